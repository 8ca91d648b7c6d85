//! Services for the node's own sockets: what the cgroup programs of `xdp/bpf/socklb.c` are
//! given, kept equal to the Service table.
//!
//! The node's packets never cross stromd's pipeline (they leave by the kernel's routes; a
//! NodePort on the node's own address is delivered locally), so a connection from the node
//! is given its backend when its socket names the frontend, and is never translated per
//! packet. The backends are the pools the pipeline uses for pods: the
//! `internalTrafficPolicy` pool for a ClusterIP, every serving endpoint for the other
//! frontends (kube-proxy treats the node's own traffic as it treats its pods'). Each
//! frontend's backends are written under a fresh id before the frontend points at them, and
//! removed after, so the programs see one set whole.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use strom_xdp::socklb::{SockFront, SocketLb};

use crate::tables::services::{FrontKind, Pool, ServiceTable};

/// What one frontend should lead to.
#[derive(Debug, Clone)]
pub struct Want {
    pub pool: Arc<Pool>,
    /// ClientIP affinity in seconds (0: none).
    pub affinity_s: u32,
}

impl Want {
    fn backends(&self) -> Vec<(std::net::Ipv4Addr, u16)> {
        self.pool.backends.iter().map(|b| (b.ip, b.port)).collect()
    }

    fn same(&self, other: &Want) -> bool {
        self.affinity_s == other.affinity_s
            && (Arc::ptr_eq(&self.pool, &other.pool) || self.pool.backends == other.pool.backends)
    }
}

/// Every TCP and UDP frontend of `table` and what it leads to (the hooks see no SCTP).
pub fn desired(table: &ServiceTable) -> BTreeMap<SockFront, Want> {
    let mut out = BTreeMap::new();
    for p in table.ports() {
        if p.proto != libc::IPPROTO_TCP as u8 && p.proto != libc::IPPROTO_UDP as u8 {
            continue;
        }
        // kube-proxy's affinity timeout is in seconds; a part of one is a whole one.
        let affinity_s = p
            .affinity_ms
            .map_or(0, |ms| u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX));
        for (f, kind) in &p.frontends {
            let pool = match kind {
                FrontKind::ClusterIp => &p.internal,
                FrontKind::NodePort | FrontKind::ExternalIp | FrontKind::LoadBalancer => &p.cluster,
            };
            out.insert(
                SockFront {
                    ip: f.ip,
                    port: f.port,
                    proto: f.proto,
                },
                Want {
                    pool: pool.clone(),
                    affinity_s,
                },
            );
        }
    }
    out
}

/// A frontend as the programs have it.
struct Installed {
    id: u32,
    want: Want,
}

/// The programs and what they were given.
pub struct NodeSockets {
    lb: SocketLb,
    installed: BTreeMap<SockFront, Installed>,
    next_id: u32,
}

/// Where `node_sockets` attaches: the configured cgroup, else the cgroup v2 root.
pub fn cgroup(configured: &std::path::Path) -> Option<PathBuf> {
    if configured.as_os_str().is_empty() {
        strom_xdp::socklb::cgroup2_root()
    } else {
        Some(configured.to_path_buf())
    }
}

impl NodeSockets {
    /// Attaches the programs to `cgroup` for the sockets of this thread's network namespace.
    pub fn attach(cgroup: &std::path::Path) -> Result<Self, strom_xdp::bpf::BpfError> {
        let netns = strom_xdp::socklb::netns_cookie().map_err(|e| {
            strom_xdp::bpf::BpfError::Cgroup(
                cgroup.to_path_buf(),
                format!("the network namespace's cookie: {e}"),
            )
        })?;
        Ok(NodeSockets {
            lb: SocketLb::attach(cgroup, netns)?,
            installed: BTreeMap::new(),
            next_id: 1,
        })
    }

    /// Frontends the programs balance now.
    pub fn len(&self) -> usize {
        self.installed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.installed.is_empty()
    }

