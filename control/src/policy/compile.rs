//! The compiler: pods into identities, policies into the groups of rules of the node's pods.
//!
//! Costs: a pod selector is matched once per identity of its namespace (not per pod), a
//! peer's namespace selector once per namespace and its pod selector once per identity of the
//! namespaces it selects; the rules of a policy are resolved once (egress, and ingress without
//! named ports) or once per set of named ports of the pods it selects (ingress with named
//! ports), and copied into every group it belongs to (moved into the last). What named ports
//! resolve to on each identity is worked out once per list of named ports, which pod
//! addresses a list of blocks holds once per list of blocks.
//!
//! The one output that grows with pods × policies: an egress rule sending named ports to an
//! `ipBlock` that holds some but not all of an identity's addresses must list those
//! addresses singly (a set names whole identities or address blocks, never their
//! intersection). 1000 such policies over 1000 pods in 10.0.0.0/16 less a /24 come to 744,000
//! single addresses and 80 ms; the usual block (outside the cluster) lists none.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::rc::Rc;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use strom_api::{
    Direction, IpBlock, IsolatedPod, PeerAddr, Peers, PolicySet, PortRange, Protocol, Rule,
    RuleGroup,
};

use super::parse::{self, Peer, Policy, Port, RuleSpec};
use super::pod::NamedPorts;
use super::{Compiled, Held, Labels, PolicyPod, NAME_LABEL};

/// Named ports of a rule: (name, protocol).
type Names = Vec<(String, Protocol)>;

/// A rule's ports: numbers and ranges, and named ports.
type SplitPorts = (Vec<PortRange>, Names);

/// Per identity, what some named ports resolve to on it.
type Resolved = Rc<Vec<Vec<PortRange>>>;

/// The identities and single addresses (address, its block) sharing a resolution.
type Target<'a> = (Vec<u32>, Vec<(IpAddr, &'a IpBlock)>);

/// A considered pod, with the addresses it owns.
struct PodEntry<'a> {
    pod: &'a PolicyPod,
    ips: Vec<IpAddr>,
}

/// Pods sharing a namespace, labels and named ports.
struct Identity<'a> {
    namespace: &'a str,
    labels: &'a Labels,
    named: &'a NamedPorts,
    addrs: Vec<IpAddr>,
    /// Some pod of it runs on the node (so it may be isolated).
    on_node: bool,
}

/// What a set of pods gets in one direction: the same group for the same key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct GroupKey {
    direction: Direction,
    /// Indices into the sorted policies.
    policies: Vec<usize>,
    /// Ingress only, and only when one of the policies names ports: the selected pods'.
    named: Option<NamedPorts>,
}

/// An ingress rule with its peers resolved, its named ports not yet.
struct IngressTemplate {
    index: u32,
    peers: Peers,
    /// `None`: every port.
    ports: Option<SplitPorts>,
}

