//! strom-control's metrics (Prometheus, through prometheus-client) and health.
//!
//! | metric | type | what |
//! |---|---|---|
//! | `strom_control_network_programming_duration_seconds` | histogram | from an object change seen to stromd's acknowledgement of the tables it means (kube-proxy's `network_programming_duration_seconds` measures from the object's own timestamp; this starts when strom-control receives the change) |
//! | `strom_control_objects{kind}` | gauge | objects held, by kind |
//! | `strom_control_watch_errors_total{kind}` | counter | failed watches and lists (each retried with backoff) |
//! | `strom_control_rejected_objects_total{kind}` | counter | objects left out of the tables as malformed |
//! | `strom_control_services_programmed_total{op}` | counter | Services set and removed in stromd, and refused by it |
//! | `strom_control_policy_sets_programmed_total` | counter | policy sets given to stromd |
//! | `strom_control_policy_sets_refused_total` | counter | policy sets stromd refused (it keeps the one it had) |
//! | `strom_control_stromd_errors_total` | counter | failed attempts to reach or greet stromd |
//! | `strom_control_stromd_syncs_total` | counter | full syncs (a new stromd met, or its tables changed by another client) |
//!
//! Ready (`/readyz` 200) once every kind has been listed and stromd has acknowledged the
//! tables since; not ready while stromd cannot be reached. `/healthz` is 200 while the
//! process serves.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::cluster::Kind;
use crate::program::{Observer, Resync, Round};
use crate::source::Report;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

/// Every metric, shared by the source, the programmer thread and the HTTP server.
pub struct Metrics {
    registry: Mutex<Registry>,
    programming: Histogram,
    objects: Family<KindLabel, Gauge>,
    watch_errors: Family<KindLabel, Counter>,
    rejected: Family<KindLabel, Counter>,
    services: Family<OpLabel, Counter>,
    policy_sets: Counter,
    policy_sets_refused: Counter,
    stromd_errors: Counter,
    stromd_syncs: Counter,
    /// Every kind listed, and stromd has acknowledged since.
    programmed: AtomicBool,
    /// stromd answered the last attempt.
    stromd_up: AtomicBool,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut r = Registry::with_prefix("strom_control");
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            // 1 ms to about 16 s.
            programming: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            objects: Family::default(),
            watch_errors: Family::default(),
            rejected: Family::default(),
            services: Family::default(),
            policy_sets: Counter::default(),
            policy_sets_refused: Counter::default(),
            stromd_errors: Counter::default(),
            stromd_syncs: Counter::default(),
            programmed: AtomicBool::new(false),
            stromd_up: AtomicBool::new(false),
        };
        r.register(
            "network_programming_duration_seconds",
            "From an object change seen to stromd's acknowledgement of the tables it means",
            m.programming.clone(),
        );
        r.register("objects", "Objects held, by kind", m.objects.clone());
        r.register(
            "watch_errors",
            "Failed watches and lists of the Kubernetes API, by kind",
            m.watch_errors.clone(),
        );
        r.register(
            "rejected_objects",
            "Objects left out of the tables as malformed, by kind",
            m.rejected.clone(),
        );
        r.register(
            "services_programmed",
            "Services set and removed in stromd, and refused by it",
            m.services.clone(),
        );
        r.register(
            "policy_sets_programmed",
            "NetworkPolicy sets given to stromd",
            m.policy_sets.clone(),
        );
        r.register(
            "policy_sets_refused",
            "NetworkPolicy sets stromd refused (it keeps the one it had)",
            m.policy_sets_refused.clone(),
        );
        r.register(
            "stromd_errors",
            "Failed attempts to reach or greet stromd",
            m.stromd_errors.clone(),
        );
        r.register(
            "stromd_syncs",
            "Full syncs with stromd (a stromd start met, or its tables changed by another client)",
            m.stromd_syncs.clone(),
        );
        // The metric handles share their values with the registered clones.
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = r;
        Arc::new(m)
    }

    /// The metrics in Prometheus' text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &r);
        out
    }

    /// Whether strom-control has programmed stromd with a full view and stromd is there.
    pub fn ready(&self) -> bool {
        self.programmed.load(Ordering::Relaxed) && self.stromd_up.load(Ordering::Relaxed)
    }
}

/// The source's and programmer's reports: logs and metrics.
#[derive(Clone)]
pub struct Reporter(pub Arc<Metrics>);

impl Report for Reporter {
    fn rejected(&mut self, kind: Kind, reason: &str) {
        tracing::warn!(kind = kind.name(), %reason, "object left out of the tables");
        self.0
            .rejected
            .get_or_create(&KindLabel { kind: kind.name() })
            .inc();
    }

    fn held(&mut self, kind: Kind, count: usize) {
        self.0
            .objects
            .get_or_create(&KindLabel { kind: kind.name() })
            .set(count as i64);
    }

    fn unreadable(&mut self, error: &str) {
        tracing::warn!(%error, "source unreadable; the last good view stays in force");
    }
}

impl crate::source::kube::WatchErrors for Reporter {
    fn watch_error(&mut self, kind: Kind, error: &kube::runtime::watcher::Error) {
        tracing::warn!(kind = kind.name(), %error, "watch failed; retrying with backoff");
        self.0
            .watch_errors
            .get_or_create(&KindLabel { kind: kind.name() })
            .inc();
    }
}

impl Observer for Reporter {
    fn programmed(&mut self, round: &Round) {
        let m = &self.0;
        m.stromd_up.store(true, Ordering::Relaxed);
        m.programmed.store(true, Ordering::Relaxed);
        if let Some(l) = round.latency {
            m.programming.observe(l.as_secs_f64());
        }
        let count = |op, n: usize| m.services.get_or_create(&OpLabel { op }).inc_by(n as u64);
        count("set", round.set.len());
        count("removed", round.removed.len());
        count("refused", round.refused.len());
        if round.policies {
            m.policy_sets.inc();
        }
        for (key, reason) in &round.refused {
            tracing::warn!(service = %key, %reason, "stromd refused the Service");
        }
        if let Some(reason) = &round.policies_refused {
            m.policy_sets_refused.inc();
            tracing::warn!(%reason, "stromd refused the policy set; it keeps the one it had");
        }
        tracing::debug!(
            set = ?round.set,
            removed = ?round.removed,
            policies = round.policies,
            latency_ms = round.latency.map(|l| l.as_secs_f64() * 1e3),
            "programmed stromd"
        );
    }

    fn unreachable(&mut self, error: &str) {
        let m = &self.0;
        if m.stromd_up.swap(false, Ordering::Relaxed) || m.stromd_errors.get() == 0 {
            tracing::warn!(%error, "stromd unreachable; retrying (it keeps its tables meanwhile)");
        }
        m.stromd_errors.inc();
    }

    fn reached(&mut self) {
        if !self.0.stromd_up.swap(true, Ordering::Relaxed) {
            tracing::info!("stromd reached");
        }
    }

    fn synced(&mut self, instance: u64, why: Resync) {
        self.0.stromd_up.store(true, Ordering::Relaxed);
        self.0.stromd_syncs.inc();
        match why {
            Resync::NewStart => tracing::info!(instance, "met stromd: setting every table"),
            Resync::Diverged => tracing::warn!(
                instance,
                "stromd's tables were changed by another client: setting every table again"
            ),
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    use axum::http::{header, StatusCode};
    use axum::routing::get;
    let m = metrics.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let m = metrics.clone();
                async move {
                    if m.ready() {
                        (StatusCode::OK, "ok\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not programmed yet\n")
                    }
                }
            }),
        );
    axum::serve(listener, app).await
}
