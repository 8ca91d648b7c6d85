//! The node's view of the cluster, whatever feeds it (the Kubernetes API through
//! [`crate::source::kube`], a manifests directory through [`crate::source::dir`]), and the
//! tables it means for stromd.
//!
//! A source hands over objects as they come ([`Cluster::apply`], [`Cluster::delete`]) and
//! whole lists when it (re)lists a kind ([`Cluster::replace`]); [`Cluster::desired`] then
//! brings the wanted tables up to date, translating again only what a change touched: the
//! Services whose object or EndpointSlices changed, and the policy set when a policy, a pod
//! or a namespace changed in a way a policy can see. An object given again unchanged (a
//! relist after a watch error) touches nothing, so nothing is rewritten in stromd.
//!
//! Only what the translation reads is held: a pod is a [`PolicyPod`] (its labels, node,
//! addresses and named ports, not its containers' images, volumes, conditions or status
//! history), the other kinds lose their annotations and managed fields ([`slim`]).

pub mod slim;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use strom_api::{PolicySet, ServiceSpec};

use crate::policy::{compile_held, Held, PolicyError, PolicyPod};
use crate::translate::{service_spec, ForNode, SERVICE_NAME_LABEL};
use crate::{object_key, TranslateError};

/// The kinds the node's tables come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    Namespace,
    NetworkPolicy,
    Node,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 6] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::Namespace,
        Kind::NetworkPolicy,
        Kind::Node,
    ];

    /// The kinds listed before anything is published: a partial view would remove Services
    /// and open isolated pods. The node's Node is not among them: without it the node has
    /// no zone, which only widens the Services' pools to every endpoint (as kube-proxy on a
    /// node without the label), and a source that cannot read it (a ClusterRole from before
    /// strom-control watched it) must not hold the rest up.
    pub const REQUIRED: [Kind; 5] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::Namespace,
        Kind::NetworkPolicy,
    ];

    /// The kind's name as the API spells it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Node => "Node",
        }
    }
}

/// One object of a kind the tables come from. A relist holds every object of its kind
/// until the list ends, so the large kinds are boxed (a Service is 824 bytes inline, a Node
/// 1520) to keep a list of 100k pods from taking a Node's size each.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    /// A pod as the policies read it: every source reads its pods into this at once.
    Pod(PolicyPod),
    Namespace(Box<Namespace>),
    NetworkPolicy(Box<NetworkPolicy>),
    Node(Box<Node>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Pod(_) => Kind::Pod,
            Object::Namespace(_) => Kind::Namespace,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
            Object::Node(_) => Kind::Node,
        }
    }

    /// `namespace/name` (a Namespace or a Node: its name).
    pub fn key(&self) -> String {
        match self {
            Object::Service(o) => object_key(&o.metadata),
            Object::EndpointSlice(o) => object_key(&o.metadata),
            Object::Pod(o) => o.key().to_string(),
            Object::Namespace(o) => o.metadata.name.clone().unwrap_or_default(),
            Object::NetworkPolicy(o) => object_key(&o.metadata),
            Object::Node(o) => o.metadata.name.clone().unwrap_or_default(),
        }
    }
}

/// The tables the cluster means for the node, as of the last [`Cluster::desired`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// Every Service stromd is to have, by `namespace/name` (headless and ExternalName ones
    /// have no entry).
    pub services: BTreeMap<String, Arc<ServiceSpec>>,
    /// The node's policy set.
    pub policies: Arc<PolicySet>,
    /// Services whose object is malformed and for which nothing was wanted before (this
    /// side started with it broken): whatever stromd has for them stays, neither set nor
    /// removed, as for a Service that broke after it was programmed.
    pub kept: BTreeSet<String>,
}

/// What one [`Cluster::desired`] found wrong: each object left out with its reason. A
/// Service that fails keeps what stromd had for it, as an API server keeps the last valid
/// state of an object whose update it refuses; a rejected policy still isolates its pods.
#[derive(Debug, Default)]
pub struct Problems {
    pub services: Vec<TranslateError>,
    /// The policies rejected by this call's compilation (`None`: the set was not compiled
    /// again).
    pub policies: Option<Vec<PolicyError>>,
}

