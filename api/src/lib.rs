//! The contract between the strom processes.
//!
//! stromd listens on a Unix stream socket. Every request is one JSON object on one line, and
//! every response is one JSON object on one line. The CNI plugin, `stromctl` and the control
//! plane link only this crate, never the dataplane.

pub mod mac;
pub mod policy;
pub mod service;

pub use policy::{
    Direction, IpBlock, IsolatedPod, PeerAddr, Peers, PolicySet, PolicyStatus, PortRange, Rule,
    RuleGroup,
};
pub use service::{
    BackendStatus, ConntrackEntry, ConntrackFilter, EndpointSpec, Protocol, ServicePortSpec,
    ServicePortStatus, ServiceSpec, Tuple,
};

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Addresses as a comma-separated list, for messages and tables.
pub fn ips_text(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The version of this contract. A peer sends it first ([`Request::Hello`]); stromd refuses a
/// peer of another version with a clear error rather than misreading its requests. It changes
/// whenever a request or response changes in a way an older peer would misread.
pub const CONTRACT: u32 = 3;

/// Where stromd listens unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/strom/stromd.sock";

/// The largest MTU stromd carries through the uplink (bytes of IP): what leaves a node has at
/// most this, and strom-cni keeps the pods' path MTU within it.
pub const MAX_UPLINK_MTU: u32 = 2034;

/// A pod's host-side port, as the CNI plugin registers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    /// Host-side veth name in the node namespace.
    pub ifname: String,
    /// The pod's addresses (its only allowed source addresses).
    pub ips: Vec<IpAddr>,
    /// The pod-side interface MAC (the only allowed source MAC).
    pub mac: String,
    /// Container (sandbox) id from CNI_CONTAINERID.
    pub container_id: String,
    /// Interface name inside the pod (CNI_IFNAME).
    #[serde(default)]
    pub pod_ifname: String,
    /// Kubernetes namespace of the pod, when known.
    #[serde(default)]
    pub pod_namespace: String,
    /// Kubernetes name of the pod, when known.
    #[serde(default)]
    pub pod_name: String,
}

/// Identifies a registered port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortKey {
    /// By host-side interface name.
    Ifname(String),
    /// By container id and pod interface name.
    Container {
        container_id: String,
        pod_ifname: String,
    },
}

/// What becomes of a removed port's interface (`Request::RemovePort`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortInterface {
    /// It stays (`stromctl remove-port`): stromd detaches its XDP program.
    #[default]
    Keep,
    /// The caller is deleting it now: stromd closes the port's AF_XDP socket only once the
    /// kernel has unbound it in that deletion (or after half a second at most), and leaves the
    /// XDP program to go with the interface. A socket closed while its interface is being
    /// deleted makes the deletion wait out RCU grace periods for the socket's hold on the
    /// interface.
    CallerDeletes,
    /// stromd deletes it (a veth: both ends), as for `CallerDeletes`, and answers once the
    /// kernel has unlisted it: its name and index are free and it is gone from every
    /// namespace. The rest of the kernel's teardown (`rcu_barrier()` and the wait for the
    /// last references, tens of milliseconds) runs on in stromd, not in the caller (CNI DEL). An
    /// interface that is not the port's any more (another index under its name) is left alone.
    Delete,
}

/// A request to stromd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The first request of a long-lived peer (strom-control): the contract version it
    /// speaks, and the writer id its deltas carry ([`Delta`]), if any. Answered with
    /// stromd's ([`Response::Hello`]), or refused when they differ.
    Hello {
        contract: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        writer: Option<u64>,
    },
    /// Is the dataplane up and able to take ports?
    Status,
    /// Register a pod port (idempotent for the same spec).
    AddPort { spec: PortSpec },
    /// Unregister a port; succeeds when it is already gone.
    RemovePort {
        key: PortKey,
        /// What becomes of the port's interface.
        #[serde(default)]
        interface: PortInterface,
    },
    /// List the registered ports with their counters.
    Ports,
    /// Per-worker counters and drop reasons.
    Stats,
    /// The forwarding tables as the workers see them.
    Tables,
    /// Programs a Service (replacing what stromd had under its namespace and name, all of
    /// its ports at once). A Service without ClusterIPs (headless) is removed.
    SetService { service: ServiceSpec },
    /// Removes a Service; succeeds when it is already gone.
    RemoveService { namespace: String, name: String },
    /// Many Services at once (a peer's whole round, or a large part of it): the Services
    /// `remove`d (`namespace/name`; gone already is fine), then those `set`, each as
    /// `SetService` would, published to the workers as one new table. Each one refused is
    /// refused alone and named with its reason in [`Response::Applied`]; the rest is applied.
    SetServices {
        #[serde(default)]
        set: Vec<ServiceSpec>,
        #[serde(default)]
        remove: Vec<String>,
        /// The delta's number, if the peer numbers them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delta: Option<Delta>,
    },
    /// Every Service port with its frontends, backends and counters. `counters_only` leaves
    /// out the flows tracked to each backend, which stromd counts by walking every tracked
    /// flow (what a metrics scrape asks: the per-port counters are kept as they go).
    Services {
        #[serde(default)]
        counters_only: bool,
    },
    /// Tracked flows matching the filter (`count_only`: just how many).
    Conntrack {
        #[serde(default)]
        filter: ConntrackFilter,
        #[serde(default)]
        count_only: bool,
    },
    /// Forgets the tracked flows matching the filter (their next packet is balanced anew).
    FlushConntrack {
        #[serde(default)]
        filter: ConntrackFilter,
    },
    /// What stromd would do with a packet of this 5-tuple arriving from a pod.
    Trace { tuple: Tuple },
    /// Replaces the node's NetworkPolicies, all at once.
    SetPolicies {
        policies: PolicySet,
        /// The delta's number, if the peer numbers them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delta: Option<Delta>,
    },
    /// Every policy selecting a pod of the node, with the pods and the drops.
    Policies,
}

