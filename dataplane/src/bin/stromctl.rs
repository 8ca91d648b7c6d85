//! stromctl: shows stromd's ports, tables, Services, conntrack, counters and drop reasons.
#![deny(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use strom_api::{Client, PortInterface, PortKey, Request, Response};

#[derive(Parser)]
#[command(version, about = "Inspect and steer a running stromd")]
struct Args {
    /// stromd's API socket.
    #[arg(short, long, default_value = strom_api::DEFAULT_SOCKET, env = "STROM_SOCKET")]
    socket: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Readiness and shape of the dataplane.
    Status,
    /// Registered ports with their counters.
    Ports,
    /// Per-worker counters and drop reasons.
    Stats,
    /// The forwarding tables.
    Tables,
    /// Register a port by hand (strom-cni does this for pods).
    AddPort {
        /// Host-side interface in stromd's namespace.
        #[arg(long)]
        ifname: String,
        /// The pod's address (repeatable).
        #[arg(long = "ip", required = true)]
        ips: Vec<std::net::IpAddr>,
        /// The pod's MAC.
        #[arg(long)]
        mac: String,
        /// An identifier for the owner (shown by `ports`).
        #[arg(long, default_value = "manual")]
        container_id: String,
    },
    /// Service ports: frontends, backends (which serve traffic from inside and from outside
    /// the node, and their tracked flows), flows, packets and rejections.
    Services,
    /// Program a Service from a JSON `ServiceSpec` file (`-` for stdin); strom-control and
    /// strom-lab do this from Kubernetes objects.
    SetService { file: PathBuf },
    /// Remove a Service (NAMESPACE/NAME).
    RemoveService { service: String },
    /// Tracked flows (all workers), filtered by address, port or Service.
    Conntrack {
        #[command(flatten)]
        filter: CtFilter,
        /// Only how many.
        #[arg(long)]
        count: bool,
        /// Forget the matching flows instead (their next packet is balanced anew).
        #[arg(long)]
        flush: bool,
    },
    /// NetworkPolicies selecting the node's pods: the pods each isolates per direction and
    /// the packets dropped because no policy allowed them.
    Policy,
    /// Replace the node's NetworkPolicies with a compiled JSON `PolicySet` file (`-` for
    /// stdin); strom-control and strom-lab compile it from Kubernetes objects.
    SetPolicies { file: PathBuf },
    /// What stromd does with the first packet of a 5-tuple from a pod: the Service it
    /// reaches, the backend Maglev picks, the translation, the policies' verdict and the rule
    /// that allows it.
    Trace {
        #[arg(long, default_value = "tcp")]
        protocol: strom_api::Protocol,
        /// Source ADDRESS:PORT.
        #[arg(long)]
        src: std::net::SocketAddr,
        /// Destination ADDRESS:PORT.
        #[arg(long)]
        dst: std::net::SocketAddr,
    },
    /// Unregister a port by host interface name.
    RemovePort {
        ifname: String,
        /// Delete the interface too (a veth: both ends), as strom-cni's DEL does; answered
        /// once the kernel has unlisted it.
        #[arg(long)]
        delete_interface: bool,
    },
}

#[derive(clap::Args)]
struct CtFilter {
    /// An address of the flow (original or translated).
    #[arg(long)]
    addr: Option<std::net::IpAddr>,
    /// A port of the flow.
    #[arg(long)]
    port: Option<u16>,
    /// The Service (NAMESPACE/NAME) the flow was balanced for.
    #[arg(long)]
    service: Option<String>,
}

impl CtFilter {
    fn api(&self) -> strom_api::ConntrackFilter {
        strom_api::ConntrackFilter {
            addr: self.addr,
            port: self.port,
            service: self.service.clone(),
        }
    }
}

/// Appends a line to `$out`. stromctl writes its whole output at once at the end ([`emit`]),
/// so that a reader that stops early (`stromctl ports | head`) ends it quietly instead of a
/// `println!` panicking on the closed pipe.
macro_rules! say {
    ($out:expr) => {
        $out.push('\n')
    };
    ($out:expr, $($arg:tt)*) => {{
        $out.push_str(&format!($($arg)*));
        $out.push('\n');
    }};
}

