//! strom-bench end to end, short: two paths, four kinds of traffic, one round of 1 s.
//!
//! ```text
//!   ns zsb<pid>-a (pod A) ══ veth ══ ns zsb<pid>-n: stromd | nftables DNAT ══ veth ══ ns zsb<pid>-b (pod B)
//! ```
//! Not a timed test: it checks that every measurement gives a number (so the paths forward:
//! stromd pod → pod, the kernel translating the Service VIP), that the JSON, the chart and the
//! regenerated Markdown block are written, the text around the block is kept, and that nothing
//! is left behind. Needs root, iperf3, sockperf and nftables (scripts/setup installs them).

use std::path::PathBuf;
use std::process::Command;

#[test]
fn a_short_run_measures_every_path_and_regenerates_its_block() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_strom-bench"));
    let dir = std::env::temp_dir().join(format!("strom-bench-test.{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, chart, md) = (dir.join("r.json"), dir.join("c.svg"), dir.join("B.md"));
    std::fs::write(
        &md,
        "# benchmarks\n\nbefore\n\n<!-- strom-bench:begin old -->\nstale numbers\n<!-- strom-bench:end -->\n\nafter\n",
    )
    .unwrap();
    let prefix = format!("zsb{}", std::process::id());
    let out = Command::new(&exe)
        .args(["run", "--secs", "1", "--rounds", "1", "--no-install"])
        .args([
            "--paths",
            "stromd,kernel-nat",
            "--traffic",
            "udp256,tcp1,latency,crr",
        ])
        .args(["--prefix", &prefix])
        .arg("--json")
        .arg(&json)
        .arg("--chart")
        .arg(&chart)
        .arg("--markdown")
        .arg(&md)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&left.stdout).to_string();
    let results = std::fs::read_to_string(&json);
    let chart_text = std::fs::read_to_string(&chart).unwrap_or_default();
    let doc = std::fs::read_to_string(&md).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);

    assert!(
        out.status.success(),
        "strom-bench failed:\n{stdout}\n{stderr}"
    );
    assert!(!left.contains(&prefix), "namespaces left behind: {left}");
    // Progress went to stderr, one line per measurement.
    assert_eq!(stderr.matches("round 1/1").count(), 8, "{stderr}");

    let r: serde_json::Value = serde_json::from_str(&results.unwrap()).unwrap();
    let samples = r["samples"].as_array().unwrap();
    for path in ["stromd", "kernel-nat"] {
        for metric in [
            "udp_mpps_256_flows",
            "tcp_gbps_1_streams",
            "rtt_p50_us",
            "rtt_p99_us",
            "tcp_conns_per_s",
        ] {
            let s = samples
                .iter()
                .find(|s| s["path"] == path && s["metric"] == metric)
                .unwrap_or_else(|| panic!("no {metric} for {path}: {r}"));
            assert!(s["value"].as_f64().unwrap() > 0.0, "{path} {metric}: {s}");
            if metric.starts_with("udp") {
                assert!(s["offered_mpps"].as_f64().unwrap() > 0.0, "{s}");
            }
            if metric.starts_with("tcp_gbps") {
                assert!(s["retransmits"].is_u64(), "{s}");
            }
            if metric == "tcp_conns_per_s" {
                assert!(s["failed_conns"].is_u64(), "{s}");
            }
        }
    }
    assert!(r["failures"].as_array().unwrap().is_empty(), "{r}");
    assert_eq!(
        r["meta"]["paths"][1]["scenario"],
        "pod → Service VIP (DNAT to pod B)"
    );

    assert!(chart_text.starts_with("<svg") && chart_text.contains("TCP Gbit/s, 1 stream"));
    assert!(
        doc.starts_with("# benchmarks\n\nbefore\n\n<!-- strom-bench:begin"),
        "{doc}"
    );
    assert!(
        doc.ends_with("<!-- strom-bench:end -->\n\nafter\n"),
        "{doc}"
    );
    assert!(!doc.contains("stale numbers"), "{doc}");
    assert!(doc.contains("| stromd / kernel-nat |"), "{doc}");
    assert!(
        doc.contains("![medians per path, bars from lowest to highest round](c.svg)"),
        "{doc}"
    );
    assert!(stdout.contains("| path | scenario |"), "{stdout}");
}