/// The numbers `named` (name, protocol) resolve to among a pod's named ports.
fn resolve(named: &[(String, Protocol)], ports: &NamedPorts) -> Vec<PortRange> {
    let mut out: Vec<PortRange> = named
        .iter()
        .flat_map(|(name, proto)| {
            ports
                .iter()
                .filter(move |(n, p, _)| n == name && p == proto)
                .map(|&(_, protocol, number)| PortRange {
                    protocol,
                    first: number,
                    last: number,
                })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A rule's ports split into ranges and named ports.
fn split_ports(ports: &[Port]) -> SplitPorts {
    let mut ranges = Vec::new();
    let mut named = Vec::new();
    for p in ports {
        match p {
            Port::Numbers(r) => ranges.push(*r),
            Port::Named { name, protocol } => named.push((name.clone(), *protocol)),
        }
    }
    ranges.sort();
    ranges.dedup();
    named.sort();
    named.dedup();
    (ranges, named)
}

fn ip_block(b: &parse::Block) -> IpBlock {
    IpBlock {
        cidr: b.cidr.to_string(),
        except: b.except.iter().map(ToString::to_string).collect(),
    }
}

/// The pod addresses in a list of blocks.
#[derive(Default)]
struct Covered {
    /// Identities all of whose addresses are in.
    whole: Vec<u32>,
    /// The addresses in of the others: identity, address, as a block.
    hosts: Vec<(u32, IpAddr, IpBlock)>,
}

struct Compiler<'a> {
    policies: &'a [Policy],
    identities: &'a [Identity<'a>],
    by_namespace: &'a BTreeMap<&'a str, Vec<u32>>,
    namespace_labels: &'a BTreeMap<&'a str, Labels>,
    /// Per policy: its ingress rules with peers resolved, its egress rules compiled.
    ingress: HashMap<usize, Vec<IngressTemplate>>,
    egress: HashMap<usize, Vec<Rule>>,
    /// Per policy: the egress groups still to build with it (its rules are moved into the
    /// last rather than copied).
    egress_uses: Vec<usize>,
    /// Per list of named ports, per list of blocks (policies often repeat them).
    resolved: HashMap<Names, Resolved>,
    covered: HashMap<Vec<parse::Block>, Rc<Covered>>,
}

impl Compiler<'_> {
    /// The identities and blocks of a rule's peers.
    fn peers(&self, policy: &Policy, peers: Option<&[Peer]>) -> Peers {
        let Some(peers) = peers else {
            return Peers::Any;
        };
        let mut identities = BTreeSet::new();
        let mut blocks: Vec<IpBlock> = Vec::new();
        for p in peers {
            match p {
                Peer::Pods { namespaces, pods } => {
                    for (ns, ids) in self.by_namespace {
                        let in_scope = match namespaces {
                            None => *ns == policy.namespace,
                            Some(sel) => self
                                .namespace_labels
                                .get(ns)
                                .is_some_and(|labels| sel.matches(labels)),
                        };
                        if !in_scope {
                            continue;
                        }
                        for &id in ids {
                            if pods.matches(self.identities[id as usize].labels) {
                                identities.insert(id);
                            }
                        }
                    }
                }
                Peer::Block(b) => {
                    let b = ip_block(b);
                    if !blocks.contains(&b) {
                        blocks.push(b);
                    }
                }
            }
        }
        Peers::Some {
            identities: identities.into_iter().collect(),
            blocks,
        }
    }

    fn ingress_templates(&mut self, pi: usize) -> &[IngressTemplate] {
        if !self.ingress.contains_key(&pi) {
            let policy = &self.policies[pi];
            let templates = policy
                .ingress
                .iter()
                .flatten()
                .map(|r| IngressTemplate {
                    index: r.index,
                    peers: self.peers(policy, r.peers.as_deref()),
                    ports: r.ports.as_deref().map(split_ports),
                })
                .collect();
            self.ingress.insert(pi, templates);
        }
        self.ingress.get(&pi).map(Vec::as_slice).unwrap_or_default()
    }

    fn egress_rules(&mut self, pi: usize) -> &[Rule] {
        if !self.egress.contains_key(&pi) {
            let policies = self.policies;
            let policy = &policies[pi];
            let mut rules = Vec::new();
            for r in policy.egress.iter().flatten() {
                self.egress_rule(policy, r, &mut rules);
            }
            self.egress.insert(pi, rules);
        }
        self.egress.get(&pi).map(Vec::as_slice).unwrap_or_default()
    }

    /// What named ports (name, protocol) resolve to on each identity (index: identity).
    fn resolved(&mut self, named: &[(String, Protocol)]) -> Resolved {
        if let Some(r) = self.resolved.get(named) {
            return r.clone();
        }
        let r: Resolved = Rc::new(
            self.identities
                .iter()
                .map(|identity| resolve(named, identity.named))
                .collect(),
        );
        self.resolved.insert(named.to_vec(), r.clone());
        r
    }

    /// The pod addresses in some of `blocks`, by identity: those all of whose addresses are,
    /// and the single addresses of the others.
    fn covered(&mut self, blocks: &[parse::Block]) -> Rc<Covered> {
        if let Some(c) = self.covered.get(blocks) {
            return c.clone();
        }
        let mut c = Covered::default();
        for (id, identity) in self.identities.iter().enumerate() {
            let inside: Vec<IpAddr> = identity
                .addrs
                .iter()
                .copied()
                .filter(|a| blocks.iter().any(|b| b.contains(*a)))
                .collect();
            if inside.is_empty() {
                continue;
            }
            if inside.len() == identity.addrs.len() {
                c.whole.push(id as u32);
            } else {
                c.hosts.extend(inside.into_iter().map(|a| {
                    let block = IpBlock {
                        cidr: IpNet::from(a).to_string(),
                        except: Vec::new(),
                    };
                    (id as u32, a, block)
                }));
            }
        }
        let c = Rc::new(c);
        self.covered.insert(blocks.to_vec(), c.clone());
        c
    }

    /// One egress rule: its numbered ports for every peer, and its named ports for each
    /// destination pod among the peers that has them, split by what they resolve to.
    fn egress_rule(&mut self, policy: &Policy, r: &RuleSpec, out: &mut Vec<Rule>) {
        let peers = self.peers(policy, r.peers.as_deref());
        let rule = |peers: Peers, ports: Option<Vec<PortRange>>| Rule {
            policy: policy.key.clone(),
            index: r.index,
            peers,
            ports,
        };
        let Some(ports) = &r.ports else {
            out.push(rule(peers, None));
            return;
        };
        let (ranges, named) = split_ports(ports);
        if !ranges.is_empty() {
            out.push(rule(peers.clone(), Some(ranges)));
        }
        if named.is_empty() {
            return;
        }
        let resolved = self.resolved(&named);
        // Identities the peers take whole: every one for a rule without peers, the selected
        // ones and those all of whose addresses are in a block otherwise; single addresses
        // of the others in a block.
        let mut whole: Vec<u32> = match &peers {
            Peers::Any => (0..self.identities.len() as u32).collect(),
            Peers::Some { identities, .. } => identities.clone(),
        };
        let blocks: Vec<parse::Block> = r
            .peers
            .iter()
            .flatten()
            .filter_map(|p| match p {
                Peer::Block(b) => Some(b.clone()),
                Peer::Pods { .. } => None,
            })
            .collect();
        let covered = if blocks.is_empty() || peers == Peers::Any {
            Rc::default()
        } else {
            self.covered(&blocks)
        };
        whole.extend_from_slice(&covered.whole);
        whole.sort_unstable();
        whole.dedup();
        // Resolved ports -> the identities and the single addresses that resolve to them.
        let mut targets: BTreeMap<&[PortRange], Target> = BTreeMap::new();
        for &id in &whole {
            match resolved.get(id as usize) {
                Some(ports) if !ports.is_empty() => targets.entry(ports).or_default().0.push(id),
                _ => {}
            }
        }
        for (id, addr, block) in &covered.hosts {
            if whole.binary_search(id).is_ok() {
                continue;
            }
            match resolved.get(*id as usize) {
                Some(ports) if !ports.is_empty() => {
                    targets.entry(ports).or_default().1.push((*addr, block))
                }
                _ => {}
            }
        }
        for (ports, (identities, mut hosts)) in targets {
            hosts.sort_by_key(|(a, _)| *a);
            let peers = Peers::Some {
                identities,
                blocks: hosts.into_iter().map(|(_, b)| b.clone()).collect(),
            };
            out.push(rule(peers, Some(ports.to_vec())));
        }
    }

    /// The rules of a group.
    fn group(&mut self, key: &GroupKey) -> RuleGroup {
        let mut rules = Vec::new();
        let none = NamedPorts::new();
        for &pi in &key.policies {
            match key.direction {
                Direction::Egress => {
                    self.egress_rules(pi);
                    let last = match self.egress_uses.get_mut(pi) {
                        Some(n) => {
                            *n = n.saturating_sub(1);
                            *n == 0
                        }
                        None => true,
                    };
                    if last {
                        rules.extend(self.egress.remove(&pi).unwrap_or_default());
                    } else {
                        rules.extend_from_slice(self.egress_rules(pi));
                    }
                }
                Direction::Ingress => {
                    let named = key.named.as_ref().unwrap_or(&none);
                    let policy = self.policies[pi].key.clone();
                    for t in self.ingress_templates(pi) {
                        let ports = match &t.ports {
                            None => None,
                            Some((ranges, names)) => {
                                let mut all = ranges.clone();
                                all.extend(resolve(names, named));
                                all.sort();
                                all.dedup();
                                if all.is_empty() {
                                    // Named ports this pod does not have: nothing to open.
                                    continue;
                                }
                                Some(all)
                            }
                        };
                        rules.push(Rule {
                            policy: policy.clone(),
                            index: t.index,
                            peers: t.peers.clone(),
                            ports,
                        });
                    }
                }
            }
        }
        let mut policies: Vec<String> = key
            .policies
            .iter()
            .map(|&pi| self.policies[pi].key.clone())
            .collect();
        policies.dedup();
        RuleGroup {
            direction: key.direction,
            policies,
            rules,
        }
    }
}

