//! NetworkPolicy compilation, one semantic at a time on small manifests (each verdict taken
//! both from the compiled set and from the reference evaluator, which must agree), then the
//! two against each other on random clusters.

use std::net::IpAddr;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use strom_api::{Direction, Peers, PolicySet, Protocol};

use super::reference::{allowed, evaluate};
use super::{arbitrary, compile, defaulted, Compiled, Input};
use crate::manifests::Objects;

const TCP: Protocol = Protocol::Tcp;
const UDP: Protocol = Protocol::Udp;
const SCTP: Protocol = Protocol::Sctp;

/// A pod on node n1: `labels` and `ports` as YAML flow contents.
fn pod(ns: &str, name: &str, ip: &str, labels: &str, ports: &str) -> String {
    format!(
        "kind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
         spec: {{nodeName: n1, containers: [{{name: c, ports: [{ports}]}}]}}\n\
         status: {{phase: Running, podIP: {ip}}}\n---\n"
    )
}

/// Namespaces shop (team a) and lab (team b); in shop, web (.1, named ports http 8080/TCP
/// and dns 53/UDP), db (.2) and client (.4); in lab, client (.3) and other (.5).
fn base() -> String {
    [
        "kind: Namespace\nmetadata: {name: shop, labels: {team: a}}\n---\n".to_string(),
        "kind: Namespace\nmetadata: {name: lab, labels: {team: b}}\n---\n".to_string(),
        pod(
            "shop",
            "web",
            "198.18.0.1",
            "app: web",
            "{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}",
        ),
        pod("shop", "db", "198.18.0.2", "app: db", ""),
        pod("shop", "client", "198.18.0.4", "app: client", ""),
        pod("lab", "client", "198.18.0.3", "app: client", ""),
        pod("lab", "other", "198.18.0.5", "app: other", ""),
    ]
    .concat()
}

const WEB: &str = "198.18.0.1";
const DB: &str = "198.18.0.2";
const LAB_CLIENT: &str = "198.18.0.3";
const SHOP_CLIENT: &str = "198.18.0.4";
const LAB_OTHER: &str = "198.18.0.5";
const OUTSIDE: &str = "8.8.8.8";

fn objects(yaml: &str) -> Objects {
    let mut o = Objects::default();
    o.add_text(yaml, "t.yaml");
    assert!(o.invalid.is_empty(), "{:?}", o.invalid);
    o
}

fn input(o: &Objects) -> Input<'_> {
    Input {
        policies: &o.network_policies,
        pods: &o.pods,
        namespaces: &o.namespaces,
        node: None,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The verdict on a packet, the same from the compiled set and from the reference.
fn verdict(input: &Input, src: &str, dst: &str, protocol: Protocol, port: u16) -> bool {
    let c = compile(input);
    let compiled = evaluate(&c.set, ip(src), ip(dst), protocol, port);
    let reference = allowed(input, ip(src), ip(dst), protocol, port);
    assert_eq!(
        compiled, reference,
        "{src} -> {dst} {protocol:?}/{port}: compiled {compiled}, reference {reference}\n{:#?}",
        c.set
    );
    compiled
}

fn tcp(input: &Input, src: &str, dst: &str, port: u16) -> bool {
    verdict(input, src, dst, TCP, port)
}

/// `base()` and these policies, compiled with no rejection.
fn with(policies: &str) -> Objects {
    let o = objects(&format!("{}{policies}", base()));
    let c = compile(&input(&o));
    assert!(c.rejected.is_empty(), "{:?}", c.rejected);
    o
}

fn identity(set: &PolicySet, addr: &str) -> Option<u32> {
    set.peers
        .iter()
        .find(|p| p.ip == ip(addr))
        .map(|p| p.identity)
}

fn isolated<'a>(set: &'a PolicySet, pod: &str) -> Option<&'a strom_api::IsolatedPod> {
    set.pods.iter().find(|p| p.pod == pod)
}

#[test]
fn a_pod_no_policy_selects_is_open_both_ways() {
    let o = with(
        "kind: NetworkPolicy\nmetadata: {name: db, namespace: shop}\n\
         spec: {podSelector: {matchLabels: {app: db}}}\n",
    );
    let i = input(&o);
    assert!(!tcp(&i, WEB, DB, 5432), "db is isolated for ingress");
    assert!(
        tcp(&i, DB, WEB, 80),
        "db is not isolated for egress, web not at all"
    );
    assert!(tcp(&i, LAB_CLIENT, WEB, 80));
    assert!(tcp(&i, WEB, OUTSIDE, 443));
    let set = compile(&i).set;
    assert_eq!(set.pods.len(), 1);
    assert_eq!(isolated(&set, "shop/db").unwrap().egress, None);
}

#[test]
fn policies_add_up_and_their_order_does_not_matter() {
    let o = with(
        "kind: NetworkPolicy\nmetadata: {name: from-clients, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  \
         ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 80}]}]\n---\n\
         kind: NetworkPolicy\nmetadata: {name: from-db, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  \
         ingress: [{from: [{podSelector: {matchLabels: {app: db}}}], ports: [{port: 5432}]}]\n",
    );
    let i = input(&o);
    assert!(tcp(&i, SHOP_CLIENT, WEB, 80));
    assert!(!tcp(&i, SHOP_CLIENT, WEB, 5432));
    assert!(tcp(&i, DB, WEB, 5432));
    assert!(!tcp(&i, DB, WEB, 80));
    let mut reversed = o.network_policies.clone();
    reversed.reverse();
    let r = Input {
        policies: &reversed,
        ..i
    };
    assert_eq!(compile(&i), compile(&r));
    let set = compile(&i).set;
    let g = &set.groups[isolated(&set, "shop/web").unwrap().ingress.unwrap() as usize];
    assert_eq!(g.policies, ["shop/from-clients", "shop/from-db"]);
}

#[test]
fn policy_types_default_to_ingress_and_to_egress_only_with_egress_rules() {
    let o = with(
        "kind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  \
         egress: [{to: [{podSelector: {matchLabels: {app: db}}}]}]\n",
    );
    let i = input(&o);
    assert!(tcp(&i, WEB, DB, 5432), "egress to db allowed");
    assert!(
        !tcp(&i, WEB, SHOP_CLIENT, 80),
        "egress isolated: it has egress rules"
    );
    assert!(
        !tcp(&i, SHOP_CLIENT, WEB, 80),
        "ingress isolated: always, no rule"
    );
    let d = defaulted(&o.network_policies[0]);
    assert_eq!(d.spec.unwrap().policy_types.unwrap(), ["Ingress", "Egress"]);
}

#[test]
fn an_empty_egress_list_without_policy_types_restricts_nothing_outbound() {
    let o = with(
        "kind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\n\
         spec: {podSelector: {matchLabels: {app: web}}, egress: []}\n",
    );
    let i = input(&o);
    assert!(tcp(&i, WEB, DB, 5432));
    assert!(tcp(&i, WEB, OUTSIDE, 443));
    assert!(!tcp(&i, DB, WEB, 80));
    let d = defaulted(&o.network_policies[0]);
    assert_eq!(d.spec.unwrap().policy_types.unwrap(), ["Ingress"]);
}

