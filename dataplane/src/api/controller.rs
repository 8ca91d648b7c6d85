//! The controller: owns the XDP programs, the tables' next version and the port registry, and
//! answers `strom-api` requests one at a time (the server hands them over). All table changes
//! happen here and reach the workers by an atomic snapshot swap.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strom_api::{
    PortInterface, PortKey, PortSpec, PortStatus, Request, Response, RouteEntry, StatusInfo,
    WorkerStats,
};

use crate::bpf::{Role, XdpPrograms};
use crate::config::Config;
use crate::mac::{fmt_mac, parse_mac, Mac};
use crate::netlink::Deletion;
use crate::pipeline::PortKind;
use crate::reconcile::Reconciler;
use crate::state::StateFile;
use crate::stats::SharedCounters;
use crate::tables::{Next, TableHandle};
use crate::worker::{wait_reply, Command, PortSetup, WorkerShared};

mod deltas;
mod persist;
mod policy;
mod services;

/// How long, at most, to wait for the kernel to release a queue's previous socket.
const BUSY_RETRIES: u32 = 100;
const BUSY_WAIT: Duration = Duration::from_millis(10);
/// When the XDP program of an interface its caller said it was deleting comes off, should the
/// interface still be there: after the socket's longest linger (`worker::LINGER_MAX`).
const DETACH_AFTER_DELETION: Duration = Duration::from_secs(2);
/// How long a `PortInterface::Delete` caller waits, at most, for the kernel to unlist the
/// interface (normally 1-2 ms; the kernel's lock may be busy with other pods' wiring).
const UNLIST_WITHIN: Duration = Duration::from_secs(1);

/// Ports (and XSKMAP slots) a node can have.
pub const MAX_PORTS: usize = 4096;

struct PortRecord {
    id: u32,
    worker: usize,
    ifindex: u32,
    spec: PortSpec,
    host_mac: Mac,
    xdp_mode: &'static str,
    zero_copy: bool,
    counters: Arc<SharedCounters>,
}

/// The registry and everything that changes with it.
pub struct Controller {
    cfg: Config,
    xdp: XdpPrograms,
    /// The desired state and the tables built from it.
    desired: Reconciler,
    workers: Vec<Arc<WorkerShared>>,
    ports: BTreeMap<u32, PortRecord>,
    next_id: u32,
    state: StateFile,
    /// Interfaces whose XDP program comes off after the current reply (`None`), or, for
    /// interfaces being deleted, at the first look after the time given (normally the deletion
    /// took the program with it by then).
    pending_detach: Vec<(u32, Option<Instant>)>,
    /// Threads deleting removed ports' interfaces (`PortInterface::Delete`): each returns once
    /// the kernel's teardown is over, after its caller was answered.
    deleting: Vec<std::thread::JoinHandle<()>>,
    uplink: Option<Uplink>,
    /// Recorded ports whose interface exists but which could not be registered again yet
    /// (their previous socket still closing after a `kill -9`, say): kept in the record and
    /// tried again at every upkeep, their interfaces' programs left attached meanwhile (a
    /// pod program without a socket drops: fail closed).
    unrestored: Vec<PortSpec>,
    /// Services refused since start (malformed, or a frontend another Service holds).
    services_refused: u64,
    /// NodePorts (protocol, port) and external/load-balancer IPs the XDP programs hand
    /// stromd now.
    bpf_node_ports: std::collections::BTreeSet<(u8, u16)>,
    bpf_vips: std::collections::BTreeSet<Ipv4Addr>,
    /// The Services' `healthCheckNodePort` servers.
    health_checks: crate::healthcheck::HealthChecks,
    /// The node's own sockets' Services (`node.node_sockets`).
    node_sockets: Option<crate::node_sockets::NodeSockets>,
    /// This start's identity, for peers to notice a restart (`Request::Hello`).
    instance: u64,
    /// Changes applied to the Service and policy tables since this start (`Request::Hello`).
    generation: u64,
    /// Numbered writers' last deltas.
    deltas: deltas::Deltas,
    /// The policies in force as last set (saved when stromd stops).
    policies: Option<strom_api::PolicySet>,
    /// The worker each port was on before a restart, by interface name: a port coming back
    /// goes there, where its flows were taken up (`persist`).
    placement: BTreeMap<String, usize>,
}

/// What `open_port` needs to know.
struct OpenPort<'a> {
    id: u32,
    worker: usize,
    ifindex: u32,
    queue: u32,
    kind: PortKind,
    host_mac: Mac,
    pod_mac: Mac,
    ips: &'a [IpAddr],
    counters: &'a Arc<SharedCounters>,
}

/// One receive queue of the uplink: its socket's port id (XSKMAP slot) and worker.
struct UplinkQueue {
    id: u32,
    worker: usize,
}