/// The label naming a Node's zone, which EndpointSlice zone hints refer to.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The objects the node's tables come from, and those tables.
#[derive(Debug)]
pub struct Cluster {
    node: String,
    services: BTreeMap<String, Service>,
    slices: BTreeMap<String, EndpointSlice>,
    /// Service `namespace/name` → its slices' keys (by the service-name label).
    slices_of: BTreeMap<String, BTreeSet<String>>,
    pods: BTreeMap<String, PolicyPod>,
    namespaces: BTreeMap<String, Namespace>,
    policies: BTreeMap<String, NetworkPolicy>,
    /// This node's Node, alone: other nodes' are not held.
    nodes: BTreeMap<String, Node>,
    /// Services to translate again.
    dirty: BTreeSet<String>,
    /// Whether the policy set is to be compiled again.
    policies_dirty: bool,
    desired: Desired,
}

impl Cluster {
    /// An empty view for node `node` (its pods are the ones policies isolate, its endpoints
    /// the local ones for the traffic policies).
    pub fn new(node: impl Into<String>) -> Self {
        Cluster {
            node: node.into(),
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            slices_of: BTreeMap::new(),
            pods: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            policies: BTreeMap::new(),
            nodes: BTreeMap::new(),
            dirty: BTreeSet::new(),
            policies_dirty: false,
            desired: Desired::default(),
        }
    }

    /// The node whose view this is.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Objects held, by kind.
    pub fn counts(&self) -> BTreeMap<Kind, usize> {
        BTreeMap::from([
            (Kind::Service, self.services.len()),
            (Kind::EndpointSlice, self.slices.len()),
            (Kind::Pod, self.pods.len()),
            (Kind::Namespace, self.namespaces.len()),
            (Kind::NetworkPolicy, self.policies.len()),
            (Kind::Node, self.nodes.len()),
        ])
    }

    /// An object added or changed. Returns whether it changed anything held.
    pub fn apply(&mut self, object: Object) -> bool {
        let object = slim::object(object);
        let key = object.key();
        match object {
            Object::Service(o) => {
                if self.services.get(&key) == Some(&*o) {
                    return false;
                }
                self.services.insert(key.clone(), *o);
                self.dirty.insert(key);
            }
            Object::EndpointSlice(o) => {
                let old = self.slices.get(&key);
                if old == Some(&*o) {
                    return false;
                }
                let was = old.and_then(slice_service);
                let now = slice_service(&o);
                if let Some(s) = &was {
                    self.unlink_slice(s, &key);
                    self.dirty.insert(s.clone());
                }
                if let Some(s) = &now {
                    self.slices_of
                        .entry(s.clone())
                        .or_default()
                        .insert(key.clone());
                    self.dirty.insert(s.clone());
                }
                self.slices.insert(key, *o);
            }
            Object::Pod(o) => {
                if self.pods.get(&key) == Some(&o) {
                    return false;
                }
                self.pods.insert(key, o);
                self.policies_dirty |= !self.policies.is_empty();
            }
            Object::Namespace(o) => {
                if self.namespaces.get(&key) == Some(&*o) {
                    return false;
                }
                self.namespaces.insert(key, *o);
                self.policies_dirty |= !self.policies.is_empty();
            }
            Object::NetworkPolicy(o) => {
                if self.policies.get(&key) == Some(&*o) {
                    return false;
                }
                self.policies.insert(key, *o);
                self.policies_dirty = true;
            }
            Object::Node(o) => {
                if key != self.node || self.nodes.get(&key) == Some(&*o) {
                    return false;
                }
                let before = self.zone().map(str::to_string);
                self.nodes.insert(key, *o);
                self.zone_changed(before);
            }
        }
        true
    }

