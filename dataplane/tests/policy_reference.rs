//! stromd's policy table against the control crate's reference evaluator, on random clusters
//! (`strom_control::policy::arbitrary`): the set `compile` makes for a node, built into a
//! [`PolicyTable`], must give every packet it is responsible for the verdict that
//! `reference::allowed` gives straight over the Kubernetes objects.
//!
//! What the table is responsible for, and so what is compared:
//! - IPv4 packets. The table holds IPv4 addresses only; probes with an IPv6 end (a dual-stack
//!   pod's second address, the generator's `fd00::` addresses) are skipped.
//! - Not a pod's traffic to itself (`src == dst`): stromd never sees it with the pod's own
//!   source (a hairpin through a Service comes from the gateway), and the reference does not
//!   model it (see `strom_control::policy`).
//! - The sides of its node's pods. stromd on node N compiles with `node: Some(N)`, so only
//!   N's pods are isolated: it decides a packet's egress when the source is a pod of N and its
//!   ingress when the destination is one. A packet with neither end on N is the other node's
//!   to decide: N's table allows it, and so does the reference for `node: Some(N)`, which is
//!   what every probe is compared with. The tables of all the generator's nodes together
//!   must also give the cluster-wide verdict (the reference with `node: None`): each side of
//!   a packet is decided on exactly one node.
//! - Not the node's own traffic. The pipeline ([`policy::verdict`]) allows everything to or
//!   from the node's addresses and its pod gateway before it asks the table; the reference
//!   knows nothing of nodes and takes such an address for any address of no pod, which an
//!   isolated pod's policy may deny. The generator gives nodes no address, but it makes
//!   host-network pods, each with an address of the pods' subnet that the reference (and the
//!   compiler) take for an address of no pod; in a real cluster such a pod has its node's
//!   address. So the pipeline's node table here has a gateway and an address no probe uses,
//!   and the addresses of the node's host-network pods: the pipeline must allow the probes
//!   touching those, and only the table's verdict on them is compared with the reference.
//!
//! `PROPTEST_CASES` overrides the number of cases; a failure prints the shrunk cluster (as
//! JSON) and the packet at fault.

use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{FileFailurePersistence, TestRunner};
use strom_api::Direction;
use strom_control::policy::arbitrary::{self, Generated, Probe, NODES};
use strom_control::policy::{compile, reference, Compiled, Input};
use strom_dataplane::pipeline::policy;
use strom_dataplane::tables::policy::{Denied, PolicySlots};
use strom_dataplane::tables::{NodeTable, PolicyTable, RouteTable, ServiceTable, View};

/// The node's pod gateway and one of its addresses: no address of the generator's.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The source port given to the pipeline (not judged).
const SPORT: u16 = 40000;

fn config(default_cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(default_cases),
        // Next to this file (the default looks for a lib.rs above it, which tests/ has not).
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        // Shrinking runs a case in about a millisecond: enough to get to the one packet and
        // the policies that matter.
        max_shrink_iters: 20_000,
        ..ProptestConfig::default()
    }
}

fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

/// A probe as stromd sees it: IPv4 ends, the protocol's number.
fn packet(p: &Probe) -> Option<(Ipv4Addr, Ipv4Addr, u8, u16)> {
    Some((v4(p.src)?, v4(p.dst)?, p.protocol.number(), p.port))
}

/// The cluster as stromd on `node` compiles it (`None`: every node's pods isolated).
fn on<'a>(g: &'a Generated, node: Option<&'a str>) -> Input<'a> {
    Input { node, ..g.input() }
}

/// A cluster and packets for it: the generator's, with 1 to 128 packets so that a failing
/// case shrinks to the one packet at fault; shown (on failure, as proptest's minimal input)
/// one object per line as JSON, the packets after.
#[derive(Clone)]
struct Case {
    g: Generated,
    probes: Vec<Probe>,
}

fn case() -> impl Strategy<Value = Case> {
    arbitrary::cluster().prop_flat_map(|g| {
        let probes = arbitrary::probes(&g, 1..=128);
        (Just(g), probes).prop_map(|(g, probes)| Case { g, probes })
    })
}

/// An object as one line of JSON.
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("<{e}>"))
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "cluster (generated for node {:?}):", self.g.node)?;
        for n in &self.g.namespaces {
            writeln!(f, "  {}", json(n))?;
        }
        for p in &self.g.pods {
            writeln!(f, "  {}", json(p))?;
        }
        for p in &self.g.policies {
            writeln!(f, "  {}", json(p))?;
        }
        writeln!(f, "packets:")?;
        for p in &self.probes {
            writeln!(f, "  {p:?}")?;
        }
        Ok(())
    }
}

