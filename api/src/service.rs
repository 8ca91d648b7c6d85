//! Services as stromd takes them: one [`ServiceSpec`] per Kubernetes Service, already
//! translated from the Service and its EndpointSlices by the control crate (targetPort
//! resolved per endpoint, endpoint conditions and node carried as they are). stromd decides
//! which endpoints serve (kube-proxy's rules) and programs its tables; nothing here is
//! Kubernetes' object model.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// A transport protocol of a Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// From an IP protocol number.
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            132 => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "sctp" => Ok(Protocol::Sctp),
            other => Err(format!("unknown protocol {other:?} (tcp, udp or sctp)")),
        }
    }
}

/// One endpoint of a Service port, with the conditions its EndpointSlice gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSpec {
    pub ip: IpAddr,
    /// The port this endpoint serves the Service port on (targetPort, resolved for it).
    pub port: u16,
    /// `conditions.ready` (unset means ready).
    pub ready: bool,
    /// `conditions.serving` (unset means as `ready`).
    pub serving: bool,
    /// `conditions.terminating` (unset means not).
    pub terminating: bool,
    /// The endpoint runs on this node (its `nodeName` is the node's).
    pub local: bool,
    /// Whether the Service's topology-aware routing leaves the endpoint to this node for
    /// traffic under a Cluster policy: it is hinted for the node's zone (or the node itself),
    /// or the hints do not apply here, as kube-proxy decides (`topologyModeFromHints`).
    /// Unset means yes.
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub in_topology: bool,
    /// The pod behind it (`namespace/name`), for display.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
}

/// One port of a Service and its endpoints: the unit stromd balances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePortSpec {
    /// The port's name ("" when the Service has a single unnamed port).
    #[serde(default)]
    pub name: String,
    pub protocol: Protocol,
    /// The port on the ClusterIPs, external IPs and load-balancer IPs.
    pub port: u16,
    /// The NodePort on the node's addresses (NodePort and LoadBalancer Services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
}

/// A Service as stromd programs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    /// `spec.clusterIPs` (none: headless, nothing is programmed).
    #[serde(default)]
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.externalIPs`.
    #[serde(default)]
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`.
    #[serde(default)]
    pub load_balancer_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortSpec>,
    /// `sessionAffinity: ClientIP`, with `timeoutSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_s: Option<u32>,
    /// `externalTrafficPolicy: Local`.
    #[serde(default)]
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`.
    #[serde(default)]
    pub internal_local: bool,
    /// `healthCheckNodePort` (LoadBalancer with `externalTrafficPolicy: Local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
}

impl ServiceSpec {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Checks what stromd relies on: addresses are IPv4 unicast, ports non-zero, port names
    /// and (protocol, port) pairs unique, at most [`MAX_ENDPOINTS`] endpoints a port.
    pub fn validate(&self) -> Result<(), String> {
        let key = self.key();
        if self.namespace.is_empty() || self.name.is_empty() {
            return Err("a Service needs a namespace and a name".into());
        }
        for ip in self
            .cluster_ips
            .iter()
            .chain(&self.external_ips)
            .chain(&self.load_balancer_ips)
        {
            match ip {
                IpAddr::V4(v4)
                    if !v4.is_unspecified() && !v4.is_broadcast() && !v4.is_multicast() => {}
                _ => return Err(format!("{key}: address {ip} is not IPv4 unicast")),
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut names = std::collections::BTreeSet::new();
        for p in &self.ports {
            if p.port == 0 || p.node_port == Some(0) {
                return Err(format!("{key}: port 0 in port {:?}", p.name));
            }
            if !seen.insert((p.protocol, p.port)) {
                return Err(format!(
                    "{key}: {}/{} appears twice",
                    p.port,
                    p.protocol.name()
                ));
            }
            if !names.insert(p.name.as_str()) {
                return Err(format!("{key}: port name {:?} appears twice", p.name));
            }
            if p.endpoints.len() > MAX_ENDPOINTS {
                return Err(format!(
                    "{key}: {} endpoints on port {:?} (at most {MAX_ENDPOINTS})",
                    p.endpoints.len(),
                    p.name
                ));
            }
            for e in &p.endpoints {
                if e.port == 0 {
                    return Err(format!("{key}: endpoint {} has port 0", e.ip));
                }
                if !e.ip.is_ipv4() {
                    return Err(format!("{key}: endpoint {} is not IPv4", e.ip));
                }
            }
        }
        Ok(())
    }
}

/// Endpoints a Service port may have (Maglev keeps a slot table per port).
pub const MAX_ENDPOINTS: usize = 4096;

/// One Service port as stromd serves it, with its counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePortStatus {
    /// `namespace/name:port-name` (`namespace/name:port` for an unnamed port).
    pub key: String,
    pub protocol: Protocol,
    /// Every `address:port` that reaches it, with its kind (`cluster-ip`, `node-port`,
    /// `external-ip`, `load-balancer`).
    pub frontends: Vec<(String, String)>,
    /// The endpoints and whether each serves traffic from inside and from outside the node
    /// (kube-proxy's rules: ready ones; serving-but-terminating ones when no ready one is
    /// left; local ones only under a Local traffic policy).
    pub backends: Vec<BackendStatus>,
    /// New connections (flows) given a backend, and packets translated, on every worker.
    pub flows: u64,
    pub packets: u64,
    /// Connections refused for want of a usable endpoint.
    pub rejected: u64,
}

/// One endpoint in [`ServicePortStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub addr: String,
    pub target: String,
    pub internal: bool,
    pub external: bool,
    /// Flows this endpoint was chosen for.
    pub flows: u64,
}

/// Which conntrack entries a request is about (every filter given must match).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackFilter {
    /// Any address of the entry (original or translated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<IpAddr>,
    /// Any port of the entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The Service (`namespace/name`) the flow was balanced for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// One tracked flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackEntry {
    pub worker: usize,
    pub protocol: String,
    /// The flow as its first packet came (`src:port -> dst:port`).
    pub original: String,
    /// The flow as the translation makes it.
    pub translated: String,
    pub state: String,
    /// Seconds until it expires without traffic.
    pub expires_in_s: u64,
    pub service: String,
    pub packets: u64,
    /// The worker that owns the flow and translates it, when this worker only hands it the
    /// flow's answers (a client beyond a multi-queue uplink whose backend is here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<usize>,
}

/// A 5-tuple to trace (`stromctl trace`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tuple {
    pub protocol: Protocol,
    pub src: IpAddr,
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
}

fn yes() -> bool {
    true
}

fn is_yes(b: &bool) -> bool {
    *b
}
