//! The reconciler: stromd's desired state (the pods' ports and the uplink's route, the
//! Services, the NetworkPolicies), fed by the API (and by strom-control through the same
//! API). Each change has the table's own module build the next version of that table, which
//! is published on its own; the version it replaces is kept here until every worker has
//! moved past it, and freed here, off the workers' path.

use std::any::Any;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::tables::policy::{PolicyError, PolicySlots};
use crate::tables::routes::{port_routes, DesiredRoutes};
use crate::tables::services::DesiredServices;
use crate::tables::{Next, PolicyTable, RouteTable, TableHandle};
use crate::worker::WorkerShared;

/// A replaced table version and each worker's loop count when it was replaced.
struct Retired {
    /// Held only to be dropped here, once no worker can read it.
    _table: Arc<dyn Any + Send + Sync>,
    loops: Vec<u64>,
}

/// The desired state and the tables built from it.
pub struct Reconciler {
    tables: TableHandle,
    workers: Vec<Arc<WorkerShared>>,
    routes: DesiredRoutes,
    services: DesiredServices,
    /// Counter slots of the policies, and the policy table's generation.
    policy_slots: PolicySlots,
    policy_generation: u64,
    retired: Vec<Retired>,
}

impl Reconciler {
    pub fn new(tables: TableHandle, workers: Vec<Arc<WorkerShared>>) -> Self {
        Reconciler {
            tables,
            workers,
            routes: DesiredRoutes::default(),
            services: DesiredServices::default(),
            policy_slots: PolicySlots::default(),
            policy_generation: 0,
            retired: Vec::new(),
        }
    }

    /// The tables (for reading what is published).
    pub fn tables(&self) -> &TableHandle {
        &self.tables
    }

    /// Routes port `port`'s addresses to it (replacing what it had).
    pub fn set_port(&mut self, port: u32, ips: &[IpAddr], next: Next) {
        self.routes.ports.insert(port, port_routes(ips, next));
        self.publish_routes();
    }

    /// Removes port `port`'s routes.
    pub fn remove_port(&mut self, port: u32) {
        if self.routes.ports.remove(&port).is_some() {
            self.publish_routes();
        }
    }

    /// Sets the default route through the uplink (None: no way out yet).
    pub fn set_uplink(&mut self, next: Option<Next>) {
        if self.routes.uplink != next {
            self.routes.uplink = next;
            self.publish_routes();
        }
    }

    /// Sets how many workers serve the uplink's receive queues.
    pub fn set_uplink_workers(&mut self, n: u16) {
        if self.routes.uplink_workers != n {
            self.routes.uplink_workers = n;
            self.publish_routes();
        }
    }

    /// Programs a Service (all its ports at once); a refused one keeps what it had.
    pub fn set_service(&mut self, spec: strom_api::ServiceSpec) -> Result<(), String> {
        self.check_addresses(&spec)?;
        let nodes = self.node_v4();
        self.services.set(spec, &nodes)?;
        self.publish_services();
        Ok(())
    }

    /// Removes the Services `remove` names (`namespace/name`), then sets those of `set`,
    /// publishing one new table for all of them: a peer's whole round costs one rebuild, not
    /// one per Service. Returns the Services refused (key, why); the others are applied.
    pub fn apply_services(
        &mut self,
        remove: &[String],
        set: Vec<strom_api::ServiceSpec>,
    ) -> Vec<(String, String)> {
        let nodes = self.node_v4();
        let mut changed = false;
        for key in remove {
            changed |= self.services.remove(key);
        }
        // A Service may take an address or NodePort another gives up later in the same
        // batch: what is refused is tried once more after a pass that applied something.
        let mut todo = set;
        let mut again = true;
        let refused = loop {
            let mut applied = false;
            let mut failed = Vec::new();
            for spec in todo {
                match self
                    .check_addresses(&spec)
                    .and_then(|()| self.services.set(spec.clone(), &nodes))
                {
                    Ok(()) => applied = true,
                    Err(why) => failed.push((spec, why)),
                }
            }
            changed |= applied;
            if again && applied && !failed.is_empty() {
                again = false;
                todo = failed.into_iter().map(|(spec, _)| spec).collect();
                continue;
            }
            break failed
                .into_iter()
                .map(|(spec, why)| (spec.key(), why))
                .collect::<Vec<_>>();
        };
        if changed {
            self.publish_services();
        }
        refused
    }