/// Which side denied a packet, and by which group: what a verdict decides (a [`Denied`]
/// carries the packet too, for the log).
fn side(v: Result<(), Denied>) -> Result<(), (Direction, u32)> {
    v.map_err(|d| (d.direction, d.group))
}

/// The set compiled from `input` and its table.
fn build(
    input: &Input,
    generation: u64,
    slots: &mut PolicySlots,
) -> Result<(Compiled, PolicyTable), TestCaseError> {
    let c = compile(input);
    let t = PolicyTable::build(&c.set, generation, slots).map_err(|e| {
        TestCaseError::fail(format!("the table refused the set: {e}\n{:#?}", c.set))
    })?;
    Ok((c, t))
}

/// The IPv4 addresses of `node`'s host-network pods: the node's own in a real cluster.
fn host_network(g: &Generated, node: &str) -> Vec<Ipv4Addr> {
    g.pods
        .iter()
        .filter(|p| {
            p.spec.as_ref().is_some_and(|s| {
                s.host_network == Some(true) && s.node_name.as_deref() == Some(node)
            })
        })
        .filter_map(|p| p.status.as_ref())
        .flat_map(|s| {
            let listed = s.pod_ips.iter().flatten().map(|i| i.ip.clone());
            listed.chain(s.pod_ip.clone())
        })
        .filter_map(|ip| ip.parse().ok())
        .collect()
}

fn node_table(g: &Generated, node: &str) -> NodeTable {
    let mut t = NodeTable::new(GATEWAY);
    t.addrs.insert(IpAddr::V4(NODE_ADDR));
    for a in host_network(g, node) {
        t.addrs.insert(IpAddr::V4(a));
    }
    t
}

/// Probes compared, and of the nodes' verdicts: those the table decided (an end isolated on
/// the node), those it denied, those the pipeline allowed as the node's own traffic.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    compared: usize,
    decided: usize,
    denied: usize,
    node_traffic: usize,
}

/// Every probe stromd is responsible for (see the module doc), on each node and on all of
/// them together, against the reference.
fn check(g: &Generated, probes: &[Probe]) -> Result<Tally, TestCaseError> {
    let routes = RouteTable::default();
    let services = ServiceTable::default();
    let mut nodes = Vec::new();
    for node in NODES {
        let input = on(g, Some(node));
        let (c, t) = build(&input, 1, &mut PolicySlots::default())?;
        nodes.push((*node, input, c, t, node_table(g, node)));
    }
    let everywhere = on(g, None);
    let (all_c, all_t) = build(&everywhere, 1, &mut PolicySlots::default())?;
    let mut tally = Tally::default();
    for p in probes {
        let Some((src, dst, proto, port)) = packet(p) else {
            continue;
        };
        if src == dst {
            continue;
        }
        tally.compared += 1;
        let mut every_node = true;
        for (node, input, c, t, nt) in &nodes {
            let reference = reference::allowed(input, p.src, p.dst, p.protocol, p.port);
            let table = t.verdict(src, dst, proto, port);
            prop_assert_eq!(
                table.is_ok(),
                reference,
                "stromd on {}: {:?}: table {:?}, reference {}\nset: {:#?}\nrejected: {:?}\ntrace: {:#?}",
                node,
                p,
                table,
                reference,
                c.set,
                c.rejected,
                t.trace(src, dst, proto, port)
            );
            every_node &= table.is_ok();
            if t.isolated(src) || t.isolated(dst) {
                tally.decided += 1;
                tally.denied += usize::from(table.is_err());
            }

            let view = View {
                node: nt,
                routes: &routes,
                services: &services,
                policy: t,
            };
            let piped = policy::verdict(&view, src, SPORT, dst, proto, port);
            if policy::is_node(&view, src) || policy::is_node(&view, dst) {
                prop_assert!(
                    piped.is_ok(),
                    "{}: {:?}: node's own traffic: {:?}",
                    node,
                    p,
                    piped
                );
                tally.node_traffic += 1;
            } else {
                prop_assert_eq!(
                    side(piped),
                    side(table),
                    "stromd on {}: {:?}: pipeline",
                    node,
                    p
                );
            }
            for (s, d) in [
                (NODE_ADDR, dst),
                (src, NODE_ADDR),
                (GATEWAY, dst),
                (src, GATEWAY),
            ] {
                let piped = policy::verdict(&view, s, SPORT, d, proto, port);
                prop_assert!(piped.is_ok(), "{}: {} -> {}: {:?}", node, s, d, piped);
            }
        }

        let cluster = reference::allowed(&everywhere, p.src, p.dst, p.protocol, p.port);
        prop_assert_eq!(
            every_node,
            cluster,
            "{:?}: the nodes' tables together {}, the cluster-wide reference {}",
            p,
            every_node,
            cluster
        );
        let all = all_t.verdict(src, dst, proto, port);
        prop_assert_eq!(
            all.is_ok(),
            cluster,
            "every node's pods in one table: {:?}: table {:?}, reference {}\nset: {:#?}\nrejected: {:?}",
            p,
            all,
            cluster,
            all_c.set,
            all_c.rejected
        );
    }
    Ok(tally)
}

