//! The traffic of the matrix, each kind measured from pod A to the path's destination.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::crr;
use crate::paths::{Env, Path};
use crate::topo::{
    ns_command, ns_run, stop_child, Topology, CRR_PORT, IPERF_PORT, IP_A, IP_B, SINK_PORT_FIRST,
    SOCKPERF_PORT, SRC_PORT_FIRST,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Traffic {
    /// 60-byte UDP frames at the highest rate strom-pktgen reaches, over this many flows.
    Udp(u32),
    /// iperf3 TCP with this many parallel streams.
    Tcp(u32),
    /// UDP request/response (sockperf ping-pong), round trip percentiles.
    Latency,
    /// New TCP connections per second (connect, 1-byte request, 1-byte answer, close; as
    /// netperf's TCP_CRR), from [`crr::CONNS`] loops at once: through a Service, a new
    /// conntrack entry and DNAT for every connection.
    Crr,
    /// 60-byte UDP from pod A to this many other pods, one flow each, with 110 pods on the
    /// node (the kubelet's default maximum): what many ports and their routes cost a path.
    Pods(u32),
}

/// Pods on the node for the `pods` traffic: A, B and the extra ones.
pub const PODS_ON_NODE: usize = 110;

pub const ALL: [Traffic; 8] = [
    Traffic::Udp(1),
    Traffic::Udp(256),
    Traffic::Udp(65536),
    Traffic::Tcp(1),
    Traffic::Tcp(4),
    Traffic::Latency,
    Traffic::Crr,
    Traffic::Pods(100),
];

impl Traffic {
    pub fn name(self) -> String {
        match self {
            Traffic::Udp(n) => format!("udp{n}"),
            Traffic::Tcp(n) => format!("tcp{n}"),
            Traffic::Latency => "latency".into(),
            Traffic::Crr => "crr".into(),
            Traffic::Pods(n) => format!("pods{n}"),
        }
    }

    /// Extra pods the topology needs for this traffic.
    pub fn extra_pods(self) -> usize {
        match self {
            Traffic::Pods(_) => PODS_ON_NODE - 2,
            _ => 0,
        }
    }

    pub fn parse(s: &str) -> Result<Traffic> {
        ALL.into_iter().find(|t| t.name() == s).with_context(|| {
            let names: Vec<_> = ALL.iter().map(|t| t.name()).collect();
            format!("unknown traffic {s:?} (known: {})", names.join(", "))
        })
    }
}

/// One number a measurement produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    UdpMpps(u32),
    /// UDP Mpps delivered to this many pods, with 110 on the node.
    UdpMppsPods(u32),
    TcpGbps(u32),
    /// New TCP connections completed per second (the `crr` traffic).
    TcpConnsPerS,
    RttP50,
    RttP99,
}

impl Metric {
    pub fn key(self) -> String {
        match self {
            Metric::UdpMpps(n) => format!("udp_mpps_{n}_flows"),
            Metric::UdpMppsPods(n) => format!("udp_mpps_{n}_pods"),
            Metric::TcpGbps(n) => format!("tcp_gbps_{n}_streams"),
            Metric::TcpConnsPerS => "tcp_conns_per_s".into(),
            Metric::RttP50 => "rtt_p50_us".into(),
            Metric::RttP99 => "rtt_p99_us".into(),
        }
    }

    pub fn from_key(k: &str) -> Option<Metric> {
        if let Some(n) = k
            .strip_prefix("udp_mpps_")
            .and_then(|r| r.strip_suffix("_flows"))
        {
            return n.parse().ok().map(Metric::UdpMpps);
        }
        if let Some(n) = k
            .strip_prefix("udp_mpps_")
            .and_then(|r| r.strip_suffix("_pods"))
        {
            return n.parse().ok().map(Metric::UdpMppsPods);
        }
        if let Some(n) = k
            .strip_prefix("tcp_gbps_")
            .and_then(|r| r.strip_suffix("_streams"))
        {
            return n.parse().ok().map(Metric::TcpGbps);
        }
        match k {
            "rtt_p50_us" => Some(Metric::RttP50),
            "rtt_p99_us" => Some(Metric::RttP99),
            "tcp_conns_per_s" => Some(Metric::TcpConnsPerS),
            _ => None,
        }
    }

