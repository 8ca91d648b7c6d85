//! The programmer against a stand-in for stromd's socket: a few lines that keep a Service
//! map, a policy set and the change count as stromd does, and fail on cue (drop the
//! connection before or after applying a request, refuse it). stromd itself is exercised
//! with strom-control in `tests/tests/control.rs`; these cover the failures a live stromd
//! rarely shows.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strom_api::{PolicySet, Protocol, Request, Response, ServicePortStatus, ServiceSpec};

use super::*;

/// What the stand-in does with one request.
#[derive(Debug, Clone)]
enum Fault {
    /// Applies and answers it.
    None,
    /// Refuses it with this message (applies nothing).
    Refuse(String),
    /// Closes the connection without applying or answering it.
    Drop,
    /// Applies it, then closes the connection without answering.
    DropAfterApply,
    /// Applies it, closes the connection without answering, and takes no connection until
    /// `closed` is cleared.
    DropAfterApplyAndClose,
}

type Refusals = Box<dyn FnMut(&ServiceSpec) -> Option<String> + Send>;

#[derive(Default)]
struct State {
    instance: u64,
    generation: u64,
    services: BTreeMap<String, ServiceSpec>,
    policies: Option<PolicySet>,
    /// Connections are closed as they come (stromd away).
    closed: bool,
    /// The next `SetServices` or `SetPolicies` is treated as
    /// [`Fault::DropAfterApplyAndClose`].
    drop_next_change: bool,
    /// Services of a `SetServices` refused alone, with the reason.
    refuse: Option<Refusals>,
    /// Every request received, in order.
    log: Vec<Request>,
    /// The last numbered delta applied: its writer, number and answer.
    last_delta: Option<(u64, u64, Response)>,
    /// Deltas applied (not answered from `last_delta`).
    deltas_applied: usize,
}

type Faults = Box<dyn FnMut(&Request) -> Fault + Send>;

struct Stromd {
    socket: PathBuf,
    state: Arc<Mutex<State>>,
}

