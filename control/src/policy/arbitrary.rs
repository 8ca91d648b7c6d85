//! Random small clusters and packets for property tests (feature `arbitrary`): the compiler
//! against [`super::reference`] here, stromd's policy table against the same reference in
//! the dataplane's tests.
//!
//! A cluster ([`Generated`]) has 2-3 namespaces with random labels (a wrong name label
//! among them at times, one of them sometimes without its Namespace object), 3-8 pods with
//! random labels, named container ports and addresses in 198.18.0.0/24 (replicas of the pod
//! before them, some with an IPv6 address too, some finished, on the host's network, without
//! an address, or sharing another's address), and 0-5 policies with random selectors
//! (`matchLabels` and `matchExpressions`), peers, `ipBlock`s inside and outside the pods'
//! subnet, numbered, ranged and named ports, protocols and `policyTypes`; about one field in
//! fifty is malformed. Packets ([`Probe`]) mostly go between the pods' addresses, on the
//! protocol and port of a port the policies or the pods name (a named port as the pods
//! number it, a number and its neighbours, the ends of a range), sometimes to or from
//! outside or on any port.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Pod, PodIP, PodSpec, PodStatus,
};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use strom_api::Protocol;

use super::{Input, NAME_LABEL};

/// Namespace names, the first two or three used.
pub const NAMESPACES: &[&str] = &["red", "blue", "green"];
/// Nodes pods run on; the input's node is the first (or none).
pub const NODES: &[&str] = &["node-a", "node-b"];
const POD_KEYS: &[&str] = &["app", "tier", "role"];
const POD_VALUES: &[&str] = &["a", "b", "c"];
const NS_KEYS: &[&str] = &["team", "env", NAME_LABEL];
const NS_OBJECT_KEYS: &[&str] = &["team", "env", NAME_LABEL];
const NS_VALUES: &[&str] = &["x", "y", "red", "blue", "green"];
const NS_OBJECT_VALUES: &[&str] = &["x", "y", "red", "blue"];
const PORT_NAMES: &[&str] = &["http", "dns", "metrics", "grpc"];
const NUMBERS: &[i32] = &[53, 80, 443, 1000, 8080, 9090];
const RANGES: &[i32] = &[0, 10, 100, 1000];
const OPERATORS: &[&str] = &["In", "NotIn", "Exists", "DoesNotExist"];
const PROTOCOLS: &[Protocol] = &[Protocol::Tcp, Protocol::Udp, Protocol::Sctp];
const CIDRS: &[&str] = &[
    "198.18.0.0/24",
    "198.18.0.0/26",
    "198.18.0.32/27",
    "198.18.0.0/27",
    "198.18.0.0/28",
    "198.18.0.32/28",
    "198.18.0.16/29",
    "10.0.0.0/8",
    "0.0.0.0/0",
    "fd00::/64",
];
/// Addresses of no pod.
pub const OUTSIDE: &[&str] = &[
    "198.18.0.250",
    "198.18.0.61",
    "10.1.2.3",
    "8.8.8.8",
    "fd00::99",
];

/// A generated cluster.
#[derive(Debug, Clone, Default)]
pub struct Generated {
    pub policies: Vec<NetworkPolicy>,
    pub pods: Vec<Pod>,
    pub namespaces: Vec<Namespace>,
    pub node: Option<String>,
}

