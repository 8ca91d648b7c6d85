//! strom-control at a cluster's scale, against a real API server (etcd, kube-apiserver and
//! kube-controller-manager built by `scripts/k8s-bins`) and a strom-lab node's stromd:
//!
//! 1. creates through the API `--services` Services, each with one EndpointSlice of
//!    `--endpoints` endpoints (on 100 nodes, a hundredth of them the lab's), `--pods` Pods
//!    spread over the same 100 nodes (status written as the kubelet would), 10 namespaces
//!    and `--policies` NetworkPolicies;
//! 2. starts strom-control and measures the full sync (from its start to `/readyz`: every
//!    kind listed and stromd's acknowledgement of the first round, which carries everything)
//!    and the peak memory of strom-control (VmHWM) and what stromd's memory grew by;
//! 3. changes one EndpointSlice at a time, `--changes` times, and one pod's labels at a time
//!    (which recompiles the policy set), and measures each change's programming latency: from
//!    the API's acknowledgement of the write to strom-control's log line of the round that
//!    carried it to stromd (stromd acknowledged), and strom-control's own part of it (from
//!    the change received to stromd's acknowledgement).
//!
//! Prints a Markdown table. Run as root, from the workspace, built in release:
//! `target/release/strom-control-bench --services 10000 --endpoints 10 --pods 10000 --policies 1000`.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use futures::stream::{self, StreamExt};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{json, Value};
use strom_control::k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use strom_control::k8s_openapi::api::discovery::v1::EndpointSlice;
use strom_control::k8s_openapi::api::networking::v1::NetworkPolicy;
use strom_tests::k8s::{free_port, ControlPlane};
use strom_tests::{net_lock, pod, Daemon, Lab};

#[derive(Parser)]
#[command(
    about = "strom-control's full sync and programming latency at scale, against a real API server"
)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Endpoints per Service (one EndpointSlice each).
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    #[arg(long, default_value_t = 1_000)]
    policies: usize,
    /// Single changes measured, of each kind.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Requests to the API server in flight while creating.
    #[arg(long, default_value_t = 64)]
    parallel: usize,
}