/// The node's uplink port and what is known of its gateway.
struct Uplink {
    /// One socket per receive queue, queue q on worker q mod workers. Each worker with one
    /// also transmits on it; the others hand their frames to queue 0's worker.
    queues: Vec<UplinkQueue>,
    ifindex: u32,
    ifname: String,
    mac: Mac,
    xdp_mode: &'static str,
    zero_copy: bool,
    counters: Arc<SharedCounters>,
    gateway: Option<Ipv4Addr>,
    gateway_mac: Option<Mac>,
    /// Its MTU: what leaves through it is at most this large.
    mtu: u16,
}

/// The gateway's MAC from the kernel's ARP table (/proc/net/arp of stromd's namespace), if the
/// kernel has resolved it on `dev`.
fn arp_lookup(ip: Ipv4Addr, dev: &str) -> Option<Mac> {
    const ATF_COM: u32 = 0x2;
    let text = std::fs::read_to_string("/proc/net/arp").ok()?;
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let flags = u32::from_str_radix(f.get(2)?.trim_start_matches("0x"), 16).ok()?;
        (f.first()?.parse::<Ipv4Addr>().ok()? == ip && f.get(5)? == &dev && flags & ATF_COM != 0)
            .then(|| parse_mac(f.get(3)?))
            .flatten()
    })
}

fn read_sys(ifname: &str, what: &str) -> Result<String, String> {
    if ifname.is_empty()
        || ifname.len() > 15
        || ifname.contains('/')
        || ifname == "."
        || ifname == ".."
    {
        return Err(format!("invalid interface name {ifname:?}"));
    }
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/{what}"))
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("interface {ifname}: {e}"))
}

/// The largest MTU stromd carries on the uplink: its socket receives a frame into one UMEM
/// frame (no multi-buffer, so that it may bind zero-copy), and a frame from it that another
/// worker routes fits a hand-off inline (`worker::HANDOFF_INLINE`), less the Ethernet header.
/// Routes out of a larger uplink use this MTU (larger packets get fragmentation-needed).
pub const MAX_UPLINK_MTU: u32 = strom_api::MAX_UPLINK_MTU;
const _: () = assert!(
    MAX_UPLINK_MTU + 14 <= crate::worker::HANDOFF_INLINE as u32,
    "an uplink frame fits a hand-off inline"
);

/// The largest MTU of a pod's veth: any IPv4 packet. Its socket is multi-buffer, and the
/// longest chain the kernel sends (`MAX_CHAIN` buffers) holds 65 535 bytes and the Ethernet
/// header.
pub const MAX_POD_MTU: u32 = u16::MAX as u32;
const _: () = assert!(
    MAX_POD_MTU + 14 <= crate::xsk::MAX_CHAIN as u32 * crate::xsk::RX_ROOM,
    "a pod's largest frame fits the longest chain"
);

/// An interface's MTU.
fn port_mtu(ifname: &str) -> Result<u32, String> {
    read_sys(ifname, "mtu")?
        .parse()
        .map_err(|e| format!("{ifname}: mtu: {e}"))
}

/// Most receive queues of an uplink stromd serves (one AF_XDP socket each).
const MAX_UPLINK_QUEUES: usize = 64;

/// An interface stromd is to serve: ifindex, MAC and number of receive queues in use.
fn port_interface(ifname: &str) -> Result<(u32, Mac, usize), String> {
    let ifindex: u32 = read_sys(ifname, "ifindex")?
        .parse()
        .map_err(|e| format!("{ifname}: ifindex: {e}"))?;
    let mac = parse_mac(&read_sys(ifname, "address")?)
        .ok_or_else(|| format!("{ifname}: unreadable MAC"))?;
    let dir = format!("/sys/class/net/{ifname}/queues");
    let rx = std::fs::read_dir(&dir)
        .map_err(|e| format!("{dir}: {e}"))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
        .count();
    Ok((ifindex, mac, rx.max(1)))
}

/// A pod's veth must have one receive queue: a pod port is one socket on one worker, and
/// frames arriving on another queue would never reach it (the pod program drops them).
/// strom-cni creates single-queue veths; this refuses anything else by name.
fn single_queue(ifname: &str, rx: usize) -> Result<(), String> {
    if rx > 1 {
        return Err(format!(
            "{ifname} has {rx} receive queues; a pod port is served on queue 0 only (one AF_XDP \
             socket): `ethtool -L {ifname} rx 1 tx 1` (or combined 1)"
        ));
    }
    Ok(())
}

impl Controller {
    /// A controller over loaded programs and started workers.
    pub fn new(
        cfg: Config,
        xdp: XdpPrograms,
        node_sockets: Option<crate::node_sockets::NodeSockets>,
        tables: TableHandle,
        workers: Vec<Arc<WorkerShared>>,
    ) -> Self {
        let state = StateFile::new(&cfg.dataplane.state_dir);
        Controller {
            cfg,
            xdp,
            desired: Reconciler::new(tables, workers.clone()),
            workers,
            ports: BTreeMap::new(),
            next_id: 0,
            state,
            pending_detach: Vec::new(),
            deleting: Vec::new(),
            uplink: None,
            unrestored: Vec::new(),
            services_refused: 0,
            bpf_node_ports: Default::default(),
            bpf_vips: Default::default(),
            health_checks: Default::default(),
            node_sockets,
            instance: instance_id(),
            generation: 0,
            deltas: Default::default(),
            policies: None,
            placement: BTreeMap::new(),
        }
    }

