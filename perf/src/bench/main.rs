//! strom-bench: the benchmark matrix in one run.
//!
//! Paths (stromd and its peers) × traffic (60-byte UDP over 1, 256 and 65536 flows, iperf3 TCP
//! with 1 and 4 streams, UDP request/response round trips, new TCP connections per second),
//! in interleaved rounds: round 1 measures every path with every traffic, then round 2, and so
//! on, each round starting one path further on, so that the noise of this shared machine falls
//! on every path alike. Shows progress, prints the medians with stromd/peer ratios, writes the
//! samples as JSON, draws an SVG chart and regenerates its block of BENCHMARKS.md.
//! `strom-bench report FILE` redoes the table, chart and block from a JSON.

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};

mod chart;
mod crr;
mod paths;
mod policies;
mod report;
mod topo;
mod traffic;

use paths::{Env, Path};
use report::{Failure, Machine, Meta, PathInfo, Results, Sample};
use traffic::Traffic;

#[derive(Parser)]
#[command(
    name = "strom-bench",
    version,
    about = "Run strom's benchmark matrix against its peers"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the topology, run every path with every traffic in interleaved rounds, report.
    Run(RunArgs),
    /// Print the table and redo the chart and BENCHMARKS.md block from a run's JSON.
    Report(ReportArgs),
    /// The `crr` traffic's server, run in pod B by `run`.
    #[command(hide = true)]
    CrrServer(CrrServerArgs),
    /// The `crr` traffic's client, run in pod A by `run`; prints its counts as JSON.
    #[command(hide = true)]
    CrrClient(CrrClientArgs),
}

#[derive(clap::Args)]
struct CrrServerArgs {
    #[arg(long)]
    port: u16,
    /// Threads accepting and answering connections.
    #[arg(long, default_value_t = 2 * crr::CONNS)]
    threads: u32,
    /// Core to pin every thread to.
    #[arg(long)]
    core: Option<usize>,
}

#[derive(clap::Args)]
struct CrrClientArgs {
    /// ADDRESS:PORT to connect to.
    #[arg(long)]
    dst: std::net::SocketAddr,
    /// Connection loops at once.
    #[arg(long, default_value_t = crr::CONNS)]
    conns: u32,
    /// Seconds to open connections for.
    #[arg(long)]
    secs: f64,
    /// Core to pin every thread to.
    #[arg(long)]
    core: Option<usize>,
}

#[derive(clap::Args)]
struct Output {
    /// Draw the chart (SVG) here.
    #[arg(long, default_value = "perf/bench.svg")]
    chart: PathBuf,
    /// Regenerate the strom-bench block of this Markdown file (created if missing).
    #[arg(long, default_value = "BENCHMARKS.md")]
    markdown: PathBuf,
    /// Leave the Markdown file alone.
    #[arg(long)]
    no_markdown: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Seconds per measurement.
    #[arg(short, long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=600))]
    secs: u32,
    /// Rounds; each measures every path with every traffic once.
    #[arg(short, long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Paths, comma separated: stromd, stromd-svc (stromd with a Service: pod → VIP, DNAT
    /// and conntrack), stromd-pol (stromd with 100 NetworkPolicies selecting both pods, every
    /// flow judged and tracked; fails a measurement whose traffic they drop), stromd-generic
    /// (stromd with the pods' XDP program in generic mode, the pods' checksum offload, TSO and
    /// GSO on), kernel (Linux forwarding), kernel-nat (Linux + nftables DNAT to a Service VIP), testpmd (DPDK MAC
    /// forwarding over AF_XDP).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "stromd,stromd-svc,kernel,kernel-nat,testpmd"
    )]
    paths: Vec<String>,
    /// Traffic, comma separated: udp1, udp256, udp65536 (60-byte UDP over that many flows),
    /// tcp1, tcp4 (iperf3 streams), latency (sockperf UDP ping-pong), crr (new TCP
    /// connections per second: connect, 1-byte request, 1-byte answer, close, 8 at once),
    /// pods100 (60-byte UDP from pod A to 100 other pods, one flow each, with 110 pods on the
    /// node; stromd and kernel only).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "udp1,udp256,udp65536,tcp1,tcp4,latency,crr"
    )]
    traffic: Vec<String>,
    /// Write every sample as JSON here [default: perf/results-bench-DATE-TIME.json].
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    out: Output,
    /// Core the traffic senders are pinned to.
    #[arg(long, default_value_t = 0)]
    sender_core: usize,
    /// Core the path under test runs on [default: the last core].
    #[arg(long)]
    dut_core: Option<usize>,
    /// Move the node veths' receive work (the NAPI instances an XDP program gives them: the
    /// copy of every frame into the AF_XDP path's memory) off the sender's core, into kernel
    /// threads pinned to this core. Without it that work runs on the sending pod's core and
    /// bounds both AF_XDP paths alike; on a machine with a core to spare for it (not the
    /// sender's, not the path's), each AF_XDP path is then bound by its own core. The kernel
    /// paths have no NAPI on these veths and are not affected.
    #[arg(long)]
    napi_core: Option<usize>,
    /// Prefix of the namespaces (PREFIX-a, PREFIX-b, PREFIX-n).
    #[arg(long, default_value = "sbench")]
    prefix: String,
    /// Directory holding stromd, stromctl and strom-pktgen [default: this binary's].
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Extra stromd flags, space separated (e.g. "--fill-per-port 256"; see stromd --help).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    stromd_args: String,
    /// The pods' interface MTU on stromd's paths, as strom-cni's `localMtu` gives it (their
    /// route to each other; the default route keeps 1500). The kernel's paths keep 1500 with
    /// the pods' TSO and GSO on, as a node without stromd has them.
    #[arg(long, default_value_t = 65_000, value_parser = clap::value_parser!(u32).range(1500..=65_535))]
    pod_mtu: u32,
    /// Fail instead of installing missing Debian packages.
    #[arg(long)]
    no_install: bool,
}

