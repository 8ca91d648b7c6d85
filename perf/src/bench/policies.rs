//! The `stromd-pol` path's NetworkPolicies: 100 policies that all select both benchmark pods,
//! compiled by strom-control from Kubernetes objects as a cluster would have them, and the
//! checks that they let every traffic through (and nothing more).
//!
//! Pods A and B are `bench/pod-a` (`app: bench, role: client`) and `bench/pod-b`
//! (`app: bench, role: server`, named container ports for iperf3, the `crr` server and
//! sockperf). Every policy selects `app: bench` for ingress and egress, so both pods are
//! isolated both ways by all 100 of them and every packet between them is judged. Four of
//! them let the traffic through, each one kind of it, from the client's egress to the
//! server's ingress; the other 96 are rules of the kinds clusters have that match no packet
//! of the benchmark (other apps and namespaces, blocks outside the pods, DNS to kube-dns,
//! port ranges the traffic does not use). No rule lets the server reach the client, so the
//! answers (UDP echoes, TCP ACKs) are denied on their own and stromd tracks every flow to let
//! them pass: the policy stage judges every new flow and conntrack carries the rest, as it
//! does for a real pod behind policies.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use anyhow::{bail, Result};
use strom_api::{PolicySet, PolicyStatus};
use strom_control::manifests::Objects;
use strom_control::policy::{compile, Input};

use crate::topo::{
    CRR_PORT, IPERF_PORT, IP_A, IP_B, SINK_PORT_FIRST, SINK_PORT_LAST, SOCKPERF_PORT,
};
use crate::traffic::Traffic;

/// Policies on the node, every one selecting both pods.
pub const COUNT: usize = 100;
/// The node the two pods run on (the rest of the cluster runs on another).
const NODE: &str = "bench-node";
pub const POD_A: &str = "bench/pod-a";
pub const POD_B: &str = "bench/pod-b";

/// The policy with index `i` among the 100, if it is one that lets a kind of the traffic
/// through (four, spread so that none is first or last): the ports it opens at the server's
/// ingress (from `role: client`) and at the client's egress (to `role: server`). Named ports
/// resolve on pod B.
fn allowing(i: usize) -> Option<(String, String)> {
    let both = |s: String| Some((s.clone(), s));
    match i {
        // strom-pktgen's UDP flows (udp1, udp256, udp65536): the sink ports.
        13 => both(format!(
            "{{protocol: UDP, port: {SINK_PORT_FIRST}, endPort: {SINK_PORT_LAST}}}"
        )),
        // iperf3 (tcp1, tcp4): by name at the server, by number at the client.
        37 => Some(("{port: iperf3}".into(), format!("{{port: {IPERF_PORT}}}"))),
        // sockperf (latency).
        61 => Some((
            "{protocol: UDP, port: sockperf}".into(),
            format!("{{protocol: UDP, port: {SOCKPERF_PORT}}}"),
        )),
        // The crr server (crr): by name on both sides.
        89 => both("{port: http}".into()),
        _ => None,
    }
}

/// The rest of the cluster, on another node: (namespace, name prefix, pods, labels, named
/// ports), addresses from 10.244.1.1 on.
const ELSEWHERE: [(&str, &str, u8, &str, &str); 5] = [
    (
        "shop",
        "web",
        8,
        "app: web, tier: frontend",
        "{name: http, containerPort: 8080}",
    ),
    (
        "shop",
        "db",
        2,
        "app: db, tier: backend",
        "{name: pg, containerPort: 5432}",
    ),
    ("lab", "client", 8, "app: client, role: client", ""),
    (
        "monitoring",
        "prometheus",
        4,
        "app: prometheus",
        "{name: metrics, containerPort: 9090}",
    ),
    (
        "kube-system",
        "coredns",
        2,
        "k8s-app: kube-dns",
        "{name: dns, containerPort: 53, protocol: UDP}, {name: dns-tcp, containerPort: 53}",
    ),
];

/// A running pod as YAML (`labels` and `ports` as flow contents).
fn pod(ns: &str, name: &str, labels: &str, node: &str, ports: &str, ip: Ipv4Addr) -> String {
    format!(
        "kind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: c, ports: [{ports}]}}]}}\n\
         status: {{phase: Running, podIP: {ip}}}\n---\n"
    )
}