#[test]
fn policy_types_given_are_kept_egress_alone_leaves_ingress_open() {
    let o = with(
        "kind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\n\
         spec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Egress]}\n",
    );
    let i = input(&o);
    assert!(!tcp(&i, WEB, DB, 5432), "egress isolated, no rule");
    assert!(!tcp(&i, WEB, OUTSIDE, 443));
    assert!(tcp(&i, DB, WEB, 80), "ingress open");
    let set = compile(&i).set;
    let web = isolated(&set, "shop/web").unwrap();
    assert_eq!(web.ingress, None);
    assert!(set.groups[web.egress.unwrap() as usize].rules.is_empty());
}

#[test]
fn a_port_without_protocol_is_tcp() {
    let o = with(
        "kind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\n\
         spec: {podSelector: {matchLabels: {app: web}}, ingress: [{ports: [{port: 53}]}]}\n",
    );
    let i = input(&o);
    assert!(verdict(&i, DB, WEB, TCP, 53));
    assert!(!verdict(&i, DB, WEB, UDP, 53));
    assert!(!verdict(&i, DB, WEB, SCTP, 53));
}

#[test]
fn defaulted_fills_what_the_api_server_does_and_is_idempotent() {
    let o = objects(
        "kind: NetworkPolicy\nmetadata: {name: a}\n---\n\
         kind: NetworkPolicy\nmetadata: {name: b}\n\
         spec:\n  policyTypes: [Egress]\n  ingress: [{ports: [{port: 80}, {protocol: UDP, port: 53}]}]\n  \
         egress: [{ports: [{port: http}]}]\n",
    );
    let a = defaulted(&o.network_policies[0]);
    let spec = a.spec.as_ref().unwrap();
    assert_eq!(spec.pod_selector, Some(Default::default()));
    assert_eq!(spec.policy_types.as_deref().unwrap(), ["Ingress"]);
    let b = defaulted(&o.network_policies[1]);
    let spec = b.spec.as_ref().unwrap();
    assert_eq!(
        spec.policy_types.as_deref().unwrap(),
        ["Egress"],
        "given types are kept"
    );
    let ports = spec.ingress.as_ref().unwrap()[0].ports.as_ref().unwrap();
    assert_eq!(ports[0].protocol.as_deref(), Some("TCP"));
    assert_eq!(ports[1].protocol.as_deref(), Some("UDP"));
    let egress = spec.egress.as_ref().unwrap()[0].ports.as_ref().unwrap();
    assert_eq!(egress[0].protocol.as_deref(), Some("TCP"));
    for p in [&a, &b] {
        assert_eq!(&defaulted(p), p);
    }
}

#[test]
fn a_policy_without_spec_denies_ingress_to_its_whole_namespace() {
    // As the API server stores it: an empty podSelector, policyTypes [Ingress].
    let o = with("kind: NetworkPolicy\nmetadata: {name: bare, namespace: shop}\n");
    let i = input(&o);
    assert!(!tcp(&i, LAB_CLIENT, WEB, 80));
    assert!(!tcp(&i, LAB_CLIENT, DB, 80));
    assert!(tcp(&i, WEB, LAB_CLIENT, 80));
    assert!(tcp(&i, WEB, LAB_OTHER, 80), "lab is not selected");
}

#[test]
fn a_pod_selector_peer_is_the_policy_namespace_only() {
    let o = with(
        "kind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  \
         ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]\n",
    );
    let i = input(&o);
    assert!(tcp(&i, SHOP_CLIENT, WEB, 80));
    assert!(
        !tcp(&i, LAB_CLIENT, WEB, 80),
        "same labels, other namespace"
    );
    assert!(!tcp(&i, DB, WEB, 80));
}

#[test]
fn a_namespace_selector_peer_takes_every_pod_of_the_namespaces_it_matches() {
    let o = with(
        "kind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  \
         ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}}]}]\n",
    );
    let i = input(&o);
    assert!(tcp(&i, LAB_CLIENT, WEB, 80));
    assert!(tcp(&i, LAB_OTHER, WEB, 80));
    assert!(
        !tcp(&i, SHOP_CLIENT, WEB, 80),
        "its own namespace is not team b"
    );
    assert!(!tcp(&i, OUTSIDE, WEB, 80));
}

#[test]
fn pod_and_namespace_selectors_in_one_peer_must_both_match() {
    let o = with(
        "kind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  \
         ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}, \
         podSelector: {matchLabels: {app: client}}}]}]\n",
    );
    let i = input(&o);
    assert!(tcp(&i, LAB_CLIENT, WEB, 80));
    assert!(!tcp(&i, LAB_OTHER, WEB, 80), "right namespace, wrong pod");
    assert!(!tcp(&i, SHOP_CLIENT, WEB, 80), "right pod, wrong namespace");
}

#[test]
fn two_peers_of_a_rule_either_match() {
    let o = with(
        "kind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  \
         ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}}, \
         {podSelector: {matchLabels: {app: db}}}]}]\n",
    );
    let i = input(&o);
    assert!(tcp(&i, LAB_OTHER, WEB, 80));
    assert!(tcp(&i, DB, WEB, 80));
    assert!(!tcp(&i, SHOP_CLIENT, WEB, 80));
}

#[test]
fn match_expressions_in_not_in_exists_and_does_not_exist() {
    // Targets t-<op> (.10-.14) each selected by a policy letting in the clients its
    // expression selects: front (.20, tier front), back (.21, tier back), plain (.22, no tier).
    let mut yaml = String::new();
    for (n, (op, expr)) in [
        ("in", "{key: tier, operator: In, values: [front]}"),
        ("notin", "{key: tier, operator: NotIn, values: [front]}"),
        ("exists", "{key: tier, operator: Exists}"),
        ("dne", "{key: tier, operator: DoesNotExist}"),
        ("and", "{key: tier, operator: In, values: [front, back]}"),
    ]
    .into_iter()
    .enumerate()
    {
        yaml += &pod(
            "shop",
            &format!("t-{op}"),
            &format!("198.18.0.{}", 10 + n),
            &format!("target: {op}"),
            "",
        );
        let labels = if op == "and" {
            "matchLabels: {app: c}, "
        } else {
            ""
        };
        yaml += &format!(
            "kind: NetworkPolicy\nmetadata: {{name: {op}, namespace: shop}}\n\
             spec:\n  podSelector: {{matchLabels: {{target: {op}}}}}\n  \
             ingress: [{{from: [{{podSelector: {{{labels}matchExpressions: [{expr}]}}}}]}}]\n---\n"
        );
    }
    yaml += &pod("shop", "front", "198.18.0.20", "tier: front, app: c", "");
    yaml += &pod("shop", "back", "198.18.0.21", "tier: back", "");
    yaml += &pod("shop", "plain", "198.18.0.22", "app: c", "");
    let o = objects(&yaml);
    let i = input(&o);
    assert!(compile(&i).rejected.is_empty());
    let from = |target: &str| -> Vec<bool> {
        ["198.18.0.20", "198.18.0.21", "198.18.0.22"]
            .iter()
            .map(|src| tcp(&i, src, target, 80))
            .collect()
    };
    assert_eq!(from("198.18.0.10"), [true, false, false], "In");
    assert_eq!(
        from("198.18.0.11"),
        [false, true, true],
        "NotIn: an absent key too"
    );
    assert_eq!(from("198.18.0.12"), [true, true, false], "Exists");
    assert_eq!(from("198.18.0.13"), [false, false, true], "DoesNotExist");
    assert_eq!(
        from("198.18.0.14"),
        [true, false, false],
        "matchLabels and expressions"
    );
}

