//! Where the node's view comes from, and the one path from there to stromd.
//!
//! - [`kube`]: watches of the Kubernetes API (kube-rs watchers), relisting after errors and
//!   410 Gone;
//! - [`dir`]: a directory of manifests, read again when it changes, with what the cluster's
//!   controllers would add (defaulting, allocation, EndpointSlices).
//!
//! Both hand their objects to a [`Driver`], which keeps the [`Cluster`] and publishes its
//! wanted tables to the [`crate::program`] thread once every kind has been listed in full
//! (a partial view would remove Services and open isolated pods), and after that at most
//! one batch window after a change: a burst of changes becomes one programming round.

pub mod dir;
pub mod kube;

use std::collections::BTreeSet;
use std::time::Instant;

use crate::cluster::{Cluster, Kind, Object};
use crate::program::{Handle, Publication};

/// A change from a source.
// Transient, as `Object` is.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Change {
    /// Added or modified.
    Apply(Object),
    /// Deleted: the kind and `namespace/name`.
    Delete(Kind, String),
    /// Every object of a kind, from a (re)list.
    Listed(Kind, Vec<Object>),
}

/// What the driver reports for logs and metrics.
pub trait Report {
    /// An object was left out of the tables: kind, `namespace/name` when known, and why.
    fn rejected(&mut self, kind: Kind, reason: &str);
    /// Objects held, by kind, after a batch.
    fn held(&mut self, kind: Kind, count: usize);
    /// The source could not be read at all (the last good view stays in force).
    fn unreadable(&mut self, error: &str);
}

/// The node's view and the way to stromd.
pub struct Driver<R> {
    cluster: Cluster,
    programmer: Handle,
    report: R,
    /// Kinds listed in full at least once.
    listed: BTreeSet<Kind>,
    /// The first change not published yet.
    since: Option<Instant>,
    /// The policies rejected now (reported when they first are).
    rejected_policies: BTreeSet<String>,
}

impl<R: Report> Driver<R> {
    pub fn new(cluster: Cluster, programmer: Handle, report: R) -> Self {
        Driver {
            cluster,
            programmer,
            report,
            listed: BTreeSet::new(),
            since: None,
            rejected_policies: BTreeSet::new(),
        }
    }

    /// Takes one change in.
    pub fn change(&mut self, change: Change) {
        let changed = match change {
            Change::Apply(o) => self.cluster.apply(o),
            Change::Delete(kind, key) => self.cluster.delete(kind, &key),
            Change::Listed(kind, objects) => {
                let first = self.listed.insert(kind);
                self.cluster.replace(kind, objects) > 0 || first
            }
        };
        if changed && self.since.is_none() {
            self.since = Some(Instant::now());
        }
    }

    /// Whether every kind that must be ([`Kind::REQUIRED`]) has been listed once.
    pub fn ready(&self) -> bool {
        Kind::REQUIRED.iter().all(|k| self.listed.contains(k))
    }

    /// The end of a batch: translates what changed and hands the tables to the programmer.
    /// Returns whether something was published.
    pub fn flush(&mut self) -> bool {
        if !self.ready() {
            return false;
        }
        let Some(since) = self.since.take() else {
            return false;
        };
        for (kind, n) in self.cluster.counts() {
            self.report.held(kind, n);
        }
        let (desired, problems) = self.cluster.desired();
        let desired = desired.clone();
        for e in &problems.services {
            self.report.rejected(Kind::Service, &e.to_string());
        }
        if let Some(rejected) = problems.policies {
            // Compiled again on every pod change: report a rejection once, while it lasts.
            let now: BTreeSet<String> = rejected.iter().map(ToString::to_string).collect();
            for r in now.difference(&self.rejected_policies) {
                self.report.rejected(Kind::NetworkPolicy, r);
            }
            self.rejected_policies = now;
        }
        self.programmer.publish(Publication { desired, since });
        true
    }

    /// The view (for tests and status).
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Where problems are reported.
    pub fn report(&mut self) -> &mut R {
        &mut self.report
    }
}

#[cfg(test)]
mod tests;