    /// Re-registers the ports recorded by a previous run whose interfaces still exist; those
    /// that fail while their interface is there are kept and tried again at every upkeep.
    /// After [`Controller::take_up_saved`], each goes to the worker it was on.
    pub fn restore(&mut self) {
        self.unrestored = self.state.load();
        self.retry_unrestored();
    }

    /// Tries the recorded ports not registered yet once more. A port whose interface is gone
    /// is forgotten.
    fn retry_unrestored(&mut self) {
        if self.unrestored.is_empty() {
            return;
        }
        for spec in std::mem::take(&mut self.unrestored) {
            let name = spec.ifname.clone();
            if let Err(gone) = port_interface(&name) {
                tracing::warn!(ifname = %name, error = %gone, "recorded port's interface is gone");
                self.placement.remove(&name);
                continue;
            }
            match self.add_port(spec.clone()) {
                Ok(p) => tracing::info!(port = p.id, ifname = %name, "restored port"),
                Err(e) => {
                    tracing::warn!(ifname = %name, error = %e, "recorded port not restored yet");
                    self.unrestored.push(spec);
                }
            }
        }
        self.save();
    }

    fn save(&self) {
        let specs: Vec<PortSpec> = self
            .ports
            .values()
            .map(|p| p.spec.clone())
            .chain(self.unrestored.iter().cloned())
            .collect();
        if let Err(e) = self.state.save(&specs) {
            tracing::warn!(error = %e, "cannot record ports");
        }
    }

    fn alloc_id(&mut self) -> Option<u32> {
        // Ids are not reused at once: a worker may still hold a snapshot naming a removed id.
        for _ in 0..MAX_PORTS {
            let id = self.next_id;
            self.next_id = (self.next_id + 1) % MAX_PORTS as u32;
            if !self.ports.contains_key(&id)
                && self
                    .uplink
                    .as_ref()
                    .is_none_or(|u| u.queues.iter().all(|q| q.id != id))
            {
                return Some(id);
            }
        }
        None
    }

    fn status_of(&self, p: &PortRecord) -> PortStatus {
        PortStatus {
            id: p.id,
            kind: "pod".into(),
            worker: p.worker,
            queue_workers: vec![p.worker],
            ifindex: p.ifindex,
            spec: p.spec.clone(),
            host_mac: fmt_mac(&p.host_mac),
            xdp_mode: p.xdp_mode.into(),
            xsk_mode: xsk_mode(p.zero_copy).into(),
            counters: p.counters.read(),
            fill_depth: p.counters.fill_depth(),
        }
    }

    /// Checks a registration: the pod's MAC, its interface's index and MAC, and its MTU.
    fn validate(&self, spec: &PortSpec) -> Result<(Mac, u32, Mac, u16), String> {
        let pod_mac = parse_mac(&spec.mac).ok_or_else(|| format!("invalid mac {:?}", spec.mac))?;
        if spec.ips.is_empty() {
            return Err("a port needs at least one IP".into());
        }
        if spec.ips.len() > crate::bpf::POD_SRC_IPS {
            return Err(format!(
                "a pod port has at most {} addresses",
                crate::bpf::POD_SRC_IPS
            ));
        }
        for ip in &spec.ips {
            match ip {
                IpAddr::V4(v4) if self.cfg.node.pod_cidr.contains(v4) => {}
                IpAddr::V4(v4) => {
                    return Err(format!(
                        "{v4} is outside the node's pod CIDR {}",
                        self.cfg.node.pod_cidr
                    ))
                }
                IpAddr::V6(_) => return Err("IPv6 pod addresses are not supported yet".into()),
            }
            if let Some(other) = self
                .ports
                .values()
                .find(|p| p.spec.ifname != spec.ifname && p.spec.ips.contains(ip))
            {
                return Err(format!(
                    "{ip} is already used by port {}",
                    other.spec.ifname
                ));
            }
        }
        let (ifindex, host_mac, rx_queues) = port_interface(&spec.ifname)?;
        if let Some(u) = self.uplink.as_ref() {
            if u.ifindex == ifindex || u.ifname == spec.ifname {
                return Err(format!(
                    "{} is the node's uplink, not a pod's interface",
                    spec.ifname
                ));
            }
        }
        if let Some(other) = self
            .ports
            .values()
            .find(|p| p.ifindex == ifindex && p.spec.ifname != spec.ifname)
        {
            return Err(format!(
                "{} is the interface of port {} (renamed?)",
                spec.ifname, other.spec.ifname
            ));
        }
        if let Some(p) = self.ports.values().find(|p| p.spec.ifname == spec.ifname) {
            // The same registration again is a no-op; a different one for an interface that
            // is still the port's is a conflict (the runtime's ADD and DEL pair up: a new
            // registration follows the old one's removal). A new interface under the old
            // name (the old one is gone) replaces the port.
            if p.ifindex == ifindex && p.spec != *spec {
                return Err(format!(
                    "{} is registered already with {} (container {}); remove that port first",
                    spec.ifname,
                    strom_api::ips_text(&p.spec.ips),
                    p.spec.container_id
                ));
            }
        }
        single_queue(&spec.ifname, rx_queues)?;
        let mtu = port_mtu(&spec.ifname)?;
        if mtu > MAX_POD_MTU {
            return Err(format!(
                "{} has MTU {mtu}; stromd carries IPv4 packets of at most {MAX_POD_MTU} bytes",
                spec.ifname
            ));
        }
        Ok((pod_mac, ifindex, host_mac, mtu as u16))
    }