impl Generated {
    pub fn input(&self) -> Input<'_> {
        Input {
            policies: &self.policies,
            pods: &self.pods,
            namespaces: &self.namespaces,
            node: self.node.as_deref(),
        }
    }

    /// Every address a pod lists (finished pods' and duplicates included).
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = self
            .pods
            .iter()
            .filter_map(|p| p.status.as_ref())
            .flat_map(|s| {
                s.pod_ips
                    .iter()
                    .flatten()
                    .map(|i| i.ip.clone())
                    .chain(s.pod_ip.clone())
            })
            .filter_map(|ip| ip.parse().ok())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// (protocol, port) pairs worth probing: the ports the policies and the pods name, with
    /// their neighbours and the edges of ranges, each with its protocol.
    pub fn ports(&self) -> Vec<(Protocol, u16)> {
        let mut out: Vec<(Protocol, i64)> = NUMBERS
            .iter()
            .flat_map(|n| PROTOCOLS.iter().map(move |p| (*p, i64::from(*n))))
            .collect();
        let named: Vec<(&str, Protocol, i64)> = self
            .pods
            .iter()
            .flat_map(|p| p.spec.iter().flat_map(|s| s.containers.iter()))
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                let proto = super::parse::protocol(p.protocol.as_deref())?;
                out.push((proto, i64::from(p.container_port)));
                Some((p.name.as_deref()?, proto, i64::from(p.container_port)))
            })
            .collect();
        for spec in self.policies.iter().filter_map(|p| p.spec.as_ref()) {
            let ports = spec
                .ingress
                .iter()
                .flatten()
                .flat_map(|r| r.ports.iter().flatten())
                .chain(
                    spec.egress
                        .iter()
                        .flatten()
                        .flat_map(|r| r.ports.iter().flatten()),
                );
            for p in ports {
                let Some(proto) = super::parse::protocol(p.protocol.as_deref()) else {
                    continue;
                };
                match &p.port {
                    Some(IntOrString::Int(n)) => {
                        let n = i64::from(*n);
                        out.extend([(proto, n - 1), (proto, n), (proto, n + 1)]);
                    }
                    Some(IntOrString::String(name)) => out.extend(
                        named
                            .iter()
                            .filter(|(n, pr, _)| n == name && *pr == proto)
                            .map(|(_, _, number)| (proto, *number)),
                    ),
                    None => out.extend([(proto, 1), (proto, 65535)]),
                }
                if let Some(e) = p.end_port {
                    out.extend([(proto, i64::from(e)), (proto, i64::from(e) + 1)]);
                }
            }
        }
        let mut out: Vec<(Protocol, u16)> = out
            .into_iter()
            .filter_map(|(p, n)| Some((p, u16::try_from(n).ok()?)))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// A packet: from `src` to `dst`, `protocol`, destination `port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

fn strings(m: BTreeMap<&str, &str>) -> BTreeMap<String, String> {
    m.into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn labels(
    keys: &'static [&'static str],
    values: &'static [&'static str],
) -> impl Strategy<Value = BTreeMap<String, String>> {
    btree_map(select(keys), select(values), 0..=2).prop_map(strings)
}

/// An address of the pods' subnet.
fn subnet(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, host)
}

/// How a pod lists its addresses.
#[derive(Debug, Clone, Copy)]
enum Addressing {
    PodIps,
    DualStack,
    PodIpOnly,
    None,
    /// The previous pod's address.
    Shared,
}

fn pod(namespaces: usize) -> impl Strategy<Value = (Pod, Addressing, bool)> {
    let phase = prop_oneof![
        12 => Just("Running"),
        1 => Just("Pending"),
        1 => Just("Succeeded"),
        1 => Just("Failed"),
    ];
    let protocol = prop_oneof![
        4 => Just(None),
        2 => Just(Some("TCP")),
        2 => Just(Some("UDP")),
        1 => Just(Some("SCTP")),
    ];
    let container_port = (
        option::weighted(0.8, select(PORT_NAMES)),
        protocol,
        select(NUMBERS),
    );
    let addressing = prop_oneof![
        10 => Just(Addressing::PodIps),
        4 => Just(Addressing::DualStack),
        1 => Just(Addressing::PodIpOnly),
        1 => Just(Addressing::None),
        1 => Just(Addressing::Shared),
    ];
    (
        0..namespaces,
        labels(POD_KEYS, POD_VALUES),
        vec(container_port, 0..=3),
        phase,
        prop::bool::weighted(0.05),
        select(NODES),
        addressing,
        prop::bool::weighted(0.4),
    )
        .prop_map(
            |(ns, labels, ports, phase, host, node, addressing, replica)| {
                let ports = ports
                    .into_iter()
                    .map(|(name, protocol, number)| ContainerPort {
                        name: name.map(String::from),
                        protocol: protocol.map(String::from),
                        container_port: number,
                        ..Default::default()
                    })
                    .collect();
                let pod = Pod {
                    metadata: ObjectMeta {
                        namespace: Some(NAMESPACES[ns].into()),
                        labels: Some(labels),
                        ..Default::default()
                    },
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            name: "c".into(),
                            ports: Some(ports),
                            ..Default::default()
                        }],
                        host_network: host.then_some(true),
                        node_name: Some(node.into()),
                        ..Default::default()
                    }),
                    status: Some(PodStatus {
                        phase: Some(phase.into()),
                        ..Default::default()
                    }),
                };
                (pod, addressing, replica)
            },
        )
}

