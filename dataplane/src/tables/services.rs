//! The Service table: each frontend (`address:port/protocol` of a ClusterIP, external IP,
//! load-balancer IP or NodePort) to its Service port, and each Service port's backends in two
//! pools (traffic from inside the node, from outside), each with its Maglev table.
//!
//! Which endpoints serve follows kube-proxy (`pkg/proxy/topology.go`, `CategorizeEndpoints`):
//! ready endpoints serve; when none is ready, serving-but-terminating ones do; others never.
//! Under a Local traffic policy only the node's own endpoints are considered, for that
//! direction; under a Cluster one, only the ready endpoints topology-aware routing leaves
//! to the node (`EndpointSpec::in_topology`, decided by strom-control from the hints). Every endpoint listed at all (terminating ones too) keeps the flows it already
//! has: a flow is cut only when its backend leaves the list.
//!
//! The reconciler keeps each Service port built ([`SvcPort`], behind an `Arc`): a change
//! rebuilds that Service's ports and the index, never another Service's Maglev tables.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use hashbrown::HashMap;
use strom_api::{BackendStatus, EndpointSpec, Protocol, ServicePortStatus, ServiceSpec};

use super::maglev::Maglev;

/// A frontend: what a Service port is reached on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrontKey {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

/// How a frontend reaches its Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontKind {
    ClusterIp,
    ExternalIp,
    LoadBalancer,
    NodePort,
}

impl FrontKind {
    pub fn name(self) -> &'static str {
        match self {
            FrontKind::ClusterIp => "cluster-ip",
            FrontKind::ExternalIp => "external-ip",
            FrontKind::LoadBalancer => "load-balancer",
            FrontKind::NodePort => "node-port",
        }
    }
}

/// A backend: an endpoint's address and the port it serves this Service port on.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// Endpoints that serve one kind of traffic, and their Maglev table.
#[derive(Debug, Clone, Default)]
pub struct Pool {
    pub backends: Vec<Backend>,
    maglev: Maglev,
}

impl Pool {
    fn new(backends: Vec<Backend>) -> Self {
        let keys: Vec<(Ipv4Addr, u16)> = backends.iter().map(|b| (b.ip, b.port)).collect();
        Pool {
            maglev: Maglev::build(&keys),
            backends,
        }
    }

    /// The backend for a flow hash; None when the pool is empty.
    #[inline]
    pub fn pick(&self, hash: u64) -> Option<Backend> {
        self.maglev
            .pick(hash)
            .and_then(|i| self.backends.get(usize::from(i)).copied())
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// Whether `b` serves in this pool (the backends are sorted).
    #[inline]
    pub fn serves(&self, b: Backend) -> bool {
        self.backends.binary_search(&b).is_ok()
    }

    /// Bytes of the Maglev table.
    pub fn table_bytes(&self) -> usize {
        self.maglev.bytes()
    }
}

/// Identifies a Service port across table versions: its slot, and which incarnation of the
/// slot (a slot freed by a removed Service is given to another with a new incarnation, so a
/// flow of the old one is never taken for the new one's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SvcRef {
    pub slot: u32,
    pub incarnation: u32,
}

impl SvcRef {
    /// A flow of no Service (masqueraded to the outside).
    pub const NONE: SvcRef = SvcRef {
        slot: u32::MAX,
        incarnation: 0,
    };
}

/// One Service port as the workers read it.
#[derive(Debug, Clone)]
pub struct SvcPort {
    pub id: SvcRef,
    /// `namespace/name`.
    pub service: String,
    /// `namespace/name:port-name` (or `:port` for an unnamed port).
    pub key: String,
    pub proto: u8,
    /// The frontends, for display (the index is [`ServiceTable`]'s).
    pub frontends: Vec<(FrontKey, FrontKind)>,
    /// `sessionAffinity: ClientIP`: how long a client keeps its backend without traffic.
    pub affinity_ms: Option<u64>,
    /// Traffic from pods and the node to a ClusterIP (`internalTrafficPolicy`).
    pub internal: Arc<Pool>,
    /// Traffic from outside the node (`externalTrafficPolicy`).
    pub external: Arc<Pool>,
    /// Every serving endpoint wherever it runs: traffic from pods to the Service's external
    /// addresses (kube-proxy short-circuits it to all endpoints), and the pool the other two
    /// share unless a Local policy narrows them.
    pub cluster: Arc<Pool>,
    /// `externalTrafficPolicy: Cluster`: traffic from outside is SNATed to the node, so
    /// replies come back through it; Local keeps the client's address.
    pub snat_external: bool,
    /// Every endpoint listed, sorted: a flow keeps its backend while it is in this list.
    listed: Vec<Backend>,
    /// The endpoints as given, for display.
    pub endpoints: Vec<EndpointSpec>,
}