const NODES: usize = 100;
const NAMESPACES: usize = 10;

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if std::env::var_os("STROM_BIN_DIR").is_none() {
        let exe = std::env::current_exe()?;
        std::env::set_var(
            "STROM_BIN_DIR",
            exe.parent().context("the binary's directory")?,
        );
    }
    let _g = net_lock();
    let cp = ControlPlane::start();
    cp.grant_strom_control();
    let lab = Lab::up(&pod("bench", "a", &[80], &[]), &[]);
    let node = lab.node_ns();
    let t = Instant::now();
    create(&cp, &a, &node)?;
    let created = t.elapsed();
    eprintln!("created the objects in {created:.1?}");

    let stromd_before = rss(lab.stromd_pid(), "VmRSS")?;
    let metrics = free_port();
    let log = lab.dir.join("strom-control.log");
    let mut cmd = Command::new(strom_tests::bin_dir().join("strom-control"));
    cmd.arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .args(["--node-name", &node, "--socket"])
        .arg(lab.socket())
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
        .env("RUST_LOG", "info,strom_control::metrics=debug");
    let t = Instant::now();
    let control = Daemon::start(cmd, &log);
    while http(metrics, "/readyz") != "ok" {
        if t.elapsed() > Duration::from_secs(600) {
            bail!("strom-control not ready in 600 s:\n{}", control.tail(20));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let sync = t.elapsed();
    let pid = control.pid().context("strom-control is not running")?;
    let control_peak = rss(pid, "VmHWM")?;
    let stromd_after = rss(lab.stromd_pid(), "VmRSS")?;
    let services_in_stromd = lab.stromctl(&["services"])["services"]
        .as_array()
        .map_or(0, Vec::len);

    let slices = measure(&log, a.changes, |i| change_slice(&cp, i % a.services, i))?;
    let labels = measure(&log, a.changes.min(20), |i| change_pod(&cp, a.pods, i))?;

    println!(
        "| strom-control at scale ({} Services × {} endpoints, {} Pods, {} NetworkPolicies, {NODES} nodes) | value |",
        a.services, a.endpoints, a.pods, a.policies
    );
    println!("|---|---|");
    println!(
        "| objects created through the API | {:.1} s |",
        created.as_secs_f64()
    );
    println!(
        "| full sync: strom-control start to ready (every kind listed, stromd acknowledged; {services_in_stromd} Service ports in stromd) | {:.2} s |",
        sync.as_secs_f64()
    );
    println!(
        "| strom-control peak memory (VmHWM) | {:.1} MiB |",
        control_peak
    );
    println!(
        "| stromd memory grown by the sync (VmRSS) | {:.1} MiB |",
        stromd_after - stromd_before
    );
    for (what, r) in [
        ("one EndpointSlice changed", &slices),
        ("one pod's labels changed (policy set recompiled)", &labels),
    ] {
        println!(
            "| {what}: API write to stromd's acknowledgement, p50 / p99 ({} changes) | {:.1} / {:.1} ms |",
            r.end_to_end.len(),
            pct(&r.end_to_end, 50.0),
            pct(&r.end_to_end, 99.0)
        );
        println!(
            "| {what}: of which strom-control (change received to acknowledgement), p50 / p99 | {:.1} / {:.1} ms |",
            pct(&r.control, 50.0),
            pct(&r.control, 99.0)
        );
    }
    Ok(())
}

/// Every object, `parallel` requests at a time.
fn create(cp: &ControlPlane, a: &Args, node: &str) -> anyhow::Result<()> {
    let c = cp.client();
    let pp = PostParams::default();
    let node_of = |i: usize| {
        if i.is_multiple_of(NODES) {
            node.to_string()
        } else {
            format!("bench-node-{}", i % NODES)
        }
    };
    cp.rt.block_on(async {
        for n in 0..NAMESPACES {
            let ns: Namespace = serde_json::from_value(json!({
                "metadata": {"name": format!("bench-{n}"), "labels": {"team": format!("t{}", n % 3)}}
            }))?;
            Api::<Namespace>::all(c.clone()).create(&pp, &ns).await?;
        }
        let ns = |i: usize| format!("bench-{}", i % NAMESPACES);
        let results: Vec<anyhow::Result<()>> = stream::iter(0..a.pods)
            .map(|i| {
                let c = c.clone();
                let pp = pp.clone();
                let node = node_of(i);
                async move {
                    let api = Api::<Pod>::namespaced(c, &ns(i));
                    let name = format!("p{i}");
                    let p: Pod = serde_json::from_value(json!({
                        "metadata": {"name": name, "labels": {"app": format!("a{}", i % 100)}},
                        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "bench",
                            "ports": [{"name": "http", "containerPort": 80}]}]}
                    }))?;
                    api.create(&pp, &p).await?;
                    let ip = addr(0xC612_4000 + i as u32); // 198.18.64.0 + i
                    let status = json!({"status": {"phase": "Running", "podIP": ip,
                        "podIPs": [{"ip": ip}], "conditions": [{"type": "Ready", "status": "True"}]}});
                    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                        .await?;
                    Ok(())
                }
            })
            .buffer_unordered(a.parallel)
            .collect()
            .await;
        results.into_iter().collect::<anyhow::Result<()>>()?;
        let results: Vec<anyhow::Result<()>> = stream::iter(0..a.services)
            .map(|i| {
                let c = c.clone();
                let pp = pp.clone();
                let endpoints: Vec<Value> = (0..a.endpoints)
                    .map(|j| {
                        let k = (i * a.endpoints + j) as u32;
                        json!({"addresses": [addr(0xC612_8000 + k % 32768)],
                            "conditions": {"ready": true}, "nodeName": node_of(k as usize)})
                    })
                    .collect();
                let port = 8080 + (i * a.endpoints) / 32768;
                async move {
                    let name = format!("s{i}");
                    let svc: Service = serde_json::from_value(json!({
                        "metadata": {"name": name},
                        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": port}]}
                    }))?;
                    Api::<Service>::namespaced(c.clone(), &ns(i)).create(&pp, &svc).await?;
                    let slice: EndpointSlice = serde_json::from_value(json!({
                        "metadata": {"name": format!("{name}-1"),
                            "labels": {"kubernetes.io/service-name": name}},
                        "addressType": "IPv4",
                        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
                        "endpoints": endpoints,
                    }))?;
                    Api::<EndpointSlice>::namespaced(c, &ns(i)).create(&pp, &slice).await?;
                    Ok(())
                }
            })
            .buffer_unordered(a.parallel)
            .collect()
            .await;
        results.into_iter().collect::<anyhow::Result<()>>()?;
        let results: Vec<anyhow::Result<()>> = stream::iter(0..a.policies)
            .map(|i| {
                let c = c.clone();
                let pp = pp.clone();
                async move {
                    let np: NetworkPolicy = serde_json::from_value(json!({
                        "metadata": {"name": format!("np{i}")},
                        "spec": {
                            "podSelector": {"matchLabels": {"app": format!("a{}", i % 100)}},
                            "ingress": [{"from": [
                                {"podSelector": {"matchLabels": {"app": format!("a{}", (i + 1) % 100)}}},
                                {"namespaceSelector": {"matchLabels": {"team": format!("t{}", i % 3)}}}
                            ], "ports": [{"port": "http"}]}]
                        }
                    }))?;
                    Api::<NetworkPolicy>::namespaced(c, &ns(i)).create(&pp, &np).await?;
                    Ok(())
                }
            })
            .buffer_unordered(a.parallel)
            .collect()
            .await;
        results.into_iter().collect::<anyhow::Result<()>>()
    })
}