    /// A Service address must be the Service's alone: one of the node's own (its traffic
    /// would be taken from the kernel on the uplink), the gateway's or a pod's would cut
    /// them off.
    fn check_addresses(&self, spec: &strom_api::ServiceSpec) -> Result<(), String> {
        let node = self.tables.node();
        for ip in spec
            .cluster_ips
            .iter()
            .chain(&spec.external_ips)
            .chain(&spec.load_balancer_ips)
        {
            let in_pods = match ip {
                IpAddr::V4(v4) => {
                    *v4 == node.gateway_v4 || node.pod_cidr.is_some_and(|c| c.contains(v4))
                }
                IpAddr::V6(_) => false,
            };
            if in_pods || node.addrs.contains(ip) {
                return Err(format!(
                    "{}: {ip} is the node's, the pod gateway's or in the pod CIDR, not a Service's",
                    spec.key()
                ));
            }
        }
        Ok(())
    }

    /// Removes a Service (nothing when it is not there).
    pub fn remove_service(&mut self, key: &str) {
        if self.services.remove(key) {
            self.publish_services();
        }
    }

    /// Replaces the NetworkPolicies (compiled, all of them at once); a malformed set is
    /// refused whole and the one in force stays.
    pub fn set_policies(&mut self, set: &strom_api::PolicySet) -> Result<(), PolicyError> {
        let table = PolicyTable::build(set, self.policy_generation + 1, &mut self.policy_slots)?;
        self.policy_generation += 1;
        let old = self.tables.publish_policy(table);
        self.retire(old);
        Ok(())
    }

    /// The policies' counter slots.
    pub fn policy_slots(&self) -> &PolicySlots {
        &self.policy_slots
    }

    /// The Services as set.
    pub fn service_specs(&self) -> impl Iterator<Item = &strom_api::ServiceSpec> {
        self.services.specs()
    }

    /// Services programmed.
    pub fn services(&self) -> usize {
        self.services.len()
    }

    /// The health-check servers the Services want ([`DesiredServices::health_checks`]).
    pub fn health_checks(&self) -> Vec<(u16, String, u64)> {
        self.services.health_checks()
    }