impl SvcPort {
    /// Whether `b` is still an endpoint of this Service port (terminating or not).
    #[inline]
    pub fn lists(&self, b: Backend) -> bool {
        self.listed.binary_search(&b).is_ok()
    }

    /// The status line of this port (counters are the caller's).
    pub fn status(&self, flows: u64, packets: u64, rejected: u64) -> ServicePortStatus {
        let backends = self
            .endpoints
            .iter()
            .filter_map(|e| {
                let IpAddr::V4(ip) = e.ip else { return None };
                let b = Backend { ip, port: e.port };
                Some(BackendStatus {
                    addr: format!("{ip}:{}", e.port),
                    target: e.target.clone(),
                    internal: self.internal.backends.contains(&b),
                    external: self.external.backends.contains(&b),
                    flows: 0,
                })
            })
            .collect();
        ServicePortStatus {
            key: self.key.clone(),
            protocol: Protocol::from_number(self.proto).unwrap_or(Protocol::Tcp),
            frontends: self
                .frontends
                .iter()
                .map(|(f, k)| (format!("{}:{}", f.ip, f.port), k.name().to_string()))
                .collect(),
            backends,
            flows,
            packets,
            rejected,
        }
    }
}

/// The endpoints that serve, by kube-proxy's rules: ready ones (of this node only, when
/// `local`; those topology-aware routing leaves to the node, when not); failing those,
/// serving-but-terminating ones (of this node only, when `local`; with no regard to
/// topology, which already fell back to every endpoint when none of its own was ready).
pub fn serving(endpoints: &[EndpointSpec], local: bool) -> Vec<Backend> {
    let pick = |ok: &dyn Fn(&EndpointSpec) -> bool| -> Vec<Backend> {
        let mut v: Vec<Backend> = endpoints
            .iter()
            .filter(|e| (!local || e.local) && ok(e))
            .filter_map(|e| match e.ip {
                IpAddr::V4(ip) => Some(Backend { ip, port: e.port }),
                IpAddr::V6(_) => None,
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let ready = pick(&|e| e.ready && (local || e.in_topology));
    if !ready.is_empty() {
        return ready;
    }
    pick(&|e| e.serving && e.terminating)
}

/// Builds the Service ports of `spec`, each under the given id, with its frontends (`nodes`:
/// the node's IPv4 addresses, where NodePorts listen).
pub fn build_ports(spec: &ServiceSpec, ids: &[SvcRef], nodes: &[Ipv4Addr]) -> Vec<SvcPort> {
    let v4 = |ips: &[IpAddr]| -> Vec<Ipv4Addr> {
        ips.iter()
            .filter_map(|i| match i {
                IpAddr::V4(v) => Some(*v),
                IpAddr::V6(_) => None,
            })
            .collect()
    };
    let (cluster, external, lb) = (
        v4(&spec.cluster_ips),
        v4(&spec.external_ips),
        v4(&spec.load_balancer_ips),
    );
    spec.ports
        .iter()
        .zip(ids)
        .map(|(p, id)| {
            let proto = p.protocol.number();
            let mut frontends = Vec::new();
            let mut add = |ips: &[Ipv4Addr], port: u16, kind| {
                for &ip in ips {
                    frontends.push((FrontKey { ip, port, proto }, kind));
                }
            };
            add(&cluster, p.port, FrontKind::ClusterIp);
            add(&external, p.port, FrontKind::ExternalIp);
            add(&lb, p.port, FrontKind::LoadBalancer);
            if let Some(np) = p.node_port {
                add(nodes, np, FrontKind::NodePort);
            }
            let mut listed: Vec<Backend> = p
                .endpoints
                .iter()
                .filter_map(|e| match e.ip {
                    IpAddr::V4(ip) => Some(Backend { ip, port: e.port }),
                    IpAddr::V6(_) => None,
                })
                .collect();
            listed.sort_unstable();
            listed.dedup();
            let cluster = Arc::new(Pool::new(serving(&p.endpoints, false)));
            let narrowed = |local: bool| {
                if local {
                    Arc::new(Pool::new(serving(&p.endpoints, true)))
                } else {
                    cluster.clone()
                }
            };
            SvcPort {
                id: *id,
                service: spec.key(),
                key: format!(
                    "{}:{}",
                    spec.key(),
                    if p.name.is_empty() {
                        p.port.to_string()
                    } else {
                        p.name.clone()
                    }
                ),
                proto,
                frontends,
                affinity_ms: spec.affinity_timeout_s.map(|s| u64::from(s) * 1000),
                internal: narrowed(spec.internal_local),
                external: narrowed(spec.external_local),
                cluster,
                snat_external: !spec.external_local,
                listed,
                endpoints: p.endpoints.clone(),
            }
        })
        .collect()
}

/// Frontends and Service ports as the workers read them.
#[derive(Debug, Clone, Default)]
pub struct ServiceTable {
    frontends: HashMap<FrontKey, (u32, FrontKind)>,
    /// Service ports by slot.
    slots: Vec<Option<Arc<SvcPort>>>,
    /// ClusterIPs, external and load-balancer IPs: addresses that are a Service's alone, so
    /// a packet to one on a port no Service has is dropped, not routed on (the node's own
    /// addresses, where NodePorts are, are not among them).
    vips: hashbrown::HashSet<Ipv4Addr>,
    /// Which version this is: a flow checks its backend is still listed once per version.
    generation: u64,
}

impl ServiceTable {
    /// The next version from every Service port built (the reconciler's).
    pub fn build<'a>(ports: impl IntoIterator<Item = &'a Arc<SvcPort>>, generation: u64) -> Self {
        let mut t = ServiceTable {
            generation,
            ..ServiceTable::default()
        };
        for p in ports {
            let slot = p.id.slot as usize;
            if t.slots.len() <= slot {
                t.slots.resize(slot + 1, None);
            }
            for (f, kind) in &p.frontends {
                // Two Services claiming one frontend: the first keeps it (the reconciler
                // refuses the second before it gets here).
                t.frontends.entry(*f).or_insert((p.id.slot, *kind));
                if *kind != FrontKind::NodePort {
                    t.vips.insert(f.ip);
                }
            }
            t.slots[slot] = Some(p.clone());
        }
        t
    }

    /// The Service port reached on `dst:port` over `proto`, if any.
    #[inline]
    pub fn frontend(&self, dst: Ipv4Addr, port: u16, proto: u8) -> Option<(&SvcPort, FrontKind)> {
        let (slot, kind) = self.frontends.get(&FrontKey {
            ip: dst,
            port,
            proto,
        })?;
        Some((self.slots.get(*slot as usize)?.as_deref()?, *kind))
    }

    /// The Service port `id`, if it is still the one in its slot.
    #[inline]
    pub fn port(&self, id: SvcRef) -> Option<&SvcPort> {
        self.slots
            .get(id.slot as usize)?
            .as_deref()
            .filter(|p| p.id.incarnation == id.incarnation)
    }

    /// Whether `ip` is a Service's address (ClusterIP, external or load-balancer IP).
    #[inline]
    pub fn is_vip(&self, ip: Ipv4Addr) -> bool {
        self.vips.contains(&ip)
    }

    /// No Service at all: the stage has nothing to look up.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty()
    }

    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Every Service port, by slot.
    pub fn ports(&self) -> impl Iterator<Item = &SvcPort> {
        self.slots.iter().filter_map(|s| s.as_deref())
    }

    /// Slots in the table (a worker keeps counters for each).
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }
}

