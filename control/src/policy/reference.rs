//! Two evaluators for tests, each a plain linear walk:
//! - [`allowed`]: the policies' verdict on one packet, written straight over the Kubernetes
//!   objects with its own defaulting, validation and selector matching (nothing of
//!   [`super::compile`]'s), so that the two check each other;
//! - [`evaluate`]: the verdict of a compiled [`PolicySet`], as stromd's table should give it.
//!
//! Both are slow (every policy, pod and rule is scanned for every packet): for tests only.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use strom_api::{Direction, Peers, PolicySet, Protocol, Rule};

use super::{Input, NAME_LABEL};

/// Whether the policies of `input` let a packet from `src` to `dst` (`protocol`, destination
/// `port`) through: the source's egress, if it is a pod of the node isolated for egress, and
/// the destination's ingress, likewise. Malformed policies count as the module doc says.
pub fn allowed(input: &Input, src: IpAddr, dst: IpAddr, protocol: Protocol, port: u16) -> bool {
    let src_pod = owner(input, src);
    let dst_pod = owner(input, dst);
    let packet = Packet { protocol, port };
    let egress_ok = match src_pod {
        Some(pod) if on_node(input, pod) => {
            side_allows(input, Direction::Egress, pod, dst, dst_pod, packet)
        }
        _ => true,
    };
    let ingress_ok = match dst_pod {
        Some(pod) if on_node(input, pod) => {
            side_allows(input, Direction::Ingress, pod, src, src_pod, packet)
        }
        _ => true,
    };
    egress_ok && ingress_ok
}

#[derive(Clone, Copy)]
struct Packet {
    protocol: Protocol,
    port: u16,
}

fn ns_of(meta: &ObjectMeta) -> &str {
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => ns,
        _ => "default",
    }
}

fn key_of(meta: &ObjectMeta) -> String {
    format!("{}/{}", ns_of(meta), meta.name.clone().unwrap_or_default())
}

fn labels_of(meta: &ObjectMeta) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

/// The addresses a pod lists.
fn pod_addresses(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let mut texts: Vec<String> = Vec::new();
    if let Some(list) = &status.pod_ips {
        for entry in list {
            texts.push(entry.ip.clone());
        }
    }
    if texts.is_empty() {
        if let Some(ip) = &status.pod_ip {
            texts.push(ip.clone());
        }
    }
    texts.iter().filter_map(|t| t.parse().ok()).collect()
}

/// The pod an address belongs to: among the pods policies see (not finished, not on the
/// host's network), the first by `namespace/name` that lists it.
fn owner<'a>(input: &Input<'a>, ip: IpAddr) -> Option<&'a Pod> {
    let mut best: Option<(String, &'a Pod)> = None;
    for pod in input.pods {
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        if phase.as_deref() == Some("Succeeded") || phase.as_deref() == Some("Failed") {
            continue;
        }
        if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            continue;
        }
        if !pod_addresses(pod).contains(&ip) {
            continue;
        }
        let key = key_of(&pod.metadata);
        let better = match &best {
            None => true,
            Some((k, _)) => key < *k,
        };
        if better {
            best = Some((key, pod));
        }
    }
    best.map(|(_, pod)| pod)
}

fn on_node(input: &Input, pod: &Pod) -> bool {
    match input.node {
        None => true,
        Some(node) => {
            let name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            name.as_deref() == Some(node)
        }
    }
}

/// A namespace's labels: its object's (the first of that name), or none, with its name label.
fn namespace_labels(input: &Input, name: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    for n in input.namespaces {
        if n.metadata.name.as_deref() == Some(name) {
            labels = labels_of(&n.metadata);
            break;
        }
    }
    labels.insert(NAME_LABEL.to_string(), name.to_string());
    labels
}

/// The directions a policy isolates: its `policyTypes`, defaulted; `None` when unreadable.
fn policy_types(spec: &NetworkPolicySpec) -> Option<(bool, bool)> {
    let given = spec.policy_types.clone().unwrap_or_default();
    if given.is_empty() {
        let has_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        return Some((true, has_egress));
    }
    if given.len() > 2 {
        return None;
    }
    let mut ingress = false;
    let mut egress = false;
    for t in &given {
        if t == "Ingress" {
            ingress = true;
        } else if t == "Egress" {
            egress = true;
        } else {
            return None;
        }
    }
    Some((ingress, egress))
}