#[test]
fn an_empty_selector_selects_everything_in_its_scope() {
    let o = with(
        "kind: NetworkPolicy\nmetadata: {name: all, namespace: shop}\n\
         spec:\n  podSelector: {}\n  ingress: [{from: [{podSelector: {}}]}]\n---\n\
         kind: NetworkPolicy\nmetadata: {name: all, namespace: lab}\n\
         spec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}}]}]\n",
    );
    let i = input(&o);
    assert!(tcp(&i, DB, WEB, 80), "every pod of shop");
    assert!(tcp(&i, SHOP_CLIENT, DB, 80));
    assert!(
        !tcp(&i, LAB_CLIENT, WEB, 80),
        "podSelector {{}}: its own namespace only"
    );
    assert!(
        tcp(&i, WEB, LAB_CLIENT, 80),
        "namespaceSelector {{}}: every namespace"
    );
    assert!(tcp(&i, LAB_OTHER, LAB_CLIENT, 80));
    assert!(!tcp(&i, OUTSIDE, LAB_CLIENT, 80), "but pods only");
    assert_eq!(compile(&i).set.pods.len(), 5);
}

#[test]
fn no_or_an_empty_from_allows_every_address() {
    for rule in ["{}", "{from: []}", "{to: []}"] {
        let dir = if rule.contains("to") {
            "egress"
        } else {
            "ingress"
        };
        let o = with(&format!(
            "kind: NetworkPolicy\nmetadata: {{name: web, namespace: shop}}\n\
             spec: {{podSelector: {{matchLabels: {{app: web}}}}, policyTypes: [Ingress, Egress], \
             {dir}: [{rule}]}}\n"
        ));
        let i = input(&o);
        let (open, shut) = if dir == "ingress" {
            ((OUTSIDE, WEB), (WEB, OUTSIDE))
        } else {
            ((WEB, OUTSIDE), (OUTSIDE, WEB))
        };
        assert!(tcp(&i, open.0, open.1, 1), "{rule}");
        assert!(verdict(&i, open.0, open.1, UDP, 65535), "{rule}");
        assert!(
            !tcp(&i, shut.0, shut.1, 1),
            "{rule}: the other way has no rule"
        );
        let set = compile(&i).set;
        let rules: Vec<_> = set.groups.iter().flat_map(|g| &g.rules).collect();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].peers, Peers::Any);
        assert_eq!(rules[0].ports, None);
    }
}

#[test]
fn an_ip_block_matches_every_address_in_it_but_its_excepts_pods_included() {
    let o = with(
        "kind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  \
         ingress: [{from: [{ipBlock: {cidr: 198.18.0.0/24, except: [198.18.0.4/32]}}]}]\n",
    );
    let i = input(&o);
    assert!(tcp(&i, LAB_CLIENT, WEB, 80), "a pod's address");
    assert!(tcp(&i, "198.18.0.99", WEB, 80), "an address of no pod");
    assert!(!tcp(&i, SHOP_CLIENT, WEB, 80), "excepted");
    assert!(!tcp(&i, "10.0.0.1", WEB, 80), "outside the block");
}

#[test]
fn ip_block_prefixes_are_written_without_host_bits() {
    let o = with(
        "kind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  \
         ingress: [{from: [{ipBlock: {cidr: 198.18.0.7/24, except: [198.18.0.9/30]}}]}]\n",
    );
    let set = compile(&input(&o)).set;
    let Peers::Some { blocks, .. } = &set.groups[0].rules[0].peers else {
        panic!("{set:?}");
    };
    assert_eq!(blocks[0].cidr, "198.18.0.0/24");
    assert_eq!(blocks[0].except, ["198.18.0.8/30"]);
    assert!(!tcp(&input(&o), "198.18.0.11", WEB, 80));
    assert!(tcp(&input(&o), "198.18.0.12", WEB, 80));
}

#[test]
fn numeric_ports_and_end_port_ranges_of_each_protocol() {
    let o = with(
        "kind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  \
         ingress: [{ports: [{port: 80}, {protocol: UDP, port: 1000, endPort: 1010}, \
         {protocol: SCTP, port: 9000}]}]\n",
    );
    let i = input(&o);
    let v = |p, n| verdict(&i, DB, WEB, p, n);
    assert!(v(TCP, 80));
    assert!(!v(TCP, 81));
    assert!(!v(TCP, 79));
    assert!(!v(UDP, 999));
    assert!(v(UDP, 1000));
    assert!(v(UDP, 1005));
    assert!(v(UDP, 1010));
    assert!(!v(UDP, 1011));
    assert!(!v(TCP, 1005), "the range is UDP's");
    assert!(v(SCTP, 9000));
    assert!(!v(UDP, 9000));
}

#[test]
fn a_port_entry_without_a_number_opens_every_port_of_its_protocol() {
    let o = with(
        "kind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\n\
         spec: {podSelector: {matchLabels: {app: web}}, ingress: [{ports: [{protocol: UDP}]}]}\n",
    );
    let i = input(&o);
    assert!(verdict(&i, DB, WEB, UDP, 1));
    assert!(verdict(&i, DB, WEB, UDP, 65535));
    assert!(!verdict(&i, DB, WEB, TCP, 80));
}

#[test]
fn a_rule_without_ports_opens_every_port_of_every_protocol() {
    for ports in ["", ", ports: []"] {
        let o = with(&format!(
            "kind: NetworkPolicy\nmetadata: {{name: web, namespace: shop}}\n\
             spec: {{podSelector: {{matchLabels: {{app: web}}}}, \
             ingress: [{{from: [{{podSelector: {{matchLabels: {{app: db}}}}}}]{ports}}}]}}\n"
        ));
        let i = input(&o);
        for p in [TCP, UDP, SCTP] {
            assert!(verdict(&i, DB, WEB, p, 1), "{ports:?}");
            assert!(verdict(&i, DB, WEB, p, 65535), "{ports:?}");
        }
        assert!(!tcp(&i, SHOP_CLIENT, WEB, 80));
    }
}

/// base(), plus api (.6, http on 9090/TCP) and the given policies.
fn with_api(policies: &str) -> Objects {
    let api = pod(
        "shop",
        "api",
        "198.18.0.6",
        "app: web",
        "{name: http, containerPort: 9090}",
    );
    let o = objects(&format!("{}{api}{policies}", base()));
    assert!(compile(&input(&o)).rejected.is_empty());
    o
}
const API: &str = "198.18.0.6";

#[test]
fn an_ingress_named_port_is_the_selected_pods_by_name_and_protocol() {
    let o = with_api(
        "kind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  \
         ingress: [{ports: [{port: http}, {port: dns}]}]\n",
    );
    let i = input(&o);
    assert!(tcp(&i, DB, WEB, 8080), "web's http");
    assert!(!tcp(&i, DB, WEB, 9090));
    assert!(tcp(&i, DB, API, 9090), "api's http");
    assert!(!tcp(&i, DB, API, 8080));
    assert!(!tcp(&i, DB, WEB, 53), "web's dns is UDP, the policy's TCP");
    assert!(!verdict(&i, DB, WEB, UDP, 53));
    let set = compile(&i).set;
    let (w, a) = (
        isolated(&set, "shop/web").unwrap(),
        isolated(&set, "shop/api").unwrap(),
    );
    assert_ne!(w.ingress, a.ingress, "the same policies, other named ports");

    let o = with_api(
        "kind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  \
         ingress: [{ports: [{protocol: UDP, port: dns}]}]\n",
    );
    let i = input(&o);
    assert!(verdict(&i, DB, WEB, UDP, 53));
    assert!(!tcp(&i, DB, WEB, 53));
    assert!(
        !verdict(&i, DB, API, UDP, 53),
        "api has no dns: nothing opens"
    );
}