    /// The node's IPv4 addresses, where NodePorts listen.
    fn node_v4(&self) -> Vec<std::net::Ipv4Addr> {
        let mut v: Vec<std::net::Ipv4Addr> = self
            .tables
            .node()
            .addrs
            .iter()
            .filter_map(|a| match a {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        v.sort_unstable();
        v
    }

    fn publish_services(&mut self) {
        let old = self.tables.publish_services(self.services.table());
        self.retire(old);
    }

    fn publish_routes(&mut self) {
        let old = self.tables.publish_routes(RouteTable::build(&self.routes));
        self.retire(old);
    }

    /// Keeps a replaced version until every worker has finished the loop it may be using it
    /// in (a worker loads the tables at the start of a loop and lets go at its end).
    fn retire(&mut self, table: Arc<dyn Any + Send + Sync>) {
        let loops = self.loops();
        self.retired.push(Retired {
            _table: table,
            loops,
        });
        self.collect();
    }

    fn loops(&self) -> Vec<u64> {
        self.workers
            .iter()
            .map(|w| w.counters.loops.load(Ordering::Acquire))
            .collect()
    }

    /// Frees the replaced versions no worker can hold any more: each worker has completed a
    /// loop since (or has ended). Called on every publish and from the API's upkeep.
    pub fn collect(&mut self) -> usize {
        let now = self.loops();
        let ended: Vec<bool> = self
            .workers
            .iter()
            .map(|w| w.counters.ended.get().is_some())
            .collect();
        let before = self.retired.len();
        self.retired.retain(|r| {
            !r.loops
                .iter()
                .zip(&now)
                .zip(&ended)
                .all(|((then, now), ended)| *ended || now > then)
        });
        before - self.retired.len()
    }

    /// Versions waiting to be freed.
    pub fn retired(&self) -> usize {
        self.retired.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::NodeTable;

    #[test]
    fn a_replaced_table_is_freed_only_once_every_worker_has_finished_a_loop() {
        let (workers, _rx) = crate::worker::create(2, &[]).unwrap();
        let tables = TableHandle::new(NodeTable::new("169.254.1.1".parse().unwrap()));
        let mut r = Reconciler::new(tables.clone(), workers.clone());
        let next = Next {
            port: 1,
            worker: 0,
            dst_mac: [2; 6],
            src_mac: [3; 6],
            mtu: 1500,
        };
        // A worker holding the first version, as one does during a loop.
        let held = tables.load();
        r.set_port(1, &["198.18.16.2".parse().unwrap()], next);
        r.set_port(2, &["198.18.16.3".parse().unwrap()], next);
        assert_eq!(tables.routes().local.len(), 2);
        assert_eq!(r.retired(), 2, "kept: no worker has finished a loop");
        workers[0].counters.loops.fetch_add(1, Ordering::Relaxed);
        assert_eq!(r.collect(), 0, "worker 1 may still hold them");
        drop(held);
        workers[1].counters.loops.fetch_add(1, Ordering::Relaxed);
        assert_eq!(r.collect(), 2);
        assert_eq!(r.retired(), 0);
        // An ended worker holds nothing.
        let _ = workers[1].counters.ended.set("stopped".into());
        r.remove_port(1);
        workers[0].counters.loops.fetch_add(1, Ordering::Relaxed);
        assert_eq!(r.collect(), 1);
    }

    fn service(name: &str, ip: &str) -> strom_api::ServiceSpec {
        serde_json::from_value(serde_json::json!({
            "namespace": "a", "name": name, "cluster_ips": [ip],
            "ports": [{"protocol": "tcp", "port": 80,
                       "endpoints": [{"ip": "198.18.16.9", "port": 8080, "ready": true,
                                      "serving": true, "terminating": false, "local": true}]}]
        }))
        .unwrap()
    }

    #[test]
    fn many_services_are_one_new_table_and_a_bad_one_is_refused_alone() {
        let (workers, _rx) = crate::worker::create(1, &[]).unwrap();
        let tables = TableHandle::new(NodeTable::new("169.254.1.1".parse().unwrap()));
        let mut r = Reconciler::new(tables.clone(), workers.clone());
        let held = tables.load();
        let refused = r.apply_services(
            &[],
            vec![
                service("web", "198.19.0.10"),
                service("db", "198.19.0.11"),
                // The pod gateway's address: not a Service's.
                service("bad", "169.254.1.1"),
            ],
        );
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].0, "a/bad");
        assert_eq!(r.services(), 2);
        assert_eq!(r.retired(), 1, "one table published for the whole batch");
        // Removals come before sets: db's address is free for another in the same batch.
        let refused = r.apply_services(&["a/db".into()], vec![service("db2", "198.19.0.11")]);
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(r.services(), 2);
        assert_eq!(r.retired(), 2);
        // db2 moves off .11 and web takes it in the same batch, web given first: refused at
        // first, taken in the second pass.
        let refused = r.apply_services(
            &[],
            vec![service("web", "198.19.0.11"), service("db2", "198.19.0.12")],
        );
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(r.retired(), 3);
        // Nothing to do publishes nothing.
        assert!(r.apply_services(&["a/gone".into()], Vec::new()).is_empty());
        assert_eq!(r.retired(), 3);
        drop(held);
    }
}
