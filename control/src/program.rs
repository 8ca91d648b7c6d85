//! Keeping stromd's tables equal to the wanted ones ([`Desired`]), over stromd's socket.
//!
//! The [`Programmer`] runs on a thread of its own, so that a slow or absent stromd never
//! holds up the watches: it is handed the latest wanted tables ([`Handle::publish`]; a newer
//! one replaces one not taken yet) and sends stromd the difference from what stromd
//! acknowledged, removals before additions (so that a ClusterIP moving from one Service to
//! another is free when the second is set). Each request is acknowledged by stromd's answer;
//! setting a Service or the policy set again with the same content is harmless in stromd.
//!
//! stromd keeps forwarding with what it has while this side is gone. On every (re)connect
//! the two greet each other with the contract version ([`strom_api::Request::Hello`]): a
//! stromd of another version is refused with its message. When the stromd met is a new
//! start (its instance differs), or this side has just started, the Services stromd lists
//! and nothing wants are removed and everything wanted is set: after either side restarts
//! they converge without touching the flows of Services that did not change. A heartbeat
//! every [`HEARTBEAT`] notices a restarted stromd even when nothing changes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use strom_api::{Client, ClientError, PolicySet, Request, Response, ServiceSpec, CONTRACT};

use crate::cluster::Desired;

/// How often the programmer greets stromd when nothing changes.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a request to stromd may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Waits between attempts to reach stromd: doubling up to the last.
const RECONNECT: [Duration; 5] = [
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(500),
    Duration::from_secs(1),
];

/// A set of wanted tables, and when the oldest change in it was seen (for the programming
/// latency).
#[derive(Debug, Clone)]
pub struct Publication {
    pub desired: Desired,
    pub since: Instant,
}

/// What a programming round did, for the caller's logs and metrics.
#[derive(Debug, Default, Clone)]
pub struct Round {
    /// Services set, and removed, by `namespace/name`.
    pub set: Vec<String>,
    pub removed: Vec<String>,
    pub policies: bool,
    /// Services stromd refused, with its reason: tried again when they change, or when
    /// stromd restarts.
    pub refused: Vec<(String, String)>,
    /// From the oldest change published to stromd's last acknowledgement.
    pub latency: Option<Duration>,
}

/// What the programmer tells its owner.
pub trait Observer: Send + 'static {
    /// A round of changes was acknowledged.
    fn programmed(&mut self, round: &Round);
    /// stromd could not be reached or refused the contract.
    fn unreachable(&mut self, error: &str);
    /// stromd was met (first, or after it restarted): everything is being set again.
    fn synced(&mut self, instance: u64);
}

/// The owner's side.
#[derive(Clone)]
pub struct Handle {
    tx: Sender<Publication>,
    latest: Receiver<Publication>,
}

impl Handle {
    /// Hands over the latest wanted tables, dropping any not taken yet.
    pub fn publish(&self, p: Publication) {
        let mut p = p;
        // The channel holds one: replace what waits, keeping the older `since`.
        while let Err(crossbeam_channel::TrySendError::Full(back)) = self.tx.try_send(p) {
            p = back;
            if let Ok(old) = self.latest.try_recv() {
                p.since = p.since.min(old.since);
            }
        }
    }
}

/// A handle whose publications go to the receiver returned instead of a programmer thread:
/// for whatever wants the tables without a stromd (tests of the sources).
pub fn detached() -> (Handle, Receiver<Publication>) {
    let (tx, rx) = bounded(1);
    (
        Handle {
            tx,
            latest: rx.clone(),
        },
        rx,
    )
}

/// Starts the programmer thread for stromd at `socket`.
pub fn spawn(socket: PathBuf, observer: impl Observer) -> std::io::Result<Handle> {
    let (tx, rx) = bounded(1);
    let handle = Handle {
        tx,
        latest: rx.clone(),
    };
    std::thread::Builder::new()
        .name("stromd-programmer".into())
        .spawn(move || Programmer::new(socket, observer).run(rx))?;
    Ok(handle)
}

/// What stromd has acknowledged.
#[derive(Debug, Default)]
struct Acked {
    services: BTreeMap<String, Arc<ServiceSpec>>,
    refused: BTreeMap<String, Arc<ServiceSpec>>,
    policies: Option<Arc<PolicySet>>,
}

struct Programmer<O> {
    socket: PathBuf,
    observer: O,
    client: Option<Client>,
    /// The stromd start last synced with.
    instance: Option<u64>,
    acked: Acked,
    /// The oldest change stromd has not acknowledged yet.
    since: Option<Instant>,
    /// Failed attempts in a row.
    failures: usize,
}

impl<O: Observer> Programmer<O> {
    fn new(socket: PathBuf, observer: O) -> Self {
        Programmer {
            socket,
            observer,
            client: None,
            instance: None,
            acked: Acked::default(),
            since: None,
            failures: 0,
        }
    }