/// Gives the pods their names and addresses (`hosts`: distinct host numbers); a replica
/// takes the namespace, labels and containers of the pod before it (the same identity).
fn finish_pods(drafts: Vec<(Pod, Addressing, bool)>, hosts: &[u8]) -> Vec<Pod> {
    let mut pods: Vec<Pod> = Vec::with_capacity(drafts.len());
    let mut previous: Option<String> = None;
    for (i, (mut pod, addressing, replica)) in drafts.into_iter().enumerate() {
        pod.metadata.name = Some(format!("pod{i}"));
        if let Some(last) = pods.last().filter(|_| replica) {
            pod.metadata.namespace.clone_from(&last.metadata.namespace);
            pod.metadata.labels.clone_from(&last.metadata.labels);
            if let (Some(spec), Some(from)) = (pod.spec.as_mut(), last.spec.as_ref()) {
                spec.containers.clone_from(&from.containers);
            }
        }
        let host = hosts.get(i).copied().unwrap_or(1);
        let v4 = subnet(host).to_string();
        let v6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(host)).to_string();
        let status = pod.status.get_or_insert_with(Default::default);
        let ips =
            |list: &[&String]| Some(list.iter().map(|ip| PodIP { ip: (*ip).clone() }).collect());
        match addressing {
            Addressing::PodIps => {
                status.pod_ip = Some(v4.clone());
                status.pod_ips = ips(&[&v4]);
            }
            Addressing::DualStack => {
                status.pod_ip = Some(v4.clone());
                status.pod_ips = ips(&[&v4, &v6]);
            }
            Addressing::PodIpOnly => status.pod_ip = Some(v4.clone()),
            Addressing::None => {}
            Addressing::Shared => {
                let ip = previous.clone().unwrap_or_else(|| v4.clone());
                status.pod_ip = Some(ip.clone());
                status.pod_ips = ips(&[&ip]);
            }
        }
        if let Some(ip) = &status.pod_ip {
            previous = Some(ip.clone());
        }
        pods.push(pod);
    }
    pods
}

fn expression(
    keys: &'static [&'static str],
    values: &'static [&'static str],
) -> impl Strategy<Value = LabelSelectorRequirement> {
    (
        select(keys),
        select(OPERATORS),
        vec(select(values), 1..=2),
        0u8..60,
    )
        .prop_map(|(key, op, vals, bad)| {
            let vals: Vec<String> = vals.into_iter().map(String::from).collect();
            let (operator, values) = match (bad, op) {
                // Malformed: In without values, Exists with some, an unknown operator.
                (0, "In" | "NotIn") => (op, Some(Vec::new())),
                (0, _) => (op, Some(vals)),
                (1, _) => ("Equals", Some(vals)),
                (_, "In" | "NotIn") => (op, Some(vals)),
                _ => (op, None),
            };
            LabelSelectorRequirement {
                key: key.into(),
                operator: operator.into(),
                values,
            }
        })
}

fn selector(
    keys: &'static [&'static str],
    values: &'static [&'static str],
) -> impl Strategy<Value = LabelSelector> {
    (
        option::of(labels(keys, values)),
        option::weighted(0.4, vec(expression(keys, values), 0..=2)),
    )
        .prop_map(|(match_labels, match_expressions)| LabelSelector {
            match_labels,
            match_expressions,
        })
}

fn pod_selector() -> impl Strategy<Value = LabelSelector> {
    selector(POD_KEYS, POD_VALUES)
}

fn namespace_selector() -> impl Strategy<Value = LabelSelector> {
    selector(NS_KEYS, NS_VALUES)
}

fn ip_block() -> impl Strategy<Value = IPBlock> {
    let cidr = prop_oneof![
        4 => select(CIDRS).prop_map(String::from),
        1 => (1u8..=60).prop_map(|h| format!("{}/32", subnet(h))),
    ];
    (cidr, vec((1u8..=60, 1u8..=8), 0..=2), 0u8..80).prop_map(|(cidr, holes, bad)| {
        let mut except = Vec::new();
        if let Ok(net) = cidr.parse::<ipnet::IpNet>() {
            for (host, extra) in holes {
                match net {
                    ipnet::IpNet::V4(n) if n.prefix_len() < 32 => {
                        let len = (n.prefix_len() + extra).min(32);
                        let mask = u32::MAX
                            .checked_shl(32 - u32::from(n.prefix_len()))
                            .unwrap_or(0);
                        let addr =
                            (u32::from(subnet(host)) & !mask) | (u32::from(n.network()) & mask);
                        if let Ok(x) = ipnet::Ipv4Net::new(Ipv4Addr::from(addr), len) {
                            except.push(x.trunc().to_string());
                        }
                    }
                    ipnet::IpNet::V6(_) => except.push(format!("fd00::{host:x}/{}", 120 + extra)),
                    ipnet::IpNet::V4(_) => {}
                }
            }
        }
        let (cidr, except) = match bad {
            // Malformed: an impossible prefix, a hole outside, not a CIDR at all, a hole as
            // large as the block.
            0 => ("198.18.0.0/33".to_string(), except),
            1 => (cidr, vec!["203.0.113.0/24".to_string()]),
            3 => (cidr.clone(), vec![cidr]),
            2 => ("not-a-cidr".to_string(), except),
            _ => (cidr, except),
        };
        IPBlock {
            cidr,
            except: (!except.is_empty()).then_some(except),
        }
    })
}

