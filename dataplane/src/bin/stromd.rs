//! stromd: the strom dataplane daemon.
#![deny(unsafe_code)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use strom_dataplane::api::{bind, serve, Controller};
use strom_dataplane::bpf::XdpPrograms;
use strom_dataplane::config::{Config, PollMode};
use strom_dataplane::tables::{NodeTable, TableHandle};
use strom_dataplane::worker;
use strom_dataplane::xsk::XskSizes;

/// stromd forwards pod traffic through AF_XDP sockets on the pods' host-side veths.
///
/// Settings come from the config file (see configs/stromd.toml); every flag overrides the
/// file's value.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Configuration file.
    #[arg(
        short,
        long,
        default_value = "/etc/strom/stromd.toml",
        env = "STROMD_CONFIG"
    )]
    config: PathBuf,
    /// The node's own addresses (repeatable; replaces node.addresses).
    #[arg(long = "node-addr")]
    node_addrs: Vec<IpAddr>,
    /// The node's pod CIDR (node.pod_cidr).
    #[arg(long)]
    pod_cidr: Option<ipnet::Ipv4Net>,
    /// The gateway address of every pod (node.pod_gateway).
    #[arg(long)]
    pod_gateway: Option<std::net::Ipv4Addr>,
    /// The node's uplink interface (node.uplink).
    #[arg(long)]
    uplink: Option<String>,
    /// Next hop on the uplink for traffic leaving the node (node.uplink_gateway).
    #[arg(long)]
    uplink_gateway: Option<std::net::Ipv4Addr>,
    /// Number of workers (dataplane.workers).
    #[arg(long)]
    workers: Option<usize>,
    /// Cores to pin the workers to, comma separated (dataplane.cores).
    #[arg(long, value_delimiter = ',')]
    cores: Option<Vec<usize>>,
    /// busy: spin always; adaptive: spin while busy, sleep when idle (dataplane.poll_mode).
    #[arg(long, value_enum)]
    poll_mode: Option<PollMode>,
    /// Frames (4 KiB each) in each worker's slice of the shared UMEM (dataplane.umem_frames).
    #[arg(long)]
    umem_frames: Option<u32>,
    /// Entries of every AF_XDP ring (dataplane.ring_size).
    #[arg(long)]
    ring_size: Option<u32>,
    /// The deepest a port's fill ring gets (dataplane.fill_per_port).
    #[arg(long)]
    fill_per_port: Option<u32>,
    /// The depth every port's fill ring keeps from its registration (dataplane.fill_min).
    #[arg(long)]
    fill_min: Option<u32>,
    /// API socket path (dataplane.api_socket).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Directory where registered ports are recorded for restarts (dataplane.state_dir).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Where the XDP links are pinned; empty: not pinned (dataplane.bpf_pin_dir).
    #[arg(long)]
    bpf_pin_dir: Option<PathBuf>,
    /// Where /metrics, /healthz and /readyz are served (dataplane.metrics_addr).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Log filter (tracing EnvFilter syntax), e.g. info or strom_dataplane=debug.
    #[arg(long, default_value = "info", env = "STROM_LOG")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Lines go to stderr from a thread of their own through a bounded queue that drops
    // when full (lossy): a worker that logs (a denied packet, say) never waits on a stderr
    // that is not drained. The guard flushes what is queued when main returns.
    let (writer, _log_guard) = tracing_appender::non_blocking(std::io::stderr());
    tracing_subscriber::fmt()
        // Colours only on a terminal: a log file or journal gets plain lines.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("--log")?)
        .with_writer(writer)
        .init();
    let mut cfg = Config::from_file(&args.config)?;
    if !args.node_addrs.is_empty() {
        cfg.node.addresses = args.node_addrs.clone();
    }
    if let Some(v) = args.pod_cidr {
        cfg.node.pod_cidr = v;
    }
    if let Some(v) = args.pod_gateway {
        cfg.node.pod_gateway = v;
    }
    if let Some(v) = args.uplink.clone() {
        cfg.node.uplink = Some(v);
    }
    if let Some(v) = args.uplink_gateway {
        cfg.node.uplink_gateway = Some(v);
    }
    if let Some(v) = args.workers {
        cfg.dataplane.workers = v;
    }
    if let Some(v) = args.cores.clone() {
        cfg.dataplane.cores = v;
    }
    if let Some(v) = args.poll_mode {
        cfg.dataplane.poll_mode = v;
    }
    if let Some(v) = args.umem_frames {
        cfg.dataplane.umem_frames = v;
    }
    if let Some(v) = args.ring_size {
        cfg.dataplane.ring_size = v;
    }
    if let Some(v) = args.fill_per_port {
        cfg.dataplane.fill_per_port = v;
    }
    if let Some(v) = args.fill_min {
        cfg.dataplane.fill_min = v;
    }
    if let Some(v) = args.api_socket.clone() {
        cfg.dataplane.api_socket = v;
    }
    if let Some(v) = args.state_dir.clone() {
        cfg.dataplane.state_dir = v;
    }
    if let Some(v) = args.bpf_pin_dir.clone() {
        cfg.dataplane.bpf_pin_dir = v;
    }
    if let Some(v) = args.metrics_addr {
        cfg.dataplane.metrics_addr = Some(v);
    }
    cfg.validate()?;
    // A second stromd must not take the node's interfaces from a live one: refuse before
    // loading anything; wait for one that was killed and is still being torn down (see
    // `lock_waiting`). A socket file left by a killed stromd is taken over.
    let api_lock = strom_dataplane::api::lock_waiting(
        &cfg.dataplane.api_socket,
        strom_dataplane::api::LOCK_PATIENCE,
    )?;
    raise_fd_limit();

    let pin_dir = &cfg.dataplane.bpf_pin_dir;
    let mut xdp = XdpPrograms::load((!pin_dir.as_os_str().is_empty()).then_some(pin_dir.as_path()))
        .context("loading XDP programs (is this root, with bpf available?)")?;
    xdp.set_gateway(cfg.node.pod_gateway)?;
    xdp.set_pod_generic(cfg.dataplane.pod_xdp == strom_dataplane::config::PodXdp::Generic);
    let mut tables = NodeTable::new(cfg.node.pod_gateway);
    for a in &cfg.node.addresses {
        tables.addrs.insert(*a);
        if let IpAddr::V4(v4) = a {
            xdp.add_node_addr(*v4)?;
        }
    }
    tables.v4 = cfg.node.addresses.iter().find_map(|a| match a {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    });
    // The directed broadcast addresses of the node's subnets (from each address and its
    // netmask: an address added without `brd` has none recorded): never routed.
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let v4 = |s: Option<&nix::sys::socket::SockaddrStorage>| {
                s.and_then(|s| s.as_sockaddr_in())
                    .map(|s| u32::from(s.ip()))
            };
            if let (Some(ip), Some(mask)) = (v4(a.address.as_ref()), v4(a.netmask.as_ref())) {
                // /31 and /32 have no broadcast address (RFC 3021).
                if mask.count_ones() < 31 {
                    tables
                        .broadcasts
                        .insert(std::net::Ipv4Addr::from(ip | !mask));
                }
            }
        }
    }
    tables.pod_cidr = Some(cfg.node.pod_cidr);
    let [snat_lo, snat_hi] = cfg.dataplane.snat_ports;
    tables.snat = strom_dataplane::tables::node::SnatPorts {
        lo: snat_lo,
        hi: snat_hi,
        workers: cfg.dataplane.workers as u16,
    };
    xdp.set_snat_ports(snat_lo, snat_hi)?;
    tables.masquerade = cfg.node.masquerade && tables.v4.is_some();
    tables.no_masquerade = cfg.node.no_masquerade.clone();
    xdp.set_pod_net(cfg.node.pod_cidr.network(), cfg.node.pod_cidr.prefix_len())?;
    if cfg.node.uplink.is_some() {
        xdp.add_owned(cfg.node.pod_cidr.network(), cfg.node.pod_cidr.prefix_len())?;
    }
    let tables = TableHandle::new(tables);

    let (shared, receivers) = worker::create(cfg.dataplane.workers, &cfg.dataplane.cores)?;
    let sizes = XskSizes {
        frames: cfg.dataplane.umem_frames,
        ring: cfg.dataplane.ring_size,
        fill: cfg.dataplane.fill_per_port,
        fill_min: cfg.dataplane.fill_min,
    };
    let handles = worker::spawn(
        &shared,
        receivers,
        &tables,
        cfg.dataplane.poll_mode,
        sizes,
        cfg.dataplane.conntrack_max,
        Some(Arc::new(xdp.echo_ids()?)),
    )?;

    let stop = Arc::new(AtomicBool::new(false));
    // The flag first, then a byte down the pipe that wakes the API loop's poll(2): whoever
    // wakes sees the flag set.
    let (wake, wake_tx) = std::os::unix::net::UnixStream::pair()?;
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
        signal_hook::low_level::pipe::register(sig, wake_tx.try_clone()?)?;
    }
    let socket = cfg.dataplane.api_socket.clone();
    tracing::info!(
        workers = cfg.dataplane.workers,
        poll_mode = cfg.dataplane.poll_mode.name(),
        pod_cidr = %cfg.node.pod_cidr,
        gateway = %cfg.node.pod_gateway,
        "stromd starting"
    );
    let uplink = cfg
        .node
        .uplink
        .clone()
        .map(|u| (u, cfg.node.uplink_gateway));
    // The node's own sockets reach Services through cgroup programs (docs/design.md).
    let node_sockets = if cfg.node.node_sockets {
        let cgroup = strom_dataplane::node_sockets::cgroup(&cfg.node.node_cgroup).context(
            "node.node_sockets: no cgroup v2 hierarchy found (set node.node_cgroup, or node_sockets = false)",
        )?;
        let n = strom_dataplane::node_sockets::NodeSockets::attach(&cgroup).with_context(|| {
            format!(
                "node.node_sockets: attaching to {} (set node.node_cgroup, or node_sockets = false)",
                cgroup.display()
            )
        })?;
        tracing::info!(cgroup = %cgroup.display(), "the node's own sockets reach Services");
        Some(n)
    } else {
        None
    };
    let metrics = match cfg.dataplane.metrics_addr {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .with_context(|| format!("dataplane.metrics_addr {addr}"))?,
        ),
        None => None,
    };
    let mut ctl = Controller::new(cfg, xdp, node_sockets, tables, shared);
    // What the last stop saved comes back before any packet can: the uplink and the ports
    // come after.
    ctl.take_up_saved();
    if let Some((ifname, gateway)) = uplink {
        if let Err(e) = ctl.add_uplink(&ifname, gateway) {
            // What was taken up from the last stop is left to the next start again.
            ctl.shutdown(handles);
            anyhow::bail!("uplink {ifname}: {e}");
        }
        // Resolve the gateway before answering the API, so that pods wired right after start
        // reach the outside at once; if it takes longer, the API loop keeps asking.
        if gateway.is_some() {
            let t = std::time::Instant::now();
            while !ctl.refresh_uplink() && t.elapsed() < std::time::Duration::from_secs(1) {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
    ctl.restore();
    let served = match bind(&socket, &api_lock) {
        Ok(listener) => {
            serve(listener, &socket, metrics, &mut ctl, &stop, wake).map_err(anyhow::Error::from)
        }
        Err(e) => Err(e.into()),
    };
    tracing::info!("stromd stopping: saving its tables, closing sockets");
    ctl.shutdown(handles);
    drop(ctl);
    served.context("API socket")?;
    tracing::info!("stromd stopped");
    Ok(())
}

/// Raises the soft limit of open files to the hard one: every port takes a socket and every
/// API client a connection (up to `MAX_CONNECTIONS`), beyond the usual soft limit of 1024.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open files limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open files limit"),
    }
}