/// The cluster: the bench namespace with pods A and B on the node, four other namespaces with
/// 24 pods on another node ([`ELSEWHERE`]), and the 100 policies, as YAML.
pub fn manifests() -> String {
    let mut y = String::new();
    for (ns, labels) in [
        ("bench", "team: perf"),
        ("shop", "team: a"),
        ("lab", "team: b"),
        ("monitoring", "team: ops"),
        ("kube-system", "tier: system"),
    ] {
        let _ = write!(
            y,
            "kind: Namespace\nmetadata: {{name: {ns}, labels: {{{labels}}}}}\n---\n"
        );
    }
    let client = "app: bench, role: client";
    y += &pod("bench", "pod-a", client, NODE, "", IP_A);
    let server_ports = format!(
        "{{name: iperf3, containerPort: {IPERF_PORT}}}, {{name: http, containerPort: {CRR_PORT}}}, \
         {{name: sockperf, containerPort: {SOCKPERF_PORT}, protocol: UDP}}"
    );
    let server = "app: bench, role: server";
    y += &pod("bench", "pod-b", server, NODE, &server_ports, IP_B);
    let mut ip = (1..).map(|n| Ipv4Addr::new(10, 244, 1, n));
    for (ns, prefix, n, labels, ports) in ELSEWHERE {
        for (i, ip) in (0..n).zip(&mut ip) {
            y += &pod(
                ns,
                &format!("{prefix}-{i}"),
                labels,
                "other-node",
                ports,
                ip,
            );
        }
    }
    for i in 0..COUNT {
        let (ingress, egress) = match allowing(i) {
            Some((pi, pe)) => (
                format!(
                    "  - from: [{{podSelector: {{matchLabels: {{role: client}}}}}}]\n    \
                     ports: [{pi}]\n"
                ),
                format!(
                    "  - to: [{{podSelector: {{matchLabels: {{role: server}}}}}}]\n    \
                     ports: [{pe}]\n"
                ),
            ),
            None => other_rules(i),
        };
        let _ = write!(
            y,
            "kind: NetworkPolicy\nmetadata: {{name: bench-{i:03}, namespace: bench}}\nspec:\n  \
             podSelector: {{matchLabels: {{app: bench}}}}\n  policyTypes: [Ingress, Egress]\n  \
             ingress:\n{ingress}  egress:\n{egress}---\n"
        );
    }
    y
}

/// Policy `i`'s rules when it is not one of those [`allowing`] the traffic: of four kinds by
/// `i % 4`, each with peers that are not the bench pods, or the bench pods on ports the
/// traffic does not use. No rule has a peer matching pod A in the server's egress or pod B in
/// the client's ingress, so the answers stay denied on their own.
fn other_rules(i: usize) -> (String, String) {
    let dns =
        "  - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}, \
               podSelector: {matchLabels: {k8s-app: kube-dns}}}]\n    \
               ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 53}]\n";
    match i % 4 {
        // A frontend's: HTTP from the shop's web pods, and DNS.
        0 => (
            format!(
                "  - from: [{{namespaceSelector: {{matchLabels: {{team: a}}}}, podSelector: \
                 {{matchLabels: {{app: web}}}}}}]\n    ports: [{{port: {}}}, {{port: http}}]\n",
                7000 + i
            ),
            dns.to_string(),
        ),
        // Scraped by monitoring; out to the internet (not the pods) on 443.
        1 => (
            format!(
                "  - from: [{{namespaceSelector: {{matchLabels: {{team: ops}}}}}}]\n    \
                 ports: [{{port: {}, endPort: {}}}]\n",
                9100 + i,
                9100 + i + 9
            ),
            "  - to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8, 198.18.0.0/15]}}]\n    \
             ports: [{port: 443}]\n"
                .to_string(),
        ),
        // The bench pods among themselves on ports the traffic does not use, and DNS.
        2 => (
            format!(
                "  - from: [{{podSelector: {{matchLabels: {{role: client}}}}}}]\n    \
                 ports: [{{port: {a}, endPort: {b}}}]\n",
                a = 20000 + 10 * i,
                b = 20009 + 10 * i
            ),
            format!(
                "  - to: [{{podSelector: {{matchLabels: {{role: server}}}}}}]\n    \
                 ports: [{{protocol: UDP, port: {a}, endPort: {b}}}]\n{dns}",
                a = 30000 + 10 * i,
                b = 30009 + 10 * i
            ),
        ),
        // From a partner's network (a block, less a hole); to the databases of two teams.
        _ => (
            format!(
                "  - from: [{{ipBlock: {{cidr: 10.{i}.0.0/16, except: [10.{i}.1.0/24]}}}}]\n    \
                 ports: [{{port: 443}}, {{port: 8443}}]\n"
            ),
            "  - to: [{namespaceSelector: {matchExpressions: [{key: team, operator: In, \
             values: [a, b]}]}, podSelector: {matchLabels: {app: db}}}]\n    \
             ports: [{port: pg}]\n"
                .to_string(),
        ),
    }
}