    /// A column header.
    pub fn label(self) -> String {
        match self {
            Metric::UdpMpps(1) => "UDP Mpps, 1 flow".into(),
            Metric::UdpMpps(n) => format!("UDP Mpps, {n} flows"),
            Metric::UdpMppsPods(n) => format!("UDP Mpps, to {n} of {PODS_ON_NODE} pods"),
            Metric::TcpGbps(1) => "TCP Gbit/s, 1 stream".into(),
            Metric::TcpGbps(n) => format!("TCP Gbit/s, {n} streams"),
            Metric::TcpConnsPerS => "TCP conn/s".into(),
            Metric::RttP50 => "RTT p50 µs".into(),
            Metric::RttP99 => "RTT p99 µs".into(),
        }
    }
}

/// What one measurement gave: each metric's value, for UDP the rate that was offered, for
/// TCP the segments retransmitted (what the path lost), for new connections those that failed
/// (fewer than [`crr::MAX_ERROR_SHARE`] of them, or the measurement fails).
pub struct Measured {
    pub values: Vec<(Metric, f64)>,
    pub offered_mpps: Option<f64>,
    pub retransmits: Option<u64>,
    pub failed_conns: Option<u64>,
}

/// Measures `traffic` through the running `path` for `secs` seconds.
pub fn measure(
    traffic: Traffic,
    path: Path,
    t: &Topology,
    env: &Env,
    secs: u32,
) -> Result<Measured> {
    let dst = path.destination();
    match traffic {
        Traffic::Udp(flows) => udp(flows, t, env, secs, &dst.to_string()),
        Traffic::Pods(n) => pods(n, t, env, secs),
        Traffic::Tcp(streams) => {
            let (g, r) = tcp(streams, t, secs, &dst.to_string())?;
            Ok(Measured {
                values: vec![(Metric::TcpGbps(streams), g)],
                offered_mpps: None,
                retransmits: Some(r),
                failed_conns: None,
            })
        }
        Traffic::Latency => {
            let (p50, p99) = latency(t, secs, &dst.to_string())?;
            Ok(Measured {
                values: vec![(Metric::RttP50, p50), (Metric::RttP99, p99)],
                offered_mpps: None,
                retransmits: None,
                failed_conns: None,
            })
        }
        Traffic::Crr => {
            let (rate, failed) = connections(t, env, secs, dst)?;
            Ok(Measured {
                values: vec![(Metric::TcpConnsPerS, rate)],
                offered_mpps: None,
                retransmits: None,
                failed_conns: Some(failed),
            })
        }
    }
}

/// Source and destination port ranges that make `flows` distinct flows (at most 65536:
/// 256 source ports × 256 sink ports).
pub fn port_ranges(flows: u32) -> Result<(String, String)> {
    if flows == 0 || flows > 65536 || (flows > 256 && !flows.is_multiple_of(256)) {
        bail!("{flows} flows: use 1-256 or a multiple of 256 up to 65536");
    }
    let sports = flows.min(256);
    let dports = flows.div_ceil(256);
    let range = |first: u16, n: u32| {
        if n == 1 {
            first.to_string()
        } else {
            format!("{first}-{}", u32::from(first) + n - 1)
        }
    };
    Ok((
        range(SRC_PORT_FIRST, sports),
        range(SINK_PORT_FIRST, dports),
    ))
}

/// 60-byte UDP from pod A to `n` extra pods, one flow each; delivered is what their
/// interfaces received together.
fn pods(n: u32, t: &Topology, env: &Env, secs: u32) -> Result<Measured> {
    let n = n as usize;
    if t.extra.len() < n {
        bail!("pods{n}: the topology has {} extra pods", t.extra.len());
    }
    let dst = format!("{}-{}", super::topo::extra_ip(1), super::topo::extra_ip(n));
    let before = t.rx_extra(n)?;
    let (seconds, pps) = pktgen(
        t,
        env,
        secs,
        &dst,
        &SRC_PORT_FIRST.to_string(),
        &SINK_PORT_FIRST.to_string(),
    )?;
    let after = t.rx_extra(n)?;
    Ok(Measured {
        values: vec![(
            Metric::UdpMppsPods(n as u32),
            after.saturating_sub(before) as f64 / seconds / 1e6,
        )],
        offered_mpps: Some(pps / 1e6),
        retransmits: None,
        failed_conns: None,
    })
}

