//! The Kubernetes API as a source: one kube-rs watcher per kind (Services, EndpointSlices,
//! Pods, Namespaces, NetworkPolicies cluster-wide; the node's own Node alone, by a field
//! selector, for its zone).
//!
//! A watcher lists, then watches from the list's resourceVersion. When a watch fails (the
//! API server gone, a timeout, 410 Gone after etcd compacted the version it was at) it
//! retries with exponential backoff and lists again; a relist is handed over whole
//! ([`Change::Listed`]) only once it is complete, and the [`super::Driver`] applies it as a
//! difference, so objects that did not change are not written to stromd again and the
//! dataplane does not flap. While the API server is unreachable stromd keeps what it has.
//!
//! Changes are taken in batches: after the first change, whatever else arrives within the
//! batch window joins it, then the batch is translated and published at once.

use std::pin::Pin;
use std::time::Duration;

use futures::stream::{select_all, Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use serde::de::DeserializeOwned;

use super::{Change, Driver, Report};
use crate::cluster::{slim, Kind, Object};

/// A watch's error, for the caller's logs and metrics.
pub trait WatchErrors {
    fn watch_error(&mut self, kind: Kind, error: &watcher::Error);
}

type Events = Pin<Box<dyn Stream<Item = (Kind, Result<Event<Object>, watcher::Error>)> + Send>>;

/// The watch of one kind with the watcher's settings (a field selector, say), its objects
/// wrapped as [`Object`]s.
fn watch<K>(client: &Client, kind: Kind, wrap: fn(K) -> Object, config: watcher::Config) -> Events
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let api: Api<K> = Api::all(client.clone());
    Box::pin(
        watcher(api, config)
            .default_backoff()
            .map(move |ev| (kind, ev.map(|e| wrapped(e, wrap)))),
    )
}

/// The event with its object wrapped and slimmed at once: a relist's objects wait whole
/// for its end, and should not hold what the tables never read.
fn wrapped<K>(event: Event<K>, wrap: fn(K) -> Object) -> Event<Object> {
    let w = |k| slim::object(wrap(k));
    match event {
        Event::Apply(k) => Event::Apply(w(k)),
        Event::Delete(k) => Event::Delete(w(k)),
        Event::Init => Event::Init,
        Event::InitApply(k) => Event::InitApply(w(k)),
        Event::InitDone => Event::InitDone,
    }
}

/// Every kind's watch, merged, for node `node`.
pub fn watches(
    client: &Client,
    node: &str,
) -> impl Stream<Item = (Kind, Result<Event<Object>, watcher::Error>)> {
    let own = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let all = watcher::Config::default;
    select_all(vec![
        watch::<Node>(client, Kind::Node, |o| Object::Node(Box::new(o)), own),
        watch::<Service>(
            client,
            Kind::Service,
            |o| Object::Service(Box::new(o)),
            all(),
        ),
        watch::<EndpointSlice>(
            client,
            Kind::EndpointSlice,
            |o| Object::EndpointSlice(Box::new(o)),
            all(),
        ),
        watch::<Pod>(client, Kind::Pod, |o| Object::Pod(o.into()), all()),
        watch::<Namespace>(
            client,
            Kind::Namespace,
            |o| Object::Namespace(Box::new(o)),
            all(),
        ),
        watch::<NetworkPolicy>(
            client,
            Kind::NetworkPolicy,
            |o| Object::NetworkPolicy(Box::new(o)),
            all(),
        ),
    ])
}

/// Relists in progress, by kind.
#[derive(Default)]
struct Relists(std::collections::BTreeMap<Kind, Vec<Object>>);

impl Relists {
    /// The change an event makes, if any yet.
    fn change(&mut self, kind: Kind, event: Event<Object>) -> Option<Change> {
        match event {
            Event::Apply(o) => Some(Change::Apply(o)),
            Event::Delete(o) => Some(Change::Delete(kind, o.key())),
            Event::Init => {
                self.0.insert(kind, Vec::new());
                None
            }
            Event::InitApply(o) => {
                self.0.entry(kind).or_default().push(o);
                None
            }
            Event::InitDone => Some(Change::Listed(
                kind,
                self.0.remove(&kind).unwrap_or_default(),
            )),
        }
    }
}

/// Feeds `driver` from the API until the watches end (they do not, short of the process
/// ending): each batch is what arrives within `batch` of its first change.
pub async fn run<R: Report, E: WatchErrors>(
    client: Client,
    driver: &mut Driver<R>,
    errors: &mut E,
    batch: Duration,
) {
    let mut events = Box::pin(watches(&client, driver.cluster().node()));
    let mut relists = Relists::default();
    let mut take = |driver: &mut Driver<R>, (kind, ev): (Kind, Result<Event<Object>, _>)| match ev {
        Ok(ev) => {
            if let Some(c) = relists.change(kind, ev) {
                driver.change(c);
            }
        }
        Err(e) => errors.watch_error(kind, &e),
    };
    while let Some(first) = events.next().await {
        take(driver, first);
        let deadline = tokio::time::Instant::now() + batch;
        loop {
            match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(Some(ev)) => take(driver, ev),
                Ok(None) => return,
                Err(_) => break,
            }
        }
        driver.flush();
    }
}

#[cfg(test)]
mod watch_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn ns(name: &str) -> Object {
        Object::Namespace(Box::new(Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        }))
    }

    #[test]
    fn a_relist_is_handed_over_only_once_complete() {
        let mut r = Relists::default();
        assert!(r.change(Kind::Namespace, Event::Init).is_none());
        assert!(r
            .change(Kind::Namespace, Event::InitApply(ns("a")))
            .is_none());
        assert!(r.change(Kind::Pod, Event::Init).is_none());
        assert!(r
            .change(Kind::Namespace, Event::InitApply(ns("b")))
            .is_none());
        match r.change(Kind::Namespace, Event::InitDone) {
            Some(Change::Listed(Kind::Namespace, objects)) => {
                let keys: Vec<String> = objects.iter().map(Object::key).collect();
                assert_eq!(keys, ["a", "b"]);
            }
            other => panic!("{other:?}"),
        }
        // The pods' relist is still its own, and empty when it ends.
        match r.change(Kind::Pod, Event::InitDone) {
            Some(Change::Listed(Kind::Pod, objects)) => assert!(objects.is_empty()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_restarted_relist_starts_over() {
        // The watcher begins a new list after an error mid-list: what the broken one gave
        // does not count.
        let mut r = Relists::default();
        r.change(Kind::Namespace, Event::Init);
        r.change(Kind::Namespace, Event::InitApply(ns("old")));
        r.change(Kind::Namespace, Event::Init);
        r.change(Kind::Namespace, Event::InitApply(ns("new")));
        match r.change(Kind::Namespace, Event::InitDone) {
            Some(Change::Listed(_, objects)) => {
                assert_eq!(objects.iter().map(Object::key).collect::<Vec<_>>(), ["new"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deletes_and_applies_pass_through() {
        let mut r = Relists::default();
        assert!(matches!(
            r.change(Kind::Namespace, Event::Apply(ns("a"))),
            Some(Change::Apply(_))
        ));
        assert!(matches!(
            r.change(Kind::Namespace, Event::Delete(ns("a"))),
            Some(Change::Delete(Kind::Namespace, k)) if k == "a"
        ));
    }
}
