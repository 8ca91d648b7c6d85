//! stromd configuration: `configs/stromd.toml`, overridden by command-line flags.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::Deserialize;

/// How workers wait for packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PollMode {
    /// Spin on the rings forever: lowest latency, one full core per worker.
    Busy,
    /// Spin while there is work, sleep in poll(2) after a short idle spell.
    Adaptive,
}

impl PollMode {
    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            PollMode::Busy => "busy",
            PollMode::Adaptive => "adaptive",
        }
    }
}

/// `[node]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// The node's own addresses: traffic to them is the kernel's.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// The node's pod CIDR (IPv4).
    pub pod_cidr: Ipv4Net,
    /// The gateway address every pod routes through.
    #[serde(default = "default_gateway")]
    pub pod_gateway: Ipv4Addr,
    /// The node's uplink interface: traffic for the pod CIDR arriving there is stromd's, the
    /// rest stays the kernel's. None: pods reach only pods and the node.
    #[serde(default)]
    pub uplink: Option<String>,
    /// Next hop on the uplink for everything outside the node (routed, no NAT: the network
    /// must route the pod CIDR to the node's address).
    #[serde(default)]
    pub uplink_gateway: Option<Ipv4Addr>,
    /// Whether pods' TCP, UDP and SCTP connections to destinations outside the cluster are
    /// masqueraded to the node's address (as kube-proxy's `--cluster-cidr` rule and the
    /// ip-masq-agent do).
    #[serde(default = "yes")]
    pub masquerade: bool,
    /// Destinations never masqueraded: the cluster's own CIDRs (the pod CIDR is always among
    /// them; add the other nodes' pod CIDRs and the service CIDR) and any network that routes
    /// pod addresses back to the node.
    #[serde(default)]
    pub no_masquerade: Vec<Ipv4Net>,
    /// Whether the node's own sockets (those of stromd's network namespace) reach Services:
    /// a connection or UDP datagram to a frontend is given a backend when the socket names it
    /// (cgroup programs, `xdp/bpf/socklb.c`).
    #[serde(default = "yes")]
    pub node_sockets: bool,
    /// The cgroup v2 directory whose processes' sockets `node_sockets` serves (its
    /// descendants too). Empty: the root of the cgroup v2 hierarchy, every process.
    #[serde(default)]
    pub node_cgroup: PathBuf,
}

fn yes() -> bool {
    true
}

/// `[dataplane]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneSection {
    /// Number of worker threads.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Cores to pin workers to (worker i → cores[i % len]); empty: no pinning.
    #[serde(default)]
    pub cores: Vec<usize>,
    #[serde(default = "default_poll")]
    pub poll_mode: PollMode,
    /// Frames (4 KiB each) in each worker's slice of the UMEM all ports share (a power of
    /// two, at least ring_size and 1024).
    #[serde(default = "default_frames")]
    pub umem_frames: u32,
    /// Size of each AF_XDP ring (power of two).
    #[serde(default = "default_ring")]
    pub ring_size: u32,
    /// The deepest a port's fill ring gets (at most ring_size), once the port has shown
    /// that it receives in bursts, as far as the worker's fill budget allows.
    #[serde(default = "default_fill")]
    pub fill_per_port: u32,
    /// The depth every port's fill ring keeps from the moment it is registered (at least
    /// 18, the buffers of a pod's largest frame; at most fill_per_port). A worker serves as
    /// many ports as three quarters of its frames keep this deep.
    #[serde(default = "default_fill_min")]
    pub fill_min: u32,
    /// Flows each worker tracks at most (connection tracking for Services), and ClientIP
    /// affinities likewise. Reserved when the worker starts (43 MiB per worker at the
    /// default: conntrack 30, affinity 13; about 330 bytes a flow), touched as flows come. A new flow finding the table full fails, counted as
    /// `conntrack_full`.
    #[serde(default = "default_conntrack_max")]
    pub conntrack_max: usize,
    /// Source ports on the node's addresses that stromd translates to (SNAT of external
    /// traffic to Services under `externalTrafficPolicy: Cluster`, masquerade), first and
    /// last: answers to them are stromd's, so the kernel must not use them (the default lies
    /// above Linux's `ip_local_port_range`, 32768-60999). Split evenly between the workers.
    #[serde(default = "default_snat_ports")]
    pub snat_ports: [u16; 2],
    /// Unix socket of the API.
    #[serde(default = "default_socket")]
    pub api_socket: PathBuf,
    /// Where ports are recorded for restarts.
    #[serde(default = "default_state")]
    pub state_dir: PathBuf,
    /// Where the XDP programs' links are pinned (on bpffs; mounted on /sys/fs/bpf if need
    /// be), so that they stay attached, failing closed, while stromd is stopped or
    /// restarting. One directory per stromd. Empty: not pinned (programs come off when
    /// stromd stops, and the node's kernel then sees the pods' frames).
    #[serde(default = "default_pin_dir")]
    pub bpf_pin_dir: PathBuf,
    /// Where `/metrics` (Prometheus), `/healthz` and `/readyz` are served over HTTP, e.g.
    /// "127.0.0.1:9101". Unset: not served.
    #[serde(default)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How the pods' XDP program is attached: "native" (the default, veth's own XDP, which
    /// clears the pod side's TSO and GSO) or "generic" (skb mode, the pod's offloads left
    /// alone: slower, and a pod with TSO on cannot send bulk TCP toward the uplink, which
    /// stromd does not segment). Applies to pods wired after a change (a pinned link keeps its
    /// mode). docs/design.md, "Generic-mode XDP".
    #[serde(default)]
    pub pod_xdp: PodXdp,
}

