//! NetworkPolicy as stromd takes it: already compiled by the control crate from
//! NetworkPolicies, Pods and Namespaces (selectors matched, `policyTypes` defaulted, named ports
//! resolved). stromd builds its lookup tables from a [`PolicySet`] and enforces it; nothing
//! here is Kubernetes' object model.
//!
//! - Every pod address the node knows (pods anywhere in the cluster) has an *identity*: pods
//!   with the same namespace, labels and named container ports share one, so a rule names a
//!   few identities rather than many addresses.
//! - A pod of the node that some policy selects for a direction is *isolated* in it, and
//!   points at the [`RuleGroup`] for it: what every policy selecting it allows, in that
//!   direction. Pods selected by the same policies (with the same named ports, for ingress)
//!   share a group.
//! - A pod that no policy isolates in a direction is open in it.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::service::Protocol;

/// Ingress (traffic to the isolated pod) or egress (traffic from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// The compiled NetworkPolicies of a node: the whole set, replaced at once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySet {
    /// Every pod address known, with its identity.
    #[serde(default)]
    pub peers: Vec<PeerAddr>,
    /// The node's pods isolated in at least one direction.
    #[serde(default)]
    pub pods: Vec<IsolatedPod>,
    /// Rule groups, referred to by index from [`IsolatedPod`].
    #[serde(default)]
    pub groups: Vec<RuleGroup>,
}

impl PolicySet {
    /// Nothing is isolated.
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }
}

/// A pod address and the identity of its pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAddr {
    pub ip: IpAddr,
    pub identity: u32,
}

/// A pod of the node that some policy isolates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsolatedPod {
    /// `namespace/name`.
    pub pod: String,
    pub ips: Vec<IpAddr>,
    /// The group of rules for traffic to it, when it is isolated for ingress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<u32>,
    /// The group of rules for traffic from it, when it is isolated for egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<u32>,
}

/// What the policies selecting a set of pods allow in one direction: a packet passes when
/// any rule matches its peer (the source for ingress, the destination for egress) and port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleGroup {
    pub direction: Direction,
    /// The policies (`namespace/name`) that select these pods in this direction; a drop is
    /// counted against each of them.
    pub policies: Vec<String>,
    /// No rule at all: everything is denied in this direction.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// One rule of a policy (an entry of its `ingress` or `egress` list), compiled: possibly
/// split in several, one per resolution of its named ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// The policy it comes from (`namespace/name`).
    pub policy: String,
    /// Its position in that policy's `ingress` or `egress` list.
    pub index: u32,
    pub peers: Peers,
    /// The ports it opens; `None`: every port of every protocol (a rule without ports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortRange>>,
}

/// Whom a rule lets in (ingress) or out to (egress).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Peers {
    /// Every address (a rule without `from` / `to`, or with an empty list).
    Any,
    /// Pods of these identities, and any address in these blocks.
    Some {
        #[serde(default)]
        identities: Vec<u32>,
        #[serde(default)]
        blocks: Vec<IpBlock>,
    },
}

/// An `ipBlock`: every address in `cidr` but those in `except`. It matches pod addresses too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpBlock {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

/// Ports `first..=last` of a protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRange {
    pub protocol: Protocol,
    pub first: u16,
    pub last: u16,
}

/// One policy selecting a pod, as `stromctl policy` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// `namespace/name`.
    pub policy: String,
    /// Packets dropped because no policy selecting the pod allowed them, on every worker.
    pub ingress_drops: u64,
    pub egress_drops: u64,
    /// The node's pods it selects, per direction (`namespace/name`).
    pub ingress_pods: Vec<String>,
    pub egress_pods: Vec<String>,
}
