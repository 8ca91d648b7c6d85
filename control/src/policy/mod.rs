//! Kubernetes NetworkPolicies (`networking.k8s.io/v1`) to stromd's [`PolicySet`]: selectors
//! matched against the pods and namespaces given, `policyTypes` defaulted, named ports
//! resolved, so that stromd only looks addresses up.
//!
//! - [`defaults`]: the API server's defaulting of a NetworkPolicy;
//! - [`compile`]: the translation, the API's semantics exactly, over pods read into
//!   [`PolicyPod`]s ([`compile_held`] for a view that holds them, [`compile`] for API objects);
//! - [`mod@reference`]: a slow evaluator written straight over the objects, and a linear one over
//!   a compiled set, which check each other in the tests;
//! - `arbitrary` (feature `arbitrary`): random small clusters and probes for property tests.
//!
//! # Semantics
//!
//! As the API defines them:
//! - A pod is isolated in a direction when some policy of its namespace selects it
//!   (`podSelector`) with that direction in its `policyTypes`; it is open in a direction no
//!   policy isolates it in. A packet passes a side when any rule of any policy isolating that
//!   side matches it: policies only add, and their order does not matter. A packet from pod A
//!   to pod B needs A's egress and B's ingress.
//! - `policyTypes` defaults as the API server does it ([`defaults::defaulted`]): `Ingress`,
//!   plus `Egress` when the policy has egress rules. A port without protocol is TCP.
//! - A peer selects pods by `podSelector` in the policy's namespace, by `namespaceSelector` in
//!   the namespaces it matches (every pod of them), or both (pods matching the one in
//!   namespaces matching the other); the peers of a rule add up. No `from` / `to` or an empty
//!   list: every address. An `ipBlock` matches every address in it but its `except`s, pods'
//!   addresses too.
//! - No `ports` or an empty list: every port of every protocol. A port entry without `port`:
//!   every port of its protocol. `endPort`: the range from `port`.
//! - A named port is resolved against a pod's containers' ports (`spec.containers`, name and
//!   protocol both matching): for ingress against the pod the policy selects, for egress
//!   against the destination. For egress the destination decides whatever the peer is: among
//!   the addresses a rule's peers match (selected pods, addresses in an `ipBlock`, every
//!   address for a rule without peers), those of a pod with that port open it, on the
//!   number that pod gives it; no other address does. (The API does not say more than "a
//!   named port on a pod"; this is how kube-network-policies and Cyclonus read it, and the
//!   only reading under which `to: []` and `to: [{ipBlock: {cidr: 0.0.0.0/0}}]` agree.) A
//!   named port no pod resolves opens nothing.
//! - A namespace given without its Namespace object has the one label the API server puts on
//!   every namespace, `kubernetes.io/metadata.name: <name>`; that label is on the given
//!   objects too.
//!
//! Which pods count: those with an address (`status.podIPs`, else `status.podIP`), not
//! Succeeded or Failed, not in the host's network namespace. An address two such pods claim
//! (one being deleted while another takes its address, or a mistake) belongs to the first by
//! `namespace/name` alone. Only pods of the node (`spec.nodeName`, when a node is given) are
//! isolated; every pod is a peer.
//!
//! # Malformed policies
//!
//! Policies that never went through an API server (manifests) are checked as its validation
//! would: CIDRs (an `except` a strict subset of its `cidr`), port numbers and names, `endPort`,
//! protocols, selector operators and values, peers (a selector or an `ipBlock`, not both nor
//! none), `policyTypes`. One that fails is rejected alone, with the reason
//! ([`Compiled::rejected`]), and the others compile as usual. A rejected policy **still
//! isolates**, allowing nothing: the pods its `podSelector` selects (every pod of its namespace
//! if that selector is itself invalid), in the directions of its defaulted `policyTypes` (both
//! when those are unreadable). Whoever wrote it meant to restrict those pods; failing closed
//! keeps a typo from opening them to everything. Label keys and values are not checked: one
//! that no label can have simply matches nothing.
//!
//! # What is compiled
//!
//! Pods with the same namespace, labels and named container ports share an identity (a rule
//! names identities, not addresses), numbered in the order of those keys. The pods of the
//! node selected by the same policies in a direction share a group (for ingress, only when
//! they also have the same named ports, if those policies name ports), groups in the order
//! of (direction, policies); a group's rules follow its policies (sorted by
//! `namespace/name`) and their rules. An egress rule with named ports becomes a rule for its
//! numbered ports and one per resolution of its named ports (the identities, or single
//! addresses of an `ipBlock`, whose pods resolve them alike). The same objects in any order
//! give the same set. IPv6 addresses and blocks are carried as they are.
//!
//! Not modelled: traffic of a pod to itself (stromd never sees it with the pod's own source:
//! a hairpin through a Service comes from the gateway) and the node's own traffic, always
//! allowed by the dataplane before it asks.

mod compile;
pub mod defaults;
mod parse;
mod pod;
pub mod reference;

#[cfg(any(test, feature = "arbitrary"))]
pub mod arbitrary;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use strom_api::PolicySet;

pub use defaults::defaulted;
pub use pod::PolicyPod;

/// The label the API server puts on every namespace: its name.
pub const NAME_LABEL: &str = "kubernetes.io/metadata.name";

type Labels = BTreeMap<String, String>;

/// What policies are compiled from: every policy, pod and namespace of the cluster, and the
/// node whose pods are to be isolated (`None`: every node's).
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub policies: &'a [NetworkPolicy],
    pub pods: &'a [Pod],
    pub namespaces: &'a [Namespace],
    pub node: Option<&'a str>,
}

/// [`Input`] as a long-lived view of the cluster holds it: the objects borrowed, each pod
/// already read into a [`PolicyPod`]. Compiled by [`compile_held`] without copying a pod,
/// policy or namespace.
#[derive(Debug, Clone, Default)]
pub struct Held<'a> {
    pub policies: Vec<&'a NetworkPolicy>,
    pub pods: Vec<&'a PolicyPod>,
    pub namespaces: Vec<&'a Namespace>,
    pub node: Option<&'a str>,
}

/// A policy that could not be compiled: it isolates its pods and allows nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NetworkPolicy {policy}: {reason}")]
pub struct PolicyError {
    /// `namespace/name`.
    pub policy: String,
    /// The field and what is wrong with it.
    pub reason: String,
}

/// The compiled set, and the policies rejected from it (ordered by `namespace/name`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    pub set: PolicySet,
    pub rejected: Vec<PolicyError>,
}

/// Compiles the policies for the pods of `input.node` (every node's when `None`). Each policy
/// is defaulted first ([`defaulted`]); a malformed one is rejected alone and still isolates
/// (see the module doc).
pub fn compile(input: &Input) -> Compiled {
    let pods: Vec<PolicyPod> = input.pods.iter().map(PolicyPod::from).collect();
    compile_held(&Held {
        policies: input.policies.iter().collect(),
        pods: pods.iter().collect(),
        namespaces: input.namespaces.iter().collect(),
        node: input.node,
    })
}

/// [`compile`] over what a view of the cluster holds.
pub fn compile_held(held: &Held) -> Compiled {
    compile::compile(held)
}

/// A namespaced object's namespace ("default" when it has none).
fn namespace(meta: &ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("default")
}

/// `namespace/name` of a namespaced object.
fn key(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        namespace(meta),
        meta.name.as_deref().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests;