/// See [`super::compile`].
pub(crate) fn compile(input: &Held) -> Compiled {
    // Policies in key order (ties, the same key twice, by their JSON) so that the input's
    // order does not matter.
    let mut sorted: Vec<(String, &NetworkPolicy)> = input
        .policies
        .iter()
        .map(|p| (super::key(&p.metadata), *p))
        .collect();
    sorted.sort_by(|a, b| {
        a.0.cmp(&b.0).then_with(|| {
            let json = |p: &NetworkPolicy| serde_json::to_string(p).unwrap_or_default();
            json(a.1).cmp(&json(b.1))
        })
    });
    let mut policies = Vec::with_capacity(sorted.len());
    let mut rejected = Vec::new();
    for (_, p) in &sorted {
        let (policy, error) = parse::policy(p);
        policies.push(policy);
        rejected.extend(error);
    }

    // Pods in key order; an address claimed by several goes to the first.
    let mut pods: Vec<PodEntry> = input
        .pods
        .iter()
        .filter(|p| !p.ips.is_empty())
        .map(|p| PodEntry {
            pod: p,
            ips: p.ips.clone(),
        })
        .collect();
    pods.sort_by(|a, b| a.pod.key.cmp(&b.pod.key));
    let mut taken = HashSet::new();
    for p in &mut pods {
        p.ips.retain(|ip| taken.insert(*ip));
    }
    pods.retain(|p| !p.ips.is_empty());

    let on_node = |p: &PolicyPod| match input.node {
        None => true,
        Some(node) => p.node.as_deref() == Some(node),
    };

    // Identities, numbered in the order of their (namespace, labels, named ports).
    let mut by_key: BTreeMap<(&str, &Labels, &NamedPorts), Vec<usize>> = BTreeMap::new();
    for (i, p) in pods.iter().enumerate() {
        by_key
            .entry((p.pod.namespace(), &p.pod.labels, &p.pod.named))
            .or_default()
            .push(i);
    }
    let mut identities: Vec<Identity> = Vec::with_capacity(by_key.len());
    let mut pod_identity = vec![0u32; pods.len()];
    for ((namespace, labels, named), members) in by_key {
        let id = identities.len() as u32;
        let mut addrs = Vec::new();
        let mut node = false;
        for &m in &members {
            pod_identity[m] = id;
            addrs.extend_from_slice(&pods[m].ips);
            node |= on_node(pods[m].pod);
        }
        identities.push(Identity {
            namespace,
            labels,
            named,
            addrs,
            on_node: node,
        });
    }
    let mut by_namespace: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (id, identity) in identities.iter().enumerate() {
        by_namespace
            .entry(identity.namespace)
            .or_default()
            .push(id as u32);
    }

    // Namespace labels: the first object of each name, with its name label; a namespace
    // without an object has only that label.
    let mut namespace_labels: BTreeMap<&str, Labels> = BTreeMap::new();
    for n in &input.namespaces {
        let Some(name) = n.metadata.name.as_deref() else {
            continue;
        };
        if !by_namespace.contains_key(name) || namespace_labels.contains_key(name) {
            continue;
        }
        let mut labels = n.metadata.labels.clone().unwrap_or_default();
        labels.insert(NAME_LABEL.into(), name.into());
        namespace_labels.insert(name, labels);
    }
    for ns in by_namespace.keys() {
        namespace_labels
            .entry(ns)
            .or_insert_with(|| Labels::from([(NAME_LABEL.to_string(), ns.to_string())]));
    }

    // Which policies select each identity of the node, per direction.
    let mut selecting: BTreeMap<u32, [Vec<usize>; 2]> = BTreeMap::new();
    for (pi, policy) in policies.iter().enumerate() {
        let Some(ids) = by_namespace.get(policy.namespace.as_str()) else {
            continue;
        };
        for &id in ids {
            let identity = &identities[id as usize];
            if !identity.on_node || !policy.selector.matches(identity.labels) {
                continue;
            }
            let e = selecting.entry(id).or_default();
            if policy.ingress.is_some() {
                e[0].push(pi);
            }
            if policy.egress.is_some() {
                e[1].push(pi);
            }
        }
    }
    let names_ingress: Vec<bool> = policies
        .iter()
        .map(|p| p.ingress.iter().flatten().any(RuleSpec::has_named_ports))
        .collect();
    let mut keys: BTreeMap<u32, [Option<GroupKey>; 2]> = BTreeMap::new();
    let mut all_keys: BTreeSet<GroupKey> = BTreeSet::new();
    for (id, [ingress, egress]) in selecting {
        let ingress = (!ingress.is_empty()).then(|| GroupKey {
            direction: Direction::Ingress,
            named: ingress
                .iter()
                .any(|&pi| names_ingress[pi])
                .then(|| identities[id as usize].named.to_vec()),
            policies: ingress,
        });
        let egress = (!egress.is_empty()).then_some(GroupKey {
            direction: Direction::Egress,
            policies: egress,
            named: None,
        });
        all_keys.extend(ingress.iter().chain(egress.iter()).cloned());
        keys.insert(id, [ingress, egress]);
    }

    let mut egress_uses = vec![0usize; policies.len()];
    for key in all_keys.iter().filter(|k| k.direction == Direction::Egress) {
        for &pi in &key.policies {
            egress_uses[pi] += 1;
        }
    }
    let mut compiler = Compiler {
        policies: &policies,
        identities: &identities,
        by_namespace: &by_namespace,
        namespace_labels: &namespace_labels,
        ingress: HashMap::new(),
        egress: HashMap::new(),
        egress_uses,
        resolved: HashMap::new(),
        covered: HashMap::new(),
    };
    let mut index: BTreeMap<&GroupKey, u32> = BTreeMap::new();
    let mut groups = Vec::with_capacity(all_keys.len());
    for key in &all_keys {
        index.insert(key, groups.len() as u32);
        groups.push(compiler.group(key));
    }

    let mut isolated = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        if !on_node(p.pod) {
            continue;
        }
        let Some([ingress, egress]) = keys.get(&pod_identity[i]) else {
            continue;
        };
        let group = |k: &Option<GroupKey>| k.as_ref().and_then(|k| index.get(k).copied());
        isolated.push(IsolatedPod {
            pod: p.pod.key.clone(),
            ips: p.ips.clone(),
            ingress: group(ingress),
            egress: group(egress),
        });
    }

    let mut peers: Vec<PeerAddr> = pods
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            let identity = pod_identity[i];
            p.ips.iter().map(move |&ip| PeerAddr { ip, identity })
        })
        .collect();
    peers.sort_by_key(|p| p.ip);

    Compiled {
        set: PolicySet {
            peers,
            pods: isolated,
            groups,
        },
        rejected,
    }
}