/// How the pods' XDP program is attached (`dataplane.pod_xdp`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodXdp {
    #[default]
    Native,
    Generic,
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeSection,
    #[serde(default = "default_dataplane")]
    pub dataplane: DataplaneSection,
}

fn default_gateway() -> Ipv4Addr {
    Ipv4Addr::new(169, 254, 1, 1)
}
fn default_workers() -> usize {
    1
}
fn default_poll() -> PollMode {
    PollMode::Adaptive
}
fn default_frames() -> u32 {
    8192
}
fn default_fill() -> u32 {
    2048
}
fn default_fill_min() -> u32 {
    32
}
fn default_snat_ports() -> [u16; 2] {
    [61000, 65535]
}
fn default_conntrack_max() -> usize {
    crate::pipeline::CONNTRACK_MAX
}
fn default_ring() -> u32 {
    2048
}
fn default_socket() -> PathBuf {
    PathBuf::from(strom_api::DEFAULT_SOCKET)
}
fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/strom")
}
fn default_state() -> PathBuf {
    PathBuf::from("/run/strom")
}
fn default_dataplane() -> DataplaneSection {
    DataplaneSection {
        workers: default_workers(),
        cores: Vec::new(),
        poll_mode: default_poll(),
        umem_frames: default_frames(),
        ring_size: default_ring(),
        fill_per_port: default_fill(),
        fill_min: default_fill_min(),
        conntrack_max: default_conntrack_max(),
        snat_ports: default_snat_ports(),
        api_socket: default_socket(),
        state_dir: default_state(),
        bpf_pin_dir: default_pin_dir(),
        metrics_addr: None,
        pod_xdp: PodXdp::Native,
    }
}

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Parse(PathBuf, String),
    #[error("invalid {field}: {why}")]
    Invalid { field: &'static str, why: String },
}