fn addr(n: u32) -> String {
    std::net::Ipv4Addr::from(n).to_string()
}

/// Change `i`: Service `s{service}`'s slice gets a different last endpoint.
fn change_slice(cp: &ControlPlane, service: usize, i: usize) -> anyhow::Result<String> {
    let ns = format!("bench-{}", service % NAMESPACES);
    let name = format!("s{service}");
    let api = Api::<EndpointSlice>::namespaced(cp.client(), &ns);
    cp.rt.block_on(async {
        let mut s = api.get(&format!("{name}-1")).await?;
        if let Some(last) = s.endpoints.last_mut() {
            last.addresses = vec![addr(0xC613_0000 + i as u32)]; // 198.19.0.0 + i
        }
        s.metadata.managed_fields = None;
        api.replace(&format!("{name}-1"), &PostParams::default(), &s)
            .await?;
        anyhow::Ok(())
    })?;
    Ok(format!("\"{ns}/{name}\""))
}

/// Change `i`: a pod of the lab's node (of `pods`) gets a label the policies select by.
fn change_pod(cp: &ControlPlane, pods: usize, i: usize) -> anyhow::Result<String> {
    // Pods p0, p100, ... are on the lab's node.
    let p = (i * NODES) % pods.max(1);
    let ns = format!("bench-{}", p % NAMESPACES);
    let api = Api::<Pod>::namespaced(cp.client(), &ns);
    cp.rt.block_on(async {
        let patch = json!({"metadata": {"labels": {"app": format!("a{}", (i + 7) % 100)}}});
        api.patch(
            &format!("p{p}"),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        anyhow::Ok(())
    })?;
    // Whichever round comes next: nothing else changes meanwhile.
    Ok(String::new())
}

/// Latencies of a series of changes, in ms.
struct Latencies {
    end_to_end: Vec<f64>,
    control: Vec<f64>,
}

/// Makes `n` changes one at a time; after each, waits for the round carrying it (a line of
/// strom-control's log with `marker`).
fn measure(
    log: &std::path::Path,
    n: usize,
    mut change: impl FnMut(usize) -> anyhow::Result<String>,
) -> anyhow::Result<Latencies> {
    let mut r = Latencies {
        end_to_end: Vec::new(),
        control: Vec::new(),
    };
    for i in 0..n {
        let from = std::fs::read_to_string(log)?.len();
        let marker = change(i)?;
        let t = Instant::now();
        loop {
            let text = std::fs::read_to_string(log)?;
            if let Some(line) = text[from..]
                .lines()
                .find(|l| l.contains("programmed stromd") && l.contains(&marker))
            {
                r.end_to_end.push(t.elapsed().as_secs_f64() * 1e3);
                if let Some(ms) = line
                    .split("latency_ms=")
                    .nth(1)
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<f64>().ok())
                {
                    r.control.push(ms);
                }
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("change {i} ({marker}) not programmed in 30 s");
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    Ok(r)
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[i]
}

/// A memory figure of a process in MiB (`VmRSS`, `VmHWM`).
fn rss(pid: u32, field: &str) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{field} of {pid}"))?;
    Ok(kb / 1024.0)
}

fn http(port: u16, path: &str) -> String {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "2",
            &format!("http://127.0.0.1:{port}{path}"),
        ])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
