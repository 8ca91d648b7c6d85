//! `strom-lab demo`: brings the demo lab up, shows and checks what stromd does (pods,
//! Services, the matrix, NetworkPolicy: a default deny, then an allow), and takes it down.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::lab::{in_ns, State};
use crate::manifest::Manifests;
use crate::{
    matrix, place_cmd, place_ip, place_ns, print_matrix, probe, probe_ip, probe_target,
    report_policies, services, up, UpOpts,
};

/// `strom-lab demo`: up, the checks, down.
pub fn demo(dir: &Path, path: &Path, o: &UpOpts) -> anyhow::Result<bool> {
    let t0 = Instant::now();
    println!("== strom-lab demo: bringing up {} ==", path.display());
    let mut st = up(dir, path, o)?;
    let result = demo_checks(&mut st, path);
    println!("\n== tearing down ==");
    let errs = st.down();
    for e in &errs {
        eprintln!("teardown: {e}");
    }
    let ok = result?;
    println!(
        "demo finished in {:.1}s: {}",
        t0.elapsed().as_secs_f64(),
        if ok && errs.is_empty() {
            "all checks passed"
        } else {
            "SOME CHECKS FAILED"
        }
    );
    Ok(ok && errs.is_empty())
}

fn demo_checks(st: &mut State, path: &Path) -> anyhow::Result<bool> {
    println!("\n{:<14} {:<16} NETNS", "POD", "IP");
    for (k, p) in &st.pods {
        println!("{k:<14} {:<16} {}", p.ip.as_deref().unwrap_or("-"), p.netns);
    }
    let mut checks: Vec<(String, bool, String)> = Vec::new();
    let mut check = |what: &str, ok: bool, detail: String| {
        println!("{} {what}: {detail}", if ok { "[ok]  " } else { "[FAIL]" });
        checks.push((what.to_string(), ok, detail));
    };
    println!("\n== traffic through stromd ==");
    for (what, from, to, port, proto) in [
        (
            "pod -> pod, TCP (same namespace)",
            "shop/web",
            "shop/db",
            5432u16,
            "tcp",
        ),
        ("pod -> pod, UDP", "tools/client", "shop/db", 53, "udp"),
        (
            "pod -> pod, TCP (across namespaces)",
            "tools/client",
            "shop/web",
            80,
            "tcp",
        ),
        (
            "node -> pod (kubelet probe path)",
            "node",
            "shop/web",
            80,
            "tcp",
        ),
        (
            "external -> pod (routed in through the uplink)",
            "external",
            "shop/web",
            80,
            "tcp",
        ),
        ("external -> pod, UDP", "external", "shop/db", 53, "udp"),
    ] {
        let r = probe(st, from, to, port, proto, Duration::from_secs(2))?;
        check(
            what,
            r.is_ok(),
            format!(
                "{from} -> {to}:{port}/{proto}: {}",
                match &r {
                    Ok(a) => format!("answered by {a}"),
                    Err(e) => format!("no answer ({e})"),
                }
            ),
        );
    }
    println!("\n== Services through stromd (DNAT, conntrack, Maglev) ==");
    for (what, from, svc, port_name, expect) in [
        (
            "pod -> Service ClusterIP",
            "tools/client",
            "shop/frontend",
            None,
            "shop/web 198.18.16.",
        ),
        (
            "pod -> Service, named port, UDP",
            "tools/client",
            "shop/database",
            Some("dns"),
            "shop/db 198.18.16.",
        ),
        (
            "external -> NodePort (SNAT to the node)",
            "external",
            "shop/frontend",
            None,
            "shop/web 198.18.0.1:",
        ),
        (
            "node -> Service ClusterIP (its socket given a backend)",
            "node",
            "shop/frontend",
            None,
            "shop/web 198.18.0.1:",
        ),
    ] {
        let choice = services::PortChoice {
            name: port_name.map(str::to_string),
            ..Default::default()
        };
        let (ip, port, proto) = probe_target(
            st,
            &format!("svc/{svc}"),
            None,
            choice,
            false,
            from == "external",
        )?;
        let r = probe_ip(st, from, ip, port, &proto, Duration::from_secs(2))?;
        check(
            what,
            r.as_ref().is_ok_and(|a| a.starts_with(expect)),
            format!(
                "{from} -> {svc} ({ip}:{port}/{proto}): {}",
                match &r {
                    Ok(a) => format!("answered by {a} (backend, and the client it saw)"),
                    Err(e) => format!("no answer ({e})"),
                }
            ),
        );
    }
    let (ip, port, proto) = probe_target(
        st,
        "svc/shop/cache",
        None,
        services::PortChoice::default(),
        false,
        false,
    )?;
    let t = Instant::now();
    let r = probe_ip(st, "tools/client", ip, port, &proto, Duration::from_secs(2))?;
    let took = t.elapsed();
    check(
        "Service without endpoints: rejected at once",
        matches!(&r, Err(e) if e.contains("refused")) && took < Duration::from_secs(1),
        format!(
            "tools/client -> shop/cache ({ip}:{port}): {} in {} ms",
            match &r {
                Ok(a) => format!("answered by {a}"),
                Err(e) => e.clone(),
            },
            took.as_millis()
        ),
    );
    let ping = |from: &str, to: &str, extra: &[&str]| -> anyhow::Result<std::process::Output> {
        let ip = place_ip(st, to)?.to_string();
        Ok(place_cmd(st, from, "ping")?
            .args(["-c", "1", "-W", "1"])
            .args(extra)
            .arg(ip)
            .output()?)
    };
    let o = ping("shop/web", "node", &[])?;
    check(
        "pod -> node, ICMP",
        o.status.success(),
        "shop/web pings the node address".into(),
    );
    let o = ping("tools/client", "external", &[])?;
    check(
        "pod -> outside, routed out through the uplink",
        o.status.success(),
        "tools/client pings 198.18.0.2 beyond the node".into(),
    );
    let o = ping("tools/client", "shop/db", &["-t", "1"])?;
    let text = String::from_utf8_lossy(&o.stdout);
    check(
        "TTL expiry answered by the gateway",
        text.contains("Time to live exceeded"),
        text.lines().nth(1).unwrap_or("").trim().to_string(),
    );
    println!("\n== iperf3 TCP, tools/client -> shop/web, 3 s ==");
    let web = place_ns(st, "shop/web")?;
    let webip = place_ip(st, "shop/web")?.to_string();
    let _ = Command::new("ip")
        .args([
            "netns", "exec", &web, "iperf3", "-s", "-1", "-D", "-p", "5201",
        ])
        .status();
    std::thread::sleep(Duration::from_millis(300));
    let out = in_ns(&place_ns(st, "tools/client")?, "iperf3")
        .args(["-c", &webip, "-p", "5201", "-t", "3", "-J"])
        .output()?;
    let gbps = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["end"]["sum_received"]["bits_per_second"].as_f64())
        .map(|b| b / 1e9);
    check(
        "iperf3 TCP through stromd",
        gbps.is_some_and(|g| g > 0.0),
        gbps.map(|g| format!("{g:.2} Gbit/s"))
            .unwrap_or_else(|| "failed".into()),
    );
    println!("\n== reachability matrix ==");
    let cells = matrix(st)?;
    print_matrix(st, &cells);
    let all = cells.iter().all(|c| c.answer.is_ok());
    check(
        "every declared port answers (no policy yet)",
        all,
        format!("{} probes", cells.len()),
    );
    policy_part(st, path, &mut check)?;
    println!("\n== stromctl ports ==");
    stromctl(st, "ports");
    println!("\n== stromctl stats ==");
    stromctl(st, "stats");
    let failed = checks.iter().filter(|c| !c.1).count();
    println!(
        "\n== summary: {} checks, {} passed, {} failed ==",
        checks.len(),
        checks.len() - failed,
        failed
    );
    Ok(failed == 0)
}