/// Writes `out` to stdout; a reader that has gone (a closed pipe) is not an error.
fn emit(out: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    match o.write_all(out.as_bytes()).and_then(|()| o.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
}

fn table(out: &mut String, headers: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let mut line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<width$}", c, width = w[i]))
            .collect();
        say!(out, "{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|s| s.to_uppercase()).collect());
    for r in rows {
        line(r);
    }
}

/// The text of `file`, or of stdin for `-`.
fn read_input(file: &std::path::Path) -> anyhow::Result<String> {
    if file.as_os_str() == "-" {
        return Ok(std::io::read_to_string(std::io::stdin())?);
    }
    std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut c = Client::connect(&a.socket, Duration::from_secs(5))?;
    let req = match &a.cmd {
        Cmd::Status => Request::Status,
        Cmd::Ports => Request::Ports,
        Cmd::Stats => Request::Stats,
        Cmd::Tables => Request::Tables,
        Cmd::AddPort {
            ifname,
            ips,
            mac,
            container_id,
        } => Request::AddPort {
            spec: strom_api::PortSpec {
                ifname: ifname.clone(),
                ips: ips.clone(),
                mac: mac.clone(),
                container_id: container_id.clone(),
                pod_ifname: String::new(),
                pod_namespace: String::new(),
                pod_name: String::new(),
            },
        },
        Cmd::Services => Request::Services {
            counters_only: false,
        },
        Cmd::Policy => Request::Policies,
        Cmd::SetPolicies { file } => {
            let text = read_input(file)?;
            Request::SetPolicies {
                policies: serde_json::from_str(&text).context("a PolicySet in JSON")?,
                delta: None,
            }
        }
        Cmd::SetService { file } => {
            let text = read_input(file)?;
            Request::SetService {
                service: serde_json::from_str(&text).context("a ServiceSpec in JSON")?,
            }
        }
        Cmd::RemoveService { service } => {
            let (namespace, name) = service
                .split_once('/')
                .context("a Service is NAMESPACE/NAME")?;
            Request::RemoveService {
                namespace: namespace.into(),
                name: name.into(),
            }
        }
        Cmd::Conntrack {
            filter,
            count,
            flush,
        } => {
            if *flush {
                Request::FlushConntrack {
                    filter: filter.api(),
                }
            } else {
                Request::Conntrack {
                    filter: filter.api(),
                    count_only: *count,
                }
            }
        }
        Cmd::Trace { protocol, src, dst } => Request::Trace {
            tuple: strom_api::Tuple {
                protocol: *protocol,
                src: src.ip(),
                src_port: src.port(),
                dst: dst.ip(),
                dst_port: dst.port(),
            },
        },
        Cmd::RemovePort {
            ifname,
            delete_interface,
        } => Request::RemovePort {
            key: PortKey::Ifname(ifname.clone()),
            interface: if *delete_interface {
                PortInterface::Delete
            } else {
                PortInterface::Keep
            },
        },
    };
    let resp = c.call(&req).context("stromd")?;
    let mut out = String::new();
    if let Output::Json = a.output {
        say!(out, "{}", serde_json::to_string_pretty(&resp)?);
        return emit(&out);
    }
    match resp {
        Response::Ok => say!(out, "ok"),
        Response::Applied { refused, .. } => {
            for (key, why) in &refused {
                say!(out, "refused {key}: {why}");
            }
            say!(out, "ok ({} refused)", refused.len());
        }
        Response::Hello {
            contract,
            version,
            instance,
            generation,
            ..
        } => say!(
            out,
            "contract {contract}, stromd {version}, instance {instance}, table changes {generation}"
        ),
        Response::Status(s) => {
            say!(out, "ready:     {}", s.ready);
            if let Some(r) = &s.reason {
                say!(out, "reason:    {r}");
            }
            say!(out, "version:   {}", s.version);
            say!(out, "workers:   {} ({})", s.workers, s.poll_mode);
            say!(out, "ports:     {}", s.ports);
        }
        Response::Ports { ports } => table(
            &mut out,
            &[
                "id", "kind", "ifname", "pod", "ips", "worker", "xdp/xsk", "rx pkts", "rx bytes",
                "tx pkts", "tx bytes", "drops", "fill",
            ],
            ports
                .iter()
                .map(|p| {
                    vec![
                        p.id.to_string(),
                        p.kind.clone(),
                        p.spec.ifname.clone(),
                        match (p.spec.pod_namespace.as_str(), p.spec.pod_name.as_str()) {
                            (_, "") => "-".into(),
                            ("", name) => name.to_string(),
                            (ns, name) => format!("{ns}/{name}"),
                        },
                        strom_api::ips_text(&p.spec.ips),
                        // One socket per receive queue: "q0 worker,q1 worker,…".
                        if p.queue_workers.len() > 1 {
                            p.queue_workers
                                .iter()
                                .map(|w| w.to_string())
                                .collect::<Vec<_>>()
                                .join(",")
                        } else {
                            p.worker.to_string()
                        },
                        format!("{}/{}", p.xdp_mode, p.xsk_mode),
                        p.counters.rx_packets.to_string(),
                        p.counters.rx_bytes.to_string(),
                        p.counters.tx_packets.to_string(),
                        p.counters.tx_bytes.to_string(),
                        p.counters.drops.to_string(),
                        p.fill_depth.to_string(),
                    ]
                })
                .collect(),
        ),
        Response::Stats { workers, xdp_drops } => {
            table(
                &mut out,
                &[
                    "worker",
                    "core",
                    "ports",
                    "rx pkts",
                    "tx pkts",
                    "drops",
                    "loops",
                    "sleeps",
                    "frames free",
                    "in fill",
                    "fill floor",
                    "fill depths/budget",
                    "core wait",
                    "preempted",
                ],
                workers
                    .iter()
                    .map(|w| {
                        vec![
                            w.id.to_string(),
                            w.core.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                            w.ports.to_string(),
                            w.counters.rx_packets.to_string(),
                            w.counters.tx_packets.to_string(),
                            w.drops.iter().map(|d| d.1).sum::<u64>().to_string(),
                            w.loops.to_string(),
                            w.sleeps.to_string(),
                            format!("{}/{}", w.frames_free, w.frames_total),
                            w.frames_in_fill.to_string(),
                            w.fill_floor.to_string(),
                            format!("{}/{}", w.fill_reserved, w.fill_budget),
                            format!("{:.1} ms", w.core_wait_ns as f64 / 1e6),
                            w.preemptions.to_string(),
                        ]
                    })
                    .collect(),
            );
            say!(out);
            let rows: Vec<Vec<String>> = workers
                .iter()
                .flat_map(|w| {
                    w.drops
                        .iter()
                        .map(move |(r, n)| vec![w.id.to_string(), r.clone(), n.to_string()])
                })
                .collect();
            let rows: Vec<Vec<String>> = rows
                .into_iter()
                .chain(
                    xdp_drops
                        .iter()
                        .map(|(r, n)| vec!["xdp".into(), r.clone(), n.to_string()]),
                )
                .collect();
            if rows.is_empty() {
                say!(out, "no drops");
            } else {
                table(&mut out, &["worker", "drop reason", "count"], rows);
            }
        }
        Response::Tables {
            gateway,
            node_addrs,
            routes,
        } => {
            say!(out, "pod gateway:    {gateway}");
            say!(out, "node addresses: {}", node_addrs.join(", "));
            say!(out);
            table(
                &mut out,
                &["prefix", "target"],
                routes
                    .into_iter()
                    .map(|r| vec![r.prefix, r.target])
                    .collect(),
            );
        }
        Response::Port(p) => say!(out, "port {} on {}", p.id, p.spec.ifname),
        Response::Services { services, refused } => {
            if services.is_empty() {
                say!(out, "no services");
            }
            if refused > 0 {
                say!(
                    out,
                    "{refused} service update(s) refused since start (see stromd's log)"
                );
            }
            for s in services {
                say!(
                    out,
                    "{} {}  flows {}  packets {}  rejected {}",
                    s.key,
                    s.protocol.name(),
                    s.flows,
                    s.packets,
                    s.rejected
                );
                for (addr, kind) in &s.frontends {
                    say!(out, "  frontend {addr} ({kind})");
                }
                if s.backends.is_empty() {
                    say!(out, "  no endpoints: new connections are rejected");
                }
                for b in &s.backends {
                    let serves = match (b.internal, b.external) {
                        (true, true) => "serving",
                        (true, false) => "serving from inside only",
                        (false, true) => "serving from outside only",
                        (false, false) => "not serving (keeps its flows)",
                    };
                    say!(
                        out,
                        "  backend {} {}  {serves}  flows {}",
                        b.addr,
                        if b.target.is_empty() { "-" } else { &b.target },
                        b.flows
                    );
                }
            }
        }
        Response::Conntrack { total, entries } => {
            if !entries.is_empty() {
                table(
                    &mut out,
                    &[
                        "worker",
                        "proto",
                        "original",
                        "translated",
                        "state",
                        "expires",
                        "service",
                        "packets",
                    ],
                    entries
                        .into_iter()
                        .map(|e| {
                            vec![
                                match e.owner {
                                    Some(o) => format!("{} (owner {o})", e.worker),
                                    None => e.worker.to_string(),
                                },
                                e.protocol,
                                e.original,
                                e.translated,
                                e.state,
                                format!("{}s", e.expires_in_s),
                                e.service,
                                e.packets.to_string(),
                            ]
                        })
                        .collect(),
                );
            }
            say!(out, "{total} flow(s)");
        }
        Response::Flushed { entries } => say!(out, "{entries} flow(s) flushed"),
        Response::Policies { policies } => {
            if policies.is_empty() {
                say!(
                    out,
                    "no policy selects a pod of this node: every pod is open"
                );
            }
            for p in policies {
                say!(
                    out,
                    "{}  dropped: ingress {}  egress {}",
                    p.policy,
                    p.ingress_drops,
                    p.egress_drops
                );
                if !p.ingress_pods.is_empty() {
                    say!(out, "  ingress: {}", p.ingress_pods.join(", "));
                }
                if !p.egress_pods.is_empty() {
                    say!(out, "  egress: {}", p.egress_pods.join(", "));
                }
            }
        }
        Response::Trace { steps } => {
            for s in steps {
                say!(out, "{s}");
            }
        }
        Response::Error { message } => anyhow::bail!(message),
    }
    emit(&out)
}
