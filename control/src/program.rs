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
//!
//! stromd numbers the changes it applies to its Service and policy tables (the greeting's
//! `generation`); this side counts the changes it had acknowledged, and a greeting that
//! finds another number means someone else changed the tables (a second writer, an
//! operator's `stromctl`): everything is set again as for a new start ([`Resync`]).
//!
//! Every change request is a numbered delta ([`strom_api::Delta`]: this run's writer id and
//! a number that grows), which stromd applies once each and in order and acknowledges with
//! its number. After a request whose answer was lost with its connection, the same delta is
//! sent again, under its number, first thing on the next connection to the same stromd
//! start: stromd answers it as it did if it had applied it (the greeting's `applied` says
//! so, and its changes are then not counted twice), or applies it now. Meanwhile what it
//! touched counts as unknown, so that a refusal (or stromd's "not in time") still leads to
//! those Services being set (or removed) again and the policy set sent again. What stromd
//! refuses is offered again when it changes, after [`RETRY_REFUSED`], at a resync, and, for
//! a Service, when another Service is removed; a refused Service keeps what stromd had for
//! it, and a Service the source cannot translate ([`Desired::kept`]) that this side has not
//! set itself is neither set nor removed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use strom_api::{Client, ClientError, Delta, PolicySet, Request, Response, ServiceSpec, CONTRACT};

use crate::cluster::Desired;

/// How often the programmer greets stromd when nothing changes.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a Service or policy set stromd refused waits before it is offered again
/// unchanged: a refusal may be for room or an address that something else frees later.
pub const RETRY_REFUSED: Duration = Duration::from_secs(10);
/// Services a `SetServices` request carries at most (about 1 KB each with ten endpoints).
const BATCH: usize = 1000;
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
    /// Services stromd refused, with its reason: offered again when they change, when a
    /// Service is removed, after [`RETRY_REFUSED`], or when stromd restarts.
    pub refused: Vec<(String, String)>,
    /// Why stromd refused the policy set, if it did (offered again as Services are).
    pub policies_refused: Option<String>,
    /// From the oldest change published to stromd's last acknowledgement (none for a round
    /// that only offered refused tables again).
    pub latency: Option<Duration>,
}

/// Why everything is being set again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resync {
    /// A stromd start not met before (or this side's first meeting).
    NewStart,
    /// The same stromd, whose count of table changes is not the one this side expects:
    /// another client changed its tables.
    Diverged,
}

/// What the programmer tells its owner.
pub trait Observer: Send + 'static {
    /// A round of changes was acknowledged.
    fn programmed(&mut self, round: &Round);
    /// stromd could not be reached or refused the contract.
    fn unreachable(&mut self, error: &str);
    /// stromd answered a greeting on a new connection.
    fn reached(&mut self);
    /// Everything is being set again, and why.
    fn synced(&mut self, instance: u64, why: Resync);
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
    spawn_with(socket, observer, RETRY_REFUSED)
}

fn spawn_with(
    socket: PathBuf,
    observer: impl Observer,
    retry_refused: Duration,
) -> std::io::Result<Handle> {
    let (tx, rx) = bounded(1);
    let handle = Handle {
        tx,
        latest: rx.clone(),
    };
    let mut programmer = Programmer::new(socket, observer);
    programmer.retry_refused = retry_refused;
    std::thread::Builder::new()
        .name("stromd-programmer".into())
        .spawn(move || programmer.run(rx))?;
    Ok(handle)
}

/// What stromd has acknowledged, and what it refused (with when to offer it again).
#[derive(Debug, Default)]
struct Acked {
    services: BTreeMap<String, Arc<ServiceSpec>>,
    refused: BTreeMap<String, (Arc<ServiceSpec>, Instant)>,
    policies: Option<Arc<PolicySet>>,
    policies_refused: Option<(Arc<PolicySet>, Instant)>,
}

impl Acked {
    /// Whether something refused is due to be offered again.
    fn retry_due(&self, now: Instant) -> bool {
        self.refused.values().any(|(_, at)| *at <= now)
            || self
                .policies_refused
                .as_ref()
                .is_some_and(|(_, at)| *at <= now)
    }
}

/// `a` and `b` are the same tables (the same publication, or equal content).
fn same<T: PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