    /// Registers a pod port. The same spec again is a no-op; a changed one replaces the port.
    pub fn add_port(&mut self, spec: PortSpec) -> Result<PortStatus, String> {
        let (pod_mac, ifindex, host_mac, mtu) = self.validate(&spec)?;
        if let Some(p) = self.ports.values().find(|p| p.spec.ifname == spec.ifname) {
            if p.spec == spec && p.ifindex == ifindex {
                return Ok(self.status_of(p));
            }
            self.remove_port(&PortKey::Ifname(spec.ifname.clone()), PortInterface::Keep)?;
        }
        let id = self.alloc_id().ok_or("no free port slot")?;
        // Kept until the port is open: one that fails now goes back to its worker later.
        let worker = self
            .placement
            .get(&spec.ifname)
            .copied()
            .filter(|&w| w < self.workers.len())
            .unwrap_or_else(|| {
                (0..self.workers.len())
                    .min_by_key(|&w| self.ports_on(w))
                    .unwrap_or(0)
            });
        let counters = Arc::new(SharedCounters::default());
        let (xdp_mode, zero_copy) = self.open_port(
            OpenPort {
                id,
                worker,
                ifindex,
                queue: 0,
                kind: PortKind::Pod,
                host_mac,
                pod_mac,
                ips: &spec.ips,
                counters: &counters,
            },
            &spec.ifname,
        )?;
        self.desired.set_port(
            id,
            &spec.ips,
            Next {
                port: id,
                worker: worker as u16,
                dst_mac: pod_mac,
                src_mac: host_mac,
                mtu,
            },
        );
        tracing::info!(port = id, worker, ifname = %spec.ifname, ips = ?spec.ips, xdp_mode, "port added");
        let rec = PortRecord {
            id,
            worker,
            ifindex,
            spec,
            host_mac,
            xdp_mode,
            zero_copy,
            counters,
        };
        let status = self.status_of(&rec);
        self.placement.remove(&rec.spec.ifname);
        self.unrestored.retain(|s| s.ifname != rec.spec.ifname);
        self.ports.insert(id, rec);
        self.save();
        Ok(status)
    }

    /// Attaches the port's program, has the worker open its socket (waiting for the kernel
    /// to release the queue's previous socket if need be) and points the XSKMAP slot at it.
    /// Undoes what it did on failure. Returns the XDP mode and whether the socket is zero-copy.
    fn open_port(&mut self, o: OpenPort<'_>, ifname: &str) -> Result<(&'static str, bool), String> {
        let role = match o.kind {
            PortKind::Pod => Role::Pod,
            PortKind::Uplink => Role::Uplink,
        };
        if o.kind == PortKind::Pod {
            let v4: Vec<Ipv4Addr> = o
                .ips
                .iter()
                .filter_map(|ip| match ip {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                })
                .collect();
            self.xdp
                .set_pod_src(o.ifindex, o.pod_mac, &v4)
                .map_err(|e| e.to_string())?;
        }
        let xdp_mode = match self.xdp.attach(o.ifindex, role) {
            Ok(m) => m,
            Err(e) => {
                self.xdp.remove_pod_src(o.ifindex);
                return Err(e.to_string());
            }
        };
        // On failure the program stays attached: without a socket in its slot, a pod's
        // program drops what the pod sends and the uplink's keeps the pods' traffic from the
        // kernel (fail closed). Detaching would let the kernel forward them.
        let fail = |_: &mut Self, e: String| Err(e);
        let mut attempt = 0;
        let opened = loop {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let setup = PortSetup {
                id: o.id,
                kind: o.kind,
                ifindex: o.ifindex,
                queue: o.queue,
                host_mac: o.host_mac,
                pod_mac: o.pod_mac,
                ips: o.ips.to_vec(),
                counters: o.counters.clone(),
            };
            if !self.workers[o.worker].command(Command::AddPort(setup, tx)) {
                return fail(self, "worker is gone".into());
            }
            match wait_reply(&rx) {
                Some(Ok(opened)) => break opened,
                Some(Err(e)) if e.busy && attempt < BUSY_RETRIES => {
                    attempt += 1;
                    std::thread::sleep(BUSY_WAIT);
                }
                Some(Err(e)) => {
                    return fail(self, format!("AF_XDP socket on {ifname}: {}", e.message))
                }
                None => {
                    // It may still open the socket: have it closed when it gets to it.
                    let (tx, _) = crossbeam_channel::bounded(1);
                    self.workers[o.worker].command(Command::RemovePort {
                        id: o.id,
                        linger: false,
                        reply: tx,
                    });
                    return fail(self, "worker did not answer".into());
                }
            }
        };
        if let Err(e) = self
            .xdp
            .bind_slot(o.ifindex, o.queue, o.id, opened.fd.as_fd())
        {
            self.stop_on_worker(o.worker, o.id, false);
            return fail(self, e.to_string());
        }
        Ok((xdp_mode, opened.zero_copy))
    }