#[test]
fn named_ports_count_beside_policies_without_them() {
    let o = with_api(
        "kind: NetworkPolicy\nmetadata: {name: a-numbered, namespace: shop}\n\
         spec: {podSelector: {matchLabels: {app: web}}, ingress: [{ports: [{port: 80}]}]}\n---\n\
         kind: NetworkPolicy\nmetadata: {name: b-named, namespace: shop}\n\
         spec: {podSelector: {matchLabels: {app: web}}, ingress: [{ports: [{port: http}]}]}\n",
    );
    let i = input(&o);
    assert!(tcp(&i, DB, WEB, 80));
    assert!(tcp(&i, DB, WEB, 8080));
    assert!(tcp(&i, DB, API, 80));
    assert!(tcp(&i, DB, API, 9090));
    assert!(!tcp(&i, DB, API, 8080));
}

#[test]
fn an_egress_named_port_is_each_destinations() {
    let o = with_api(
        "kind: NetworkPolicy\nmetadata: {name: client, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  \
         egress: [{to: [{podSelector: {}}], ports: [{port: http}]}]\n",
    );
    let i = input(&o);
    assert!(tcp(&i, SHOP_CLIENT, WEB, 8080));
    assert!(!tcp(&i, SHOP_CLIENT, WEB, 9090));
    assert!(tcp(&i, SHOP_CLIENT, API, 9090));
    assert!(!tcp(&i, SHOP_CLIENT, API, 8080));
    assert!(!tcp(&i, SHOP_CLIENT, DB, 8080), "db has no http");
    assert!(!tcp(&i, SHOP_CLIENT, LAB_CLIENT, 8080), "not a peer");
}

#[test]
fn an_egress_named_port_without_peers_opens_the_pods_that_have_it_and_no_other_address() {
    let o = with_api(
        "kind: NetworkPolicy\nmetadata: {name: client, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  \
         egress: [{ports: [{port: http}]}]\n",
    );
    let i = input(&o);
    assert!(tcp(&i, SHOP_CLIENT, WEB, 8080));
    assert!(tcp(&i, SHOP_CLIENT, API, 9090));
    assert!(!tcp(&i, SHOP_CLIENT, API, 8080));
    assert!(
        !tcp(&i, SHOP_CLIENT, OUTSIDE, 8080),
        "no pod: a named port never matches"
    );
    assert!(!tcp(&i, SHOP_CLIENT, "198.18.0.99", 8080));
}

#[test]
fn an_egress_named_port_to_an_ip_block_opens_the_pods_in_it_that_have_it() {
    let o = with_api(
        "kind: NetworkPolicy\nmetadata: {name: client, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  \
         egress: [{to: [{ipBlock: {cidr: 198.18.0.0/29, except: [198.18.0.4/30]}}], \
         ports: [{port: http}, {port: 7}]}]\n",
    );
    let i = input(&o);
    assert!(tcp(&i, SHOP_CLIENT, WEB, 8080), "web is in the block");
    assert!(!tcp(&i, SHOP_CLIENT, API, 9090), "api is in an except");
    assert!(!tcp(&i, SHOP_CLIENT, DB, 8080), "db is, without http");
    assert!(
        tcp(&i, SHOP_CLIENT, DB, 7),
        "numbered ports: every address of the block"
    );
    assert!(tcp(&i, SHOP_CLIENT, "198.18.0.0", 7));
    assert!(!tcp(&i, SHOP_CLIENT, "198.18.0.0", 8080));
}

#[test]
fn a_named_port_only_some_addresses_of_an_identity_are_in_the_block_of_opens_those() {
    // web and web2 share an identity; the block holds web's address only.
    let o = objects(&format!(
        "{}{}kind: NetworkPolicy\nmetadata: {{name: client, namespace: shop}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: client}}}}\n  policyTypes: [Egress]\n  \
         egress: [{{to: [{{ipBlock: {{cidr: 198.18.0.1/32}}}}], ports: [{{port: http}}]}}]\n",
        base(),
        pod(
            "shop",
            "web2",
            "198.18.0.7",
            "app: web",
            "{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}"
        ),
    ));
    let i = input(&o);
    let set = compile(&i).set;
    assert_eq!(identity(&set, WEB), identity(&set, "198.18.0.7"));
    assert!(tcp(&i, SHOP_CLIENT, WEB, 8080));
    assert!(!tcp(&i, SHOP_CLIENT, "198.18.0.7", 8080));
}

#[test]
fn a_named_port_no_pod_has_opens_nothing() {
    let o = with(
        "kind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress, Egress]\n  \
         ingress: [{ports: [{port: nope}]}]\n  egress: [{ports: [{port: nope}]}]\n",
    );
    let i = input(&o);
    for port in [1, 53, 80, 8080] {
        assert!(!tcp(&i, DB, WEB, port));
        assert!(!tcp(&i, WEB, DB, port));
    }
}

#[test]
fn pods_without_an_address_finished_or_on_the_host_network_are_neither_isolated_nor_peers() {
    let o = with(
        "kind: Pod\nmetadata: {name: done, namespace: shop, labels: {app: web}}\n\
         spec: {containers: []}\nstatus: {phase: Succeeded, podIP: 198.18.0.10}\n---\n\
         kind: Pod\nmetadata: {name: failed, namespace: shop, labels: {app: web}}\n\
         spec: {containers: []}\nstatus: {phase: Failed, podIP: 198.18.0.11}\n---\n\
         kind: Pod\nmetadata: {name: host, namespace: shop, labels: {app: web}}\n\
         spec: {hostNetwork: true, containers: []}\nstatus: {phase: Running, podIP: 198.18.0.12}\n---\n\
         kind: Pod\nmetadata: {name: new, namespace: shop, labels: {app: web}}\n\
         spec: {containers: []}\nstatus: {phase: Pending}\n---\n\
         kind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress, Egress]\n  \
         ingress: [{from: [{podSelector: {}}]}]\n  egress: [{to: [{podSelector: {}}]}]\n",
    );
    let i = input(&o);
    let set = compile(&i).set;
    let pods: Vec<&str> = set.pods.iter().map(|p| p.pod.as_str()).collect();
    assert_eq!(pods, ["shop/web"]);
    for gone in ["198.18.0.10", "198.18.0.11", "198.18.0.12"] {
        assert_eq!(identity(&set, gone), None, "{gone}");
        assert!(!tcp(&i, gone, WEB, 80), "{gone} is no pod to the policy");
        assert!(tcp(&i, gone, DB, 80), "{gone}: nothing isolates it");
    }
    assert!(tcp(&i, DB, WEB, 80));
}

#[test]
fn pod_ips_come_before_pod_ip() {
    let o = with(
        "kind: Pod\nmetadata: {name: dual, namespace: shop}\nspec: {containers: []}\n\
         status: {podIP: 198.18.0.21, podIPs: [{ip: 198.18.0.20}, {ip: 'fd00::20'}]}\n---\n\
         kind: Pod\nmetadata: {name: single, namespace: shop}\nspec: {containers: []}\n\
         status: {podIP: 198.18.0.22}\n",
    );
    let set = compile(&input(&o)).set;
    let peers: Vec<String> = set.peers.iter().map(|p| p.ip.to_string()).collect();
    assert!(peers.contains(&"198.18.0.20".into()));
    assert!(peers.contains(&"fd00::20".into()));
    assert!(!peers.contains(&"198.18.0.21".into()));
    assert!(peers.contains(&"198.18.0.22".into()), "podIP alone");
    assert_eq!(set.peers.len(), 8);
}