fn selector_is_valid(s: &LabelSelector) -> bool {
    for e in s.match_expressions.clone().unwrap_or_default() {
        let n = e.values.map(|v| v.len()).unwrap_or(0);
        let ok = match e.operator.as_str() {
            "In" | "NotIn" => n > 0,
            "Exists" | "DoesNotExist" => n == 0,
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

fn selector_matches(s: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    for (k, v) in s.match_labels.clone().unwrap_or_default() {
        if labels.get(&k) != Some(&v) {
            return false;
        }
    }
    for e in s.match_expressions.clone().unwrap_or_default() {
        let values = e.values.unwrap_or_default();
        let have = labels.get(&e.key);
        let ok = match e.operator.as_str() {
            "In" => match have {
                Some(v) => values.contains(v),
                None => false,
            },
            "NotIn" => match have {
                Some(v) => !values.contains(v),
                None => true,
            },
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

fn cidr(text: &str) -> Option<IpNet> {
    text.parse().ok()
}

fn block_is_valid(b: &IPBlock) -> bool {
    let Some(outer) = cidr(&b.cidr) else {
        return false;
    };
    for x in b.except.clone().unwrap_or_default() {
        let Some(inner) = cidr(&x) else {
            return false;
        };
        let strictly_inside = inner.prefix_len() > outer.prefix_len()
            && outer.contains(&inner.network())
            && inner.network().is_ipv4() == outer.network().is_ipv4();
        if !strictly_inside {
            return false;
        }
    }
    true
}

fn block_contains(b: &IPBlock, ip: IpAddr) -> bool {
    let inside = cidr(&b.cidr).is_some_and(|n| n.contains(&ip));
    let excepted = b
        .except
        .clone()
        .unwrap_or_default()
        .iter()
        .any(|x| cidr(x).is_some_and(|n| n.contains(&ip)));
    inside && !excepted
}

fn peer_is_valid(p: &NetworkPolicyPeer) -> bool {
    let fields = [
        p.pod_selector.is_some(),
        p.namespace_selector.is_some(),
        p.ip_block.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if fields == 0 || (p.ip_block.is_some() && fields > 1) {
        return false;
    }
    p.pod_selector.as_ref().is_none_or(selector_is_valid)
        && p.namespace_selector.as_ref().is_none_or(selector_is_valid)
        && p.ip_block.as_ref().is_none_or(block_is_valid)
}

fn name_is_valid(name: &str) -> bool {
    let chars: Vec<char> = name.chars().collect();
    if chars.is_empty() || chars.len() > 15 {
        return false;
    }
    let mut letters = 0;
    for (i, c) in chars.iter().enumerate() {
        match c {
            'a'..='z' => letters += 1,
            '0'..='9' => {}
            '-' => {
                if i == 0 || i == chars.len() - 1 || chars[i - 1] == '-' {
                    return false;
                }
            }
            _ => return false,
        }
    }
    letters > 0
}

fn port_is_valid(p: &NetworkPolicyPort) -> bool {
    let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
    if proto != "TCP" && proto != "UDP" && proto != "SCTP" {
        return false;
    }
    let in_range = |n: i32| (1..=65535).contains(&n);
    match (&p.port, p.end_port) {
        (None, None) => true,
        (None, Some(_)) => false,
        (Some(IntOrString::Int(n)), None) => in_range(*n),
        (Some(IntOrString::Int(n)), Some(end)) => in_range(*n) && in_range(end) && end >= *n,
        (Some(IntOrString::String(name)), None) => name_is_valid(name),
        (Some(IntOrString::String(_)), Some(_)) => false,
    }
}

/// The rules of a policy in a direction: (peers, ports) of each.
fn rules_of(
    spec: &NetworkPolicySpec,
    direction: Direction,
) -> Vec<(Vec<NetworkPolicyPeer>, Vec<NetworkPolicyPort>)> {
    match direction {
        Direction::Ingress => spec
            .ingress
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r.from.unwrap_or_default(), r.ports.unwrap_or_default()))
            .collect(),
        Direction::Egress => spec
            .egress
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r.to.unwrap_or_default(), r.ports.unwrap_or_default()))
            .collect(),
    }
}

fn policy_is_valid(spec: &NetworkPolicySpec) -> bool {
    if policy_types(spec).is_none() {
        return false;
    }
    if !selector_is_valid(&spec.pod_selector.clone().unwrap_or_default()) {
        return false;
    }
    for direction in [Direction::Ingress, Direction::Egress] {
        for (peers, ports) in rules_of(spec, direction) {
            if !peers.iter().all(peer_is_valid) || !ports.iter().all(port_is_valid) {
                return false;
            }
        }
    }
    true
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

/// Whether a pod has a container port of that name, protocol and number.
fn pod_has_port(pod: &Pod, name: &str, protocol: &str, port: u16) -> bool {
    let Some(spec) = &pod.spec else {
        return false;
    };
    for c in &spec.containers {
        for p in c.ports.clone().unwrap_or_default() {
            let p_proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            if p.name.as_deref() == Some(name)
                && p_proto == protocol
                && (1..=65535).contains(&p.container_port)
                && p.container_port == i32::from(port)
            {
                return true;
            }
        }
    }
    false
}

/// Whether a rule's ports take the packet; named ones are looked up on `named_on`.
fn ports_match(ports: &[NetworkPolicyPort], named_on: Option<&Pod>, packet: Packet) -> bool {
    if ports.is_empty() {
        return true;
    }
    let want = protocol_name(packet.protocol);
    for p in ports {
        let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
        if proto != want {
            continue;
        }
        let hit = match &p.port {
            None => true,
            Some(IntOrString::Int(n)) => {
                let last = p.end_port.unwrap_or(*n);
                *n <= i32::from(packet.port) && i32::from(packet.port) <= last
            }
            Some(IntOrString::String(name)) => {
                named_on.is_some_and(|pod| pod_has_port(pod, name, want, packet.port))
            }
        };
        if hit {
            return true;
        }
    }
    false
}

/// Whether a rule's peers take the address (and its pod, if it is one).
fn peers_match(
    input: &Input,
    peers: &[NetworkPolicyPeer],
    policy_ns: &str,
    ip: IpAddr,
    pod: Option<&Pod>,
) -> bool {
    if peers.is_empty() {
        return true;
    }
    for p in peers {
        if let Some(b) = &p.ip_block {
            if block_contains(b, ip) {
                return true;
            }
            continue;
        }
        let Some(pod) = pod else {
            continue;
        };
        let pod_ns = ns_of(&pod.metadata);
        let ns_ok = match &p.namespace_selector {
            None => pod_ns == policy_ns,
            Some(s) => selector_matches(s, &namespace_labels(input, pod_ns)),
        };
        let pod_ok = match &p.pod_selector {
            None => true,
            Some(s) => selector_matches(s, &labels_of(&pod.metadata)),
        };
        if ns_ok && pod_ok {
            return true;
        }
    }
    false
}

/// One side of a packet: whether the policies isolating `pod` in `direction` (if any) allow
/// traffic with `peer_ip` (of pod `peer_pod`, if it is one).
fn side_allows(
    input: &Input,
    direction: Direction,
    pod: &Pod,
    peer_ip: IpAddr,
    peer_pod: Option<&Pod>,
    packet: Packet,
) -> bool {
    let mut isolated = false;
    for policy in input.policies {
        let policy: &NetworkPolicy = policy;
        let policy_ns = ns_of(&policy.metadata);
        if policy_ns != ns_of(&pod.metadata) {
            continue;
        }
        let spec = policy.spec.clone().unwrap_or_default();
        let (ingress, egress) = policy_types(&spec).unwrap_or((true, true));
        let applies = match direction {
            Direction::Ingress => ingress,
            Direction::Egress => egress,
        };
        if !applies {
            continue;
        }
        let selector = spec.pod_selector.clone().unwrap_or_default();
        let selects =
            !selector_is_valid(&selector) || selector_matches(&selector, &labels_of(&pod.metadata));
        if !selects {
            continue;
        }
        isolated = true;
        if !policy_is_valid(&spec) {
            continue;
        }
        // Named ports are the destination's: the isolated pod for ingress, the peer for egress.
        let named_on = match direction {
            Direction::Ingress => Some(pod),
            Direction::Egress => peer_pod,
        };
        for (peers, ports) in rules_of(&spec, direction) {
            if ports_match(&ports, named_on, packet)
                && peers_match(input, &peers, policy_ns, peer_ip, peer_pod)
            {
                return true;
            }
        }
    }
    !isolated
}

/// The verdict of a compiled set on a packet, by linear scans: the source's egress group if
/// it is an isolated pod, then the destination's ingress group likewise.
pub fn evaluate(set: &PolicySet, src: IpAddr, dst: IpAddr, protocol: Protocol, port: u16) -> bool {
    let side = |pod_ip: IpAddr, peer_ip: IpAddr, direction: Direction| -> bool {
        let Some(pod) = set.pods.iter().find(|p| p.ips.contains(&pod_ip)) else {
            return true;
        };
        let group = match direction {
            Direction::Ingress => pod.ingress,
            Direction::Egress => pod.egress,
        };
        let Some(group) = group else {
            return true;
        };
        let Some(group) = set.groups.get(group as usize) else {
            return false;
        };
        let identity = set
            .peers
            .iter()
            .find(|p| p.ip == peer_ip)
            .map(|p| p.identity);
        group
            .rules
            .iter()
            .any(|r| rule_matches(r, peer_ip, identity, protocol, port))
    };
    side(src, dst, Direction::Egress) && side(dst, src, Direction::Ingress)
}

fn rule_matches(
    r: &Rule,
    peer: IpAddr,
    identity: Option<u32>,
    protocol: Protocol,
    port: u16,
) -> bool {
    let port_ok = match &r.ports {
        None => true,
        Some(ranges) => ranges
            .iter()
            .any(|p| p.protocol == protocol && p.first <= port && port <= p.last),
    };
    let peer_ok = match &r.peers {
        Peers::Any => true,
        Peers::Some { identities, blocks } => {
            identity.is_some_and(|id| identities.contains(&id))
                || blocks.iter().any(|b| {
                    let inside = |text: &str| cidr(text).is_some_and(|n| n.contains(&peer));
                    inside(&b.cidr) && !b.except.iter().any(|x| inside(x))
                })
        }
    };
    port_ok && peer_ok
}