    /// Serves the uplink: its program passes the node's own traffic to the kernel and sends
    /// what stromd owns (the pod CIDR) to the socket of the queue it arrived on (one per
    /// receive queue, queue q on worker q mod workers); what pods send beyond the node leaves
    /// through it to `gateway`.
    pub fn add_uplink(&mut self, ifname: &str, gateway: Option<Ipv4Addr>) -> Result<(), String> {
        let (ifindex, mac, rx_queues) = port_interface(ifname)?;
        let mtu = port_mtu(ifname)?;
        {
            if mtu > MAX_UPLINK_MTU {
                tracing::warn!(
                    ifname,
                    mtu,
                    max = MAX_UPLINK_MTU,
                    "uplink MTU above what stromd carries there: it sends at most that much, \
                     and received frames beyond 3826 bytes are dropped (xsk_rx_too_large)"
                );
            }
        }
        if rx_queues > MAX_UPLINK_QUEUES {
            return Err(format!(
                "{ifname} has {rx_queues} receive queues; stromd serves at most \
                 {MAX_UPLINK_QUEUES}: `ethtool -L {ifname} combined {MAX_UPLINK_QUEUES}`"
            ));
        }
        let counters = Arc::new(SharedCounters::default());
        let mut queues: Vec<UplinkQueue> = Vec::with_capacity(rx_queues);
        let mut xdp_mode = "";
        let mut zero_copy = true;
        for queue in 0..rx_queues {
            let worker = queue % self.workers.len();
            let opened = match self.alloc_id() {
                Some(id) => self
                    .open_port(
                        OpenPort {
                            id,
                            worker,
                            ifindex,
                            queue: queue as u32,
                            kind: PortKind::Uplink,
                            host_mac: mac,
                            pod_mac: [0; 6],
                            ips: &[],
                            counters: &counters,
                        },
                        ifname,
                    )
                    .map(|mode| (id, mode)),
                None => Err("no free port slot".to_string()),
            };
            match opened {
                Ok((id, (mode, zc))) => {
                    xdp_mode = mode;
                    zero_copy &= zc;
                    queues.push(UplinkQueue { id, worker });
                }
                Err(e) => {
                    // The program stays (see `open_port`): pods' traffic is not the kernel's.
                    for (q, u) in queues.iter().enumerate() {
                        self.xdp.unbind_slot(ifindex, q as u32, u.id);
                        self.stop_on_worker(u.worker, u.id, false);
                    }
                    return Err(format!("queue {queue}: {e}"));
                }
            }
        }
        tracing::info!(
            ifname,
            queues = rx_queues,
            xdp_mode,
            xsk_mode = xsk_mode(zero_copy),
            ?gateway,
            "uplink added"
        );
        let spread = rx_queues.min(self.workers.len());
        self.desired.set_uplink_workers(spread as u16);
        self.uplink = Some(Uplink {
            queues,
            ifindex,
            ifname: ifname.to_string(),
            mac,
            xdp_mode,
            zero_copy,
            counters,
            gateway,
            gateway_mac: None,
            mtu: mtu.min(MAX_UPLINK_MTU) as u16,
        });
        Ok(())
    }

    /// Learns the uplink gateway's MAC from the kernel (and asks the kernel to resolve it when
    /// it has not), and routes pods' outbound traffic through it once known or changed.
    pub fn refresh_uplink(&mut self) -> bool {
        let Some(u) = self.uplink.as_mut() else {
            return false;
        };
        let Some(gw) = u.gateway else { return false };
        match arp_lookup(gw, &u.ifname) {
            Some(mac) if u.gateway_mac == Some(mac) => true,
            Some(mac) => {
                u.gateway_mac = Some(mac);
                let next = Next {
                    port: u.queues[0].id,
                    worker: u.queues[0].worker as u16,
                    dst_mac: mac,
                    src_mac: u.mac,
                    mtu: u.mtu,
                };
                tracing::info!(gateway = %gw, mac = %fmt_mac(&mac), "uplink gateway resolved");
                self.desired.set_uplink(Some(next));
                true
            }
            None => {
                // Any datagram to the gateway makes the kernel resolve it (discard port).
                if let Ok(s) = std::net::UdpSocket::bind(("0.0.0.0", 0)) {
                    let _ = s.send_to(b"", (gw, 9));
                }
                false
            }
        }
    }