/// The policy part: `policy/1-default-deny.yaml` of the demo's manifests, then
/// `2-allow.yaml` on top, each shown in the matrix and checked; the node reaches its pods
/// whatever the policies.
fn policy_part(
    st: &mut State,
    path: &Path,
    check: &mut impl FnMut(&str, bool, String),
) -> anyhow::Result<()> {
    let dir = path.join("policy");
    let mut m = Manifests::load(path)?;
    let steps = [
        ("1-default-deny.yaml", "default deny in shop"),
        ("2-allow.yaml", "then web from pods, db from web on sql"),
    ];
    for (i, (file, what)) in steps.into_iter().enumerate() {
        println!("\n== NetworkPolicy, step {}: {what} ({file}) ==", i + 1);
        m.network_policies
            .extend(Manifests::load(&dir.join(file))?.network_policies);
        report_policies(&st.sync_policies(&m)?);
        let cells = matrix(st)?;
        print_matrix(st, &cells);
        // Whether the matrix's cell passed; None when the matrix has no such cell.
        let allowed = |from: &str, to: &str, port: u16| {
            cells
                .iter()
                .find(|c| c.from == from && c.to == to && c.port == port)
                .map(|c| c.answer.is_ok())
        };
        let want: &[(&str, &str, u16, bool)] = if i == 0 {
            &[
                ("tools/client", "shop/web", 80, false),
                ("shop/web", "shop/db", 5432, false),
                ("shop/db", "shop/web", 80, false),
            ]
        } else {
            &[
                ("tools/client", "shop/web", 80, true),
                ("shop/db", "shop/web", 80, true),
                ("shop/web", "shop/db", 5432, true),
                ("tools/client", "shop/db", 5432, false),
                ("shop/web", "shop/db", 53, false),
            ]
        };
        for &(from, to, port, ok) in want {
            let seen = allowed(from, to, port);
            let word = |a: bool| if a { "allowed" } else { "denied" };
            check(
                &format!("policy step {}: {from} -> {to}:{port}", i + 1),
                seen == Some(ok),
                format!(
                    "{} (expected {})",
                    seen.map_or("not in the matrix", word),
                    word(ok)
                ),
            );
        }
        let r = probe(st, "node", "shop/db", 5432, "tcp", Duration::from_secs(2))?;
        check(
            &format!("policy step {}: node -> shop/db:5432", i + 1),
            r.is_ok(),
            "the node reaches its pods whatever the policies".into(),
        );
    }
    println!("\n== stromctl policy ==");
    stromctl(st, "policy");
    Ok(())
}

/// Shows `stromctl CMD` of the lab's stromd.
fn stromctl(st: &State, cmd: &str) {
    let _ = Command::new(st.settings.bin("stromctl"))
        .arg("--socket")
        .arg(st.settings.socket())
        .arg(cmd)
        .status();
}