impl Drop for Stromd {
    fn drop(&mut self) {
        if let Some(dir) = self.socket.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Stromd {
    fn start(name: &str, faults: Faults) -> Stromd {
        let dir = std::env::temp_dir().join(format!("strom-program-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("stromd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let state = Arc::new(Mutex::new(State {
            instance: 7,
            ..State::default()
        }));
        let shared = state.clone();
        std::thread::spawn(move || serve(listener, &shared, faults));
        Stromd { socket, state }
    }

    fn services(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .services
            .keys()
            .cloned()
            .collect()
    }

    fn count(&self, what: impl Fn(&Request) -> bool) -> usize {
        self.state
            .lock()
            .unwrap()
            .log
            .iter()
            .filter(|r| what(r))
            .count()
    }
}

/// One connection at a time, as the programmer keeps one.
fn serve(listener: UnixListener, state: &Mutex<State>, mut faults: Faults) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { return };
        if state.lock().unwrap().closed {
            continue;
        }
        let mut writer = conn.try_clone().unwrap();
        for line in BufReader::new(conn).lines() {
            let Ok(line) = line else { break };
            let req: Request = serde_json::from_str(&line).unwrap();
            let mut fault = faults(&req);
            let mut s = state.lock().unwrap();
            let changing = matches!(
                req,
                Request::SetServices { .. } | Request::SetPolicies { .. }
            );
            if changing && std::mem::take(&mut s.drop_next_change) {
                fault = Fault::DropAfterApplyAndClose;
            }
            s.log.push(req.clone());
            let answer = match fault {
                Fault::Drop => break,
                Fault::Refuse(message) => Response::Error { message },
                Fault::None => apply(&mut s, req),
                Fault::DropAfterApply => {
                    apply(&mut s, req);
                    break;
                }
                Fault::DropAfterApplyAndClose => {
                    apply(&mut s, req);
                    s.closed = true;
                    break;
                }
            };
            writer.write_all(&strom_api::encode_line(&answer)).unwrap();
        }
    }
}

/// What stromd does with a request, as far as the programmer can tell.
fn apply(s: &mut State, req: Request) -> Response {
    match req {
        Request::Hello { contract, writer } => Response::Hello {
            contract,
            version: "test".into(),
            instance: s.instance,
            generation: s.generation,
            applied: s
                .last_delta
                .as_ref()
                .filter(|(w, _, _)| Some(*w) == writer)
                .map(|(_, seq, _)| *seq),
        },
        Request::SetService { service } => {
            s.generation += 1;
            let key = format!("{}/{}", service.namespace, service.name);
            s.services.insert(key, service);
            Response::Ok
        }
        Request::SetServices { set, remove, delta } => numbered(s, delta, |s| {
            for key in remove {
                s.generation += 1;
                s.services.remove(&key);
            }
            let mut refused = Vec::new();
            for service in set {
                let key = format!("{}/{}", service.namespace, service.name);
                if let Some(why) = s.refuse.as_mut().and_then(|f| f(&service)) {
                    refused.push((key, why));
                    continue;
                }
                s.generation += 1;
                s.services.insert(key, service);
            }
            Response::Applied {
                refused,
                delta: None,
            }
        }),
        Request::RemoveService { namespace, name } => {
            s.generation += 1;
            s.services.remove(&format!("{namespace}/{name}"));
            Response::Ok
        }
        Request::SetPolicies { policies, delta } => numbered(s, delta, |s| {
            s.generation += 1;
            s.policies = Some(policies);
            Response::Applied {
                refused: Vec::new(),
                delta: None,
            }
        }),
        Request::Services { .. } => Response::Services {
            services: s
                .services
                .keys()
                .map(|k| ServicePortStatus {
                    key: format!("{k}:80"),
                    protocol: Protocol::Tcp,
                    frontends: Vec::new(),
                    backends: Vec::new(),
                    flows: 0,
                    packets: 0,
                    rejected: 0,
                })
                .collect(),
            refused: 0,
        },
        other => Response::Error {
            message: format!("not in the stand-in: {other:?}"),
        },
    }
}

/// A numbered delta as stromd takes it: its writer's last one again is answered as before,
/// an older one refused, a newer one applied and acknowledged with its number.
fn numbered(
    s: &mut State,
    delta: Option<strom_api::Delta>,
    apply: impl FnOnce(&mut State) -> Response,
) -> Response {
    let Some(d) = delta else { return apply(s) };
    if let Some((w, seq, answer)) = &s.last_delta {
        if *w == d.writer && *seq == d.seq {
            return answer.clone();
        }
        if *w == d.writer && *seq > d.seq {
            return Response::Error {
                message: "out of order".into(),
            };
        }
    }
    let mut answer = apply(s);
    if let Response::Applied { delta, .. } = &mut answer {
        *delta = Some(d.seq);
    }
    s.deltas_applied += 1;
    s.last_delta = Some((d.writer, d.seq, answer.clone()));
    answer
}

/// The observer's calls, in order.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl Observer for Seen {
    fn programmed(&mut self, round: &Round) {
        let mut line = format!("programmed set={:?} removed={:?}", round.set, round.removed);
        if !round.refused.is_empty() {
            line += &format!(" refused={:?}", round.refused);
        }
        if let Some(r) = &round.policies_refused {
            line += &format!(" policies_refused={r}");
        }
        self.0.lock().unwrap().push(line);
    }
    fn unreachable(&mut self, _: &str) {
        self.0.lock().unwrap().push("unreachable".into());
    }
    fn reached(&mut self) {
        self.0.lock().unwrap().push("reached".into());
    }
    fn synced(&mut self, _: u64, why: Resync) {
        self.0.lock().unwrap().push(format!("synced {why:?}"));
    }
}

fn service(key: &str, ip: &str) -> Arc<ServiceSpec> {
    let (namespace, name) = key.split_once('/').unwrap();
    Arc::new(ServiceSpec {
        namespace: namespace.into(),
        name: name.into(),
        cluster_ips: vec![ip.parse().unwrap()],
        ..unknown()
    })
}

fn desired(services: &[(&str, &str)]) -> Desired {
    Desired {
        services: services
            .iter()
            .map(|(k, ip)| (k.to_string(), service(k, ip)))
            .collect(),
        ..Desired::default()
    }
}

fn publish(h: &Handle, d: Desired) {
    h.publish(Publication {
        desired: d,
        since: Instant::now(),
    });
}

/// Waits up to 10 s for `cond`; whether it came.
fn wait(cond: impl Fn() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    while !cond() {
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Waits up to 10 s for `cond`.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    assert!(wait(cond), "timed out waiting for {what}");
}

fn is_remove(r: &Request) -> bool {
    matches!(r, Request::SetServices { remove, .. } if !remove.is_empty())
}

/// A `SetServices` that sets the Service named `name`.
fn sets(r: &Request, name: &str) -> bool {
    matches!(r, Request::SetServices { set, .. } if set.iter().any(|s| s.name == name))
}

#[test]
fn a_removal_whose_connection_fails_is_sent_again() {
    // The first removal is lost with its connection: stromd still has the Service, and the
    // programmer must not count it as gone.
    let mut dropped = false;
    let stromd = Stromd::start(
        "removal",
        Box::new(move |r| {
            if is_remove(r) && !dropped {
                dropped = true;
                Fault::Drop
            } else {
                Fault::None
            }
        }),
    );
    let seen = Seen::default();
    let h = spawn_with(stromd.socket.clone(), seen.clone(), RETRY_REFUSED).unwrap();
    publish(
        &h,
        desired(&[("a/web", "198.18.100.1"), ("a/db", "198.18.100.2")]),
    );
    eventually("both set", || stromd.services().len() == 2);
    publish(&h, desired(&[("a/web", "198.18.100.1")]));
    eventually("db removed", || stromd.services() == ["a/web"]);
    assert_eq!(stromd.count(is_remove), 2, "{:?}", seen.all());
}

#[test]
fn a_change_applied_without_an_answer_is_harmless_and_no_resync() {
    // stromd applied the Service but the answer was lost: the programmer sends it again on
    // the next connection (a no-op for stromd), and does not take stromd's count of changes
    // for someone else's.
    let mut dropped = false;
    let stromd = Stromd::start(
        "lost-answer",
        Box::new(move |r| {
            if sets(r, "web") && !dropped {
                dropped = true;
                Fault::DropAfterApply
            } else {
                Fault::None
            }
        }),
    );
    let seen = Seen::default();
    let h = spawn_with(stromd.socket.clone(), seen.clone(), RETRY_REFUSED).unwrap();
    publish(&h, desired(&[("a/web", "198.18.100.1")]));
    eventually("set and acknowledged", || {
        seen.all().iter().any(|l| l.starts_with("programmed"))
    });
    assert_eq!(stromd.count(|r| sets(r, "web")), 2, "{:?}", seen.all());
    // Sent again under its number, first thing on the new connection: stromd answered it
    // from its record, without applying it twice.
    let numbers: Vec<Option<strom_api::Delta>> = stromd
        .state
        .lock()
        .unwrap()
        .log
        .iter()
        .filter_map(|r| match r {
            Request::SetServices { delta, .. } => Some(*delta),
            _ => None,
        })
        .collect();
    assert_eq!(numbers.len(), 2);
    assert!(
        numbers[0].is_some() && numbers[0] == numbers[1],
        "{numbers:?}"
    );
    // Every delta (the Service's, the policy set's) was applied once.
    let state = stromd.state.lock().unwrap();
    let mut deltas: Vec<strom_api::Delta> = state
        .log
        .iter()
        .filter_map(|r| match r {
            Request::SetServices { delta, .. } | Request::SetPolicies { delta, .. } => *delta,
            _ => None,
        })
        .collect();
    let sent = deltas.len();
    deltas.sort_by_key(|d| d.seq);
    deltas.dedup();
    assert_eq!(sent, deltas.len() + 1, "one sent twice: {deltas:?}");
    assert_eq!(state.deltas_applied, deltas.len());
    assert_eq!(
        state.generation, 2,
        "the Service and the policy set, once each"
    );
    drop(state);
    // A heartbeat later the counts agree: no resync.
    std::thread::sleep(HEARTBEAT + Duration::from_millis(300));
    let all = seen.all();
    assert_eq!(
        all.iter().filter(|l| l.starts_with("synced")).count(),
        1,
        "{all:?}"
    );
}

/// A change applied by stromd whose answer is lost, then the wanted tables change before
/// stromd is reached again: what the lost request touched is unknown, so it is made right
/// whatever it became. `change` is published first, `after` while stromd is away.
fn lost_then_changed(
    name: &str,
    first: Desired,
    change: Desired,
    after: Desired,
) -> (Stromd, Seen, Handle) {
    let stromd = Stromd::start(name, Box::new(|_| Fault::None));
    let seen = Seen::default();
    let h = spawn_with(stromd.socket.clone(), seen.clone(), RETRY_REFUSED).unwrap();
    publish(&h, first);
    eventually("the first round", || {
        seen.all().iter().any(|l| l.starts_with("programmed"))
    });
    // The next change is applied and its answer lost.
    stromd.state.lock().unwrap().drop_next_change = true;
    publish(&h, change);
    eventually("stromd away", || stromd.state.lock().unwrap().closed);
    publish(&h, after);
    std::thread::sleep(Duration::from_millis(200));
    stromd.state.lock().unwrap().closed = false;
    // The handle lives on: the programmer ends when its last handle is dropped.
    (stromd, seen, h)
}

/// What the stand-in received and the observer heard, for a failure's message.
fn story(stromd: &Stromd, seen: &Seen) -> String {
    format!("{:#?}\n{:#?}", stromd.state.lock().unwrap().log, seen.all())
}

#[test]
fn a_new_service_applied_without_an_answer_then_deleted_is_removed() {
    let (stromd, seen, _h) = lost_then_changed(
        "lost-new",
        desired(&[("a/web", "198.18.100.1")]),
        desired(&[("a/web", "198.18.100.1"), ("a/new", "198.18.100.2")]),
        desired(&[("a/web", "198.18.100.1")]),
    );
    let ok = wait(|| stromd.services() == ["a/web"]);
    assert!(ok, "new not removed: {}", story(&stromd, &seen));
}

#[test]
fn a_change_applied_without_an_answer_then_reverted_is_reverted() {
    let (stromd, seen, _h) = lost_then_changed(
        "lost-revert",
        desired(&[("a/web", "198.18.100.1")]),
        desired(&[("a/web", "198.18.100.7")]),
        desired(&[("a/web", "198.18.100.1")]),
    );
    let ok = wait(|| {
        stromd.state.lock().unwrap().services["a/web"].cluster_ips[0].to_string() == "198.18.100.1"
    });
    assert!(ok, "web not back: {}", story(&stromd, &seen));
}

#[test]
fn a_policy_set_applied_without_an_answer_then_reverted_is_reverted() {
    let with_peer = |ip: &str| {
        let mut d = desired(&[("a/web", "198.18.100.1")]);
        d.policies = Arc::new(PolicySet {
            peers: vec![strom_api::PeerAddr {
                ip: ip.parse().unwrap(),
                identity: 1,
            }],
            ..PolicySet::default()
        });
        d
    };
    let (stromd, seen, _h) = lost_then_changed(
        "lost-policies",
        with_peer("198.18.16.2"),
        with_peer("198.18.16.3"),
        with_peer("198.18.16.2"),
    );
    let ok = wait(|| {
        stromd
            .state
            .lock()
            .unwrap()
            .policies
            .as_ref()
            .map(|p| p.peers[0].ip.to_string())
            == Some("198.18.16.2".into())
    });
    assert!(ok, "the first set not back: {}", story(&stromd, &seen));
}

#[test]
fn a_refused_service_is_offered_again_after_a_while() {
    // Refused twice (say, stromd's table was full), then taken: no change is published in
    // between.
    let stromd = Stromd::start("refused", Box::new(|_| Fault::None));
    let mut refusals = 0;
    stromd.state.lock().unwrap().refuse = Some(Box::new(move |service| {
        (service.name == "db" && refusals < 2).then(|| {
            refusals += 1;
            "no room".to_string()
        })
    }));
    let seen = Seen::default();
    let h = spawn_with(
        stromd.socket.clone(),
        seen.clone(),
        Duration::from_millis(200),
    )
    .unwrap();
    publish(
        &h,
        desired(&[("a/web", "198.18.100.1"), ("a/db", "198.18.100.2")]),
    );
    eventually("db taken at the third offer", || {
        stromd.services() == ["a/db", "a/web"]
    });
    let all = seen.all();
    assert!(
        all.iter()
            .any(|l| l.contains("refused=[(\"a/db\", \"no room\")]")),
        "{all:?}"
    );
    assert!(!all.iter().any(|l| l == "unreachable"), "{all:?}");
    // web was set once: offering db again does not rewrite it.
    assert_eq!(stromd.count(|r| sets(r, "web")), 1);
}

#[test]
fn a_refused_policy_set_is_reported_as_refused_not_as_an_unreachable_stromd() {
    let stromd = Stromd::start(
        "policies",
        Box::new(|r| match r {
            Request::SetPolicies { .. } => Fault::Refuse("bad set".into()),
            _ => Fault::None,
        }),
    );
    let seen = Seen::default();
    let h = spawn_with(stromd.socket.clone(), seen.clone(), Duration::from_secs(60)).unwrap();
    publish(&h, desired(&[("a/web", "198.18.100.1")]));
    eventually("a round", || {
        seen.all().iter().any(|l| l.starts_with("programmed"))
    });
    std::thread::sleep(HEARTBEAT * 2);
    let all = seen.all();
    assert!(
        all.iter().any(|l| l.contains("policies_refused=bad set")),
        "{all:?}"
    );
    assert!(!all.iter().any(|l| l == "unreachable"), "{all:?}");
    // Offered once, not again every heartbeat or reconnect.
    assert_eq!(
        stromd.count(|r| matches!(r, Request::SetPolicies { .. })),
        1
    );
    assert_eq!(stromd.services(), ["a/web"]);
}

#[test]
fn reconnecting_to_the_same_stromd_says_it_is_reached_without_a_resync() {
    // The second greeting's connection fails (a heartbeat): the programmer reports stromd
    // unreachable, then reached again on the next connection, and sees the same start with
    // the same count of changes, so nothing is set again.
    let mut hellos = 0;
    let stromd = Stromd::start(
        "reconnect",
        Box::new(move |r| {
            if matches!(r, Request::Hello { .. }) {
                hellos += 1;
                if hellos == 2 {
                    return Fault::Drop;
                }
            }
            Fault::None
        }),
    );
    let seen = Seen::default();
    let h = spawn_with(stromd.socket.clone(), seen.clone(), RETRY_REFUSED).unwrap();
    publish(&h, desired(&[("a/web", "198.18.100.1")]));
    eventually("reached again", || {
        seen.all().iter().filter(|l| *l == "reached").count() == 2
    });
    let all = seen.all();
    let lost = all.iter().position(|l| l == "unreachable").expect("lost");
    assert_eq!(all[lost + 1], "reached", "{all:?}");
    assert_eq!(all.iter().filter(|l| l.starts_with("synced")).count(), 1);
    assert_eq!(stromd.count(|r| sets(r, "web")), 1);
}

#[test]
fn tables_changed_by_another_client_are_set_again() {
    let stromd = Stromd::start("diverged", Box::new(|_| Fault::None));
    let seen = Seen::default();
    let h = spawn_with(stromd.socket.clone(), seen.clone(), RETRY_REFUSED).unwrap();
    publish(&h, desired(&[("a/web", "198.18.100.1")]));
    eventually("set", || stromd.services() == ["a/web"]);
    {
        // An operator's `stromctl`: removes web, adds another.
        let mut s = stromd.state.lock().unwrap();
        s.services.clear();
        s.services.insert(
            "b/stray".into(),
            (*service("b/stray", "198.18.100.9")).clone(),
        );
        s.generation += 2;
    }
    eventually("put back at a heartbeat", || stromd.services() == ["a/web"]);
    let all = seen.all();
    assert!(all.iter().any(|l| l == "synced Diverged"), "{all:?}");
}

#[test]
fn a_service_that_fails_translation_keeps_what_stromd_has() {
    // This side starts while a Service's object is malformed (nothing wanted for it, it is
    // `kept`): what stromd has for it from before stays; one neither wanted nor kept goes.
    let stromd = Stromd::start("kept", Box::new(|_| Fault::None));
    {
        let mut s = stromd.state.lock().unwrap();
        for k in ["a/broken", "a/deleted"] {
            s.services
                .insert(k.into(), (*service(k, "198.18.100.5")).clone());
        }
    }
    let seen = Seen::default();
    let h = spawn_with(stromd.socket.clone(), seen.clone(), RETRY_REFUSED).unwrap();
    let mut d = desired(&[("a/web", "198.18.100.1")]);
    d.kept.insert("a/broken".into());
    publish(&h, d);
    eventually("synced", || stromd.services() == ["a/broken", "a/web"]);
    // Once it translates again it is set like any other.
    let mut d = desired(&[("a/web", "198.18.100.1"), ("a/broken", "198.18.100.6")]);
    d.kept.clear();
    publish(&h, d);
    eventually("set", || {
        stromd.state.lock().unwrap().services["a/broken"].cluster_ips[0].to_string()
            == "198.18.100.6"
    });
}