#[test]
fn only_the_nodes_pods_are_isolated_every_pod_is_a_peer() {
    let o = with(&format!(
        "{}kind: NetworkPolicy\nmetadata: {{name: all, namespace: shop}}\n\
         spec: {{podSelector: {{}}, ingress: [{{from: [{{podSelector: {{matchLabels: {{app: far}}}}}}]}}]}}\n",
        pod("shop", "far", "198.18.0.30", "app: far", "").replace("nodeName: n1", "nodeName: n2"),
    ));
    let mut i = input(&o);
    i.node = Some("n1");
    let set = compile(&i).set;
    assert!(isolated(&set, "shop/far").is_none(), "on n2");
    assert!(isolated(&set, "shop/web").is_some());
    assert!(
        identity(&set, "198.18.0.30").is_some(),
        "a peer all the same"
    );
    assert!(tcp(&i, WEB, "198.18.0.30", 80), "n2 enforces its own pods");
    assert!(tcp(&i, "198.18.0.30", WEB, 80));
    assert!(!tcp(&i, DB, WEB, 80));
    i.node = Some("n3");
    assert!(compile(&i).set.pods.is_empty());
    assert!(tcp(&i, DB, WEB, 80));
    i.node = None;
    assert!(!tcp(&i, WEB, "198.18.0.30", 80), "every node's pods");
}

#[test]
fn a_namespace_without_an_object_has_only_its_name_label() {
    let mut yaml = pod("ghost", "g", "198.18.0.40", "app: g", "");
    for (name, addr, selector) in [
        (
            "by-name",
            "198.18.0.41",
            "matchLabels: {kubernetes.io/metadata.name: ghost}",
        ),
        ("by-team", "198.18.0.42", "matchLabels: {team: b}"),
        (
            "no-team",
            "198.18.0.43",
            "matchExpressions: [{key: team, operator: DoesNotExist}]",
        ),
    ] {
        yaml += &format!(
            "kind: NetworkPolicy\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec: {{podSelector: {{matchLabels: {{app: {name}}}}}, \
             ingress: [{{from: [{{namespaceSelector: {{{selector}}}}}]}}]}}\n---\n"
        );
        yaml += &pod("shop", name, addr, &format!("app: {name}"), "");
    }
    let o = objects(&format!("{}{yaml}", base()));
    let i = input(&o);
    assert!(compile(&i).rejected.is_empty());
    assert!(
        tcp(&i, "198.18.0.40", "198.18.0.41", 80),
        "by its name label"
    );
    assert!(
        !tcp(&i, "198.18.0.40", "198.18.0.42", 80),
        "it has no other label"
    );
    assert!(tcp(&i, "198.18.0.40", "198.18.0.43", 80));
    assert!(!tcp(&i, LAB_CLIENT, "198.18.0.43", 80), "lab has a team");
}

#[test]
fn the_name_label_is_on_given_namespaces_too_and_cannot_be_changed() {
    let o = objects(&format!(
        "kind: Namespace\nmetadata: {{name: lab, labels: {{kubernetes.io/metadata.name: fake}}}}\n---\n{}\
         kind: NetworkPolicy\nmetadata: {{name: web, namespace: shop}}\n\
         spec: {{podSelector: {{matchLabels: {{app: web}}}}, ingress: [{{from: [{{namespaceSelector: \
         {{matchLabels: {{kubernetes.io/metadata.name: lab}}}}}}]}}]}}\n---\n\
         kind: NetworkPolicy\nmetadata: {{name: db, namespace: shop}}\n\
         spec: {{podSelector: {{matchLabels: {{app: db}}}}, ingress: [{{from: [{{namespaceSelector: \
         {{matchLabels: {{kubernetes.io/metadata.name: fake}}}}}}]}}]}}\n",
        pod("lab", "client", LAB_CLIENT, "app: client", "")
            + &pod("shop", "web", WEB, "app: web", "")
            + &pod("shop", "db", DB, "app: db", "")
            + "kind: Namespace\nmetadata: {name: shop, labels: {team: a}}\n---\n",
    ));
    let i = input(&o);
    assert!(tcp(&i, LAB_CLIENT, WEB, 80));
    assert!(!tcp(&i, LAB_CLIENT, DB, 80));
}

#[test]
fn pods_alike_share_an_identity() {
    let o = with(&[
        pod("shop", "web2", "198.18.0.7", "app: web", "{name: dns, containerPort: 53, protocol: UDP}, {name: http, containerPort: 8080}"),
        pod("shop", "web3", "198.18.0.8", "app: web", "{name: http, containerPort: 8081}, {name: dns, containerPort: 53, protocol: UDP}"),
        pod("lab", "web4", "198.18.0.9", "app: web", "{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}"),
        pod("shop", "web5", "198.18.0.10", "app: web", "{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}, {containerPort: 9}"),
        pod("shop", "client2", "198.18.0.11", "app: client", ""),
    ].concat());
    let set = compile(&input(&o)).set;
    let id = |a: &str| identity(&set, a).unwrap();
    assert_eq!(
        id(WEB),
        id("198.18.0.7"),
        "container ports in another order"
    );
    assert_eq!(
        id(WEB),
        id("198.18.0.10"),
        "an unnamed port is no part of it"
    );
    assert_ne!(id(WEB), id("198.18.0.8"), "http on another number");
    assert_ne!(id(WEB), id("198.18.0.9"), "another namespace");
    assert_eq!(id(SHOP_CLIENT), id("198.18.0.11"));
    assert_ne!(id(SHOP_CLIENT), id(LAB_CLIENT));
    assert_ne!(id(SHOP_CLIENT), id(DB));
    let mut ids: Vec<u32> = set.peers.iter().map(|p| p.identity).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids, (0..7).collect::<Vec<u32>>(), "numbered densely");
}

#[test]
fn pods_selected_by_the_same_policies_share_a_group() {
    let o = with(
        &[
            pod(
                "shop",
                "web2",
                "198.18.0.7",
                "app: web",
                "{name: http, containerPort: 9999}",
            ),
            "kind: NetworkPolicy\nmetadata: {name: z-all, namespace: shop}\n\
         spec: {podSelector: {}, ingress: [{ports: [{port: 80}]}]}\n---\n"
                .to_string(),
            "kind: NetworkPolicy\nmetadata: {name: a-web, namespace: shop}\n\
         spec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Ingress, Egress]}\n"
                .to_string(),
        ]
        .concat(),
    );
    let set = compile(&input(&o)).set;
    let web = isolated(&set, "shop/web").unwrap();
    let web2 = isolated(&set, "shop/web2").unwrap();
    let db = isolated(&set, "shop/db").unwrap();
    let client = isolated(&set, "shop/client").unwrap();
    assert_eq!(web.ingress, web2.ingress, "no named port in their policies");
    assert_eq!(web.egress, web2.egress);
    assert_eq!(db.ingress, client.ingress);
    assert_ne!(db.ingress, web.ingress);
    assert_eq!(db.egress, None);
    let g = &set.groups[web.ingress.unwrap() as usize];
    assert_eq!(g.direction, Direction::Ingress);
    assert_eq!(g.policies, ["shop/a-web", "shop/z-all"], "sorted");
    assert_eq!(
        set.groups[web.egress.unwrap() as usize].direction,
        Direction::Egress
    );
    assert_eq!(set.groups.len(), 3);
}