/// The number a peer gives a change to stromd's tables (`SetServices`, `SetPolicies`): its
/// `writer` id (one per run of the peer) and a `seq` that grows with each delta. stromd
/// applies a writer's deltas in order, once each: a delta numbered as the last one applied
/// is answered as it was, without applying it again (a peer sends it again when the answer
/// was lost); one numbered below it is refused (out of order). stromd remembers the last
/// deltas of [`DELTA_WRITERS`] writers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub writer: u64,
    pub seq: u64,
}

/// How many writers' last deltas stromd remembers (the least recently seen is forgotten).
pub const DELTA_WRITERS: usize = 16;

/// Dataplane readiness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// True only while every worker's loop is moving.
    pub ready: bool,
    /// Why stromd is not ready (a worker that ended, panicked or stopped moving).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub version: String,
    pub workers: usize,
    pub ports: usize,
    pub poll_mode: String,
    pub uplink: Option<String>,
}

/// Packet and byte counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drops: u64,
    /// Packets sent with the kernel asked to finish their transport checksum (AF_XDP transmit
    /// metadata, toward pods).
    #[serde(default)]
    pub csum_offloaded: u64,
}

/// One registered port and its counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortStatus {
    pub id: u32,
    pub kind: String,
    pub worker: usize,
    /// The worker serving each receive queue's socket (index = queue): one entry for a pod,
    /// one per queue for the uplink.
    #[serde(default)]
    pub queue_workers: Vec<usize>,
    pub ifindex: u32,
    pub spec: PortSpec,
    pub host_mac: String,
    pub xdp_mode: String,
    /// How its AF_XDP sockets bound: "copy", or "zero-copy" (the uplink, on a NIC whose
    /// driver supports it).
    #[serde(default)]
    pub xsk_mode: String,
    pub counters: Counters,
    /// How deep the port's fill ring is kept now: the worker's floor, or deeper (up to
    /// `fill_per_port`) while the port receives in bursts.
    #[serde(default)]
    pub fill_depth: u64,
}

/// One worker's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStats {
    pub id: usize,
    pub core: Option<usize>,
    pub ports: usize,
    pub counters: Counters,
    /// Drop reason name → count (only non-zero reasons).
    pub drops: Vec<(String, u64)>,
    pub loops: u64,
    pub sleeps: u64,
    /// Frames of the worker's UMEM slice in its free pool, and in all (the rest are lent to
    /// the kernel: fill, rx, tx and completion rings).
    #[serde(default)]
    pub frames_free: u64,
    #[serde(default)]
    pub frames_total: u64,
    /// Frames in the worker's fill rings, as last sampled (every few thousand loops, and
    /// before an adaptive worker sleeps). Idle, free + in fill = total: no frame is lost.
    #[serde(default)]
    pub frames_in_fill: u64,
    /// The depth every port's fill ring keeps at least (`fill_min`): what each port has from
    /// the moment it is registered.
    #[serde(default)]
    pub fill_floor: u64,
    /// The most the worker's fill rings may hold together (three quarters of its frames less
    /// a reserve), and what their depths add up to now: the floor for each port, more for
    /// ports receiving in bursts. Memory is the worker's frames whatever the number of ports.
    #[serde(default)]
    pub fill_budget: u64,
    #[serde(default)]
    pub fill_reserved: u64,
    /// How long the worker thread has waited for its core since it started, in ns: time it
    /// was runnable while another task held the core (the kernel's schedstat run_delay). A
    /// port's fill ring lasts only so long without the worker: drops for want of fill frames
    /// follow long waits. 0 where the kernel keeps no schedstats.
    #[serde(default)]
    pub core_wait_ns: u64,
    /// Times another task took the worker's core from it (involuntary context switches).
    #[serde(default)]
    pub preemptions: u64,
}