/// Runs strom-pktgen in pod A for `secs` seconds (60-byte frames as fast as it goes), waits
/// for what is in flight, and returns its seconds and packets per second.
fn pktgen(
    t: &Topology,
    env: &Env,
    secs: u32,
    dst: &str,
    sports: &str,
    dports: &str,
) -> Result<(f64, f64)> {
    let json = env.work.join("pktgen.json");
    let _ = std::fs::remove_file(&json);
    ns_run(
        &t.a,
        &[
            &env.bin.join("strom-pktgen").to_string_lossy(),
            "send",
            "--dev",
            "eth0",
            "--cores",
            &env.sender_core.to_string(),
            "--duration",
            &secs.to_string(),
            "--interval-ms",
            "0",
            "--dst-mac",
            &t.mac_ha,
            "--src-ip",
            &IP_A.to_string(),
            "--dst-ip",
            dst,
            "--src-port",
            sports,
            "--dst-port",
            dports,
            "--size",
            "60",
            "--json",
            &json.to_string_lossy(),
        ],
    )?;
    // What is still in flight reaches the pods in well under this.
    std::thread::sleep(Duration::from_millis(500));
    let sent: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    let seconds = sent["seconds"].as_f64().context("strom-pktgen's seconds")?;
    let pps = sent["pps"].as_f64().context("strom-pktgen's pps")?;
    Ok((seconds, pps))
}

fn udp(flows: u32, t: &Topology, env: &Env, secs: u32, dst: &str) -> Result<Measured> {
    let (sports, dports) = port_ranges(flows)?;
    let before = t.rx_b()?;
    let (seconds, pps) = pktgen(t, env, secs, dst, &sports, &dports)?;
    let after = t.rx_b()?;
    Ok(Measured {
        values: vec![(
            Metric::UdpMpps(flows),
            after.saturating_sub(before) as f64 / seconds / 1e6,
        )],
        offered_mpps: Some(pps / 1e6),
        retransmits: None,
        failed_conns: None,
    })
}

/// A server in a namespace, stopped (SIGINT, then SIGKILL) when dropped.
struct Server(Child);

impl Server {
    fn start(ns: &str, args: &[&str]) -> Result<Server> {
        let child = ns_command(ns)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", args[0]))?;
        Ok(Server(child))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        stop_child(&mut self.0, Duration::from_secs(3));
    }
}