fn peer() -> impl Strategy<Value = NetworkPolicyPeer> {
    prop_oneof![
        16 => pod_selector().prop_map(|s| NetworkPolicyPeer {
            pod_selector: Some(s),
            ..Default::default()
        }),
        12 => namespace_selector().prop_map(|s| NetworkPolicyPeer {
            namespace_selector: Some(s),
            ..Default::default()
        }),
        12 => (pod_selector(), namespace_selector()).prop_map(|(p, n)| NetworkPolicyPeer {
            pod_selector: Some(p),
            namespace_selector: Some(n),
            ..Default::default()
        }),
        16 => ip_block().prop_map(|b| NetworkPolicyPeer {
            ip_block: Some(b),
            ..Default::default()
        }),
        // Malformed: no peer at all, or an ipBlock with a selector.
        1 => Just(NetworkPolicyPeer::default()),
        1 => (ip_block(), pod_selector()).prop_map(|(b, s)| NetworkPolicyPeer {
            ip_block: Some(b),
            pod_selector: Some(s),
            ..Default::default()
        }),
    ]
}

fn protocol() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        4 => Just(None),
        2 => Just(Some("TCP".to_string())),
        2 => Just(Some("UDP".to_string())),
        1 => Just(Some("SCTP".to_string())),
    ]
}

fn port() -> impl Strategy<Value = NetworkPolicyPort> {
    let p = |protocol, port, end_port| NetworkPolicyPort {
        protocol,
        port,
        end_port,
    };
    prop_oneof![
        20 => (protocol(), select(NUMBERS))
            .prop_map(move |(pr, n)| p(pr, Some(IntOrString::Int(n)), None)),
        8 => (protocol(), select(NUMBERS), select(RANGES))
            .prop_map(move |(pr, n, d)| p(pr, Some(IntOrString::Int(n)), Some(n + d))),
        16 => (protocol(), select(PORT_NAMES))
            .prop_map(move |(pr, n)| p(pr, Some(IntOrString::String(n.into())), None)),
        4 => protocol().prop_map(move |pr| p(pr, None, None)),
        // Malformed.
        1 => (0usize..7).prop_map(move |k| match k {
            0 => p(None, Some(IntOrString::Int(0)), None),
            1 => p(None, Some(IntOrString::Int(70000)), None),
            2 => p(None, Some(IntOrString::Int(80)), Some(79)),
            3 => p(None, Some(IntOrString::String("http".into())), Some(90)),
            4 => p(None, Some(IntOrString::String("Bad_Name".into())), None),
            5 => p(Some("ICMP".into()), Some(IntOrString::Int(80)), None),
            _ => p(None, None, Some(80)),
        }),
    ]
}

type RuleParts = (
    Option<Vec<NetworkPolicyPeer>>,
    Option<Vec<NetworkPolicyPort>>,
);

fn rule() -> impl Strategy<Value = RuleParts> {
    let peers = prop_oneof![
        2 => Just(None),
        1 => Just(Some(Vec::new())),
        6 => vec(peer(), 1..=2).prop_map(Some),
    ];
    let ports = prop_oneof![
        3 => Just(None),
        1 => Just(Some(Vec::new())),
        6 => vec(port(), 1..=2).prop_map(Some),
    ];
    // Address blocks with named ports, rare by chance alone: the named ports of the pods
    // in the blocks count, no other address's.
    let blocks = vec(ip_block(), 1..=2).prop_map(|bs| {
        bs.into_iter()
            .map(|b| NetworkPolicyPeer {
                ip_block: Some(b),
                ..Default::default()
            })
            .collect()
    });
    let named = vec((protocol(), select(PORT_NAMES)), 1..=2).prop_map(|ps| {
        ps.into_iter()
            .map(|(protocol, name)| NetworkPolicyPort {
                protocol,
                port: Some(IntOrString::String(name.into())),
                end_port: None,
            })
            .collect()
    });
    prop_oneof![
        8 => (peers, ports),
        1 => (blocks, named).prop_map(|(b, n)| (Some(b), Some(n))),
    ]
}