#[derive(clap::Args)]
struct ReportArgs {
    /// A JSON file written by `strom-bench run`.
    json: PathBuf,
    #[command(flatten)]
    out: Output,
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Report(a) => report(a),
        Cmd::CrrServer(a) => crr::server(a.port, a.threads, a.core),
        Cmd::CrrClient(a) => crr::client(a.dst, a.conns, a.secs, a.core),
    };
    if let Err(e) = r {
        eprintln!("strom-bench: {e:#}");
        std::process::exit(1);
    }
}

fn report(a: ReportArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.json)
        .with_context(|| format!("reading {}", a.json.display()))?;
    let r: Results =
        serde_json::from_str(&text).with_context(|| format!("decoding {}", a.json.display()))?;
    publish(&r, &a.json, &a.out)
}

/// Prints the table and writes the chart and Markdown block.
fn publish(r: &Results, json: &FsPath, out: &Output) -> Result<()> {
    println!("{}", r.table());
    for f in &r.failures {
        println!(
            "failed: round {} {} {}: {}",
            f.round, f.path, f.traffic, f.error
        );
    }
    chart::svg(r, &out.chart).with_context(|| format!("drawing {}", out.chart.display()))?;
    println!("chart: {}", out.chart.display());
    if !out.no_markdown {
        let base = out.markdown.parent().unwrap_or(FsPath::new("."));
        let block = r.markdown(&relative(json, base), Some(&relative(&out.chart, base)));
        let doc = std::fs::read_to_string(&out.markdown).unwrap_or_default();
        std::fs::write(&out.markdown, report::regenerate(&doc, &block))
            .with_context(|| format!("writing {}", out.markdown.display()))?;
        println!(
            "regenerated the strom-bench block of {}",
            out.markdown.display()
        );
    }
    Ok(())
}

/// `p` relative to `base` when it lies under it (as a Markdown link from `base` needs).
fn relative(p: &FsPath, base: &FsPath) -> String {
    let canon = |x: &FsPath| {
        let x = if x.as_os_str().is_empty() {
            FsPath::new(".")
        } else {
            x
        };
        std::fs::canonicalize(x).ok()
    };
    let full = p
        .parent()
        .and_then(canon)
        .zip(p.file_name())
        .map(|(d, f)| d.join(f));
    match (full, canon(base)) {
        (Some(f), Some(b)) => f
            .strip_prefix(&b)
            .map(|r| r.display().to_string())
            .unwrap_or_else(|_| f.display().to_string()),
        _ => p.display().to_string(),
    }
}