/// A numbered delta whose answer was lost with its connection: sent again, with its number,
/// first thing at the next round on the same stromd start, which answers it as it did (or
/// applies it, if it never got it).
#[derive(Debug, Clone)]
enum InFlight {
    Services {
        remove: Vec<String>,
        set: Vec<(String, Arc<ServiceSpec>)>,
        seq: u64,
    },
    Policies {
        set: Arc<PolicySet>,
        seq: u64,
    },
}

impl InFlight {
    fn seq(&self) -> u64 {
        match self {
            InFlight::Services { seq, .. } | InFlight::Policies { seq, .. } => *seq,
        }
    }
}

struct Programmer<O> {
    socket: PathBuf,
    observer: O,
    client: Option<Client>,
    /// This run's writer id, on every delta ([`strom_api::Delta`]).
    writer: u64,
    /// The last delta number given.
    seq: u64,
    /// The delta whose answer was lost, if any.
    in_flight: Option<InFlight>,
    /// The number of this writer's last delta stromd had applied at the last greeting.
    applied: Option<u64>,
    /// The stromd start last synced with.
    instance: Option<u64>,
    /// stromd's count of table changes as this side expects it: the count at the last
    /// greeting plus the changes acknowledged since. `None` after a request whose answer
    /// was lost (stromd may or may not have applied it).
    generation: Option<u64>,
    acked: Acked,
    /// The oldest change stromd has not acknowledged yet.
    since: Option<Instant>,
    /// Failed attempts in a row.
    failures: usize,
    retry_refused: Duration,
}

impl<O: Observer> Programmer<O> {
    fn new(socket: PathBuf, observer: O) -> Self {
        Programmer {
            socket,
            observer,
            client: None,
            writer: writer_id(),
            seq: 0,
            in_flight: None,
            applied: None,
            instance: None,
            generation: None,
            acked: Acked::default(),
            since: None,
            failures: 0,
            retry_refused: RETRY_REFUSED,
        }
    }

