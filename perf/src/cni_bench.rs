//! strom-cni-bench: ADD and DEL latency of strom-cni, side by side with the reference bridge +
//! host-local plugins, called as a runtime calls them, plus the pod creation and deletion rates
//! with parallel callers. Everything runs in namespaces it creates (prefix `cb`), on a strom-lab node.
//!
//!   strom-cni-bench [--pods 100] [--parallel 8] [--rounds 2]
#![deny(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "CNI ADD/DEL latency: strom-cni vs bridge + host-local")]
struct Args {
    /// Pods per measurement.
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// Parallel callers for the creation- and deletion-rate measurements.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// Interleaved rounds (strom, reference, strom, reference, ...).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Where stromd, strom-cni and strom-lab are (default: beside this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Directory of the reference plugins.
    #[arg(long, default_value = "/usr/lib/cni")]
    ref_dir: PathBuf,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

const PREFIX: &str = "cb";
const LAB: &str = "/run/strom-cni-bench";

struct Plugin {
    name: &'static str,
    binary: PathBuf,
    conf: Value,
}

fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    let o = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    if !o.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

/// One plugin call; returns its duration.
fn call(
    node: &str,
    p: &Plugin,
    command: &str,
    id: &str,
    netns: &str,
    cni_path: &str,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{node}"))
        .arg(&p.binary)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", format!("/run/netns/{netns}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni_path)
        .env("CNI_ARGS", "IgnoreUnknown=1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(p.conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let d = t.elapsed();
    if !out.status.success() {
        bail!(
            "{} {command} {id}: {}",
            p.name,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(d)
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

struct Row {
    plugin: &'static str,
    add: Vec<Duration>,
    del: Vec<Duration>,
    rate: Vec<f64>,
    del_rate: Vec<f64>,
}

/// Calls `verb` for every pod `par{i}` from `parallel` callers at once (pod i from caller
/// i mod `parallel`); pods per second.
fn in_parallel(
    node: &str,
    p: &Plugin,
    verb: &str,
    nss: &[String],
    parallel: usize,
    cni_path: &str,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let hs: Vec<_> = (0..parallel)
            .map(|w| {
                s.spawn(move || -> anyhow::Result<()> {
                    for (i, ns) in nss.iter().enumerate().filter(|(i, _)| i % parallel == w) {
                        call(node, p, verb, &format!("par{i}"), ns, cni_path)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join().map_err(|_| anyhow::anyhow!("caller panicked"))??;
        }
        Ok(())
    })?;
    Ok(nss.len() as f64 / t.elapsed().as_secs_f64())
}

fn measure(
    node: &str,
    p: &Plugin,
    pods: usize,
    parallel: usize,
    cni_path: &str,
    row: &mut Row,
) -> anyhow::Result<()> {
    let nss: Vec<String> = (0..pods).map(|i| format!("{PREFIX}-pod{i}")).collect();
    for (i, ns) in nss.iter().enumerate() {
        row.add
            .push(call(node, p, "ADD", &format!("seq{i}"), ns, cni_path)?);
    }
    for (i, ns) in nss.iter().enumerate() {
        row.del
            .push(call(node, p, "DEL", &format!("seq{i}"), ns, cni_path)?);
    }
    row.rate
        .push(in_parallel(node, p, "ADD", &nss, parallel, cni_path)?);
    row.del_rate
        .push(in_parallel(node, p, "DEL", &nss, parallel, cni_path)?);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let bin = match a.bin_dir.clone() {
        Some(b) => b,
        None => std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .to_path_buf(),
    };
    let lab = |args: &[&str]| {
        Command::new(bin.join("strom-lab"))
            .arg("--dir")
            .arg(LAB)
            .args(args)
            .status()
    };
    let _ = lab(&["down", "--prefix", PREFIX]);
    let empty = std::env::temp_dir().join("strom-cni-bench-empty.yaml");
    std::fs::write(&empty, "")?;
    if !lab(&["up", empty.to_str().context("path")?, "--prefix", PREFIX])?.success() {
        bail!("strom-lab up failed");
    }
    let result = run(&a, &bin);
    let _ = lab(&["down", "--prefix", PREFIX]);
    result
}

fn run(a: &Args, bin: &Path) -> anyhow::Result<()> {
    let node = format!("{PREFIX}-node");
    for i in 0..a.pods {
        sh(Command::new("ip").args(["netns", "add", &format!("{PREFIX}-pod{i}")]))?;
    }
    let strom = Plugin {
        name: "strom-cni",
        binary: bin.join("strom-cni"),
        conf: json!({"cniVersion": "1.0.0", "name": "bench-strom", "type": "strom-cni",
            "socket": format!("{LAB}/stromd.sock"),
            "ipam": {"type": "strom", "subnet": "198.18.16.0/20", "dataDir": format!("{LAB}/bench-ipam")}}),
    };
    let reference = Plugin {
        name: "bridge+host-local",
        binary: a.ref_dir.join("bridge"),
        conf: json!({"cniVersion": "1.0.0", "name": "bench-bridge", "type": "bridge", "bridge": "cbr0",
            "isGateway": true, "ipMasq": false,
            "ipam": {"type": "host-local", "subnet": "198.18.64.0/20", "dataDir": format!("{LAB}/bench-host-local")}}),
    };
    let cni_path = format!("{}:{}", bin.display(), a.ref_dir.display());
    let mut rows = [
        Row {
            plugin: strom.name,
            add: vec![],
            del: vec![],
            rate: vec![],
            del_rate: vec![],
        },
        Row {
            plugin: reference.name,
            add: vec![],
            del: vec![],
            rate: vec![],
            del_rate: vec![],
        },
    ];
    for round in 1..=a.rounds {
        for (p, row) in [&strom, &reference].into_iter().zip(rows.iter_mut()) {
            eprintln!(
                "round {round}/{}: {} ({} pods, then {} parallel callers)",
                a.rounds, p.name, a.pods, a.parallel
            );
            measure(&node, p, a.pods, a.parallel, &cni_path, row)?;
        }
    }
    println!(
        "{:<18} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>14} {:>14}",
        "plugin",
        "ADD p50",
        "ADD p90",
        "ADD p99",
        "DEL p50",
        "DEL p90",
        "DEL p99",
        "ADD pods/s",
        "DEL pods/s"
    );
    let mut out = Vec::new();
    for r in rows.iter_mut() {
        // Samples in call order for the JSON, before `pct` sorts them.
        let ms = |v: &[Duration]| -> Vec<f64> { v.iter().map(|d| d.as_secs_f64() * 1e3).collect() };
        let (add_ms, del_ms) = (ms(&r.add), ms(&r.del));
        let (a50, a90, a99) = (
            pct(&mut r.add, 0.5),
            pct(&mut r.add, 0.9),
            pct(&mut r.add, 0.99),
        );
        let (d50, d90, d99) = (
            pct(&mut r.del, 0.5),
            pct(&mut r.del, 0.9),
            pct(&mut r.del, 0.99),
        );
        r.rate.sort_by(f64::total_cmp);
        r.del_rate.sort_by(f64::total_cmp);
        let rate = r.rate[r.rate.len() / 2];
        let del_rate = r.del_rate[r.del_rate.len() / 2];
        println!(
            "{:<18} {a50:>7.1}ms {a90:>7.1}ms {a99:>7.1}ms {d50:>7.1}ms {d90:>7.1}ms {d99:>7.1}ms {rate:>14.1} {del_rate:>14.1}",
            r.plugin
        );
        out.push(
            json!({"plugin": r.plugin, "add_p50_ms": a50, "add_p90_ms": a90, "add_p99_ms": a99,
            "del_p50_ms": d50, "del_p90_ms": d90, "del_p99_ms": d99, "pods_per_s": rate,
            "pods_per_s_rounds": r.rate, "del_pods_per_s": del_rate,
            "del_pods_per_s_rounds": r.del_rate, "calls": r.add.len(), "add_ms": add_ms, "del_ms": del_ms}),
        );
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}