/// `spec` of a policy `bad` selecting web, beside a good one selecting db.
fn rejected_reason(spec: &str) -> (Compiled, Objects) {
    let o = objects(&format!(
        "{}kind: NetworkPolicy\nmetadata: {{name: bad, namespace: shop}}\nspec: {spec}\n---\n\
         kind: NetworkPolicy\nmetadata: {{name: good, namespace: shop}}\n\
         spec: {{podSelector: {{matchLabels: {{app: db}}}}, ingress: [{{ports: [{{port: 5432}}]}}]}}\n",
        base()
    ));
    (compile(&input(&o)), o)
}

#[test]
fn each_malformed_field_rejects_its_policy_alone() {
    let web = "podSelector: {matchLabels: {app: web}}";
    let cases = [
        (format!("{{{web}, ingress: [{{from: [{{ipBlock: {{cidr: 198.18.0.0/33}}}}]}}]}}"), "spec.ingress[0].from[0].ipBlock.cidr: \"198.18.0.0/33\" is not a CIDR"),
        (format!("{{{web}, ingress: [{{from: [{{ipBlock: {{cidr: 198.18.0.1}}}}]}}]}}"), "is not a CIDR"),
        (format!("{{{web}, ingress: [{{from: [{{ipBlock: {{cidr: ''}}}}]}}]}}"), "cidr: required"),
        (format!("{{{web}, ingress: [{{from: [{{ipBlock: {{cidr: 198.18.0.0/24, except: [10.0.0.0/8]}}}}]}}]}}"), "except[0]: \"10.0.0.0/8\" is not a strict subset"),
        (format!("{{{web}, ingress: [{{from: [{{ipBlock: {{cidr: 198.18.0.0/24, except: [198.18.0.0/24]}}}}]}}]}}"), "is not a strict subset"),
        (format!("{{{web}, ingress: [{{from: [{{ipBlock: {{cidr: 198.18.0.0/24, except: ['fd00::/120']}}}}]}}]}}"), "is not a strict subset"),
        (format!("{{{web}, ingress: [{{from: [{{ipBlock: {{cidr: 198.18.0.0/24, except: [nope]}}}}]}}]}}"), "except[0]: \"nope\" is not a CIDR"),
        (format!("{{{web}, ingress: [{{ports: [{{port: 0}}]}}]}}"), "spec.ingress[0].ports[0].port: 0 is out of range"),
        (format!("{{{web}, egress: [{{ports: [{{port: 70000}}]}}]}}"), "spec.egress[0].ports[0].port: 70000 is out of range"),
        (format!("{{{web}, ingress: [{{ports: [{{port: 80, endPort: 70000}}]}}]}}"), "endPort: 70000 is out of range"),
        (format!("{{{web}, ingress: [{{ports: [{{port: 80, endPort: 79}}]}}]}}"), "endPort: 79 is less than port 80"),
        (format!("{{{web}, ingress: [{{ports: [{{port: http, endPort: 90}}]}}]}}"), "endPort: may not be specified with a named port"),
        (format!("{{{web}, ingress: [{{ports: [{{endPort: 90}}]}}]}}"), "endPort: may not be specified when port is not"),
        (format!("{{{web}, ingress: [{{ports: [{{protocol: ICMP, port: 80}}]}}]}}"), "protocol: \"ICMP\" is not TCP, UDP or SCTP"),
        (format!("{{{web}, ingress: [{{ports: [{{protocol: tcp, port: 80}}]}}]}}"), "protocol: \"tcp\" is not"),
        (format!("{{{web}, ingress: [{{ports: [{{port: Bad_Name}}]}}]}}"), "port: \"Bad_Name\" is not a port name"),
        (format!("{{{web}, ingress: [{{ports: [{{port: '-http'}}]}}]}}"), "is not a port name"),
        (format!("{{{web}, ingress: [{{ports: [{{port: ht--tp}}]}}]}}"), "is not a port name"),
        (format!("{{{web}, ingress: [{{ports: [{{port: '8080'}}]}}]}}"), "needs a letter"),
        (format!("{{{web}, ingress: [{{ports: [{{port: abcdefghijklmnop}}]}}]}}"), "1-15 characters"),
        (format!("{{{web}, ingress: [{{ports: [{{port: ''}}]}}]}}"), "is not a port name"),
        (format!("{{{web}, ingress: [{{from: [{{}}]}}]}}"), "from[0]: must specify a peer"),
        (format!("{{{web}, ingress: [{{from: [{{ipBlock: {{cidr: 10.0.0.0/8}}, podSelector: {{}}}}]}}]}}"), "may not specify both ipBlock and another peer"),
        (format!("{{{web}, ingress: [{{from: [{{namespaceSelector: {{matchExpressions: [{{key: a, operator: Equals, values: [b]}}]}}}}]}}]}}"), "from[0].namespaceSelector.matchExpressions[0]: operator \"Equals\" is not In"),
        (format!("{{{web}, egress: [{{to: [{{podSelector: {{matchExpressions: [{{key: a, operator: In}}]}}}}]}}]}}"), "operator In needs at least one value"),
        (format!("{{{web}, egress: [{{to: [{{podSelector: {{matchExpressions: [{{key: a, operator: NotIn, values: []}}]}}}}]}}]}}"), "operator NotIn needs at least one value"),
        (format!("{{{web}, ingress: [{{from: [{{podSelector: {{matchExpressions: [{{key: a, operator: Exists, values: [b]}}]}}}}]}}]}}"), "operator Exists takes no values"),
        (format!("{{{web}, ingress: [{{from: [{{podSelector: {{matchExpressions: [{{key: a, operator: DoesNotExist, values: [b]}}]}}}}]}}]}}"), "operator DoesNotExist takes no values"),
        (format!("{{{web}, policyTypes: [Ingress, Sideways]}}"), "spec.policyTypes[1]: \"Sideways\" is not Ingress or Egress"),
        (format!("{{{web}, policyTypes: [Ingress, Egress, Ingress]}}"), "at most two"),
        ("{podSelector: {matchExpressions: [{key: app, operator: In}]}}".to_string(), "spec.podSelector.matchExpressions[0]: operator In needs"),
    ];
    for (spec, reason) in &cases {
        let (c, o) = rejected_reason(spec);
        assert_eq!(c.rejected.len(), 1, "{spec}: {:?}", c.rejected);
        let e = &c.rejected[0];
        assert_eq!(e.policy, "shop/bad", "{spec}");
        assert!(
            e.reason.contains(reason),
            "{spec}: {:?} lacks {reason:?}",
            e.reason
        );
        assert!(
            e.to_string().starts_with("NetworkPolicy shop/bad: spec."),
            "{e}"
        );
        let i = input(&o);
        assert!(
            tcp(&i, SHOP_CLIENT, DB, 5432),
            "{spec}: the good policy stands"
        );
        assert!(!tcp(&i, SHOP_CLIENT, DB, 80), "{spec}");
    }
}