    fn uplink_status(&self) -> Option<PortStatus> {
        let u = self.uplink.as_ref()?;
        Some(PortStatus {
            id: u.queues[0].id,
            kind: "uplink".into(),
            worker: u.queues[0].worker,
            queue_workers: u.queues.iter().map(|q| q.worker).collect(),
            ifindex: u.ifindex,
            spec: PortSpec {
                ifname: u.ifname.clone(),
                ips: Vec::new(),
                mac: u.gateway_mac.map(|m| fmt_mac(&m)).unwrap_or_default(),
                container_id: String::new(),
                pod_ifname: String::new(),
                pod_namespace: String::new(),
                pod_name: String::new(),
            },
            host_mac: fmt_mac(&u.mac),
            xdp_mode: u.xdp_mode.into(),
            xsk_mode: xsk_mode(u.zero_copy).into(),
            counters: u.counters.read(),
            fill_depth: u.counters.fill_depth(),
        })
    }

    /// Ports served by `worker`, the uplink included.
    fn ports_on(&self, worker: usize) -> usize {
        self.ports.values().filter(|p| p.worker == worker).count()
            + self.uplink.as_ref().map_or(0, |u| {
                u.queues.iter().filter(|q| q.worker == worker).count()
            })
    }

    /// Removes a recorded port not registered again from the record, and its interface's
    /// program (left attached to keep the pod fenced while it waited).
    fn forget_unrestored(&mut self, key: &PortKey) {
        let before = self.unrestored.len();
        let mut gone = Vec::new();
        self.unrestored.retain(|s| {
            let hit = match key {
                PortKey::Ifname(n) => &s.ifname == n,
                PortKey::Container {
                    container_id,
                    pod_ifname,
                } => {
                    &s.container_id == container_id
                        && (pod_ifname.is_empty() || &s.pod_ifname == pod_ifname)
                }
            };
            if hit {
                gone.push(s.ifname.clone());
            }
            !hit
        });
        for name in gone {
            if let Ok((ifindex, _, _)) = port_interface(&name) {
                self.xdp.detach(ifindex);
            }
        }
        if self.unrestored.len() != before {
            self.save();
        }
    }