    fn fresh_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.installed.values().any(|i| i.id == id) {
                return id;
            }
        }
    }

    /// Makes the programs' frontends those of `table`; unchanged ones are not rewritten.
    pub fn sync(&mut self, table: &ServiceTable) {
        let want = desired(table);
        let gone: Vec<SockFront> = self
            .installed
            .keys()
            .filter(|f| !want.contains_key(f))
            .copied()
            .collect();
        for f in gone {
            if let Err(e) = self.lb.remove_front(f) {
                tracing::error!(front = ?f, error = %e, "cannot remove a frontend of the node's sockets");
                continue;
            }
            if let Some(old) = self.installed.remove(&f) {
                self.lb.remove_backends(old.id, &old.want.backends());
            }
        }
        for (f, w) in want {
            if self.installed.get(&f).is_some_and(|i| i.want.same(&w)) {
                continue;
            }
            let id = self.fresh_id();
            let backends = w.backends();
            let written = self.lb.set_backends(id, &backends).and_then(|()| {
                self.lb
                    .set_front(f, id, backends.len() as u32, w.affinity_s)
            });
            if let Err(e) = written {
                // The frontend keeps what it had; a half-written id is never pointed at.
                tracing::error!(front = ?f, error = %e, "cannot give the node's sockets a frontend");
                self.lb.remove_backends(id, &backends);
                continue;
            }
            if let Some(old) = self.installed.insert(f, Installed { id, want: w }) {
                self.lb.remove_backends(old.id, &old.want.backends());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::services::DesiredServices;
    use strom_api::{EndpointSpec, Protocol, ServicePortSpec, ServiceSpec};

    fn endpoint(ip: &str, port: u16, local: bool) -> EndpointSpec {
        EndpointSpec {
            ip: ip.parse().unwrap(),
            port,
            ready: true,
            serving: true,
            terminating: false,
            local,
            in_topology: true,
            target: String::new(),
        }
    }

    fn spec(protocol: Protocol, itp_local: bool) -> ServiceSpec {
        ServiceSpec {
            namespace: "shop".into(),
            name: "web".into(),
            cluster_ips: vec!["198.19.0.10".parse().unwrap()],
            external_ips: vec!["203.0.113.7".parse().unwrap()],
            load_balancer_ips: vec![],
            ports: vec![ServicePortSpec {
                name: "http".into(),
                protocol,
                port: 80,
                node_port: Some(30080),
                endpoints: vec![
                    endpoint("198.18.16.2", 8080, true),
                    endpoint("198.18.32.2", 8080, false),
                ],
            }],
            affinity_timeout_s: Some(1500),
            internal_local: itp_local,
            external_local: true,
            health_check_node_port: None,
        }
    }

    #[test]
    fn a_clusterip_leads_to_the_internal_pool_and_the_rest_to_every_serving_endpoint() {
        let mut d = DesiredServices::default();
        d.set(spec(Protocol::Tcp, true), &["198.18.0.1".parse().unwrap()])
            .unwrap();
        let want = desired(&d.table());
        let get = |ip: &str, port: u16| {
            let f = SockFront {
                ip: ip.parse().unwrap(),
                port,
                proto: 6,
            };
            let w = &want[&f];
            let ips: Vec<String> = w.pool.backends.iter().map(|b| b.ip.to_string()).collect();
            (ips, w.affinity_s)
        };
        // internalTrafficPolicy Local: the node's own endpoint only.
        assert_eq!(get("198.19.0.10", 80), (vec!["198.18.16.2".into()], 1500));
        // externalTrafficPolicy Local does not narrow the node's own connections.
        let all = vec!["198.18.16.2".to_string(), "198.18.32.2".into()];
        assert_eq!(get("198.18.0.1", 30080), (all.clone(), 1500));
        assert_eq!(get("203.0.113.7", 80), (all, 1500));
        assert_eq!(want.len(), 3);
    }

    #[test]
    fn sctp_frontends_are_not_given_to_the_socket_hooks() {
        let mut d = DesiredServices::default();
        d.set(
            spec(Protocol::Sctp, false),
            &["198.18.0.1".parse().unwrap()],
        )
        .unwrap();
        assert!(desired(&d.table()).is_empty());
    }

    #[test]
    fn an_equal_pool_built_again_is_the_same_want() {
        let mut d = DesiredServices::default();
        let nodes = ["198.18.0.1".parse().unwrap()];
        d.set(spec(Protocol::Udp, false), &nodes).unwrap();
        let a = desired(&d.table());
        let mut s = spec(Protocol::Udp, false);
        s.external_ips.clear();
        d.set(s, &nodes).unwrap();
        let b = desired(&d.table());
        let f = |ip: &str, port| SockFront {
            ip: ip.parse().unwrap(),
            port,
            proto: 17,
        };
        assert!(a[&f("198.19.0.10", 80)].same(&b[&f("198.19.0.10", 80)]));
        assert!(!b.contains_key(&f("203.0.113.7", 80)));
        let mut s = spec(Protocol::Udp, false);
        s.ports[0].endpoints.pop();
        d.set(s, &nodes).unwrap();
        let c = desired(&d.table());
        assert!(!a[&f("198.19.0.10", 80)].same(&c[&f("198.19.0.10", 80)]));
    }
}