    fn run(mut self, rx: Receiver<Publication>) {
        // The latest wanted tables, and since when some of it waits for stromd.
        let mut wanted: Option<Desired> = None;
        loop {
            let wait = if self.client.is_none() && wanted.is_some() {
                RECONNECT[self.failures.min(RECONNECT.len() - 1)]
            } else {
                HEARTBEAT
            };
            match rx.recv_timeout(wait) {
                Ok(p) => {
                    wanted = Some(p.desired);
                    self.since = Some(self.since.map_or(p.since, |s| s.min(p.since)));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            // Nothing is programmed until the source has its first full view: a partial one
            // would remove Services and open isolated pods.
            let Some(w) = wanted.as_ref() else { continue };
            match self.greet() {
                Ok(false) => {}
                // A new stromd (or this side's first meeting): everything, now.
                Ok(true) => self.since = Some(self.since.unwrap_or_else(Instant::now)),
                Err(e) => {
                    self.client = None;
                    self.failures += 1;
                    self.observer.unreachable(&e);
                    continue;
                }
            }
            let Some(since) = self.since else { continue };
            match self.program(w) {
                Ok(mut round) => {
                    self.failures = 0;
                    self.since = None;
                    round.latency = Some(since.elapsed());
                    self.observer.programmed(&round);
                }
                Err(e) => {
                    self.client = None;
                    self.failures += 1;
                    self.observer.unreachable(&e.to_string());
                }
            }
        }
    }

    /// Connects if need be and greets stromd; on meeting a new start, plans a full resync
    /// and says so.
    fn greet(&mut self) -> Result<bool, String> {
        if self.client.is_none() {
            self.client =
                Some(Client::connect(&self.socket, REQUEST_TIMEOUT).map_err(|e| e.to_string())?);
        }
        let client = self.client.as_mut().expect("connected above");
        let instance = match client.call(&Request::Hello { contract: CONTRACT }) {
            Ok(Response::Hello { instance, .. }) => instance,
            Ok(other) => return Err(format!("stromd answered a greeting with {other:?}")),
            Err(ClientError::Refused(m)) => return Err(format!("stromd refused: {m}")),
            Err(e) => return Err(e.to_string()),
        };
        if self.instance == Some(instance) {
            return Ok(false);
        }
        self.resync(instance).map_err(|e| e.to_string())?;
        Ok(true)
    }

    /// stromd is a new start, or this side is: forget what was acknowledged, remove what
    /// stromd lists that nothing wants (a Service deleted while this side was away), and set
    /// everything at the next round.
    fn resync(&mut self, instance: u64) -> Result<(), ClientError> {
        let client = self.client.as_mut().expect("connected");
        let listed = match client.call(&Request::Services)? {
            Response::Services { services, .. } => services
                .into_iter()
                // `namespace/name:port`.
                .map(|s| s.key.split(':').next().unwrap_or_default().to_string())
                .collect::<BTreeSet<_>>(),
            _ => BTreeSet::new(),
        };
        // What stromd has counts as acknowledged with unknown content: anything wanted is
        // set again, anything not wanted is removed.
        self.acked = Acked::default();
        for key in listed {
            self.acked.services.insert(key, Arc::new(unknown()));
        }
        self.instance = Some(instance);
        self.observer.synced(instance);
        Ok(())
    }

    /// Sends stromd the difference between `want` and what it acknowledged.
    fn program(&mut self, want: &Desired) -> Result<Round, ClientError> {
        let client = self.client.as_mut().expect("greeted");
        let acked = &mut self.acked;
        let mut round = Round::default();
        let gone: Vec<String> = acked
            .services
            .keys()
            .chain(acked.refused.keys())
            .filter(|k| !want.services.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            acked.refused.remove(&key);
            if acked.services.remove(&key).is_none() {
                continue;
            }
            let (namespace, name) = key.split_once('/').unwrap_or(("default", &key));
            client.call(&Request::RemoveService {
                namespace: namespace.into(),
                name: name.into(),
            })?;
            round.removed.push(key);
        }
        if !round.removed.is_empty() {
            // A refusal may have been for an address a removed Service held.
            acked.refused.clear();
        }
        for (key, spec) in &want.services {
            let same = |m: &BTreeMap<String, Arc<ServiceSpec>>| {
                m.get(key)
                    .is_some_and(|s| Arc::ptr_eq(s, spec) || **s == **spec)
            };
            if same(&acked.services) || same(&acked.refused) {
                continue;
            }
            match client.call(&Request::SetService {
                service: (**spec).clone(),
            }) {
                Ok(_) => {
                    acked.refused.remove(key);
                    acked.services.insert(key.clone(), spec.clone());
                    round.set.push(key.clone());
                }
                Err(ClientError::Refused(reason)) => {
                    // stromd keeps what it had for it, if anything.
                    acked.refused.insert(key.clone(), spec.clone());
                    round.refused.push((key.clone(), reason));
                }
                Err(e) => return Err(e),
            }
        }
        let policies_same = acked
            .policies
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(p, &want.policies) || **p == *want.policies);
        if !policies_same {
            client.call(&Request::SetPolicies {
                policies: (*want.policies).clone(),
            })?;
            acked.policies = Some(want.policies.clone());
            round.policies = true;
        }
        Ok(round)
    }
}

/// A Service stromd has whose content this side does not know: equal to nothing wanted.
fn unknown() -> ServiceSpec {
    ServiceSpec {
        namespace: String::new(),
        name: String::new(),
        cluster_ips: Vec::new(),
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        ports: Vec::new(),
        affinity_timeout_s: None,
        external_local: false,
        internal_local: false,
        health_check_node_port: None,
    }
}
