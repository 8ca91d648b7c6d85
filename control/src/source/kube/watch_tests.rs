//! The watches against a scripted API server, in kube-rs's own style (a `tower_test` mock
//! service behind a real `kube::Client`): the cases a live API server rarely shows on cue.
//! Bookmarks move the watch on, a delete of an object never seen and a relist after 410
//! Gone change only what they must, and a burst of changes reaches a slow programmer as one
//! publication. The real API server is exercised in `tests/tests/control.rs`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tower_test::mock::{self, Handle, SendResponse};

use super::*;
use crate::cluster::Cluster;
use crate::program::detached;

/// What the scripted server answers a request with.
enum Answer {
    /// A body (the list, or a watch's events, one per line), after which it ends.
    Body(Vec<u8>),
    /// Never answered (a watch with nothing to say).
    Hold,
}

type Script = Box<dyn FnMut(&str) -> Answer + Send>;

/// Serves requests from `script` (given each request's path and query), recording them.
fn server(
    mut handle: Handle<Request<Body>, Response<Body>>,
    mut script: Script,
    seen: Arc<Mutex<Vec<String>>>,
) {
    tokio::spawn(async move {
        // Unanswered requests stay pending, not failed.
        let mut held: Vec<SendResponse<Response<Body>>> = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let uri = req.uri().to_string();
            seen.lock().unwrap().push(uri.clone());
            match script(&uri) {
                Answer::Body(b) => {
                    send.send_response(Response::builder().body(Body::from(b)).unwrap())
                }
                Answer::Hold => held.push(send),
            }
        }
    });
}

fn client(script: Script) -> (Client, Arc<Mutex<Vec<String>>>) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    server(handle, script, seen.clone());
    (Client::new(service, "default"), seen)
}

fn namespace(name: &str, rv: u32) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "resourceVersion": rv.to_string()}})
}

fn list(kind: &str, rv: u32, items: Vec<Value>) -> Answer {
    let v = json!({"apiVersion": "v1", "kind": format!("{kind}List"),
                   "metadata": {"resourceVersion": rv.to_string()}, "items": items});
    Answer::Body(serde_json::to_vec(&v).unwrap())
}

fn events(evs: &[(&str, Value)]) -> Answer {
    let mut b = Vec::new();
    for (t, o) in evs {
        b.extend(serde_json::to_vec(&json!({"type": t, "object": o})).unwrap());
        b.push(b'\n');
    }
    Answer::Body(b)
}

fn watching(uri: &str) -> bool {
    uri.contains("watch=true")
}

/// `resourceVersion=N` of a request.
fn rv(uri: &str) -> Option<&str> {
    uri.split(['?', '&'])
        .find_map(|p| p.strip_prefix("resourceVersion="))
}

#[derive(Default)]
struct Errors(Vec<String>);

impl WatchErrors for Errors {
    fn watch_error(&mut self, kind: Kind, error: &watcher::Error) {
        self.0.push(format!("{}: {error}", kind.name()));
    }
}