    /// The node's zone: its Node's `topology.kubernetes.io/zone` label, while the Node is
    /// known and has it.
    pub fn zone(&self) -> Option<&str> {
        self.nodes
            .get(&self.node)
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|l| l.get(ZONE_LABEL))
            .map(String::as_str)
    }

    /// Every Service to translate again when the zone differs from `before` (zone hints
    /// may now name it or not).
    fn zone_changed(&mut self, before: Option<String>) {
        if self.zone() != before.as_deref() {
            self.dirty.extend(self.services.keys().cloned());
        }
    }

    /// An object deleted (only its kind and key count). Returns whether it was held.
    pub fn delete(&mut self, kind: Kind, key: &str) -> bool {
        match kind {
            Kind::Service => {
                if self.services.remove(key).is_none() {
                    return false;
                }
                self.dirty.insert(key.to_string());
            }
            Kind::EndpointSlice => {
                let Some(old) = self.slices.remove(key) else {
                    return false;
                };
                if let Some(s) = slice_service(&old) {
                    self.unlink_slice(&s, key);
                    self.dirty.insert(s);
                }
            }
            Kind::Pod => {
                if self.pods.remove(key).is_none() {
                    return false;
                }
                self.policies_dirty |= !self.policies.is_empty();
            }
            Kind::Namespace => {
                if self.namespaces.remove(key).is_none() {
                    return false;
                }
                self.policies_dirty |= !self.policies.is_empty();
            }
            Kind::NetworkPolicy => {
                if self.policies.remove(key).is_none() {
                    return false;
                }
                self.policies_dirty = true;
            }
            Kind::Node => {
                let before = self.zone().map(str::to_string);
                if self.nodes.remove(key).is_none() {
                    return false;
                }
                self.zone_changed(before);
            }
        }
        true
    }

    /// Every object of `kind`, as a fresh list gives them: those not among `objects` are
    /// deleted, the others applied (unchanged ones touch nothing). Objects of another kind
    /// are ignored. Returns how many objects changed.
    pub fn replace(&mut self, kind: Kind, objects: Vec<Object>) -> usize {
        let keep: BTreeSet<String> = objects
            .iter()
            .filter(|o| o.kind() == kind)
            .map(Object::key)
            .collect();
        let gone: Vec<String> = match kind {
            Kind::Service => stale(&self.services, &keep),
            Kind::EndpointSlice => stale(&self.slices, &keep),
            Kind::Pod => stale(&self.pods, &keep),
            Kind::Namespace => stale(&self.namespaces, &keep),
            Kind::NetworkPolicy => stale(&self.policies, &keep),
            Kind::Node => stale(&self.nodes, &keep),
        };
        let mut changed = 0;
        for key in gone {
            changed += usize::from(self.delete(kind, &key));
        }
        for o in objects.into_iter().filter(|o| o.kind() == kind) {
            changed += usize::from(self.apply(o));
        }
        changed
    }

    /// Whether a change waits for [`Cluster::desired`].
    pub fn pending(&self) -> bool {
        !self.dirty.is_empty() || self.policies_dirty
    }

    /// Brings the wanted tables up to date with the changes since the last call, and
    /// returns them with what was left out this time.
    pub fn desired(&mut self) -> (&Desired, Problems) {
        let mut problems = Problems::default();
        for key in std::mem::take(&mut self.dirty) {
            let Some(svc) = self.services.get(&key) else {
                self.desired.services.remove(&key);
                self.desired.kept.remove(&key);
                continue;
            };
            let slices: Vec<&EndpointSlice> = self
                .slices_of
                .get(&key)
                .into_iter()
                .flatten()
                .filter_map(|k| self.slices.get(k))
                .collect();
            let node = ForNode {
                name: &self.node,
                zone: self.zone(),
            };
            match service_spec(svc, &slices, node) {
                Ok(Some(spec)) => {
                    self.desired.kept.remove(&key);
                    if self.desired.services.get(&key).map(|s| &**s) != Some(&spec) {
                        self.desired.services.insert(key, Arc::new(spec));
                    }
                }
                Ok(None) => {
                    self.desired.kept.remove(&key);
                    self.desired.services.remove(&key);
                }
                // What was wanted before stays; with nothing wanted before, what stromd has.
                Err(e) => {
                    if !self.desired.services.contains_key(&key) {
                        self.desired.kept.insert(key);
                    }
                    problems.services.push(e);
                }
            }
        }
        if std::mem::take(&mut self.policies_dirty) {
            let compiled = compile_held(&Held {
                policies: self.policies.values().collect(),
                pods: self.pods.values().collect(),
                namespaces: self.namespaces.values().collect(),
                node: Some(&self.node),
            });
            problems.policies = Some(compiled.rejected);
            if *self.desired.policies != compiled.set {
                self.desired.policies = Arc::new(compiled.set);
            }
        }
        (&self.desired, problems)
    }

    fn unlink_slice(&mut self, service: &str, slice: &str) {
        if let Some(set) = self.slices_of.get_mut(service) {
            set.remove(slice);
            if set.is_empty() {
                self.slices_of.remove(service);
            }
        }
    }
}

/// Service `namespace/name` an EndpointSlice belongs to, by its label.
fn slice_service(slice: &EndpointSlice) -> Option<String> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    let namespace = slice
        .metadata
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    Some(format!("{namespace}/{name}"))
}

fn stale<T>(held: &BTreeMap<String, T>, keep: &BTreeSet<String>) -> Vec<String> {
    held.keys()
        .filter(|k| !keep.contains(*k))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests;