fn run(a: RunArgs) -> Result<()> {
    if std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m))? != 0 {
        bail!("run as root: the benchmark builds network namespaces and attaches XDP programs");
    }
    let paths: Vec<Path> = a
        .paths
        .iter()
        .map(|p| Path::parse(p))
        .collect::<Result<_>>()?;
    let traffic: Vec<Traffic> = a
        .traffic
        .iter()
        .map(|t| Traffic::parse(t))
        .collect::<Result<_>>()?;
    if paths.is_empty() || traffic.is_empty() {
        bail!("nothing to measure: give at least one path and one traffic");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dut_core = a.dut_core.unwrap_or(cores - 1);
    if a.sender_core >= cores || dut_core >= cores || a.napi_core.is_some_and(|c| c >= cores) {
        bail!("this machine has cores 0-{}", cores - 1);
    }
    if let Some(c) = a.napi_core.filter(|&c| c == a.sender_core || c == dut_core) {
        eprintln!(
            "note: --napi-core {c} shares a core with the {}: the veths' receive work competes \
             with it there",
            if c == dut_core {
                "path under test"
            } else {
                "sender"
            }
        );
    }
    let bin = match &a.bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this binary's directory")?
            .to_path_buf(),
    };
    for b in ["stromd", "stromctl", "strom-pktgen"] {
        if !bin.join(b).is_file() {
            bail!(
                "{} not found (build the workspace: cargo build --release --workspace)",
                bin.join(b).display()
            );
        }
    }
    let mut packages = vec!["iproute2", "ethtool", "nftables", "iperf3", "sockperf"];
    for p in &paths {
        packages.extend_from_slice(p.packages());
    }
    install(&packages, a.no_install)?;

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    let started = sh(&["date", "-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let json = a.json.clone().unwrap_or_else(|| {
        let stamp = sh(&["date", "-u", "+%Y-%m-%d-%H%M"]).unwrap_or_else(|| "run".into());
        PathBuf::from(format!("perf/results-bench-{stamp}.json"))
    });
    let work = std::env::temp_dir().join(format!("strom-bench.{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let env = Env {
        bin,
        work: work.clone(),
        dut_core,
        sender_core: a.sender_core,
        napi_core: a.napi_core,
        stromd_args: a.stromd_args.split_whitespace().map(String::from).collect(),
        pod_mtu: a.pod_mtu,
    };
    let mut results = Results {
        meta: Meta {
            started,
            command: command_line(),
            secs: a.secs,
            rounds: a.rounds,
            paths: paths
                .iter()
                .map(|p| PathInfo {
                    name: p.name().into(),
                    scenario: p.scenario().into(),
                    description: p.describe().into(),
                })
                .collect(),
            traffic: traffic.iter().map(|t| t.name()).collect(),
            sender_core: a.sender_core,
            dut_core,
            napi_core: a.napi_core,
            machine: machine(cores),
            commit: sh(&["git", "describe", "--always", "--dirty"]),
            tools: tools(&paths),
            rotated: true,
            pod_mtu: Some(a.pod_mtu),
        },
        samples: Vec::new(),
        failures: Vec::new(),
    };

    let outcome = measure_all(&a, &paths, &traffic, &env, &stop, &mut results);
    let _ = std::fs::remove_dir_all(&work);
    outcome?;
    if let Some(dir) = json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&json, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("writing {}", json.display()))?;
    println!("samples: {}", json.display());
    publish(&results, &json, &a.out)?;
    if !results.failures.is_empty() {
        bail!(
            "{} measurement(s) failed (listed above and in the JSON)",
            results.failures.len()
        );
    }
    Ok(())
}

/// The rounds. Namespaces and processes go away when this returns, however it returns.
fn measure_all(
    a: &RunArgs,
    paths: &[Path],
    traffic: &[Traffic],
    env: &Env,
    stop: &AtomicBool,
    results: &mut Results,
) -> Result<()> {
    let extra = traffic.iter().map(|t| t.extra_pods()).max().unwrap_or(0);
    let topo = topo::Topology::create(&a.prefix, extra).context("building the topology")?;
    let served = |p: paths::Path| traffic.iter().filter(|t| p.serves(**t)).count();
    let total = a.rounds as usize * paths.iter().map(|p| served(*p)).sum::<usize>();
    let width = traffic.iter().map(|t| t.name().len()).max().unwrap_or(0);
    let (mut done, t0) = (0usize, Instant::now());
    let interrupted = || stop.load(Ordering::Relaxed);
    for round in 1..=a.rounds {
        for path in round_order(paths, round) {
            if interrupted() {
                bail!("interrupted");
            }
            let mut running = match paths::start(path, &topo, env) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("round {round}: {} did not start: {e:#}", path.name());
                    for &t in traffic.iter().filter(|t| path.serves(**t)) {
                        results
                            .failures
                            .push(Failure::new(round, path.name(), &t.name(), &e));
                    }
                    done += served(path);
                    continue;
                }
            };
            if let (Some(core), true) = (env.napi_core, path.attaches_xdp()) {
                let threads = topo.pin_napi(core).context("moving the veths' NAPI")?;
                if threads == 0 {
                    bail!(
                        "--napi-core: {} attached XDP to the node's veths, but no NAPI thread \
                         of theirs was found (does this kernel thread veth's NAPI?)",
                        path.name()
                    );
                }
            }
            // Let the path settle (XDP attached, rings filled, first neighbour lookups done).
            std::thread::sleep(Duration::from_millis(500));
            for &t in traffic.iter().filter(|t| path.serves(**t)) {
                if interrupted() {
                    bail!("interrupted");
                }
                // What the path reports about the measurement (stromd-pol: its policies dropped
                // none of it), also when it failed: policy drops would say why.
                let outcome = match (
                    traffic::measure(t, path, &topo, env, a.secs),
                    running.verify(t),
                ) {
                    (m, Ok(())) => m,
                    (Ok(_), Err(v)) => Err(v),
                    (Err(e), Err(v)) => Err(anyhow!("{v:#} (and the measurement failed: {e:#})")),
                };
                done += 1;
                let what = match &outcome {
                    Ok(m) => {
                        let mut s = Vec::new();
                        for (metric, v) in &m.values {
                            s.push(format!("{metric_key} {v:.3}", metric_key = metric.key()));
                            results.samples.push(Sample {
                                round,
                                path: path.name().into(),
                                metric: metric.key(),
                                value: *v,
                                offered_mpps: m.offered_mpps,
                                retransmits: m.retransmits,
                                failed_conns: m.failed_conns,
                            });
                        }
                        if let Some(o) = m.offered_mpps {
                            s.push(format!("(offered {o:.3} Mpps)"));
                        }
                        if let Some(r) = m.retransmits {
                            s.push(format!("({r} retransmits)"));
                        }
                        if let Some(f) = m.failed_conns {
                            s.push(format!("({f} connections failed)"));
                        }
                        s.join("  ")
                    }
                    Err(e) if interrupted() => bail!("interrupted ({e:#})"),
                    Err(e) => {
                        results
                            .failures
                            .push(Failure::new(round, path.name(), &t.name(), e));
                        format!("FAILED: {e:#}")
                    }
                };
                let elapsed = t0.elapsed().as_secs();
                let left = elapsed * (total - done) as u64 / done as u64;
                eprintln!(
                    "[{done:>3}/{total}] round {round}/{rounds} {path:<10} {t:<width$}  {what}   {e}m{es:02}s elapsed, ~{l}m{ls:02}s left",
                    rounds = a.rounds,
                    path = path.name(),
                    t = t.name(),
                    e = elapsed / 60,
                    es = elapsed % 60,
                    l = left / 60,
                    ls = left % 60,
                );
            }
            running
                .stop()
                .with_context(|| format!("stopping {}", path.name()))?;
        }
    }
    drop(topo);
    Ok(())
}

