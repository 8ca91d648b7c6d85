//! stromd's Prometheus endpoint (`dataplane.metrics_addr`): `/metrics`, `/healthz`,
//! `/readyz` over HTTP, served by a thread of its own that asks the controller for its
//! counters as an API client does (the workers answer their parts between batches). It asks
//! for the Services' counters only, not the flows per backend, which would walk every
//! tracked flow on the controller thread.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `strom_ready` | gauge | 1 while every worker's loop moves |
//! | `strom_port_packets_total`, `strom_port_bytes_total` | counter | `port`, `pod`, `direction` (rx, tx) |
//! | `strom_port_drops_total` | counter | `port`, `pod` |
//! | `strom_drops_total` | counter | `worker`, `reason` (the pipeline's named reasons) |
//! | `strom_xdp_drops_total` | counter | `reason` (the XDP programs') |
//! | `strom_worker_loops_total` | counter | `worker` |
//! | `strom_worker_frames_free` | gauge | `worker` |
//! | `strom_conntrack_entries` | gauge | flows tracked, every worker |
//! | `strom_service_flows_total` | counter | `service` (`namespace/name:port`), flows given a backend |
//! | `strom_policy_drops_total` | counter | `policy`, `direction` |
//!
//! The registry is built at each scrape from the controller's answers: every counter is one
//! of stromd's own monotonic counters, so the values keep their meaning across scrapes.
//! HTTP is tiny_http's (a blocking server: the thread asks the controller synchronously).

use std::net::TcpListener;

use crossbeam_channel::Sender;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use strom_api::{ConntrackFilter, Request, Response};

