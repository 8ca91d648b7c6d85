//! The controller's part in keeping stromd's tables across a restart (docs/design.md,
//! "Across a restart of stromd"): on a stop, once the workers have left their loops, the
//! Services, policies, ports' workers and every worker's flows and clients go to
//! `state_dir/tables.cbor`; the next start sets the Services and policies again and hands
//! each worker its flows before the uplink and the ports come back (each port to the worker
//! it was on).

use std::collections::HashMap;
use std::time::Instant;

use super::Controller;
use crate::conntrack::persist::{FlowTables, Restored, SavedTables};
use crate::state::tables::{boot_id, boot_ms, Snapshot, SnapshotFile, VERSION};
use crate::stats::coarse_ms;
use crate::tables::services::SvcRef;
use crate::worker::{wait_reply, Command};

fn tuple_of(r: [u16; 2]) -> (u16, u16) {
    (r[0], r[1])
}

impl Controller {
    fn snapshot_file(&self) -> SnapshotFile {
        SnapshotFile::new(&self.cfg.dataplane.state_dir)
    }

    /// Writes what the next start takes up: `tables` are the workers' (None for one that
    /// panicked: its flows are lost). Failures are logged; the stop goes on.
    pub(super) fn save_tables(&mut self, tables: Vec<Option<FlowTables>>) {
        let t = Instant::now();
        let now = coarse_ms();
        let services = self.desired.tables().services();
        let mut svc_ports = Vec::new();
        let mut index: HashMap<SvcRef, u32> = HashMap::new();
        for p in services.ports() {
            index.insert(p.id, svc_ports.len() as u32);
            svc_ports.push((p.key.clone(), p.proto));
        }
        let lost = tables.iter().filter(|t| t.is_none()).count();
        if lost > 0 {
            tracing::warn!(
                workers = lost,
                "flows of stopped-by-panic workers not saved"
            );
        }
        let workers: Vec<SavedTables> = tables
            .iter()
            .map(|t| {
                t.as_ref()
                    .map(|t| t.save(now, |s| index.get(&s).copied()))
                    .unwrap_or_default()
            })
            .collect();
        let snapshot = Snapshot {
            version: VERSION,
            boot_id: boot_id(),
            saved_boot_ms: boot_ms(),
            snat_ports: tuple_of(self.cfg.dataplane.snat_ports),
            services: self.desired.service_specs().cloned().collect(),
            policies: self.policies.take(),
            svc_ports,
            // The ports open, and those taken up from the last stop that are not open again
            // yet (their flows are still on those workers).
            port_workers: std::mem::take(&mut self.placement)
                .into_iter()
                .chain(
                    self.ports
                        .values()
                        .map(|p| (p.spec.ifname.clone(), p.worker)),
                )
                .collect(),
            workers,
        };
        let flows: usize = snapshot.workers.iter().map(|w| w.flows.len()).sum();
        let clients: usize = snapshot.workers.iter().map(|w| w.clients.len()).sum();
        let file = self.snapshot_file();
        match file.save(&snapshot) {
            Ok(bytes) => tracing::info!(
                path = %file.path().display(),
                services = snapshot.services.len(),
                flows,
                clients,
                bytes,
                ms = t.elapsed().as_millis() as u64,
                "tables saved for the next start"
            ),
            Err(e) => tracing::warn!(error = %e, "tables not saved: the next start begins empty"),
        }
    }

    /// Takes up what the last stop saved: the Services and policies, the workers its ports
    /// were on (for [`Controller::restore`]), and every worker's flows and clients. Called
    /// before the uplink and the ports are back: no packet of a saved flow can come first and
    /// be taken for a new flow (a masqueraded one would get another port).
    pub fn take_up_saved(&mut self) {
        if let Some(s) = self.restore_tables() {
            self.restore_flows(s);
        }
    }

    /// Sets the saved Services and policies again and notes the ports' workers; returns the
    /// rest of the snapshot.
    fn restore_tables(&mut self) -> Option<Snapshot> {
        let mut s = self.snapshot_file().take()?;
        let services = std::mem::take(&mut s.services);
        let n = services.len();
        let refused = self.desired.apply_services(&[], services);
        for (key, why) in &refused {
            tracing::warn!(service = %key, error = %why, "saved service not set again");
        }
        self.sync_frontends();
        if let Some(set) = s.policies.take() {
            let r = self.set_policies(set);
            if r != strom_api::Response::Ok {
                tracing::warn!(answer = ?r, "saved policies not set again");
            }
        }
        if s.workers.len() == self.workers.len() {
            self.placement = std::mem::take(&mut s.port_workers);
        }
        tracing::info!(
            services = n - refused.len(),
            policies = self.policies.is_some(),
            "saved services and policies set again"
        );
        Some(s)
    }

    /// Hands each worker the flows and clients it had, their Service ports mapped to this
    /// start's slots. With another number of workers they are dropped (logged): each worker
    /// masquerades to its own share of the SNAT ports, and its ports would be others.
    fn restore_flows(&mut self, s: Snapshot) {
        let elapsed = boot_ms().saturating_sub(s.saved_boot_ms);
        if s.workers.len() != self.workers.len() {
            tracing::warn!(
                saved = s.workers.len(),
                now = self.workers.len(),
                "saved flows not taken up: another number of workers"
            );
            return;
        }
        let snat = tuple_of(self.cfg.dataplane.snat_ports);
        if s.snat_ports != snat {
            tracing::warn!(
                saved = ?s.snat_ports,
                now = ?snat,
                "saved flows not taken up: another SNAT port range"
            );
            return;
        }
        let services = self.desired.tables().services();
        let by_key: HashMap<(&str, u8), SvcRef> = services
            .ports()
            .map(|p| ((p.key.as_str(), p.proto), p.id))
            .collect();
        let svc: Vec<Option<SvcRef>> = s
            .svc_ports
            .iter()
            .map(|(k, proto)| by_key.get(&(k.as_str(), *proto)).copied())
            .collect();
        let mut total = Restored::default();
        let mut clients = 0;
        let mut unanswered = 0;
        for (w, saved) in self.workers.iter().zip(s.workers) {
            if saved.flows.is_empty() && saved.clients.is_empty() {
                continue;
            }
            let (tx, rx) = crossbeam_channel::bounded(1);
            let sent = w.command(Command::Restore {
                saved: Box::new(saved),
                svc: svc.clone(),
                elapsed_ms: elapsed,
                reply: tx,
            });
            if let Some((r, c)) = sent.then(|| wait_reply(&rx)).flatten() {
                total.taken += r.taken;
                total.expired += r.expired;
                total.no_service += r.no_service;
                total.refused += r.refused;
                total.malformed += r.malformed;
                clients += c;
            } else {
                unanswered += 1;
            }
        }
        tracing::info!(
            flows = total.taken,
            expired = total.expired,
            no_service = total.no_service,
            refused = total.refused,
            malformed = total.malformed,
            clients,
            workers_unanswered = unanswered,
            gone_ms = elapsed,
            "saved flows taken up"
        );
    }
}