/// The node's policy set, compiled; fails when the compiler rejects a policy.
pub fn policy_set() -> Result<PolicySet> {
    let mut o = Objects::default();
    o.add_text(&manifests(), "stromd-pol");
    if !o.invalid.is_empty() {
        bail!("the stromd-pol manifests: {:?}", o.invalid);
    }
    if o.network_policies.len() != COUNT {
        bail!(
            "the stromd-pol manifests hold {} policies, not {COUNT}",
            o.network_policies.len()
        );
    }
    let c = compile(&Input {
        policies: &o.network_policies,
        pods: &o.pods,
        namespaces: &o.namespaces,
        node: Some(NODE),
    });
    if !c.rejected.is_empty() {
        bail!(
            "strom-control rejected stromd-pol's policies: {:?}",
            c.rejected
        );
    }
    Ok(c.set)
}

/// Checks what stromd reports after `SetPolicies`: all 100 policies, each selecting both pods
/// in both directions.
pub fn check_selected(policies: &[PolicyStatus]) -> Result<()> {
    if policies.len() != COUNT {
        bail!(
            "stromd reports {} policies selecting the pods, not {COUNT}",
            policies.len()
        );
    }
    for p in policies {
        for (dir, pods) in [("ingress", &p.ingress_pods), ("egress", &p.egress_pods)] {
            for pod in [POD_A, POD_B] {
                if !pods.iter().any(|x| x == pod) {
                    bail!("stromd: {} does not select {pod} for {dir}", p.policy);
                }
            }
        }
    }
    Ok(())
}

/// The port whose tracked flows show that the policies judged `traffic` (any entry with it),
/// and how many entries it must have at least (`None`: the path does not carry it).
pub fn tracked(traffic: Traffic) -> Option<(u16, u64)> {
    match traffic {
        Traffic::Udp(flows) => Some((SINK_PORT_FIRST, u64::from(flows.min(256)))),
        Traffic::Tcp(_) => Some((IPERF_PORT, 1)),
        Traffic::Latency => Some((SOCKPERF_PORT, 1)),
        Traffic::Crr => Some((CRR_PORT, 1)),
        Traffic::Pods(_) => None,
    }
}