/// The Services as the reconciler keeps them: each spec, the slots of its ports, and each
/// port built. A port keeps its slot across changes of its Service (same protocol and name),
/// so its flows and counters carry over.
#[derive(Debug, Default)]
pub struct DesiredServices {
    specs: BTreeMap<String, (ServiceSpec, Vec<SvcRef>)>,
    built: BTreeMap<u32, Arc<SvcPort>>,
    /// Which Service holds each frontend.
    owners: HashMap<FrontKey, String>,
    free: Vec<u32>,
    next_slot: u32,
    incarnations: u32,
    generation: u64,
}

impl DesiredServices {
    /// The Services as set.
    pub fn specs(&self) -> impl Iterator<Item = &ServiceSpec> {
        self.specs.values().map(|(s, _)| s)
    }

    /// Takes `spec` in place of what its Service had (`nodes`: where NodePorts listen). A
    /// frontend another Service holds refuses the whole Service, which keeps what it had.
    pub fn set(&mut self, spec: ServiceSpec, nodes: &[Ipv4Addr]) -> Result<(), String> {
        spec.validate()?;
        let key = spec.key();
        if spec.cluster_ips.is_empty() {
            self.remove(&key);
            return Ok(());
        }
        let old = self.specs.get(&key);
        let mut ids = Vec::with_capacity(spec.ports.len());
        let mut taken: Vec<u32> = Vec::new();
        for p in &spec.ports {
            let kept = old.and_then(|(o, ids)| {
                o.ports
                    .iter()
                    .zip(ids)
                    .find(|(op, _)| op.protocol == p.protocol && op.name == p.name)
                    .map(|(_, id)| *id)
            });
            ids.push(match kept {
                Some(id) => id,
                None => {
                    let slot = self.free.pop().unwrap_or_else(|| {
                        self.next_slot += 1;
                        self.next_slot - 1
                    });
                    taken.push(slot);
                    self.incarnations += 1;
                    SvcRef {
                        slot,
                        incarnation: self.incarnations,
                    }
                }
            });
        }
        let ports = build_ports(&spec, &ids, nodes);
        for p in &ports {
            for (f, _) in &p.frontends {
                if let Some(owner) = self.owners.get(f).filter(|o| **o != key) {
                    self.free.extend(taken);
                    return Err(format!(
                        "{key}: {}:{}/{} is {owner}'s",
                        f.ip,
                        f.port,
                        Protocol::from_number(f.proto).map_or("?", |p| p.name())
                    ));
                }
            }
        }
        self.remove(&key);
        // `remove` freed the slots this spec keeps: take them back.
        self.free.retain(|s| !ids.iter().any(|id| id.slot == *s));
        for p in ports {
            for (f, _) in &p.frontends {
                self.owners.insert(*f, key.clone());
            }
            self.built.insert(p.id.slot, Arc::new(p));
        }
        self.specs.insert(key, (spec, ids));
        Ok(())
    }