#[test]
fn what_the_api_server_accepts_is_not_rejected() {
    let web = "podSelector: {matchLabels: {app: web}}";
    for spec in [
        format!("{{{web}, ingress: [{{ports: [{{port: abcdefghijklmno}}, {{port: http-alt}}, {{port: h2}}]}}]}}"),
        format!("{{{web}, ingress: [{{ports: [{{port: 1}}, {{port: 65535}}, {{port: 80, endPort: 80}}, {{port: 1, endPort: 65535}}]}}]}}"),
        format!("{{{web}, ingress: [{{from: [{{ipBlock: {{cidr: 198.18.0.7/24, except: [198.18.0.0/25, 198.18.0.9/32]}}}}]}}]}}"),
        format!("{{{web}, ingress: [{{from: [{{ipBlock: {{cidr: 'fd00::/64', except: ['fd00::/80']}}}}]}}]}}"),
        format!("{{{web}, ingress: [{{from: [{{podSelector: {{matchExpressions: [{{key: a, operator: Exists, values: []}}]}}}}]}}]}}"),
        format!("{{{web}, policyTypes: [Egress, Ingress], egress: [], ingress: []}}"),
        format!("{{{web}, policyTypes: [Ingress, Ingress]}}"),
        format!("{{{web}, ingress: [{{ports: [{{protocol: SCTP}}]}}]}}"),
    ] {
        let (c, _) = rejected_reason(&spec);
        assert!(c.rejected.is_empty(), "{spec}: {:?}", c.rejected);
    }
}

#[test]
fn a_rejected_policy_isolates_its_pods_and_allows_nothing() {
    let (c, o) = rejected_reason(
        "{podSelector: {matchLabels: {app: web}}, \
         ingress: [{from: [{podSelector: {}}], ports: [{port: 80}, {port: 0}]}]}",
    );
    assert_eq!(c.rejected.len(), 1);
    let i = input(&o);
    assert!(
        !tcp(&i, SHOP_CLIENT, WEB, 80),
        "its valid part does not count either"
    );
    assert!(
        tcp(&i, WEB, SHOP_CLIENT, 80),
        "defaulted types: ingress only"
    );
    assert!(tcp(&i, SHOP_CLIENT, LAB_CLIENT, 80), "other pods untouched");
    let web = isolated(&c.set, "shop/web").unwrap();
    let g = &c.set.groups[web.ingress.unwrap() as usize];
    assert_eq!(g.policies, ["shop/bad"], "drops are counted against it");
    assert!(g.rules.is_empty());

    let (c, o) = rejected_reason(
        "{podSelector: {matchLabels: {app: web}}, policyTypes: [Egress], \
         egress: [{ports: [{port: 0}]}]}",
    );
    assert_eq!(c.rejected.len(), 1);
    let i = input(&o);
    assert!(!tcp(&i, WEB, SHOP_CLIENT, 80), "its given types");
    assert!(tcp(&i, SHOP_CLIENT, WEB, 80));
}

#[test]
fn a_rejected_policy_with_unreadable_policy_types_isolates_both_ways() {
    let (c, o) = rejected_reason(
        "{podSelector: {matchLabels: {app: web}}, policyTypes: [Sideways], ingress: [{}], egress: [{}]}",
    );
    assert_eq!(c.rejected.len(), 1);
    let i = input(&o);
    assert!(!tcp(&i, SHOP_CLIENT, WEB, 80));
    assert!(!tcp(&i, WEB, SHOP_CLIENT, 80));
    assert!(tcp(&i, SHOP_CLIENT, LAB_CLIENT, 80));
}

#[test]
fn a_rejected_policy_with_an_invalid_pod_selector_isolates_its_whole_namespace() {
    let (c, o) = rejected_reason(
        "{podSelector: {matchExpressions: [{key: app, operator: Equals, values: [web]}]}, \
         policyTypes: [Ingress]}",
    );
    assert_eq!(c.rejected.len(), 1);
    let i = input(&o);
    for pod in [WEB, DB, SHOP_CLIENT] {
        assert!(!tcp(&i, LAB_CLIENT, pod, 80), "{pod}");
    }
    assert!(tcp(&i, WEB, LAB_CLIENT, 80), "ingress only");
    assert!(tcp(&i, SHOP_CLIENT, LAB_OTHER, 80), "not another namespace");
    assert!(
        tcp(&i, SHOP_CLIENT, DB, 5432),
        "the good policy allows, beside the bad one"
    );
}

#[test]
fn ipv6_addresses_and_blocks_are_carried_through() {
    let o = with(
        "kind: Pod\nmetadata: {name: six, namespace: shop, labels: {app: six}}\nspec: {nodeName: n1, containers: []}\n\
         status: {podIPs: [{ip: 198.18.0.60}, {ip: 'fd00::60'}]}\n---\n\
         kind: NetworkPolicy\nmetadata: {name: six, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: six}}\n  \
         ingress: [{from: [{ipBlock: {cidr: 'fd00::/64', except: ['fd00::bad/128']}}]}]\n",
    );
    let i = input(&o);
    let set = compile(&i).set;
    let six = isolated(&set, "shop/six").unwrap();
    assert_eq!(six.ips, [ip("198.18.0.60"), ip("fd00::60")]);
    assert_eq!(identity(&set, "fd00::60"), identity(&set, "198.18.0.60"));
    let Peers::Some { blocks, .. } = &set.groups[0].rules[0].peers else {
        panic!("{set:?}");
    };
    assert_eq!(blocks[0].cidr, "fd00::/64");
    assert_eq!(blocks[0].except, ["fd00::bad/128"]);
    assert!(tcp(&i, "fd00::1", "fd00::60", 80));
    assert!(!tcp(&i, "fd00::bad", "fd00::60", 80));
    assert!(!tcp(&i, WEB, "198.18.0.60", 80));
}

#[test]
fn an_address_two_pods_claim_is_the_first_by_name() {
    let o = with(&[
        pod("shop", "b-new", "198.18.0.50", "app: new", ""),
        pod("shop", "a-old", "198.18.0.50", "app: old", ""),
        "kind: NetworkPolicy\nmetadata: {name: db, namespace: shop}\n\
         spec: {podSelector: {matchLabels: {app: db}}, ingress: [{from: [{podSelector: {matchLabels: {app: new}}}]}]}\n---\n\
         kind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\n\
         spec: {podSelector: {matchLabels: {app: web}}, ingress: [{from: [{podSelector: {matchLabels: {app: old}}}]}]}\n"
            .to_string(),
    ]
    .concat());
    let i = input(&o);
    let set = compile(&i).set;
    assert_eq!(
        set.peers
            .iter()
            .filter(|p| p.ip == ip("198.18.0.50"))
            .count(),
        1
    );
    assert!(tcp(&i, "198.18.0.50", WEB, 80), "shop/a-old's");
    assert!(!tcp(&i, "198.18.0.50", DB, 80));
}

#[test]
fn the_same_objects_in_any_order_compile_alike() {
    let o = with_api(
        "kind: NetworkPolicy\nmetadata: {name: b, namespace: shop}\n\
         spec: {podSelector: {}, ingress: [{ports: [{port: http}]}], egress: [{ports: [{port: http}, {port: 53}]}]}\n---\n\
         kind: NetworkPolicy\nmetadata: {name: a, namespace: shop}\n\
         spec: {podSelector: {matchLabels: {app: web}}, ingress: [{from: [{namespaceSelector: {}}]}]}\n---\n\
         kind: NetworkPolicy\nmetadata: {name: a, namespace: lab}\n\
         spec: {podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 198.18.0.0/29}}], ports: [{port: http}]}]}\n",
    );
    let i = input(&o);
    let first = compile(&i);
    let mut policies = o.network_policies.clone();
    let mut pods = o.pods.clone();
    let mut namespaces = o.namespaces.clone();
    policies.reverse();
    pods.reverse();
    namespaces.reverse();
    policies.rotate_left(1);
    pods.rotate_left(2);
    let again = compile(&Input {
        policies: &policies,
        pods: &pods,
        namespaces: &namespaces,
        node: None,
    });
    assert_eq!(first, again);
}