/// The policies' drop counts: their sum, and per direction how many policies counted drops
/// and how many each ("egress: 100 policies, 1 each (bench/bench-000, ...)"). A drop is
/// counted against every policy isolating the pod, so one denied packet shows on all 100.
pub fn drops(policies: &[PolicyStatus]) -> (u64, String) {
    let mut total = 0;
    let mut parts = Vec::new();
    for dir in ["ingress", "egress"] {
        let counted: Vec<(&str, u64)> = policies
            .iter()
            .map(|p| match dir {
                "ingress" => (p.policy.as_str(), p.ingress_drops),
                _ => (p.policy.as_str(), p.egress_drops),
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        let Some(&(first, _)) = counted.first() else {
            continue;
        };
        total += counted.iter().map(|(_, n)| n).sum::<u64>();
        let lo = counted.iter().map(|(_, n)| *n).min().unwrap_or(0);
        let hi = counted.iter().map(|(_, n)| *n).max().unwrap_or(0);
        let each = if lo == hi {
            format!("{lo} each")
        } else {
            format!("{lo}-{hi} each")
        };
        let more = if counted.len() > 1 { ", ..." } else { "" };
        parts.push(format!(
            "{dir}: {} policies, {each} ({first}{more})",
            counted.len()
        ));
    }
    (total, parts.join("; "))
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use strom_api::Protocol;
    use strom_control::policy::reference::evaluate;

    use super::*;

    fn allowed(set: &PolicySet, src: Ipv4Addr, dst: Ipv4Addr, p: Protocol, port: u16) -> bool {
        evaluate(set, IpAddr::V4(src), IpAddr::V4(dst), p, port)
    }

    #[test]
    fn every_policy_isolates_both_pods_both_ways() {
        let set = policy_set().unwrap();
        assert_eq!(set.pods.len(), 2);
        for pod in &set.pods {
            assert!(pod.pod == POD_A || pod.pod == POD_B, "{}", pod.pod);
            for g in [pod.ingress, pod.egress] {
                let g = &set.groups[g.expect("isolated both ways") as usize];
                assert_eq!(g.policies.len(), COUNT, "{:?}", g.policies);
            }
        }
        assert!(
            set.peers.len() > 2,
            "the rest of the cluster has identities"
        );
    }

    /// What every traffic kind sends from pod A to pod B passes; the answers do not on their own
    /// (so stromd tracks each flow); nothing else passes.
    #[test]
    fn the_traffic_passes_and_its_answers_need_conntrack() {
        let set = policy_set().unwrap();
        let (udp, tcp) = (Protocol::Udp, Protocol::Tcp);
        for port in SINK_PORT_FIRST..=SINK_PORT_LAST {
            assert!(allowed(&set, IP_A, IP_B, udp, port), "udp {port}");
        }
        assert!(allowed(&set, IP_A, IP_B, udp, SOCKPERF_PORT));
        assert!(allowed(&set, IP_A, IP_B, tcp, IPERF_PORT));
        assert!(allowed(&set, IP_A, IP_B, tcp, CRR_PORT));
        // Answers to any port pod A may send from (ports 1024-65535 with the crr sysctls), and
        // the traffic's own ports the other way round.
        let bench_ports = [
            SINK_PORT_FIRST,
            SINK_PORT_LAST,
            IPERF_PORT,
            CRR_PORT,
            SOCKPERF_PORT,
        ];
        for port in (0..=u16::MAX).step_by(7).chain(bench_ports) {
            for p in [udp, tcp] {
                assert!(!allowed(&set, IP_B, IP_A, p, port), "{p:?} {port} to A");
            }
        }
        // Nothing the traffic does not use, however near.
        for (p, port) in [
            (tcp, SINK_PORT_FIRST),
            (udp, SINK_PORT_FIRST - 1),
            (udp, SINK_PORT_LAST + 1),
            (udp, IPERF_PORT),
            (tcp, IPERF_PORT + 1),
            (udp, CRR_PORT),
            (tcp, SOCKPERF_PORT),
            (tcp, 22),
            (tcp, 53),
            (udp, 30000),
        ] {
            assert!(!allowed(&set, IP_A, IP_B, p, port), "{p:?} {port}");
        }
        // The 96 other policies do open ports, to other peers (kube-dns, the internet).
        assert!(allowed(&set, IP_A, "10.244.1.23".parse().unwrap(), udp, 53));
        assert!(!allowed(
            &set,
            IP_A,
            "10.244.1.22".parse().unwrap(),
            udp,
            53
        ));
        assert!(allowed(
            &set,
            IP_A,
            "203.0.113.7".parse().unwrap(),
            tcp,
            443
        ));
    }

    #[test]
    fn every_traffic_kind_the_path_carries_has_a_tracked_port() {
        for t in crate::traffic::ALL {
            let pods = matches!(t, Traffic::Pods(_));
            assert_eq!(tracked(t).is_none(), pods, "{}", t.name());
            assert_eq!(
                crate::paths::Path::StromdPol.serves(t),
                !pods,
                "{}",
                t.name()
            );
        }
        assert_eq!(tracked(Traffic::Udp(65536)), Some((SINK_PORT_FIRST, 256)));
    }

    #[test]
    fn stromds_report_is_checked() {
        let status = |name: &str, pods: &[&str], drops: u64| PolicyStatus {
            policy: name.into(),
            ingress_drops: drops,
            egress_drops: 0,
            ingress_pods: pods.iter().map(|p| p.to_string()).collect(),
            egress_pods: pods.iter().map(|p| p.to_string()).collect(),
        };
        let mut all: Vec<PolicyStatus> = (0..COUNT)
            .map(|i| status(&format!("bench/bench-{i:03}"), &[POD_A, POD_B], 0))
            .collect();
        check_selected(&all).unwrap();
        assert_eq!(drops(&all), (0, String::new()));
        all[5] = status("bench/bench-005", &[POD_A], 3);
        assert!(check_selected(&all).is_err());
        assert_eq!(
            drops(&all),
            (3, "ingress: 1 policies, 3 each (bench/bench-005)".into())
        );
        for p in &mut all[7..] {
            p.egress_drops = 2;
        }
        all[9].egress_drops = 5;
        assert_eq!(
            drops(&all).1,
            "ingress: 1 policies, 3 each (bench/bench-005); \
             egress: 93 policies, 2-5 each (bench/bench-007, ...)"
        );
        all.pop();
        assert!(check_selected(&all).is_err());
    }
}