/// The paths in the order round `round` (from 1) measures them: each round starts one path
/// further on, so that no path is always the first after a path's teardown, or always
/// measured at the same distance from it. With a fixed order stromd always came first,
/// right after testpmd had gone.
fn round_order(paths: &[Path], round: u32) -> Vec<Path> {
    let mut order = paths.to_vec();
    if !order.is_empty() {
        let k = (round.saturating_sub(1) as usize) % order.len();
        order.rotate_left(k);
    }
    order
}

/// Installs the Debian packages that are missing (or names them with `--no-install`).
fn install(packages: &[&str], no_install: bool) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            sh(&["dpkg-query", "-W", "-f=${Status}", p])
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if no_install {
        bail!("missing Debian packages: {}", missing.join(" "));
    }
    eprintln!("strom-bench: installing {}", missing.join(" "));
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("apt-get install {} failed ({status})", missing.join(" "));
    }
    Ok(())
}

/// A command's trimmed standard output, or None when it fails.
fn sh(args: &[&str]) -> Option<String> {
    let out = Command::new(args[0]).args(&args[1..]).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn command_line() -> String {
    let mut args = std::env::args();
    let exe = args.next().unwrap_or_default();
    let exe = if exe.ends_with("/strom-bench") {
        "target/release/strom-bench".to_string()
    } else {
        exe
    };
    std::iter::once(exe)
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

fn machine(cores: usize) -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".into(), |(_, v)| v.trim().to_string());
    let mem_kb: f64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map_or("unknown OS".into(), |v| v.trim_matches('"').to_string());
    Machine {
        cpu,
        cores,
        memory_gib: mem_kb / 1024.0 / 1024.0,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        os,
    }
}

fn tools(paths: &[Path]) -> BTreeMap<String, String> {
    let mut names = vec!["iperf3", "sockperf", "nftables"];
    if paths.contains(&Path::Testpmd) {
        names.push("dpdk-dev");
    }
    names
        .into_iter()
        .filter_map(|n| {
            Some((
                n.to_string(),
                sh(&["dpkg-query", "-W", "-f=${Version}", n])?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::round_order;
    use crate::paths::Path;

    #[test]
    fn each_round_starts_one_path_further_on() {
        let p = [Path::Stromd, Path::Kernel, Path::Testpmd];
        assert_eq!(round_order(&p, 1), p);
        assert_eq!(
            round_order(&p, 2),
            [Path::Kernel, Path::Testpmd, Path::Stromd]
        );
        assert_eq!(
            round_order(&p, 3),
            [Path::Testpmd, Path::Stromd, Path::Kernel]
        );
        assert_eq!(round_order(&p, 4), p);
        assert_eq!(round_order(&p[..1], 2), [Path::Stromd]);
        assert!(round_order(&[], 1).is_empty());
    }
}