    fn run(mut self, rx: Receiver<Publication>) {
        // The latest wanted tables.
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
                    self.lost();
                    self.observer.unreachable(&e);
                    continue;
                }
            }
            if self.since.is_none() && !self.acked.retry_due(Instant::now()) {
                continue;
            }
            match self.program(w) {
                Ok(mut round) => {
                    self.failures = 0;
                    round.latency = self.since.take().map(|s| s.elapsed());
                    self.observer.programmed(&round);
                }
                Err(e) => {
                    self.lost();
                    self.observer.unreachable(&e.to_string());
                }
            }
        }
    }

    /// The connection failed: whatever was in flight may or may not have been applied.
    fn lost(&mut self) {
        self.client = None;
        self.failures += 1;
    }

    /// Connects if need be and greets stromd; on meeting a new start, or tables changed
    /// behind this side's back, plans a full resync and says so.
    fn greet(&mut self) -> Result<bool, String> {
        let fresh = self.client.is_none();
        if fresh {
            self.client =
                Some(Client::connect(&self.socket, REQUEST_TIMEOUT).map_err(|e| e.to_string())?);
        }
        let client = self.client.as_mut().expect("connected above");
        let hello = Request::Hello {
            contract: CONTRACT,
            writer: Some(self.writer),
        };
        let (instance, generation) = match client.call(&hello) {
            Ok(Response::Hello {
                instance,
                generation,
                applied,
                ..
            }) => {
                self.applied = applied;
                (instance, generation)
            }
            Ok(other) => return Err(format!("stromd answered a greeting with {other:?}")),
            Err(ClientError::Refused(m)) => return Err(format!("stromd refused: {m}")),
            Err(e) => return Err(e.to_string()),
        };
        if fresh {
            self.observer.reached();
        }
        let why = if self.instance != Some(instance) {
            Resync::NewStart
        } else if self.generation.is_some_and(|g| g != generation) {
            Resync::Diverged
        } else {
            // Same start; a lost answer (no expectation) leaves what was acknowledged as it
            // was, and the delta in flight is sent again under its number (`program`).
            self.generation = Some(generation);
            return Ok(false);
        };
        self.resync(instance, generation, why)
            .map_err(|e| e.to_string())?;
        Ok(true)
    }

    /// Forgets what was acknowledged, removes what stromd lists that nothing wants (a
    /// Service deleted while this side was away) and sets everything at the next round.
    fn resync(&mut self, instance: u64, generation: u64, why: Resync) -> Result<(), ClientError> {
        let client = self.client.as_mut().expect("connected");
        let listed = match client.call(&Request::Services {
            counters_only: true,
        })? {
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
        self.generation = Some(generation);
        // Everything is set again: a delta in flight has nothing left to say.
        self.in_flight = None;
        self.observer.synced(instance, why);
        Ok(())
    }

    /// The next delta number.
    fn next_delta(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn delta(&self, seq: u64) -> Option<Delta> {
        Some(Delta {
            writer: self.writer,
            seq,
        })
    }

    /// One request that changes stromd's tables (the caller counts what it applied). On an
    /// error stromd may still apply it (an answer lost with its connection; stromd's own
    /// "did not answer in time" comes as a refusal while the request waits to be applied):
    /// the count is unknown until the next greeting, and the caller marks what the request
    /// touched as unknown.
    fn change(&mut self, request: &Request) -> Result<Response, ClientError> {
        let client = self.client.as_mut().expect("greeted");
        let answer = client.call(request);
        if answer.is_err() {
            self.generation = None;
        }
        answer
    }

    /// `n` changes stromd acknowledged applying.
    fn counted(&mut self, n: usize) {
        if let Some(g) = &mut self.generation {
            *g += n as u64;
        }
    }

    /// Sends stromd the difference between `want` and what it acknowledged, and offers again
    /// what it refused when that is due. Services go in [`BATCH`]es (`SetServices`), each
    /// published by stromd as one new table, removals first.
    fn program(&mut self, want: &Desired) -> Result<Round, ClientError> {
        let now = Instant::now();
        let mut round = Round::default();
        // A delta whose answer was lost goes first, under its number: stromd answers it as
        // it did, or applies it now. Its changes count unless stromd had applied it by the
        // greeting, whose figure holds them already.
        if let Some(f) = self.in_flight.take() {
            let count = self.applied.is_none_or(|a| a < f.seq());
            match f {
                InFlight::Services { remove, set, seq } => {
                    self.send_services(remove, set, seq, count, &mut round, now)?
                }
                InFlight::Policies { set, seq } => {
                    self.send_policies(set, seq, count, &mut round, now)?
                }
            }
        }
        // A refusal stands while what was refused is still what is wanted (and not what
        // stromd acknowledged since).
        let acked = &self.acked.services;
        self.acked.refused.retain(|k, (s, _)| {
            want.services.get(k).is_some_and(|w| same(w, s))
                && !acked.get(k).is_some_and(|a| same(a, s))
        });
        let gone: Vec<String> = self
            .acked
            .services
            .iter()
            .filter(|(k, s)| {
                // `kept` protects only what stromd had when this side met it (content
                // unknown), not what this side set itself.
                let wanted = want.services.contains_key(*k);
                let kept = want.kept.contains(*k) && is_unknown(s);
                !wanted && !kept
            })
            .map(|(k, _)| k.clone())
            .collect();
        if !gone.is_empty() {
            // A refusal may have been for an address a Service removed now held: offer
            // them again (stromd removes before it sets, also within one request).
            for (_, at) in self.acked.refused.values_mut() {
                *at = now;
            }
        }
        let sets: Vec<(String, Arc<ServiceSpec>)> = want
            .services
            .iter()
            .filter(|(key, spec)| {
                let acked = self.acked.services.get(*key).is_some_and(|s| same(s, spec));
                let waiting = self
                    .acked
                    .refused
                    .get(*key)
                    .is_some_and(|(s, at)| same(s, spec) && *at > now);
                !acked && !waiting
            })
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        let mut gone = gone.into_iter().peekable();
        let mut sets = sets.into_iter().peekable();
        while gone.peek().is_some() || sets.peek().is_some() {
            let remove: Vec<String> = gone.by_ref().take(BATCH).collect();
            let set: Vec<(String, Arc<ServiceSpec>)> =
                sets.by_ref().take(BATCH - remove.len()).collect();
            let seq = self.next_delta();
            self.send_services(remove, set, seq, true, &mut round, now)?;
        }
        let want_policies = &want.policies;
        let acked_same = self
            .acked
            .policies
            .as_ref()
            .is_some_and(|p| same(p, want_policies));
        let waiting = self
            .acked
            .policies_refused
            .as_ref()
            .is_some_and(|(p, at)| same(p, want_policies) && *at > now);
        if !acked_same && !waiting {
            let seq = self.next_delta();
            self.send_policies(want_policies.clone(), seq, true, &mut round, now)?;
        } else if acked_same {
            self.acked.policies_refused = None;
        }
        Ok(round)
    }
}

impl<O: Observer> Programmer<O> {
    /// One `SetServices` delta (`remove`, then `set`) numbered `seq`, and what its answer
    /// means for what stromd has; `count`: its changes are not in stromd's figure yet. On
    /// an error what the delta touched counts as unknown (set again, or removed, at the
    /// next round) and, if the answer was lost, the delta is sent again first thing.
    fn send_services(
        &mut self,
        remove: Vec<String>,
        set: Vec<(String, Arc<ServiceSpec>)>,
        seq: u64,
        count: bool,
        round: &mut Round,
        now: Instant,
    ) -> Result<(), ClientError> {
        let request = Request::SetServices {
            set: set.iter().map(|(_, s)| (**s).clone()).collect(),
            remove: remove.clone(),
            delta: self.delta(seq),
        };
        let answer = self.change(&request);
        let refused: BTreeMap<String, String> = match answer {
            Ok(Response::Applied { refused, delta }) if delta == Some(seq) => {
                refused.into_iter().collect()
            }
            other => {
                // Applied, partly or not at all: what stromd has for these Services
                // is unknown, so each is sent again (or removed) at the next round.
                self.generation = None;
                for key in remove.iter().chain(set.iter().map(|(k, _)| k)) {
                    self.acked.services.insert(key.clone(), Arc::new(unknown()));
                }
                let error = match other {
                    Err(e) => e,
                    Ok(answer) => ClientError::Refused(format!(
                        "stromd answered SetServices (delta {seq}) with {answer:?}"
                    )),
                };
                if !matches!(error, ClientError::Refused(_)) {
                    self.in_flight = Some(InFlight::Services { remove, set, seq });
                }
                return Err(error);
            }
        };
        let refused_here = set.iter().filter(|(k, _)| refused.contains_key(k)).count();
        if count {
            self.counted(remove.len() + set.len() - refused_here);
        }
        for key in remove {
            self.acked.services.remove(&key);
            round.removed.push(key);
        }
        for (key, spec) in set {
            match refused.get(&key) {
                Some(why) => {
                    // stromd keeps what it had for it, if anything.
                    self.acked
                        .refused
                        .insert(key.clone(), (spec, now + self.retry_refused));
                    round.refused.push((key, why.clone()));
                }
                None => {
                    self.acked.refused.remove(&key);
                    self.acked.services.insert(key.clone(), spec);
                    round.set.push(key);
                }
            }
        }
        Ok(())
    }

    /// One `SetPolicies` delta numbered `seq`, as [`Self::send_services`].
    fn send_policies(
        &mut self,
        set: Arc<PolicySet>,
        seq: u64,
        count: bool,
        round: &mut Round,
        now: Instant,
    ) -> Result<(), ClientError> {
        let request = Request::SetPolicies {
            policies: (*set).clone(),
            delta: self.delta(seq),
        };
        match self.change(&request) {
            Ok(Response::Applied { delta, .. }) if delta == Some(seq) => {
                if count {
                    self.counted(1);
                }
                self.acked.policies = Some(set);
                self.acked.policies_refused = None;
                round.policies = true;
                Ok(())
            }
            other => {
                // Refused, or stromd's "did not answer in time" while it still applies
                // it, or the answer lost: which set stromd holds is unknown, so the
                // wanted one is sent again (not before the retry time, if refused) even
                // when the wanted set goes back to the one acknowledged before.
                self.acked.policies = None;
                let e = match other {
                    Err(e) => e,
                    Ok(answer) => {
                        self.generation = None;
                        return Err(ClientError::Refused(format!(
                            "stromd answered SetPolicies (delta {seq}) with {answer:?}"
                        )));
                    }
                };
                let ClientError::Refused(reason) = e else {
                    self.in_flight = Some(InFlight::Policies { set, seq });
                    return Err(e);
                };
                self.acked.policies_refused = Some((set, now + self.retry_refused));
                round.policies_refused = Some(reason);
                Ok(())
            }
        }
    }
}

/// A writer id for this run: the process id and the start time, so that two runs (a
/// restarted strom-control) are told apart by stromd.
fn writer_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    nanos ^ (u64::from(std::process::id()) << 40)
}

/// Whether `spec` is [`unknown`].
fn is_unknown(spec: &ServiceSpec) -> bool {
    spec.name.is_empty() && spec.namespace.is_empty()
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

#[cfg(test)]
mod tests;