#[tokio::test]
async fn bookmarks_move_the_watch_on_and_a_410_relists_as_a_difference() {
    // List a, b at 10; the first watch brings a delete of an object never seen (out of
    // order: it went before the list was taken), an add of c and a bookmark at 20, then
    // ends; the next watch must start at 20 and is told 410 Gone (etcd compacted); the
    // relist at 30 has a and c.
    let mut script: VecDeque<Answer> = VecDeque::from([
        list("Namespace", 10, vec![namespace("a", 5), namespace("b", 6)]),
        events(&[
            ("DELETED", namespace("never-seen", 9)),
            ("ADDED", namespace("c", 11)),
            (
                "BOOKMARK",
                json!({"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"resourceVersion": "20"}}),
            ),
        ]),
        events(&[(
            "ERROR",
            json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                   "message": "too old resource version: 20 (25)", "reason": "Expired",
                   "code": 410}),
        )]),
        list("Namespace", 30, vec![namespace("a", 5), namespace("c", 11)]),
    ]);
    let (client, seen) = client(Box::new(move |_| {
        script.pop_front().unwrap_or(Answer::Hold)
    }));
    let mut stream = watch::<Namespace>(
        &client,
        Kind::Namespace,
        |o| Object::Namespace(Box::new(o)),
        watcher::Config::default(),
    );
    let mut relists = Relists::default();
    let mut cluster = Cluster::new("node-1");
    let mut errors = Errors::default();
    let mut lists = Vec::new();
    let mut changes = Vec::new();
    let done = tokio::time::timeout(Duration::from_secs(20), async {
        while lists.len() < 2 {
            let (kind, ev) = stream.next().await.expect("the watch goes on");
            match ev {
                Ok(ev) => match relists.change(kind, ev) {
                    Some(Change::Listed(k, objects)) => {
                        lists.push(objects.iter().map(Object::key).collect::<Vec<_>>());
                        changes.push(("listed", cluster.replace(k, objects)));
                    }
                    Some(Change::Apply(o)) => {
                        changes.push(("apply", usize::from(cluster.apply(o))))
                    }
                    Some(Change::Delete(k, key)) => {
                        changes.push(("delete", usize::from(cluster.delete(k, &key))))
                    }
                    None => {}
                },
                Err(e) => errors.watch_error(kind, &e),
            }
        }
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    assert!(done.is_ok(), "requests: {seen:?}, errors: {:?}", errors.0);
    assert_eq!(lists, [vec!["a", "b"], vec!["a", "c"]]);
    // The list counts two changes; the unknown delete none; c one; the relist drops b only.
    assert_eq!(
        changes,
        [("listed", 2), ("delete", 0), ("apply", 1), ("listed", 1)]
    );
    let watches: Vec<&str> = seen
        .iter()
        .filter(|u| watching(u))
        .filter_map(|u| rv(u))
        .collect();
    assert_eq!(watches[..2], ["10", "20"], "{seen:?}");
    assert_eq!(errors.0.len(), 1, "{:?}", errors.0);
    assert!(
        errors.0[0].contains("410") || errors.0[0].contains("too old"),
        "{:?}",
        errors.0
    );
    assert_eq!(cluster.counts()[&Kind::Namespace], 2);
}

fn service(name: &str, rv: u32) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "a", "resourceVersion": rv.to_string()},
           "spec": {"clusterIP": "198.19.0.10", "clusterIPs": ["198.19.0.10"], "type": "ClusterIP",
                    "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}]}})
}

#[tokio::test]
async fn a_burst_reaches_a_slow_programmer_as_its_latest_state() {
    // Every kind is listed empty; then 200 Services and the deletes of 100 of them come in
    // one watch response. The batch window takes them together: a couple of rounds at most,
    // not 300. The programmer has not taken anything meanwhile (it is slow): what waits for
    // it is one publication, with the end state.
    let mut burst_sent = false;
    let (client, seen) = client(Box::new(move |uri| {
        let kind = if uri.starts_with("/api/v1/namespaces?") {
            "Namespace"
        } else if uri.starts_with("/api/v1/services?") {
            "Service"
        } else if uri.contains("/endpointslices?") {
            "EndpointSlice"
        } else if uri.starts_with("/api/v1/pods?") {
            "Pod"
        } else if uri.starts_with("/api/v1/nodes?") {
            "Node"
        } else {
            "NetworkPolicy"
        };
        if !watching(uri) {
            return list(kind, 1, Vec::new());
        }
        if kind != "Service" || burst_sent {
            return Answer::Hold;
        }
        burst_sent = true;
        let mut evs: Vec<(&str, Value)> = (0..200)
            .map(|i| ("ADDED", service(&format!("s{i}"), 2 + i)))
            .collect();
        evs.extend((0..100).map(|i| ("DELETED", service(&format!("s{}", 2 * i), 300 + i))));
        events(&evs)
    }));
    let (handle, rx) = detached();
    let mut driver = Driver::new(Cluster::new("node-1"), handle, Rounds::default());
    let mut errors = Errors::default();
    let _ = tokio::time::timeout(
        Duration::from_secs(3),
        run(client, &mut driver, &mut errors, Duration::from_millis(100)),
    )
    .await;
    assert!(errors.0.is_empty(), "{:?}", errors.0);
    assert!(driver.ready());
    // The node's own Node alone is listed and watched.
    let nodes: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|u| u.starts_with("/api/v1/nodes?"))
        .cloned()
        .collect();
    assert!(nodes.len() >= 2, "{nodes:?}");
    assert!(
        nodes
            .iter()
            .all(|u| u.contains("fieldSelector=metadata.name%3Dnode-1")),
        "{nodes:?}"
    );
    let rounds = driver.report().0;
    assert!((1..=3).contains(&rounds), "{rounds} rounds for one burst");
    let p = rx.try_recv().expect("a publication waits");
    let mut keys: Vec<String> = p.desired.services.keys().cloned().collect();
    keys.sort_by_key(|k| k[3..].parse::<u32>().unwrap());
    let odd: Vec<String> = (0..100).map(|i| format!("a/s{}", 2 * i + 1)).collect();
    assert_eq!(keys, odd, "the end state: the odd ones");
}

/// Counts the driver's rounds (each reports the Services held once).
#[derive(Default)]
struct Rounds(usize);

impl crate::source::Report for Rounds {
    fn rejected(&mut self, _: Kind, _: &str) {}
    fn held(&mut self, kind: Kind, _: usize) {
        self.0 += usize::from(kind == Kind::Service);
    }
    fn unreadable(&mut self, _: &str) {}
}