/// Kinds of rejection among generated policies, to see that the generator mostly makes
/// valid ones.
#[test]
fn the_generator_makes_mostly_valid_policies() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut policies, mut rejected, mut isolated) = (0, 0, 0);
    for _ in 0..300 {
        let g = arbitrary::cluster()
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let c = compile(&g.input());
        policies += g.policies.len();
        rejected += c.rejected.len();
        isolated += c.set.pods.len();
    }
    assert!(
        rejected * 100 < policies * 25,
        "{rejected} of {policies} rejected"
    );
    assert!(
        rejected * 100 > policies * 3,
        "{rejected} of {policies} rejected"
    );
    assert!(isolated > 300, "{isolated} isolated pods");
}

/// What stromd checks of a set (groups exist and are of their direction), and what it
/// should not have to: groups no pod uses, identities no address has, unsorted policies.
fn well_formed(set: &PolicySet) -> Result<(), TestCaseError> {
    let mut used = vec![false; set.groups.len()];
    for p in &set.pods {
        prop_assert!(p.ingress.is_some() || p.egress.is_some(), "{p:?}");
        for (g, d) in [
            (p.ingress, Direction::Ingress),
            (p.egress, Direction::Egress),
        ] {
            let Some(g) = g else { continue };
            let group = set.groups.get(g as usize);
            prop_assert_eq!(group.map(|g| g.direction), Some(d));
            used[g as usize] = true;
        }
    }
    prop_assert!(used.iter().all(|u| *u), "a group no pod uses");
    for g in &set.groups {
        prop_assert!(
            g.policies.windows(2).all(|w| w[0] < w[1]),
            "{:?}",
            g.policies
        );
        for r in &g.rules {
            prop_assert!(g.policies.contains(&r.policy));
            if let Peers::Some { identities, .. } = &r.peers {
                for id in identities {
                    prop_assert!(set.peers.iter().any(|p| p.identity == *id), "{id}");
                }
            }
        }
    }
    Ok(())
}

proptest! {
    // PROPTEST_CASES overrides the count for a longer run.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(400),
    ))]

    #[test]
    fn the_compiled_set_agrees_with_the_reference((g, probes) in arbitrary::case()) {
        let input = g.input();
        let c = compile(&input);
        well_formed(&c.set)?;
        for p in &probes {
            let compiled = evaluate(&c.set, p.src, p.dst, p.protocol, p.port);
            let reference = allowed(&input, p.src, p.dst, p.protocol, p.port);
            prop_assert_eq!(compiled, reference, "{:?}\n{:#?}\nrejected {:?}", p, c.set, c.rejected);
        }
    }

    #[test]
    fn compiling_does_not_depend_on_the_order_of_the_objects(g in arbitrary::cluster(), turn in 0usize..8) {
        let c = compile(&g.input());
        let mut policies = g.policies.clone();
        let mut pods = g.pods.clone();
        policies.reverse();
        pods.reverse();
        if !policies.is_empty() {
            let n = turn % policies.len();
            policies.rotate_left(n);
        }
        let n = turn % pods.len().max(1);
        pods.rotate_left(n);
        let again = compile(&Input { policies: &policies, pods: &pods, ..g.input() });
        prop_assert_eq!(c, again);
    }
}

/// 1000 pods in 10 namespaces (100 label sets), 1000 policies, with numbered and named
/// ports, selectors of both kinds, an ipBlock of addresses outside the cluster and, in
/// `tangled` of each 100 policies, named ports to a block that cuts through the identities
/// (each such rule lists the addresses of the pods it takes singly). Run with
/// `cargo test --release -p strom-control -- --ignored --nocapture compile_time`.
fn thousands(tangled: u32) -> Objects {
    let mut yaml = String::new();
    for ns in 0..10 {
        yaml += &format!(
            "kind: Namespace\nmetadata: {{name: ns{ns}, labels: {{team: t{}}}}}\n---\n",
            ns % 3
        );
    }
    for i in 0..1000u32 {
        let ns = i % 10;
        let app = (i / 10) % 10;
        let ip = format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256);
        yaml += &format!(
            "kind: Pod\nmetadata: {{name: p{i}, namespace: ns{ns}, labels: {{app: a{app}, tier: t{}}}}}\n\
             spec: {{nodeName: n{}, containers: [{{name: c, ports: [{{name: http, containerPort: {}}}]}}]}}\n\
             status: {{podIP: {ip}}}\n---\n",
            app % 3,
            i % 4,
            8080 + app % 2
        );
    }
    for i in 0..1000u32 {
        let ns = i % 10;
        let app = (i / 10) % 10;
        let from = (i / 7) % 10;
        let outside = if i % 100 < tangled {
            "{to: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24]}}], ports: [{port: http}]}"
        } else {
            "{to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}], ports: [{port: 443}]}"
        };
        yaml += &format!(
            "kind: NetworkPolicy\nmetadata: {{name: np{i}, namespace: ns{ns}}}\nspec:\n  \
             podSelector: {{matchLabels: {{app: a{app}}}}}\n  policyTypes: [Ingress, Egress]\n  \
             ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: a{from}}}}}}}, \
             {{namespaceSelector: {{matchLabels: {{team: t{}}}}}, podSelector: {{matchExpressions: \
             [{{key: tier, operator: In, values: [t1, t2]}}]}}}}]\n    \
             ports: [{{port: http}}, {{port: {}, endPort: {}}}]\n  \
             egress:\n  - to: [{{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: a{from}}}}}}}]\n    \
             ports: [{{port: http}}, {{protocol: UDP, port: 53}}]\n  \
             - {outside}\n---\n",
            i % 3,
            1000 + i,
            1010 + i
        );
    }
    objects(&yaml)
}

#[test]
#[ignore]
fn compile_time_for_a_thousand_pods_and_policies() {
    for tangled in [0, 10, 100] {
        let o = thousands(tangled);
        for node in [Some("n0"), None] {
            let i = Input { node, ..input(&o) };
            let start = std::time::Instant::now();
            let c = compile(&i);
            let took = start.elapsed();
            let rules: usize = c.set.groups.iter().map(|g| g.rules.len()).sum();
            let blocks: usize = c
                .set
                .groups
                .iter()
                .flat_map(|g| &g.rules)
                .map(|r| match &r.peers {
                    Peers::Any => 0,
                    Peers::Some { blocks, .. } => blocks.len(),
                })
                .sum();
            println!(
                "tangled {tangled}%, node {node:?}: {took:?} for {} pods, {} policies: \
                 {} identities, {} isolated, {} groups, {rules} rules, {blocks} blocks",
                o.pods.len(),
                o.network_policies.len(),
                c.set
                    .peers
                    .iter()
                    .map(|p| p.identity)
                    .max()
                    .map_or(0, |m| m + 1),
                c.set.pods.len(),
                c.set.groups.len(),
            );
            assert!(c.rejected.is_empty());
        }
    }
}