    /// Forgets a Service; false when there was none.
    pub fn remove(&mut self, key: &str) -> bool {
        let Some((_, ids)) = self.specs.remove(key) else {
            return false;
        };
        for id in ids {
            if let Some(p) = self.built.remove(&id.slot) {
                for (f, _) in &p.frontends {
                    self.owners.remove(f);
                }
            }
            self.free.push(id.slot);
        }
        true
    }

    /// The next table version.
    pub fn table(&mut self) -> ServiceTable {
        self.generation += 1;
        ServiceTable::build(self.built.values(), self.generation)
    }

    pub fn len(&self) -> usize {
        self.specs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// The health checks the Services want: (healthCheckNodePort, Service, local serving
    /// endpoints) for each with `externalTrafficPolicy: Local` and such a port.
    pub fn health_checks(&self) -> Vec<(u16, String, u64)> {
        self.specs
            .values()
            .filter(|(s, _)| s.external_local)
            .filter_map(|(s, _)| {
                let port = s.health_check_node_port?;
                let mut local: Vec<Backend> = s
                    .ports
                    .iter()
                    .flat_map(|p| serving(&p.endpoints, true))
                    .map(|b| Backend { port: 0, ..b })
                    .collect();
                local.sort_unstable();
                local.dedup();
                Some((port, s.key(), local.len() as u64))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strom_api::ServicePortSpec;

    fn ep(ip: &str, port: u16, ready: bool, serving: bool, terminating: bool) -> EndpointSpec {
        EndpointSpec {
            ip: ip.parse().unwrap(),
            port,
            ready,
            serving,
            terminating,
            local: ip.ends_with(".2"),
            in_topology: true,
            target: String::new(),
        }
    }

    fn b(ip: &str, port: u16) -> Backend {
        Backend {
            ip: ip.parse().unwrap(),
            port,
        }
    }

    #[test]
    fn ready_endpoints_serve_and_terminating_ones_only_when_none_is_ready() {
        let eps = vec![
            ep("198.18.16.2", 80, true, true, false),
            ep("198.18.16.3", 81, false, true, true),
            ep("198.18.16.4", 80, false, false, false),
        ];
        assert_eq!(serving(&eps, false), vec![b("198.18.16.2", 80)]);
        let eps2 = vec![eps[1].clone(), eps[2].clone()];
        assert_eq!(serving(&eps2, false), vec![b("198.18.16.3", 81)]);
        // Not ready, not serving: never.
        assert!(serving(&[eps[2].clone()], false).is_empty());
        // Local: only this node's (".2" here).
        assert_eq!(serving(&eps2, true), vec![]);
        assert_eq!(serving(&eps, true), vec![b("198.18.16.2", 80)]);
    }

    #[test]
    fn topology_narrows_the_cluster_pool_only() {
        let mut eps = vec![
            ep("198.18.16.2", 80, true, true, false),
            ep("198.18.16.3", 80, true, true, false),
            ep("198.18.16.4", 80, false, true, true),
        ];
        eps[0].in_topology = false;
        // Cluster: the ready endpoint of the node's zone only.
        assert_eq!(serving(&eps, false), vec![b("198.18.16.3", 80)]);
        // Local: the node's own, hinted elsewhere or not.
        assert_eq!(serving(&eps, true), vec![b("198.18.16.2", 80)]);
        // No ready endpoint left to the node: the terminating one, whatever its hints.
        eps[1].ready = false;
        eps[2].in_topology = false;
        assert_eq!(serving(&eps, false), vec![b("198.18.16.4", 80)]);
    }

    #[test]
    fn frontends_of_every_kind_lead_to_the_port_and_a_flow_keeps_a_listed_backend() {
        let spec = ServiceSpec {
            namespace: "ns".into(),
            name: "web".into(),
            cluster_ips: vec!["198.19.0.10".parse().unwrap()],
            external_ips: vec!["198.19.1.1".parse().unwrap()],
            load_balancer_ips: vec!["198.19.2.1".parse().unwrap()],
            ports: vec![ServicePortSpec {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: Some(30080),
                endpoints: vec![
                    ep("198.18.16.2", 8080, true, true, false),
                    ep("198.18.16.3", 8081, false, true, true),
                ],
            }],
            affinity_timeout_s: Some(5),
            external_local: true,
            internal_local: false,
            health_check_node_port: None,
        };
        let id = SvcRef {
            slot: 3,
            incarnation: 1,
        };
        let ports: Vec<Arc<SvcPort>> = build_ports(&spec, &[id], &["198.18.0.1".parse().unwrap()])
            .into_iter()
            .map(Arc::new)
            .collect();
        let t = ServiceTable::build(&ports, 1);
        for (ip, port, kind) in [
            ("198.19.0.10", 80, FrontKind::ClusterIp),
            ("198.19.1.1", 80, FrontKind::ExternalIp),
            ("198.19.2.1", 80, FrontKind::LoadBalancer),
            ("198.18.0.1", 30080, FrontKind::NodePort),
        ] {
            let (p, k) = t.frontend(ip.parse().unwrap(), port, 6).unwrap();
            assert_eq!((p.key.as_str(), k), ("ns/web:http", kind));
        }
        assert!(t.frontend("198.19.0.10".parse().unwrap(), 80, 17).is_none());
        let p = t.port(id).unwrap();
        assert_eq!(p.affinity_ms, Some(5000));
        assert!(!p.snat_external);
        assert_eq!(p.internal.backends, vec![b("198.18.16.2", 8080)]);
        assert!(p.lists(b("198.18.16.3", 8081)), "terminating: still listed");
        assert!(!p.lists(b("198.18.16.9", 8080)));
        assert!(t
            .port(SvcRef {
                slot: 3,
                incarnation: 2
            })
            .is_none());
    }
}
