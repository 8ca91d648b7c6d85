//! The controller's Service requests: programming Services through the reconciler, and
//! reading what the workers hold (counters, conntrack) by asking each between its batches.

use strom_api::{ConntrackFilter, Response, ServicePortStatus, ServiceSpec, Tuple};

use super::Controller;
use crate::conntrack::FlowKey;
use crate::pipeline::service::SvcCount;
use crate::tables::services::FrontKind;
use crate::worker::{wait_reply, Command, ConntrackQuery};

impl Controller {
    /// `SetService`: a refused Service (malformed, or claiming another's frontend) is named
    /// in the answer and logged; every other Service stays as it was.
    pub(super) fn set_service(&mut self, spec: ServiceSpec) -> Response {
        let key = spec.key();
        match self.desired.set_service(spec) {
            Ok(()) => {
                tracing::info!(service = %key, "service programmed");
                self.sync_frontends();
                Response::Ok
            }
            Err(message) => {
                self.services_refused += 1;
                tracing::warn!(service = %key, error = %message, "service refused");
                Response::Error { message }
            }
        }
    }

    /// `SetServices`: removals, then sets, one table published. Returns the answer and how
    /// many changes were applied (for the generation).
    pub(super) fn set_services(
        &mut self,
        set: Vec<ServiceSpec>,
        remove: Vec<String>,
    ) -> (Response, u64) {
        let (sets, removals) = (set.len(), remove.len());
        let refused = self.desired.apply_services(&remove, set);
        for (key, why) in &refused {
            tracing::warn!(service = %key, error = %why, "service refused");
        }
        self.services_refused += refused.len() as u64;
        self.sync_frontends();
        tracing::info!(
            set = sets - refused.len(),
            removed = removals,
            refused = refused.len(),
            "services programmed"
        );
        let applied = (sets - refused.len() + removals) as u64;
        (
            Response::Applied {
                refused,
                delta: None,
            },
            applied,
        )
    }

    pub(super) fn remove_service(&mut self, namespace: &str, name: &str) -> Response {
        self.desired.remove_service(&format!("{namespace}/{name}"));
        self.sync_frontends();
        Response::Ok
    }

    /// Makes the XDP programs hand stromd what the Services now reach from outside:
    /// NodePorts on the node's addresses, external and load-balancer IPs on the uplink; and
    /// hand back to the kernel what they no longer do. Gives the node's own sockets the
    /// Services' frontends.
    pub(super) fn sync_frontends(&mut self) {
        let table = self.desired.tables().services();
        let mut ports = std::collections::BTreeSet::new();
        let mut vips = std::collections::BTreeSet::new();
        for p in table.ports() {
            for (f, kind) in &p.frontends {
                match kind {
                    FrontKind::NodePort => {
                        ports.insert((f.proto, f.port));
                    }
                    FrontKind::ExternalIp | FrontKind::LoadBalancer => {
                        vips.insert(f.ip);
                    }
                    FrontKind::ClusterIp => {}
                }
            }
        }
        for &(proto, port) in ports.difference(&self.bpf_node_ports) {
            if let Err(e) = self.xdp.set_node_port(proto, port, true) {
                tracing::error!(port, error = %e, "cannot open a NodePort");
            }
        }
        for &(proto, port) in self.bpf_node_ports.difference(&ports) {
            if let Err(e) = self.xdp.set_node_port(proto, port, false) {
                tracing::error!(port, error = %e, "cannot close a NodePort");
            }
        }
        if self.cfg.node.uplink.is_some() {
            for ip in vips.difference(&self.bpf_vips) {
                if let Err(e) = self.xdp.add_owned(*ip, 32) {
                    tracing::error!(%ip, error = %e, "cannot take a Service address");
                }
            }
            for ip in self.bpf_vips.difference(&vips) {
                if let Err(e) = self.xdp.remove_owned(*ip, 32) {
                    tracing::error!(%ip, error = %e, "cannot give back a Service address");
                }
            }
        }
        self.bpf_node_ports = ports;
        self.bpf_vips = vips;
        let want = self.desired.health_checks();
        self.health_checks.sync(&want);
        if let Some(n) = &mut self.node_sockets {
            n.sync(&self.desired.tables().services());
        }
    }