    fn stop_on_worker(&self, worker: usize, id: u32, linger: bool) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let c = Command::RemovePort {
            id,
            linger,
            reply: tx,
        };
        if self.workers[worker].command(c) {
            let _ = wait_reply(&rx);
        }
    }

    /// Unregisters a port; Ok when it is not registered. `interface`: what becomes of the
    /// port's interface (`PortInterface`). With `Delete`, an error says only that the
    /// interface was not seen to go; the port is unregistered all the same.
    pub fn remove_port(&mut self, key: &PortKey, interface: PortInterface) -> Result<(), String> {
        let found = self.ports.values().find(|p| match key {
            PortKey::Ifname(n) => &p.spec.ifname == n,
            PortKey::Container {
                container_id,
                pod_ifname,
            } => {
                &p.spec.container_id == container_id
                    && (pod_ifname.is_empty() || &p.spec.pod_ifname == pod_ifname)
            }
        });
        let Some(id) = found.map(|p| p.id) else {
            self.forget_unrestored(key);
            return Ok(());
        };
        let Some(p) = self.ports.remove(&id) else {
            return Ok(());
        };
        // Stop the kernel steering frames to the socket, stop workers routing to it, then close.
        self.xdp.unbind_slot(p.ifindex, 0, p.id);
        // The deletion starts now and runs beside the rest: a socket still bound when the
        // interface goes is unbound inside the unregistration (see `PortInterface`), and a
        // worker that still sends to it meanwhile gets an error for those frames, no more.
        let deletion = match interface {
            PortInterface::Delete => Some(Deletion::start(p.ifindex, &p.spec.ifname)),
            _ => None,
        };
        self.desired.remove_port(p.id);
        let deleted = interface != PortInterface::Keep;
        self.stop_on_worker(p.worker, p.id, deleted);
        // Detaching waits for the kernel too; nothing reaches the port any more, so the
        // caller is answered first (see `after_reply`). An interface being deleted takes its
        // program with it: detaching it during the deletion would only contend for the
        // kernel's lock, so that waits until the deletion is surely over.
        let when = deleted.then(|| Instant::now() + DETACH_AFTER_DELETION);
        self.pending_detach.push((p.ifindex, when));
        tracing::info!(port = p.id, ifname = %p.spec.ifname, "port removed");
        self.save();
        self.reap_deletions();
        match deletion {
            None | Some(Ok(None)) => Ok(()),
            Some(Ok(Some(d))) => {
                let r = d.unlisted(UNLIST_WITHIN);
                self.deleting.push(d.into_thread());
                r.map_err(|e| format!("port removed; deleting {}: {e}", p.spec.ifname))
            }
            Some(Err(e)) => Err(format!("port removed; deleting {}: {e}", p.spec.ifname)),
        }
    }

    /// Joins the deletion threads that have finished.
    fn reap_deletions(&mut self) {
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deleting)
            .into_iter()
            .partition(|t| t.is_finished());
        self.deleting = running;
        for t in done {
            let _ = t.join();
        }
    }

    /// Work left over from the last request, done once its caller has its answer.
    pub fn after_reply(&mut self) {
        self.detach_due(None);
    }

    /// Detaches the programs whose time has come: those due after a reply (`now` None), or
    /// also those of deleted interfaces due by `now`.
    fn detach_due(&mut self, now: Option<Instant>) {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_detach)
            .into_iter()
            .partition(|(_, when)| match (when, now) {
                (None, _) => true,
                (Some(t), Some(now)) => *t <= now,
                (Some(_), None) => false,
            });
        self.pending_detach = later;
        for (ifindex, _) in due {
            if !self.ports.values().any(|p| p.ifindex == ifindex) {
                self.xdp.detach(ifindex);
            }
        }
    }

    /// Periodic upkeep between requests: the uplink's gateway, late detaches. Returns when
    /// it wants to run next.
    pub fn tick(&mut self) -> Instant {
        self.desired.collect();
        self.detach_due(Some(Instant::now()));
        self.reap_deletions();
        self.retry_unrestored();
        let known = self.refresh_uplink();
        // Until the uplink gateway is known, ask every 200 ms; then watch it for changes.
        self.upkeep_by(Instant::now() + Duration::from_millis(if known { 2000 } else { 200 }))
    }

    /// `next`, or earlier when a late detach falls due before it.
    pub fn upkeep_by(&self, next: Instant) -> Instant {
        self.pending_detach
            .iter()
            .filter_map(|(_, t)| *t)
            .fold(next, Instant::min)
    }

    /// A change to the tables, numbered or not: a numbered one is applied only when it is
    /// newer than its writer's last, answered as before when it is that one again, and
    /// refused when older; its answer acknowledges its number.
    fn numbered(
        &mut self,
        delta: Option<strom_api::Delta>,
        apply: impl FnOnce(&mut Self) -> Response,
    ) -> Response {
        let Some(d) = delta else {
            return apply(self);
        };
        match self.deltas.check(&d) {
            deltas::Verdict::Answered(answer) => answer,
            deltas::Verdict::OutOfOrder(last) => Response::Error {
                message: format!(
                    "delta {} of writer {:x} is older than its last one applied ({last}): \
                     not applied",
                    d.seq, d.writer
                ),
            },
            deltas::Verdict::Apply => {
                let mut answer = apply(self);
                if let Response::Applied { delta, .. } = &mut answer {
                    *delta = Some(d.seq);
                }
                self.deltas.record(d, &answer);
                answer
            }
        }
    }

    /// Counts a change to the Service or policy tables that was applied (`Request::Hello`'s
    /// `generation`), and passes its answer on.
    fn count_change(&mut self, answer: Response) -> Response {
        if !matches!(answer, Response::Error { .. }) {
            self.generation += 1;
        }
        answer
    }

    /// Answers one request.
    pub fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Hello { contract, writer } if contract == strom_api::CONTRACT => {
                Response::Hello {
                    contract,
                    version: env!("CARGO_PKG_VERSION").into(),
                    instance: self.instance,
                    generation: self.generation,
                    applied: writer.and_then(|w| self.deltas.applied(w)),
                }
            }
            Request::Hello { contract, .. } => Response::Error {
                message: format!(
                    "this peer speaks contract version {contract}, stromd {} speaks {}: run \
                     matching versions of stromd and its peers",
                    env!("CARGO_PKG_VERSION"),
                    strom_api::CONTRACT
                ),
            },
            Request::Status => Response::Status({
                let reason = super::health::not_ready(&self.workers);
                StatusInfo {
                    ready: reason.is_none(),
                    reason,
                    version: env!("CARGO_PKG_VERSION").into(),
                    workers: self.workers.len(),
                    ports: self.ports.len(),
                    poll_mode: self.cfg.dataplane.poll_mode.name().into(),
                    uplink: self.uplink.as_ref().map(|u| u.ifname.clone()),
                }
            }),
            Request::AddPort { spec } => match self.add_port(spec) {
                Ok(s) => Response::Port(Box::new(s)),
                Err(message) => Response::Error { message },
            },
            Request::RemovePort { key, interface } => match self.remove_port(&key, interface) {
                Ok(()) => Response::Ok,
                Err(message) => Response::Error { message },
            },
            Request::Ports => Response::Ports {
                ports: self
                    .uplink_status()
                    .into_iter()
                    .chain(self.ports.values().map(|p| self.status_of(p)))
                    .collect(),
            },
            Request::Stats => Response::Stats {
                xdp_drops: self.xdp.drops(),
                workers: self
                    .workers
                    .iter()
                    .map(|w| {
                        let wait = crate::stats::core_wait(w.counters.tid.load(Ordering::Relaxed))
                            .unwrap_or_default();
                        let (frames_free, frames_in_fill) = w.counters.frames();
                        WorkerStats {
                            id: w.id,
                            core: w.core,
                            ports: self.ports_on(w.id),
                            frames_free,
                            frames_total: w.counters.frames_total.load(Ordering::Relaxed),
                            frames_in_fill,
                            fill_floor: w.counters.fill_floor.load(Ordering::Relaxed),
                            fill_budget: w.counters.fill_budget.load(Ordering::Relaxed),
                            fill_reserved: w.counters.fill_reserved.load(Ordering::Relaxed),
                            counters: w.counters.packets.read(),
                            drops: w.counters.drops(),
                            loops: w.counters.loops.load(Ordering::Relaxed),
                            sleeps: w.counters.sleeps.load(Ordering::Relaxed),
                            core_wait_ns: wait.wait_ns,
                            preemptions: wait.preemptions,
                        }
                    })
                    .collect(),
            },
            Request::Tables => {
                let t = self.desired.tables().routes();
                let node = self.desired.tables().node();
                let mut routes: Vec<RouteEntry> = t
                    .local
                    .iter()
                    .map(|(ip, n)| RouteEntry {
                        prefix: crate::tables::routes::host_prefix(ip),
                        target: format!(
                            "port {} (worker {}) via {} → {}",
                            n.port,
                            n.worker,
                            fmt_mac(&n.src_mac),
                            fmt_mac(&n.dst_mac)
                        ),
                    })
                    .collect();
                routes.sort_by(|a, b| a.prefix.cmp(&b.prefix));
                if let Some(n) = &t.uplink {
                    routes.push(RouteEntry {
                        prefix: "0.0.0.0/0".into(),
                        target: format!(
                            "uplink port {} via {} → gateway {}",
                            n.port,
                            fmt_mac(&n.src_mac),
                            fmt_mac(&n.dst_mac)
                        ),
                    });
                }
                let mut node_addrs: Vec<String> =
                    node.addrs.iter().map(|a| a.to_string()).collect();
                node_addrs.sort();
                Response::Tables {
                    gateway: node.gateway_v4.to_string(),
                    node_addrs,
                    routes,
                }
            }
            Request::SetService { service } => {
                let r = self.set_service(service);
                self.count_change(r)
            }
            Request::RemoveService { namespace, name } => {
                let r = self.remove_service(&namespace, &name);
                self.count_change(r)
            }
            Request::SetServices { set, remove, delta } => self.numbered(delta, |c| {
                let (answer, applied) = c.set_services(set, remove);
                c.generation += applied;
                answer
            }),
            Request::Services { counters_only } => self.services(counters_only),
            Request::Conntrack { filter, count_only } => self.conntrack(&filter, count_only),
            Request::FlushConntrack { filter } => self.flush_conntrack(&filter),
            Request::Trace { tuple } => self.trace(&tuple),
            Request::SetPolicies { policies, delta } => self.numbered(delta, |c| {
                let r = c.set_policies(policies);
                match c.count_change(r) {
                    // A numbered delta is acknowledged with its number.
                    Response::Ok if delta.is_some() => Response::Applied {
                        refused: Vec::new(),
                        delta: None,
                    },
                    r => r,
                }
            }),
            Request::Policies => self.policies(),
        }
    }

    /// Stops the workers and leaves their flows and the tables to the next start (recorded
    /// ports stay on disk too); detaches the programs unless they are pinned.
    pub fn shutdown(
        &mut self,
        handles: Vec<std::thread::JoinHandle<Option<crate::conntrack::persist::FlowTables>>>,
    ) {
        for w in &self.workers {
            w.command(Command::Stop);
        }
        let tables: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().ok().flatten())
            .collect();
        self.save_tables(tables);
        for t in self.deleting.drain(..) {
            let _ = t.join();
        }
        // Pinned programs stay: the pods stay cut off from each other and the outside until
        // the next stromd takes them back (fail closed). Unpinned ones come off.
        if !self.xdp.pinned() {
            for i in self.xdp.attached() {
                self.xdp.detach(i);
            }
        }
    }
}

/// What tells this start of stromd from any other (`Response::Hello::instance`): the start
/// time in nanoseconds mixed with the process id.
fn instance_id() -> u64 {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    ns ^ (u64::from(std::process::id()) << 48)
}

/// How a port's sockets bound, as `PortStatus::xsk_mode` names it.
fn xsk_mode(zero_copy: bool) -> &'static str {
    if zero_copy {
        "zero-copy"
    } else {
        "copy"
    }
}