impl Config {
    /// Reads and validates a file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        let cfg: Config =
            toml::from_str(&text).map_err(|e| ConfigError::Parse(path.into(), e.to_string()))?;
        Ok(cfg)
    }

    /// Checks the values against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let inv = |field, why: String| Err(ConfigError::Invalid { field, why });
        let d = &self.dataplane;
        if d.workers == 0 || d.workers > 64 {
            return inv(
                "dataplane.workers",
                format!("{} (must be 1..=64)", d.workers),
            );
        }
        let ncores = core_affinity::get_core_ids()
            .map(|c| c.len())
            .unwrap_or(usize::MAX);
        if let Some(c) = d.cores.iter().find(|&&c| c >= ncores) {
            return inv(
                "dataplane.cores",
                format!("core {c} does not exist (this machine has {ncores})"),
            );
        }
        if !d.ring_size.is_power_of_two() || !(64..=8192).contains(&d.ring_size) {
            return inv(
                "dataplane.ring_size",
                format!("{} (a power of two, 64..=8192)", d.ring_size),
            );
        }
        if !d.umem_frames.is_power_of_two()
            || d.umem_frames < d.ring_size.max(1024)
            || d.umem_frames > 1 << 20
        {
            return inv(
                "dataplane.umem_frames",
                format!(
                    "{} (a power of two, at least ring_size and 1024, at most 1048576)",
                    d.umem_frames
                ),
            );
        }
        if d.fill_per_port == 0 || d.fill_per_port > d.ring_size {
            return inv(
                "dataplane.fill_per_port",
                format!("{} (1..=ring_size)", d.fill_per_port),
            );
        }
        let [lo, hi] = d.snat_ports;
        if lo == 0 || hi < lo || usize::from(hi - lo) + 1 < d.workers * 64 {
            return inv(
                "dataplane.snat_ports",
                format!("[{lo}, {hi}] (first <= last, 64 ports a worker at least)"),
            );
        }
        if d.conntrack_max == 0 || d.conntrack_max > 1 << 24 {
            return inv(
                "dataplane.conntrack_max",
                format!("{} (1..=16777216)", d.conntrack_max),
            );
        }
        // A pod's largest frame takes `MAX_CHAIN` fill frames: a floor below that would never
        // take one, and so never drain to be deepened.
        let least = crate::xsk::MAX_CHAIN as u32;
        if d.fill_min < least || d.fill_min > d.fill_per_port {
            return inv(
                "dataplane.fill_min",
                format!(
                    "{} ({least}..=fill_per_port: a pod's largest frame)",
                    d.fill_min
                ),
            );
        }
        if self.node.pod_cidr.contains(&self.node.pod_gateway) {
            return inv(
                "node.pod_gateway",
                format!(
                    "{} lies inside the pod CIDR {}",
                    self.node.pod_gateway, self.node.pod_cidr
                ),
            );
        }
        if self.node.uplink_gateway.is_some() && self.node.uplink.is_none() {
            return inv("node.uplink_gateway", "needs node.uplink".into());
        }
        if let Some(u) = &self.node.uplink {
            if u.is_empty() || u.len() > 15 || u.contains('/') {
                return inv("node.uplink", format!("{u:?} is not an interface name"));
            }
        }
        if let Some(a) = self
            .node
            .addresses
            .iter()
            .find(|a| matches!(a, IpAddr::V4(v) if self.node.pod_cidr.contains(v)))
        {
            return inv(
                "node.addresses",
                format!("{a} lies inside the pod CIDR {}", self.node.pod_cidr),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(s).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse("[node]\npod_cidr = \"198.18.16.0/20\"\n").unwrap();
        assert_eq!(c.node.pod_gateway, Ipv4Addr::new(169, 254, 1, 1));
        assert_eq!(c.dataplane.workers, 1);
        assert_eq!(c.dataplane.poll_mode, PollMode::Adaptive);
    }

    #[test]
    fn unknown_field_is_refused_by_name() {
        let e = parse("[node]\npod_cidr = \"198.18.16.0/20\"\npod_cdir = 1\n").unwrap_err();
        assert!(e.contains("pod_cdir"), "{e}");
    }

    #[test]
    fn uplink_gateway_needs_an_uplink() {
        let e = parse("[node]\npod_cidr = \"198.18.16.0/20\"\nuplink_gateway = \"198.18.0.2\"\n")
            .unwrap_err();
        assert!(e.contains("node.uplink_gateway"), "{e}");
        parse("[node]\npod_cidr = \"198.18.16.0/20\"\nuplink = \"eth0\"\nuplink_gateway = \"198.18.0.2\"\n").unwrap();
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = parse("[node]\npod_cidr = \"198.18.16.0/20\"\n[dataplane]\nring_size = 100\n")
            .unwrap_err();
        assert!(e.contains("dataplane.ring_size"), "{e}");
        let e = parse("[node]\npod_cidr = \"198.18.16.0/20\"\npod_gateway = \"198.18.16.1\"\n")
            .unwrap_err();
        assert!(e.contains("node.pod_gateway"), "{e}");
        let e = parse("[node]\npod_cidr = \"198.18.16.0/20\"\n[dataplane]\numem_frames = 1000\n")
            .unwrap_err();
        assert!(e.contains("dataplane.umem_frames"), "{e}");
        let e = parse("[node]\npod_cidr = \"198.18.16.0/20\"\n[dataplane]\nfill_per_port = 4096\n")
            .unwrap_err();
        assert!(e.contains("dataplane.fill_per_port"), "{e}");
        let e = parse(
            "[node]\npod_cidr = \"198.18.16.0/20\"\n[dataplane]\nring_size = 512\nfill_per_port = 1024\n",
        )
        .unwrap_err();
        assert!(e.contains("dataplane.fill_per_port"), "{e}");
        let e = parse("[node]\npod_cidr = \"198.18.16.0/33\"\n").unwrap_err();
        assert!(e.contains("pod_cidr"), "{e}");
    }
}