use super::server::{ask, Msg};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PortLabels {
    port: String,
    pod: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PortOnly {
    port: String,
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerReason {
    worker: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Worker {
    worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    policy: String,
    direction: String,
}

/// The answers a scrape is made of.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub status: Option<Response>,
    pub ports: Option<Response>,
    pub stats: Option<Response>,
    pub conntrack: Option<Response>,
    pub services: Option<Response>,
    pub policies: Option<Response>,
}

/// The metrics of one snapshot, in Prometheus' text format.
pub fn encode_snapshot(s: &Snapshot) -> String {
    let mut r = Registry::with_prefix("strom");
    let ready = Gauge::<i64>::default();
    if let Some(Response::Status(st)) = &s.status {
        ready.set(i64::from(st.ready));
    }
    r.register("ready", "1 while every worker's loop moves", ready);

    let packets = Family::<PortLabels, Counter>::default();
    let bytes = Family::<PortLabels, Counter>::default();
    let port_drops = Family::<PortOnly, Counter>::default();
    if let Some(Response::Ports { ports }) = &s.ports {
        for p in ports {
            let pod = if p.spec.pod_name.is_empty() {
                String::new()
            } else {
                format!("{}/{}", p.spec.pod_namespace, p.spec.pod_name)
            };
            let l = |direction| PortLabels {
                port: p.spec.ifname.clone(),
                pod: pod.clone(),
                direction,
            };
            let c = &p.counters;
            packets.get_or_create(&l("rx")).inc_by(c.rx_packets);
            packets.get_or_create(&l("tx")).inc_by(c.tx_packets);
            bytes.get_or_create(&l("rx")).inc_by(c.rx_bytes);
            bytes.get_or_create(&l("tx")).inc_by(c.tx_bytes);
            port_drops
                .get_or_create(&PortOnly {
                    port: p.spec.ifname.clone(),
                    pod: pod.clone(),
                })
                .inc_by(c.drops);
        }
    }
    r.register(
        "port_packets",
        "Packets received and sent per port",
        packets,
    );
    r.register("port_bytes", "Bytes received and sent per port", bytes);
    r.register(
        "port_drops",
        "Packets dropped per port (any reason)",
        port_drops,
    );

    let drops = Family::<WorkerReason, Counter>::default();
    let xdp = Family::<Reason, Counter>::default();
    let loops = Family::<Worker, Counter>::default();
    let free = Family::<Worker, Gauge>::default();
    if let Some(Response::Stats { workers, xdp_drops }) = &s.stats {
        for w in workers {
            let worker = w.id.to_string();
            for (reason, n) in &w.drops {
                drops
                    .get_or_create(&WorkerReason {
                        worker: worker.clone(),
                        reason: reason.clone(),
                    })
                    .inc_by(*n);
            }
            loops
                .get_or_create(&Worker {
                    worker: worker.clone(),
                })
                .inc_by(w.loops);
            free.get_or_create(&Worker { worker })
                .set(i64::try_from(w.frames_free).unwrap_or(i64::MAX));
        }
        for (reason, n) in xdp_drops {
            xdp.get_or_create(&Reason {
                reason: reason.clone(),
            })
            .inc_by(*n);
        }
    }
    r.register(
        "drops",
        "Packets dropped by the pipeline, by worker and reason",
        drops,
    );
    r.register(
        "xdp_drops",
        "Packets dropped by the XDP programs, by reason",
        xdp,
    );
    r.register("worker_loops", "Worker loops", loops);
    r.register(
        "worker_frames_free",
        "Frames in the worker's free pool",
        free,
    );

    let entries = Gauge::<i64>::default();
    if let Some(Response::Conntrack { total, .. }) = &s.conntrack {
        entries.set(i64::try_from(*total).unwrap_or(i64::MAX));
    }
    r.register("conntrack_entries", "Flows tracked, every worker", entries);

    let flows = Family::<ServiceLabel, Counter>::default();
    if let Some(Response::Services { services, .. }) = &s.services {
        for p in services {
            flows
                .get_or_create(&ServiceLabel {
                    service: p.key.clone(),
                })
                .inc_by(p.flows);
        }
    }
    r.register(
        "service_flows",
        "Flows given a backend, per Service port",
        flows,
    );

    let policy_drops = Family::<PolicyLabels, Counter>::default();
    if let Some(Response::Policies { policies }) = &s.policies {
        for p in policies {
            for (direction, n) in [("ingress", p.ingress_drops), ("egress", p.egress_drops)] {
                policy_drops
                    .get_or_create(&PolicyLabels {
                        policy: p.policy.clone(),
                        direction: direction.into(),
                    })
                    .inc_by(n);
            }
        }
    }
    r.register(
        "policy_drops",
        "Packets dropped because no NetworkPolicy allowed them, by isolating policy and direction",
        policy_drops,
    );

    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

/// Asks the controller for everything a scrape shows.
fn snapshot(tx: &Sender<Msg>) -> Snapshot {
    let ok = |r: Response| match r {
        Response::Error { .. } => None,
        r => Some(r),
    };
    Snapshot {
        status: ok(ask(tx, Request::Status)),
        ports: ok(ask(tx, Request::Ports)),
        stats: ok(ask(tx, Request::Stats)),
        conntrack: ok(ask(
            tx,
            Request::Conntrack {
                filter: ConntrackFilter::default(),
                count_only: true,
            },
        )),
        services: ok(ask(
            tx,
            Request::Services {
                counters_only: true,
            },
        )),
        policies: ok(ask(tx, Request::Policies)),
    }
}

/// Serves scrapes on `listener` until the process ends.
pub(super) fn serve(listener: TcpListener, tx: Sender<Msg>) {
    let server = match tiny_http::Server::from_listener(listener, None) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "metrics endpoint not served");
            return;
        }
    };
    for req in server.incoming_requests() {
        let (code, body, kind) = match req.url() {
            "/metrics" => (
                200,
                encode_snapshot(&snapshot(&tx)),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
            "/healthz" => (200, "ok\n".to_string(), "text/plain"),
            "/readyz" => match ask(&tx, Request::Status) {
                Response::Status(s) if s.ready => (200, "ok\n".to_string(), "text/plain"),
                Response::Status(s) => (
                    503,
                    format!("{}\n", s.reason.unwrap_or_else(|| "not ready".into())),
                    "text/plain",
                ),
                other => (503, format!("{other:?}\n"), "text/plain"),
            },
            _ => (404, "not found\n".to_string(), "text/plain"),
        };
        let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], kind.as_bytes())
            .expect("a valid header");
        let resp = tiny_http::Response::from_string(body)
            .with_status_code(code)
            .with_header(header);
        if let Err(e) = req.respond(resp) {
            tracing::debug!(error = %e, "metrics scrape ended early");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strom_api::{Counters, PortSpec, PortStatus, StatusInfo, WorkerStats};

    #[test]
    fn a_snapshot_becomes_labelled_series() {
        let port = PortStatus {
            id: 1,
            kind: "pod".into(),
            worker: 0,
            queue_workers: vec![0],
            ifindex: 7,
            spec: PortSpec {
                ifname: "st1".into(),
                ips: vec![],
                mac: String::new(),
                container_id: String::new(),
                pod_ifname: "eth0".into(),
                pod_namespace: "shop".into(),
                pod_name: "web".into(),
            },
            host_mac: String::new(),
            xdp_mode: String::new(),
            xsk_mode: String::new(),
            counters: Counters {
                rx_packets: 10,
                rx_bytes: 1000,
                tx_packets: 9,
                tx_bytes: 900,
                drops: 1,
                csum_offloaded: 0,
            },
            fill_depth: 0,
        };
        let worker = WorkerStats {
            id: 0,
            core: None,
            ports: 1,
            counters: Counters::default(),
            drops: vec![("policy_denied".into(), 3)],
            loops: 42,
            sleeps: 0,
            frames_free: 100,
            frames_total: 200,
            frames_in_fill: 100,
            fill_floor: 32,
            fill_budget: 0,
            fill_reserved: 0,
            core_wait_ns: 0,
            preemptions: 0,
        };
        let s = Snapshot {
            status: Some(Response::Status(StatusInfo {
                ready: true,
                reason: None,
                version: "0".into(),
                workers: 1,
                ports: 1,
                poll_mode: "busy".into(),
                uplink: None,
            })),
            ports: Some(Response::Ports { ports: vec![port] }),
            stats: Some(Response::Stats {
                workers: vec![worker],
                xdp_drops: vec![("xdp_no_socket".into(), 5)],
            }),
            conntrack: Some(Response::Conntrack {
                total: 17,
                entries: vec![],
            }),
            services: None,
            policies: None,
        };
        let text = encode_snapshot(&s);
        for line in [
            "strom_ready 1",
            "strom_port_packets_total{port=\"st1\",pod=\"shop/web\",direction=\"rx\"} 10",
            "strom_port_bytes_total{port=\"st1\",pod=\"shop/web\",direction=\"tx\"} 900",
            "strom_port_drops_total{port=\"st1\",pod=\"shop/web\"} 1",
            "strom_drops_total{worker=\"0\",reason=\"policy_denied\"} 3",
            "strom_xdp_drops_total{reason=\"xdp_no_socket\"} 5",
            "strom_worker_loops_total{worker=\"0\"} 42",
            "strom_worker_frames_free{worker=\"0\"} 100",
            "strom_conntrack_entries 17",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing in:\n{text}"
            );
        }
    }

    #[test]
    fn a_missing_answer_leaves_its_series_out_not_the_scrape() {
        let text = encode_snapshot(&Snapshot::default());
        assert!(text.contains("strom_ready 0"));
        assert!(text.ends_with("# EOF\n"));
    }
}