    /// Every worker's counters per Service port slot.
    fn service_counts(&self) -> Vec<Vec<SvcCount>> {
        let mut all = Vec::new();
        for w in &self.workers {
            let (tx, rx) = crossbeam_channel::bounded(1);
            if !w.command(Command::ServiceCounts(tx)) {
                continue;
            }
            if let Some(counts) = wait_reply(&rx) {
                all.push(counts);
            }
        }
        all
    }

    /// `Services`: each Service port, its frontends, which endpoints serve, its counters and
    /// (unless `counters_only`) the flows tracked to each backend now.
    pub(super) fn services(&self, counters_only: bool) -> Response {
        let table = self.desired.tables().services();
        let counts = self.service_counts();
        let flows = if counters_only {
            Vec::new()
        } else {
            self.conntrack_entries(&ConntrackFilter::default(), false, false)
                .1
        };
        let mut services: Vec<ServicePortStatus> = table
            .ports()
            .map(|p| {
                // The workers' counts of this port's incarnation of its slot, added up.
                let mut c = SvcCount::default();
                for w in &counts {
                    if let Some(x) = w
                        .get(p.id.slot as usize)
                        .filter(|x| x.incarnation == p.id.incarnation)
                    {
                        c.flows += x.flows;
                        c.packets += x.packets;
                        c.rejected += x.rejected;
                    }
                }
                let mut s = p.status(c.flows, c.packets, c.rejected);
                for b in &mut s.backends {
                    b.flows = flows
                        .iter()
                        .filter(|e| {
                            e.service == p.service
                                && e.translated.ends_with(&format!(" -> {}", b.addr))
                        })
                        .count() as u64;
                }
                s
            })
            .collect();
        services.sort_by(|a, b| a.key.cmp(&b.key));
        Response::Services {
            services,
            refused: self.services_refused,
        }
    }

    /// Asks every worker for its flows matching `filter` (or to forget them, `flush`).
    fn conntrack_entries(
        &self,
        filter: &ConntrackFilter,
        count_only: bool,
        flush: bool,
    ) -> (u64, Vec<strom_api::ConntrackEntry>) {
        let mut total = 0;
        let mut entries = Vec::new();
        for w in &self.workers {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let query = ConntrackQuery {
                filter: filter.clone(),
                count_only,
                flush,
            };
            if !w.command(Command::Conntrack { query, reply: tx }) {
                continue;
            }
            if let Some((n, mut e)) = wait_reply(&rx) {
                total += n;
                entries.append(&mut e);
            }
        }
        (total, entries)
    }

    pub(super) fn conntrack(&self, filter: &ConntrackFilter, count_only: bool) -> Response {
        let (total, entries) = self.conntrack_entries(filter, count_only, false);
        Response::Conntrack { total, entries }
    }

    pub(super) fn flush_conntrack(&self, filter: &ConntrackFilter) -> Response {
        let (entries, _) = self.conntrack_entries(filter, false, true);
        Response::Flushed { entries }
    }

    /// `Trace`: what the Service stage would do with the first packet of `tuple` from a pod.
    pub(super) fn trace(&self, tuple: &Tuple) -> Response {
        let (std::net::IpAddr::V4(src), std::net::IpAddr::V4(dst)) = (tuple.src, tuple.dst) else {
            return Response::Error {
                message: "only IPv4 is traced (stromd forwards IPv4)".into(),
            };
        };
        let key = FlowKey {
            src,
            dst,
            sport: tuple.src_port,
            dport: tuple.dst_port,
            proto: tuple.protocol.number(),
        };
        let loaded = self.desired.tables().load();
        let view = loaded.view();
        let steps = crate::pipeline::service::trace(&key, &view, view.node.gateway_v4);
        Response::Trace { steps }
    }
}