/// Rebuilding the table from an equal set (the same objects in another order, compiled
/// again), with the next generation and the slots stromd keeps, changes nothing but the
/// generation; nor does a table built from a copy of the set with fresh slots.
fn check_rebuild(g: &Generated, probes: &[Probe], turn: usize) -> Result<(), TestCaseError> {
    for node in NODES {
        let input = on(g, Some(node));
        let mut slots = PolicySlots::default();
        let (c, first) = build(&input, 1, &mut slots)?;
        let used = slots.len();

        let mut policies = g.policies.clone();
        let mut pods = g.pods.clone();
        let mut namespaces = g.namespaces.clone();
        policies.reverse();
        pods.reverse();
        namespaces.reverse();
        let (np, nq) = (policies.len().max(1), pods.len().max(1));
        policies.rotate_left(turn % np);
        pods.rotate_left(turn % nq);
        let shuffled = Input {
            policies: &policies,
            pods: &pods,
            namespaces: &namespaces,
            node: Some(node),
        };
        let (again, second) = build(&shuffled, 2, &mut slots)?;
        prop_assert_eq!(&c.set, &again.set, "the same objects in another order");
        let (_, fresh) = build(&input, 3, &mut PolicySlots::default())?;

        prop_assert_eq!(
            (first.generation(), second.generation(), fresh.generation()),
            (1, 2, 3)
        );
        prop_assert_eq!(slots.len(), used, "an equal set takes no new counter slot");
        prop_assert_eq!(second.slots(), first.slots());
        let groups = |t: &PolicyTable| {
            t.groups()
                .iter()
                .map(|g| (g.direction, g.slots.clone(), g.policies.clone()))
                .collect::<Vec<_>>()
        };
        prop_assert_eq!(groups(&second), groups(&first));
        prop_assert_eq!(
            groups(&fresh).len(),
            groups(&first).len(),
            "fresh slots may number policies alike, the groups are the same"
        );
        let isolated = |t: &PolicyTable| {
            let mut v: Vec<_> = t
                .pods()
                .map(|(ip, name, i, e)| (ip, name.to_string(), i, e))
                .collect();
            v.sort();
            v
        };
        prop_assert_eq!(isolated(&second), isolated(&first));
        prop_assert_eq!(isolated(&fresh), isolated(&first));

        // Every IPv4 probe, a pod's traffic to itself too: the same table gives the same.
        for p in probes {
            let Some((src, dst, proto, port)) = packet(p) else {
                continue;
            };
            let v1 = first.verdict(src, dst, proto, port);
            prop_assert_eq!(
                second.verdict(src, dst, proto, port),
                v1,
                "{}: {:?}",
                node,
                p
            );
            prop_assert_eq!(
                fresh.verdict(src, dst, proto, port),
                v1,
                "{}: {:?}",
                node,
                p
            );
            prop_assert_eq!(
                second.trace(src, dst, proto, port),
                first.trace(src, dst, proto, port),
                "{}: {:?}",
                node,
                p
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn each_node_s_table_agrees_with_the_reference(c in case()) {
        check(&c.g, &c.probes)?;
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn a_table_rebuilt_from_an_equal_set_gives_the_same_verdicts(
        c in case(),
        turn in 0usize..8,
    ) {
        check_rebuild(&c.g, &c.probes, turn)?;
    }
}

/// The same check on a fixed sequence of clusters, with what it saw: the generator must give
/// the tables packets to decide, both ways, or the property says little.
#[test]
fn the_random_clusters_give_the_tables_packets_to_decide() {
    let mut runner = TestRunner::deterministic();
    let mut total = Tally::default();
    for _ in 0..400 {
        let c = case().new_tree(&mut runner).unwrap().current();
        let t = check(&c.g, &c.probes).unwrap_or_else(|e| panic!("{e}\n{c:?}"));
        total.compared += t.compared;
        total.decided += t.decided;
        total.denied += t.denied;
        total.node_traffic += t.node_traffic;
    }
    println!("{total:?}");
    // Tally { compared: 13698, decided: 8923, denied: 6068, node_traffic: 1000 } when written.
    assert!(total.compared > 8_000, "{total:?}");
    assert!(total.decided > 4_000, "{total:?}");
    assert!(total.denied > 1_000, "{total:?}");
    assert!(total.decided - total.denied > 1_000, "{total:?}");
    assert!(total.node_traffic > 100, "{total:?}");
}
