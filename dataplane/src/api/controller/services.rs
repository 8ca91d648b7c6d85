//! The controller's Service requests: programming Services through the reconciler, and
//! reading what the workers hold (counters, conntrack) by asking each between its batches.

use strom_api::{ConntrackFilter, Response, ServicePortStatus, ServiceSpec, Tuple};

use super::Controller;
use crate::conntrack::FlowKey;
use crate::pipeline::service::SvcCount;
use crate::worker::{wait_reply, Command, ConntrackQuery};

impl Controller {
    /// `SetService`: a refused Service (malformed, or claiming another's frontend) is named
    /// in the answer and logged; every other Service stays as it was.
    pub(super) fn set_service(&mut self, spec: ServiceSpec) -> Response {
        let key = spec.key();
        match self.desired.set_service(spec) {
            Ok(()) => {
                tracing::info!(service = %key, "service programmed");
                Response::Ok
            }
            Err(message) => {
                self.services_refused += 1;
                tracing::warn!(service = %key, error = %message, "service refused");
                Response::Error { message }
            }
        }
    }

    pub(super) fn remove_service(&mut self, namespace: &str, name: &str) -> Response {
        self.desired.remove_service(&format!("{namespace}/{name}"));
        Response::Ok
    }

    /// Every worker's counters per Service port slot, added up.
    fn service_counts(&self) -> Vec<SvcCount> {
        let mut total: Vec<SvcCount> = Vec::new();
        for w in &self.workers {
            let (tx, rx) = crossbeam_channel::bounded(1);
            if !w.command(Command::ServiceCounts(tx)) {
                continue;
            }
            if let Some(counts) = wait_reply(&rx) {
                if total.len() < counts.len() {
                    total.resize(counts.len(), SvcCount::default());
                }
                for (t, c) in total.iter_mut().zip(&counts) {
                    t.flows += c.flows;
                    t.packets += c.packets;
                    t.rejected += c.rejected;
                }
            }
        }
        total
    }

    /// `Services`: each Service port, its frontends, which endpoints serve, its counters and
    /// the flows tracked to each backend now.
    pub(super) fn services(&self) -> Response {
        let table = self.desired.tables().services();
        let counts = self.service_counts();
        let (_, flows) = self.conntrack_entries(&ConntrackFilter::default(), false, false);
        let mut services: Vec<ServicePortStatus> = table
            .ports()
            .map(|p| {
                let c = counts.get(p.id.slot as usize).copied().unwrap_or_default();
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
        Response::Services { services }
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