fn policy_types() -> impl Strategy<Value = Option<Vec<String>>> {
    let v = |t: &[&str]| Some(t.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    prop_oneof![
        4 => Just(None),
        1 => Just(v(&[])),
        3 => Just(v(&["Ingress"])),
        3 => Just(v(&["Egress"])),
        3 => Just(v(&["Ingress", "Egress"])),
        1 => Just(v(&["Egress", "Ingress"])),
        // Malformed.
        1 => Just(v(&["Ingress", "Sideways"])),
    ]
}

fn policy(namespaces: usize) -> impl Strategy<Value = NetworkPolicy> {
    let spec = (
        option::weighted(0.85, pod_selector()),
        policy_types(),
        option::weighted(0.8, vec(rule(), 0..=2)),
        option::weighted(0.6, vec(rule(), 0..=2)),
    )
        .prop_map(
            |(pod_selector, policy_types, ingress, egress)| NetworkPolicySpec {
                pod_selector,
                policy_types,
                ingress: ingress.map(|rules| {
                    rules
                        .into_iter()
                        .map(|(from, ports)| NetworkPolicyIngressRule { from, ports })
                        .collect()
                }),
                egress: egress.map(|rules| {
                    rules
                        .into_iter()
                        .map(|(to, ports)| NetworkPolicyEgressRule { to, ports })
                        .collect()
                }),
            },
        );
    (0..namespaces, option::weighted(0.97, spec)).prop_map(|(ns, spec)| NetworkPolicy {
        metadata: ObjectMeta {
            namespace: Some(NAMESPACES[ns].into()),
            ..Default::default()
        },
        spec,
    })
}

/// A random cluster.
pub fn cluster() -> impl Strategy<Value = Generated> {
    (2usize..=3)
        .prop_flat_map(|n| {
            let namespaces = vec(
                (
                    prop::bool::weighted(0.85),
                    labels(NS_OBJECT_KEYS, NS_OBJECT_VALUES),
                ),
                n,
            );
            let hosts = Just((1u8..=60).collect::<Vec<u8>>()).prop_shuffle();
            // Mostly some policies: a cluster without any says little.
            let policies = prop_oneof![1 => Just(0usize), 9 => 1usize..=5]
                .prop_flat_map(move |k| vec(policy(n), k));
            (
                namespaces,
                vec(pod(n), 3..=8),
                hosts,
                policies,
                prop_oneof![Just(None), Just(Some(NODES[0].to_string()))],
            )
        })
        .prop_map(|(namespaces, drafts, hosts, mut policies, node)| {
            for (i, p) in policies.iter_mut().enumerate() {
                p.metadata.name = Some(format!("p{i}"));
            }
            let namespaces = namespaces
                .into_iter()
                .enumerate()
                .filter(|(_, (exists, _))| *exists)
                .map(|(i, (_, labels))| Namespace {
                    metadata: ObjectMeta {
                        name: Some(NAMESPACES[i].into()),
                        labels: Some(labels),
                        ..Default::default()
                    },
                    ..Default::default()
                })
                .collect();
            Generated {
                policies,
                pods: finish_pods(drafts, &hosts),
                namespaces,
                node,
            }
        })
}

/// Random packets for a cluster, mostly between its pods on the ports it names.
pub fn probes(g: &Generated, count: RangeInclusive<usize>) -> BoxedStrategy<Vec<Probe>> {
    let outside: Vec<IpAddr> = OUTSIDE.iter().filter_map(|a| a.parse().ok()).collect();
    let pods = g.addresses();
    let addr: BoxedStrategy<IpAddr> = if pods.is_empty() {
        select(outside).boxed()
    } else {
        prop_oneof![6 => select(pods), 1 => select(outside)].boxed()
    };
    let named = select(g.ports());
    let any_port = (select(PROTOCOLS), any::<u16>());
    let port = prop_oneof![6 => named, 1 => any_port];
    vec(
        (addr.clone(), addr, port).prop_map(|(src, dst, (protocol, port))| Probe {
            src,
            dst,
            protocol,
            port,
        }),
        count,
    )
    .boxed()
}

/// A random cluster and 96-128 packets for it.
pub fn case() -> impl Strategy<Value = (Generated, Vec<Probe>)> {
    cluster().prop_flat_map(|g| {
        let probes = probes(&g, 96..=128);
        (Just(g), probes)
    })
}