/// One forwarding entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteEntry {
    pub prefix: String,
    pub target: String,
}

/// A response from stromd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Ok,
    /// The answer to `SetServices`: the Services refused (`namespace/name`, why); all the
    /// others were applied. The answer to a numbered `SetPolicies` too (nothing refused:
    /// a refused policy set is an [`Response::Error`]). `delta` acknowledges the delta's
    /// number.
    Applied {
        refused: Vec<(String, String)>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delta: Option<u64>,
    },
    Hello {
        contract: u32,
        /// stromd's version.
        version: String,
        /// Changes on every start of stromd: a peer that sees it change knows stromd's
        /// tables started empty again.
        instance: u64,
        /// How many changes to the Service and policy tables this start of stromd has
        /// applied: one per `SetService`, `RemoveService` and `SetPolicies` answered
        /// without error, and per Service a `SetServices` removed or set (not those it
        /// refused). A peer that counts the changes acknowledged to it and finds another
        /// figure knows some other client changed the tables: it lists and sets what it
        /// wants again.
        #[serde(default)]
        generation: u64,
        /// The number of the last delta of the greeting's writer this start of stromd took
        /// (applied, or refused with its answer kept; none: none of its deltas).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        applied: Option<u64>,
    },
    Status(StatusInfo),
    Port(Box<PortStatus>),
    Ports {
        ports: Vec<PortStatus>,
    },
    Stats {
        workers: Vec<WorkerStats>,
        /// What the XDP programs dropped before stromd saw it, by reason (only non-zero
        /// reasons): a pod's spoofed frames for the node, frames for a socket not bound yet.
        #[serde(default)]
        xdp_drops: Vec<(String, u64)>,
    },
    Tables {
        gateway: String,
        node_addrs: Vec<String>,
        routes: Vec<RouteEntry>,
    },
    Services {
        services: Vec<ServicePortStatus>,
        /// `SetService` requests refused since stromd started (each answered with why).
        #[serde(default)]
        refused: u64,
    },
    Conntrack {
        /// Matching entries on every worker (all of them, also with `count_only`).
        total: u64,
        /// The matching entries (none with `count_only`).
        entries: Vec<ConntrackEntry>,
    },
    /// How many entries a flush removed.
    Flushed {
        entries: u64,
    },
    Trace {
        /// One line per decision, in order.
        steps: Vec<String>,
    },
    Policies {
        policies: Vec<PolicyStatus>,
    },
    Error {
        message: String,
    },
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to stromd at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("i/o with stromd failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("stromd sent a malformed response: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("stromd closed the connection without answering")]
    Closed,
    #[error("stromd refused: {0}")]
    Refused(String),
}

/// A blocking client: one connection, requests answered in order.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects with a timeout applied to every read and write.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        Ok(Client {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends one request and waits for its response. `Response::Error` becomes `Refused`.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        let mut buf = String::new();
        if self.reader.read_line(&mut buf)? == 0 {
            return Err(ClientError::Closed);
        }
        match serde_json::from_str::<Response>(&buf)? {
            Response::Error { message } => Err(ClientError::Refused(message)),
            other => Ok(other),
        }
    }
}

/// Encodes one response line (used by the server side).
pub fn encode_line<T: Serialize>(value: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec(value).unwrap_or_else(|e| {
        format!(r#"{{"result":"error","message":"encode: {e}"}}"#).into_bytes()
    });
    v.push(b'\n');
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_is_one_line_json() {
        let req = Request::AddPort {
            spec: PortSpec {
                ifname: "st1234".into(),
                ips: vec!["198.18.10.2".parse().unwrap()],
                mac: "02:00:00:00:00:01".into(),
                container_id: "abc".into(),
                pod_ifname: "eth0".into(),
                pod_namespace: "default".into(),
                pod_name: "a".into(),
            },
        };
        let line = encode_line(&req);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let back: Request = serde_json::from_slice(&line).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn a_removal_from_an_older_caller_does_not_say_the_interface_is_being_deleted() {
        let r: Request =
            serde_json::from_str(r#"{"op":"remove_port","key":{"ifname":"st1"}}"#).unwrap();
        assert_eq!(
            r,
            Request::RemovePort {
                key: PortKey::Ifname("st1".into()),
                interface: PortInterface::Keep,
            }
        );
        let r: Request = serde_json::from_str(
            r#"{"op":"remove_port","key":{"ifname":"st1"},"interface":"delete"}"#,
        )
        .unwrap();
        assert!(matches!(
            r,
            Request::RemovePort {
                interface: PortInterface::Delete,
                ..
            }
        ));
    }

    #[test]
    fn error_response_decodes() {
        let r: Response = serde_json::from_str(r#"{"result":"error","message":"no"}"#).unwrap();
        assert_eq!(
            r,
            Response::Error {
                message: "no".into()
            }
        );
    }
}
