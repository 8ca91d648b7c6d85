//! strom-lab: a Kubernetes node in network namespaces, wired by strom-cni and served by stromd.
#![deny(unsafe_code)]

mod demo;
mod lab;
mod manifest;
mod net;
mod policy;
mod services;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::json;

use lab::{in_ns, Settings, State};
use manifest::Manifests;

#[derive(Parser)]
#[command(
    version,
    about = "A Kubernetes node in network namespaces, served by strom"
)]
struct Args {
    /// Where the lab keeps its state, logs and sockets.
    #[arg(
        long,
        global = true,
        default_value = "/run/strom-lab",
        env = "STROM_LAB_DIR"
    )]
    dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct UpOpts {
    /// Prefix of every namespace the lab creates.
    #[arg(long, default_value = "sl")]
    prefix: String,
    /// Where stromd, strom-cni and stromctl are (default: beside strom-lab).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The node's pod CIDR.
    #[arg(long, default_value = "198.18.16.0/20")]
    pod_cidr: String,
    /// stromd workers.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// stromd poll mode (busy or adaptive).
    #[arg(long, default_value = "adaptive")]
    poll_mode: String,
    /// Cores to pin stromd's workers to, comma separated (default: not pinned).
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
    /// Receive/transmit queues of the uplink veth (stromd opens a socket per receive queue,
    /// as on a multi-queue NIC).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    uplink_queues: u16,
    /// Flows each stromd worker tracks at most (`conntrack_max` in `[dataplane]`; default:
    /// stromd's).
    #[arg(long)]
    conntrack_max: Option<usize>,
    /// The pods' interface MTU toward the node's other pods (strom-cni's `localMtu`; default:
    /// strom-cni's, 65000). At or below the path MTU (1450 here) the pods have one MTU.
    #[arg(long)]
    local_mtu: Option<u32>,
    /// How stromd attaches the pods' XDP program (`pod_xdp` in `[dataplane]`: native or
    /// generic; default: stromd's, native).
    #[arg(long, value_parser = ["native", "generic"])]
    pod_xdp: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the node, stromd, every Pod of PATH (a manifest file or a directory), and its
    /// Services in stromd (ClusterIPs from 198.19.0.0/16).
    Up {
        path: PathBuf,
        #[command(flatten)]
        opts: UpOpts,
    },
    /// Apply PATH again: pods added or removed are wired or unwired, pods whose ports or
    /// address changed are rewired, label changes are applied to the running pod; Services
    /// are set again (their endpoints from the pods' labels now), those gone are removed.
    Apply { path: PathBuf },
    /// Pods, addresses and the dataplane's state.
    Status,
    /// Run a command inside a pod (NS/POD), the node (node) or the outside world (external).
    Exec {
        target: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Connect from one place to another: prints allow (and who answered, and the client
    /// address it saw) or deny; exits 0 on allow, 1 on deny, 2 when the probe cannot be made
    /// here (SCTP on a kernel without it).
    ///
    /// --to is a pod (NS/POD), node, external or an address, with --port; or a Service
    /// (NS/SERVICE, or svc/NS/SERVICE when a pod has the same name): from a pod or the node
    /// its ClusterIP, from external its NodePort on the node's address (--lb: its first
    /// load-balancer address), on the Service port picked by --port-name, --port (the
    /// Service port's number) and --protocol, or its first port.
    Probe {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        port: Option<u16>,
        /// A Service port's name.
        #[arg(long)]
        port_name: Option<String>,
        /// To a Service: its first load-balancer address (from external: rather than its
        /// NodePort).
        #[arg(long)]
        lb: bool,
        /// To a Service from a pod or the node: its NodePort on the node's address (from
        /// external that is the default).
        #[arg(long)]
        node_port: bool,
        /// tcp (the default for a pod), udp or sctp; for a Service, the port's own.
        #[arg(long)]
        protocol: Option<String>,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// Every pod to every pod over every declared port and protocol.
    Matrix {
        #[arg(long)]
        json: bool,
    },
    /// Stop stromd (SIGTERM) or start it again, to watch pods keep their wiring.
    Stromd {
        #[arg(value_parser = ["stop", "start", "restart"])]
        action: String,
    },
    /// Remove everything the lab made (also after a crash).
    Down {
        /// Namespace prefix to sweep when no state is left.
        #[arg(long, default_value = "sl")]
        prefix: String,
    },
    /// The main job: bring up configs/demo, show traffic through stromd, tear down.
    Demo {
        #[arg(long, default_value = "configs/demo")]
        path: PathBuf,
        #[command(flatten)]
        opts: UpOpts,
    },
    #[command(hide = true)]
    Responder {
        #[arg(long)]
        name: String,
        #[arg(long)]
        tcp: Vec<u16>,
        #[arg(long)]
        udp: Vec<u16>,
        #[arg(long)]
        sctp: Vec<u16>,
        /// TCP ports whose connections are held open (answered again on every read).
        #[arg(long)]
        hold_tcp: Vec<u16>,
    },
    /// Holds TCP connections open across a change (net::hold).
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        ip: IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    #[command(hide = true)]
    Connect {
        /// One target, or several: then they are probed in parallel (16 at a time) and each
        /// gets a line, "allow ANSWER" or "deny REASON", in the order given.
        #[arg(long, required = true)]
        ip: Vec<IpAddr>,
        /// Answer in lines ("allow ANSWER" or "deny REASON", one per target) even for one
        /// target, exiting 0 (the matrix reads these).
        #[arg(long)]
        lines: bool,
        /// Probe the targets this many times over (new connections each time), in lines.
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        protocol: String,
        #[arg(long)]
        timeout_ms: u64,
    },
}

fn settings(dir: &std::path::Path, o: &UpOpts) -> anyhow::Result<Settings> {
    let bin_dir = match &o.bin_dir {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .to_path_buf(),
    };
    if o.prefix.is_empty()
        || o.prefix.len() > 12
        || !o
            .prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        bail!("--prefix must be 1-12 characters of [A-Za-z0-9-]");
    }
    Ok(Settings {
        dir: dir.to_path_buf(),
        prefix: o.prefix.clone(),
        bin_dir,
        pod_cidr: o.pod_cidr.clone(),
        workers: o.workers,
        poll_mode: o.poll_mode.clone(),
        uplink_queues: o.uplink_queues,
        cores: o.cores.clone(),
        conntrack_max: o.conntrack_max,
        local_mtu: o.local_mtu,
        pod_xdp: o.pod_xdp.clone(),
    })
}

fn report(m: &Manifests) {
    for i in &m.invalid {
        eprintln!("skipped (invalid): {i}");
    }
    if !m.ignored.is_empty() {
        eprintln!("not acted on by the lab yet: {}", m.ignored.join(", "));
    }
}

/// Says what a Services sync did.
fn report_services(done: &services::ServicesApplied) {
    for r in &done.refused {
        eprintln!("Service skipped: {r}");
    }
    if !done.programmed.is_empty() || !done.removed.is_empty() {
        println!(
            "services set: {}; removed: {}",
            done.programmed.join(", "),
            done.removed.join(", ")
        );
    }
}

fn up(dir: &std::path::Path, path: &std::path::Path, o: &UpOpts) -> anyhow::Result<State> {
    let m = Manifests::load(path)?;
    report(&m);
    let mut st = up_pods(dir, &m, o)?;
    if !m.services.is_empty() {
        match st.sync_services(&m) {
            Ok(done) => report_services(&done),
            Err(e) => {
                let errs = st.down();
                bail!("services: {e:#} (teardown: {})", errs.join("; "));
            }
        }
    }
    if !m.network_policies.is_empty() {
        match st.sync_policies(&m) {
            Ok(done) => report_policies(&done),
            Err(e) => {
                let errs = st.down();
                bail!("policies: {e:#} (teardown: {})", errs.join("; "));
            }
        }
    }
    Ok(st)
}

/// Says what a policy sync did.
fn report_policies(done: &policy::PoliciesApplied) {
    for r in &done.rejected {
        eprintln!("NetworkPolicy rejected (it isolates what it selects, allowing nothing): {r}");
    }
    if done.changed {
        println!(
            "policies set: {} polic{}, {} pod(s) isolated",
            done.policies,
            if done.policies == 1 { "y" } else { "ies" },
            done.isolated
        );
    }
}

fn up_pods(dir: &std::path::Path, m: &Manifests, o: &UpOpts) -> anyhow::Result<State> {
    let mut st = State::up_node(settings(dir, o)?)?;
    for p in m.pods.clone() {
        let key = p.key();
        if let Err(e) = st.add_pod(p) {
            let errs = st.down();
            bail!(
                "pod {key}: {e:#}{}",
                if errs.is_empty() {
                    String::new()
                } else {
                    format!(" (teardown: {})", errs.join("; "))
                }
            );
        }
    }
    Ok(st)
}

/// Resolves a place to a namespace.
fn place_ns(st: &State, place: &str) -> anyhow::Result<String> {
    match place {
        "external" => Ok(st.settings.ext_ns()),
        "node" => Ok(st.settings.node_ns()),
        key => st
            .pods
            .get(key)
            .map(|p| p.netns.clone())
            .with_context(|| format!("no pod {key} (or node, external)")),
    }
}

/// A command run at a place: in a pod's namespace, or the node's namespace and cgroup (where
/// stromd serves its sockets' Services), or external's namespace.
fn place_cmd(
    st: &State,
    place: &str,
    prog: impl AsRef<std::ffi::OsStr>,
) -> anyhow::Result<std::process::Command> {
    if place == "node" {
        return Ok(lab::in_node(&st.settings, prog));
    }
    Ok(in_ns(&place_ns(st, place)?, prog))
}

/// Resolves a destination to an address.
fn place_ip(st: &State, place: &str) -> anyhow::Result<IpAddr> {
    if let Ok(ip) = place.parse() {
        return Ok(ip);
    }
    match place {
        "external" => Ok(lab::EXT_ADDR.parse()?),
        "node" => Ok(lab::NODE_ADDR.parse()?),
        key => st
            .pods
            .get(key)
            .and_then(|p| p.ip.as_deref())
            .with_context(|| format!("no pod {key}"))?
            .parse()
            .map_err(Into::into),
    }
}

/// Ok(answer) or Err(reason).
fn probe(
    st: &State,
    from: &str,
    to: &str,
    port: u16,
    protocol: &str,
    timeout: Duration,
) -> anyhow::Result<Result<String, String>> {
    probe_ip(st, from, place_ip(st, to)?, port, protocol, timeout)
}

/// Where `strom-lab probe` goes: (address, port, protocol).
fn probe_target(
    st: &State,
    to: &str,
    port: Option<u16>,
    choice: services::PortChoice,
    lb: bool,
    node_port: bool,
) -> anyhow::Result<(IpAddr, u16, String)> {
    let (key, forced) = match to.strip_prefix("svc/") {
        Some(k) => (k, true),
        None => (to, false),
    };
    let plain = !forced
        && (st.pods.contains_key(key)
            || matches!(key, "node" | "external")
            || key.parse::<IpAddr>().is_ok());
    if plain {
        if choice.name.is_some() || lb {
            bail!("--port-name and --lb are for Services; {to} is not one");
        }
        let port = port.context("--port is needed for a pod, the node or an address")?;
        let protocol = choice.protocol.map_or("tcp", |p| p.name());
        return Ok((place_ip(st, key)?, port, protocol.to_string()));
    }
    let choice = services::PortChoice { port, ..choice };
    let (ip, port, protocol) = st.service_target(key, node_port, lb, &choice)?;
    Ok((ip, port, protocol.name().to_string()))
}

/// Ok(answer) or Err(reason), to an address.
fn probe_ip(
    st: &State,
    from: &str,
    ip: IpAddr,
    port: u16,
    protocol: &str,
    timeout: Duration,
) -> anyhow::Result<Result<String, String>> {
    let out = place_cmd(st, from, std::env::current_exe()?)?
        .args([
            "connect",
            "--ip",
            &ip.to_string(),
            "--port",
            &port.to_string(),
            "--protocol",
            protocol,
            "--timeout-ms",
            &timeout.as_millis().to_string(),
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(if out.status.success() {
        Ok(text)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    })
}

struct Cell {
    from: String,
    to: String,
    port: u16,
    protocol: String,
    answer: Result<String, String>,
}

/// Connections one `connect --lines` keeps open at once. Its SYNs then leave the pod in
/// bursts of at most this many, within what a quiet port's fill ring holds (`fill_min`, 32):
/// a pod that opens a hundred connections in the same instant loses the excess of that burst
/// until stromd deepens its ring (docs/design.md, "What the floor does not cover"), and TCP
/// sends those SYNs again only after a second, past the matrix's timeout.
const PROBES_IN_FLIGHT: usize = 16;

/// Whether the matrix probes `protocol` here (SCTP only where the kernel has it).
fn probed(protocol: &str, sctp: bool) -> bool {
    protocol != "sctp" || sctp
}

/// Probes from `from` every `(key, ip)` in `targets` on one port and protocol: one process
/// in `from`'s namespace, one connection per target in parallel; the answers per target, in
/// order.
fn probe_many(
    st: &State,
    from: &str,
    targets: &[(String, IpAddr)],
    port: u16,
    protocol: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<(String, Result<String, String>)>> {
    let mut cmd = place_cmd(st, from, std::env::current_exe()?)?;
    cmd.args([
        "connect",
        "--lines",
        "--port",
        &port.to_string(),
        "--protocol",
        protocol,
    ])
    .args(["--timeout-ms", &timeout.as_millis().to_string()]);
    for (_, ip) in targets {
        cmd.args(["--ip", &ip.to_string()]);
    }
    let out = cmd.stdin(std::process::Stdio::null()).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // One line per target, in order: "allow ANSWER" or "deny REASON".
    let lines: Vec<&str> = text.lines().collect();
    Ok(targets
        .iter()
        .enumerate()
        .map(|(i, (key, _))| {
            let answer = match lines.get(i).map(|l| l.split_once(' ').unwrap_or((l, ""))) {
                Some(("allow", a)) => Ok(a.to_string()),
                Some((_, r)) => Err(r.to_string()),
                None => Err(format!(
                    "no answer from the prober: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
            };
            (key.clone(), answer)
        })
        .collect())
}

/// Every pod to every port some pod serves, the sources at once (a denied probe costs its
/// timeout, so the matrix costs about one per port served).
fn matrix(st: &State) -> anyhow::Result<Vec<Cell>> {
    let sctp = net::sctp_supported();
    let declared = st
        .pods
        .values()
        .any(|p| p.decl.ports.iter().any(|d| d.protocol == "sctp"));
    if declared && !sctp {
        eprintln!("SCTP ports left out: {}", net::NO_SCTP);
    }
    // Every (port, protocol) some pod serves, and the pods that serve it.
    let mut served: BTreeMap<(u16, String), Vec<(String, IpAddr)>> = BTreeMap::new();
    for (to, p) in &st.pods {
        for d in &p.decl.ports {
            if probed(&d.protocol, sctp) {
                served
                    .entry((d.port, d.protocol.clone()))
                    .or_default()
                    .push((to.clone(), place_ip(st, to)?));
            }
        }
    }
    // Each source in a thread of its own, its ports one after the other: a pod's probes of
    // one port go out at once, within what its quiet port takes in one burst.
    let rows: Vec<anyhow::Result<Vec<Cell>>> = std::thread::scope(|scope| {
        let served = &served;
        let threads: Vec<_> = st
            .pods
            .keys()
            .map(|from| {
                scope.spawn(move || -> anyhow::Result<Vec<Cell>> {
                    let mut row = Vec::new();
                    for ((port, protocol), targets) in served {
                        let answers = probe_many(
                            st,
                            from,
                            targets,
                            *port,
                            protocol,
                            Duration::from_millis(1000),
                        )?;
                        for (to, answer) in answers {
                            row.push(Cell {
                                from: from.clone(),
                                to,
                                port: *port,
                                protocol: protocol.to_string(),
                                answer,
                            });
                        }
                    }
                    Ok(row)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a prober thread panicked")))
            })
            .collect()
    });
    let mut cells = Vec::new();
    for r in rows {
        cells.extend(r?);
    }
    Ok(cells)
}

fn print_matrix(st: &State, cells: &[Cell]) {
    let sctp = net::sctp_supported();
    let cols: Vec<String> = st
        .pods
        .iter()
        .flat_map(|(k, p)| {
            p.decl
                .ports
                .iter()
                .filter(move |d| probed(&d.protocol, sctp))
                .map(move |d| format!("{k}:{}/{}", d.port, d.protocol))
        })
        .collect();
    let w = st.pods.keys().map(|k| k.len()).max().unwrap_or(4).max(4);
    println!(
        "{:w$}  {}",
        "from \\ to",
        (0..cols.len())
            .map(|i| format!("[{i}]"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    for from in st.pods.keys() {
        let row: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let ok = cells
                    .iter()
                    .find(|x| {
                        &x.from == from && format!("{}:{}/{}", x.to, x.port, x.protocol) == *c
                    })
                    .is_some_and(|x| x.answer.is_ok());
                format!(
                    "{:^w$}",
                    if ok { "." } else { "X" },
                    w = format!("[{i}]").len()
                )
            })
            .collect();
        println!("{from:w$}  {}", row.join(" "));
    }
    for (i, c) in cols.iter().enumerate() {
        println!("  [{i}] {c}");
    }
    println!("  . = allowed (answered by the target), X = denied");
}

fn exec_in(st: &State, target: &str, cmd: &[String]) -> anyhow::Result<i32> {
    let status = place_cmd(st, target, &cmd[0])?.args(&cmd[1..]).status()?;
    Ok(status.code().unwrap_or(1))
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    match a.cmd {
        Cmd::Up { path, opts } => {
            let st = up(&a.dir, &path, &opts)?;
            for (k, p) in &st.pods {
                println!("{k} {}", p.ip.as_deref().unwrap_or("-"));
            }
        }
        Cmd::Apply { path } => {
            let m = Manifests::load(&path)?;
            report(&m);
            let mut st = State::load(&a.dir)?;
            let done = st.apply(&m)?;
            println!(
                "added: {}; removed: {}; relabelled: {}",
                done.added.join(", "),
                done.removed.join(", "),
                done.relabelled.join(", ")
            );
            if !m.services.is_empty() || !st.services.is_empty() {
                report_services(&st.sync_services(&m)?);
            }
            if !m.network_policies.is_empty() || !st.policies.is_empty() {
                report_policies(&st.sync_policies(&m)?);
            }
        }
        Cmd::Status => {
            let st = State::load(&a.dir)?;
            println!(
                "node {} ({}), external {} ({})",
                st.settings.node_ns(),
                lab::NODE_ADDR,
                st.settings.ext_ns(),
                lab::EXT_ADDR
            );
            println!(
                "stromd pid {:?}, socket {}",
                st.stromd,
                st.settings.socket().display()
            );
            for (k, p) in &st.pods {
                let ports: Vec<String> = p
                    .decl
                    .ports
                    .iter()
                    .map(|d| format!("{}/{}", d.port, d.protocol))
                    .collect();
                let labels: Vec<String> = p
                    .decl
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!(
                    "{k:<24} {:<16} {:<24} {:<16} {}",
                    p.ip.as_deref().unwrap_or("-"),
                    p.netns,
                    ports.join(","),
                    labels.join(",")
                );
            }
            if !st.services.is_empty() {
                println!("services (ClusterIPs from {}):", services::SERVICE_CIDR);
                for l in services::status_lines(&st.services) {
                    println!("{l}");
                }
            }
        }
        Cmd::Exec { target, cmd } => {
            let st = State::load(&a.dir)?;
            std::process::exit(exec_in(&st, &target, &cmd)?);
        }
        Cmd::Probe {
            from,
            to,
            port,
            port_name,
            lb,
            node_port,
            protocol,
            timeout_ms,
        } => {
            let st = State::load(&a.dir)?;
            let protocol = match protocol {
                Some(p) => Some(
                    p.parse::<strom_api::Protocol>()
                        .map_err(anyhow::Error::msg)?,
                ),
                None => None,
            };
            let choice = services::PortChoice {
                name: port_name,
                port: None,
                protocol,
            };
            let to_node_port = node_port || from == "external";
            let (ip, port, protocol) = probe_target(&st, &to, port, choice, lb, to_node_port)?;
            if protocol == "sctp" && !net::sctp_supported() {
                eprintln!("error: {}", net::NO_SCTP);
                std::process::exit(2);
            }
            match probe_ip(
                &st,
                &from,
                ip,
                port,
                &protocol,
                Duration::from_millis(timeout_ms),
            )? {
                Ok(who) => println!("allow: answered by {who}"),
                Err(why) => {
                    println!("deny: {why}");
                    std::process::exit(1);
                }
            }
        }
        Cmd::Matrix { json } => {
            let st = State::load(&a.dir)?;
            let cells = matrix(&st)?;
            if json {
                let v: Vec<_> = cells
                    .iter()
                    .map(|c| json!({"from": c.from, "to": c.to, "port": c.port, "protocol": c.protocol, "allow": c.answer.is_ok(), "answer": c.answer.as_ref().ok()}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_matrix(&st, &cells);
            }
        }
        Cmd::Stromd { action } => {
            let mut st = State::load(&a.dir)?;
            if action != "start" {
                st.stop_stromd();
            }
            if action != "stop" {
                st.start_stromd()?;
                // stromd takes up its ports, and after a stop (not a kill) the Services,
                // policies and flows it saved; the lab gives its Services and policies again
                // all the same, as strom-control does to a new stromd.
                for e in st.reprogram_services() {
                    eprintln!("Service not set again: {e}");
                }
                if let Err(e) = st.reprogram_policies() {
                    eprintln!("policies not set again: {e:#}");
                }
            }
        }
        Cmd::Down { prefix } => match State::load(&a.dir) {
            Ok(st) => {
                let errs = st.down();
                for e in &errs {
                    eprintln!("{e}");
                }
            }
            Err(_) => {
                lab::sweep(&prefix);
                let _ = std::fs::remove_dir_all(&a.dir);
            }
        },
        Cmd::Demo { path, opts } => {
            if !demo::demo(&a.dir, &path, &opts)? {
                std::process::exit(1);
            }
        }
        Cmd::Responder {
            name,
            tcp,
            udp,
            sctp,
            hold_tcp,
        } => net::respond(&name, &tcp, &udp, &sctp, &hold_tcp)?,
        Cmd::Hold {
            ip,
            port,
            count,
            timeout_ms,
        } => net::hold(ip, port, count, Duration::from_millis(timeout_ms))?,
        Cmd::Connect {
            ip,
            lines,
            count,
            port,
            protocol,
            timeout_ms,
        } => {
            let timeout = Duration::from_millis(timeout_ms);
            let lines = lines || count > 1;
            let ip: Vec<IpAddr> = (0..count).flat_map(|_| ip.iter().copied()).collect();
            if let ([one], false) = (&ip[..], lines) {
                let one = *one;
                match net::connect(one, port, &protocol, timeout) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("{e}");
                        // Neither allow nor deny: the probe cannot be made here.
                        std::process::exit(if e == net::NO_SCTP { 2 } else { 1 });
                    }
                }
            } else {
                // At most PROBES_IN_FLIGHT connections at once, each thread taking the next
                // target as it finishes one, as a client's connection pool would.
                let next = std::sync::atomic::AtomicUsize::new(0);
                let answers: Vec<std::sync::OnceLock<Result<String, String>>> =
                    ip.iter().map(|_| std::sync::OnceLock::new()).collect();
                std::thread::scope(|sc| {
                    for _ in 0..PROBES_IN_FLIGHT.min(ip.len()) {
                        sc.spawn(|| loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&a) = ip.get(i) else { break };
                            let _ = answers[i].set(net::connect(a, port, &protocol, timeout));
                        });
                    }
                });
                let answers = answers.into_iter().map(|a| {
                    a.into_inner()
                        .unwrap_or_else(|| Err("prober thread failed".into()))
                });
                for a in answers {
                    match a {
                        Ok(s) => println!("allow {}", s.replace('\n', " ")),
                        Err(e) => println!("deny {}", e.replace('\n', " ")),
                    }
                }
            }
        }
    }
    Ok(())
}