/// Waits until something listens on `port` in `ns` (TCP or UDP).
fn wait_listening(ns: &str, port: u16, udp: bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let flag = if udp { "-lun" } else { "-ltn" };
    while Instant::now() < deadline {
        let out = ns_run(ns, &["ss", flag, "sport", "=", &format!(":{port}")])?;
        if out.lines().count() > 1 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on port {port} in {ns} after 5 s")
}

/// Gbit/s received and the segments the senders retransmitted.
fn tcp(streams: u32, t: &Topology, secs: u32, dst: &str) -> Result<(f64, u64)> {
    let port = IPERF_PORT.to_string();
    let _server = Server::start(&t.b, &["iperf3", "-s", "-1", "-p", &port])?;
    wait_listening(&t.b, IPERF_PORT, false)?;
    let (secs, streams) = (secs.to_string(), streams.to_string());
    let out = ns_run(
        &t.a,
        &[
            "iperf3", "-c", dst, "-p", &port, "-t", &secs, "-P", &streams, "-J",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3's JSON")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 gave no result: {}", v["error"]))?;
    let retransmits = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    Ok((bps / 1e9, retransmits))
}

fn latency(t: &Topology, secs: u32, dst: &str) -> Result<(f64, f64)> {
    let port = SOCKPERF_PORT.to_string();
    let _server = Server::start(
        &t.b,
        &["sockperf", "server", "-i", &IP_B.to_string(), "-p", &port],
    )?;
    wait_listening(&t.b, SOCKPERF_PORT, true)?;
    let out = ns_run(
        &t.a,
        &[
            "sockperf",
            "ping-pong",
            "-i",
            dst,
            "-p",
            &port,
            "-t",
            &secs.to_string(),
            "--pps=max",
            "--full-rtt",
        ],
    )?;
    parse_sockperf(&out)
}

/// New TCP connections per second from pod A to `dst`, and the connections that failed: this
/// binary's crr server in pod B, its client in pod A (module `crr`), both pinned to the
/// sender's core as strom-pktgen is, so that the path under test keeps its own core.
fn connections(t: &Topology, env: &Env, secs: u32, dst: std::net::Ipv4Addr) -> Result<(f64, u64)> {
    let exe = std::env::current_exe().context("this binary's path")?;
    let exe = exe.to_string_lossy();
    let (port, conns, core) = (
        CRR_PORT.to_string(),
        crr::CONNS.to_string(),
        env.sender_core.to_string(),
    );
    // Twice the client's loops: a loop's next connection need not wait for the server to
    // finish with its last one (reading the client's FIN and closing).
    let threads = (2 * crr::CONNS).to_string();
    let _server = Server::start(
        &t.b,
        &[
            &exe,
            "crr-server",
            "--port",
            &port,
            "--threads",
            &threads,
            "--core",
            &core,
        ],
    )?;
    wait_listening(&t.b, CRR_PORT, false)?;
    for sysctl in crr::CLIENT_SYSCTLS {
        ns_run(&t.a, &["sysctl", "-qw", sysctl])?;
    }
    let out = ns_run(
        &t.a,
        &[
            &exe,
            "crr-client",
            "--dst",
            &format!("{dst}:{CRR_PORT}"),
            "--conns",
            &conns,
            "--secs",
            &secs.to_string(),
            "--core",
            &core,
        ],
    )?;
    crr::parse(&out)?.judge()
}

/// The 50th and 99th percentiles from sockperf's summary lines
/// (`sockperf: ---> percentile 99.000 =  103.497`).
pub fn parse_sockperf(out: &str) -> Result<(f64, f64)> {
    let pct = |p: &str| {
        out.lines()
            .find(|l| l.contains(&format!("percentile {p} ")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    match (pct("50.000"), pct("99.000")) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => bail!("sockperf printed no percentiles"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_counts_become_port_ranges() {
        assert_eq!(port_ranges(1).unwrap(), ("1024".into(), "9".into()));
        assert_eq!(port_ranges(256).unwrap(), ("1024-1279".into(), "9".into()));
        assert_eq!(
            port_ranges(65536).unwrap(),
            ("1024-1279".into(), "9-264".into())
        );
        assert_eq!(
            port_ranges(512).unwrap(),
            ("1024-1279".into(), "9-10".into())
        );
        assert!(port_ranges(0).is_err());
        assert!(port_ranges(300).is_err());
        assert!(port_ranges(65537).is_err());
    }

    #[test]
    fn sockperf_percentiles_are_read() {
        let out = "sockperf: ---> percentile 99.900 =  470.956\n\
                   sockperf: ---> percentile 99.000 =  103.497\n\
                   sockperf: ---> percentile 50.000 =   59.034\n";
        assert_eq!(parse_sockperf(out).unwrap(), (59.034, 103.497));
        assert!(parse_sockperf("sockperf: error").is_err());
    }

    #[test]
    fn traffic_names_round_trip() {
        for t in ALL {
            assert_eq!(Traffic::parse(&t.name()).unwrap(), t);
        }
        assert_eq!(Traffic::parse("crr").unwrap(), Traffic::Crr);
        assert!(Traffic::parse("tcp_crr").is_err());
    }

    #[test]
    fn metric_keys_round_trip() {
        for m in [
            Metric::UdpMpps(1),
            Metric::UdpMpps(65536),
            Metric::TcpGbps(4),
            Metric::RttP50,
            Metric::RttP99,
            Metric::TcpConnsPerS,
        ] {
            assert_eq!(Metric::from_key(&m.key()), Some(m));
        }
        assert_eq!(Metric::from_key("udp_mpps_x_flows"), None);
    }
}
