use super::*;
use strom_api::{IpBlock, IsolatedPod, PeerAddr, RuleGroup};

const A: Ipv4Addr = Ipv4Addr::new(198, 18, 16, 2);
const B: Ipv4Addr = Ipv4Addr::new(198, 18, 16, 3);
const C: Ipv4Addr = Ipv4Addr::new(198, 18, 16, 4);
const OUT: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 9);
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;

fn tcp(first: u16, last: u16) -> PortRange {
    PortRange {
        protocol: Protocol::Tcp,
        first,
        last,
    }
}

fn rule(peers: Peers, ports: Option<Vec<PortRange>>) -> Rule {
    Rule {
        policy: "x/p".into(),
        index: 0,
        peers,
        ports,
    }
}

fn ids(v: &[u32]) -> Peers {
    Peers::Some {
        identities: v.to_vec(),
        blocks: vec![],
    }
}

/// A, B, C with identities 1, 2, 3; A isolated for ingress by `rules`.
fn set(direction: Direction, rules: Vec<Rule>) -> PolicySet {
    let (ingress, egress) = match direction {
        Direction::Ingress => (Some(0), None),
        Direction::Egress => (None, Some(0)),
    };
    PolicySet {
        peers: [(A, 1), (B, 2), (C, 3)]
            .into_iter()
            .map(|(ip, identity)| PeerAddr {
                ip: IpAddr::V4(ip),
                identity,
            })
            .collect(),
        pods: vec![IsolatedPod {
            pod: "x/a".into(),
            ips: vec![IpAddr::V4(A)],
            ingress,
            egress,
        }],
        groups: vec![RuleGroup {
            direction,
            policies: vec!["x/p".into()],
            rules,
        }],
    }
}

fn table(s: &PolicySet) -> PolicyTable {
    PolicyTable::build(s, 1, &mut PolicySlots::default()).unwrap()
}

#[test]
fn port_sets_merge_ranges_and_tell_protocols_apart() {
    let s = PortSet::of(Some(&[
        tcp(80, 80),
        tcp(81, 90),
        tcp(100, 200),
        PortRange {
            protocol: Protocol::Udp,
            first: 53,
            last: 53,
        },
    ]));
    assert_eq!(s.ranges[0], vec![(80, 90), (100, 200)]);
    for (proto, port, want) in [
        (TCP, 80, true),
        (TCP, 90, true),
        (TCP, 91, false),
        (TCP, 99, false),
        (TCP, 100, true),
        (TCP, 200, true),
        (TCP, 201, false),
        (TCP, 53, false),
        (UDP, 53, true),
        (UDP, 80, false),
        (ICMP, 0, false),
    ] {
        assert_eq!(s.contains(proto, port), want, "{proto}/{port}");
    }
    let all = PortSet::of(None);
    assert!(all.contains(ICMP, 0) && all.contains(TCP, 1) && all.contains(47, 0));
    assert!(!PortSet::of(Some(&[])).contains(TCP, 80));
}

#[test]
fn an_isolated_pod_takes_only_what_a_rule_allows() {
    let t = table(&set(
        Direction::Ingress,
        vec![rule(ids(&[2]), Some(vec![tcp(80, 80)]))],
    ));
    assert!(t.verdict(B, A, TCP, 80).is_ok());
    assert!(t.verdict(B, A, TCP, 81).is_err());
    assert!(t.verdict(B, A, UDP, 80).is_err(), "a TCP rule opens no UDP");
    assert_eq!(
        t.verdict(C, A, TCP, 80),
        Err(Denied {
            direction: Direction::Ingress,
            group: 0,
            src: C,
            sport: 0,
            dst: A,
            proto: TCP,
            port: 80,
        })
    );
    // A sends anything (not isolated for egress), and others are open.
    assert!(t.verdict(A, C, UDP, 9).is_ok());
    assert!(t.verdict(C, B, TCP, 22).is_ok());
}

#[test]
fn egress_isolation_judges_the_destination() {
    let t = table(&set(
        Direction::Egress,
        vec![rule(ids(&[3]), Some(vec![tcp(443, 443)]))],
    ));
    assert!(t.verdict(A, C, TCP, 443).is_ok());
    assert_eq!(
        t.verdict(A, B, TCP, 443).unwrap_err().direction,
        Direction::Egress
    );
    assert!(t.verdict(B, A, TCP, 1).is_ok(), "ingress stays open");
}

#[test]
fn a_group_without_rules_denies_everything() {
    let t = table(&set(Direction::Ingress, vec![]));
    assert!(t.verdict(B, A, TCP, 80).is_err());
    assert!(t.verdict(OUT, A, ICMP, 0).is_err());
}

#[test]
fn a_rule_without_peers_or_ports_opens_all() {
    let t = table(&set(Direction::Ingress, vec![rule(Peers::Any, None)]));
    assert!(t.verdict(OUT, A, ICMP, 0).is_ok());
    assert!(t.verdict(B, A, 132, 7).is_ok());
    let t = table(&set(
        Direction::Ingress,
        vec![rule(Peers::Any, Some(vec![tcp(80, 80)]))],
    ));
    assert!(t.verdict(OUT, A, TCP, 80).is_ok());
    assert!(
        t.verdict(OUT, A, ICMP, 0).is_err(),
        "ports given: ICMP is not among them"
    );
}

#[test]
fn blocks_match_any_address_inside_but_their_exceptions_pods_included() {
    let block = |cidr: &str, except: &[&str]| IpBlock {
        cidr: cidr.into(),
        except: except.iter().map(|s| s.to_string()).collect(),
    };
    let t = table(&set(
        Direction::Ingress,
        vec![
            rule(
                Peers::Some {
                    identities: vec![],
                    blocks: vec![block("198.18.16.0/24", &["198.18.16.4/32"])],
                },
                Some(vec![tcp(80, 80)]),
            ),
            rule(
                Peers::Some {
                    identities: vec![],
                    blocks: vec![block("198.19.0.0/16", &[]), block("2001:db8::/32", &[])],
                },
                Some(vec![tcp(22, 22)]),
            ),
        ],
    ));
    assert!(t.verdict(B, A, TCP, 80).is_ok(), "a pod inside the block");
    assert!(t.verdict(C, A, TCP, 80).is_err(), "the exception");
    assert!(t.verdict(OUT, A, TCP, 22).is_ok());
    assert!(t.verdict(OUT, A, TCP, 80).is_err());
    assert!(t.verdict(Ipv4Addr::new(198, 20, 0, 1), A, TCP, 22).is_err());
}

#[test]
fn overlapping_blocks_take_the_union_of_their_ports() {
    let b = |cidr: &str| Peers::Some {
        identities: vec![],
        blocks: vec![IpBlock {
            cidr: cidr.into(),
            except: vec![],
        }],
    };
    let t = table(&set(
        Direction::Ingress,
        vec![
            rule(b("198.19.0.0/16"), Some(vec![tcp(80, 80)])),
            rule(b("198.19.0.0/24"), Some(vec![tcp(81, 81)])),
        ],
    ));
    assert!(t.verdict(OUT, A, TCP, 80).is_ok());
    assert!(t.verdict(OUT, A, TCP, 81).is_ok());
    let far = Ipv4Addr::new(198, 19, 7, 1);
    assert!(t.verdict(far, A, TCP, 80).is_ok());
    assert!(t.verdict(far, A, TCP, 81).is_err());
}

#[test]
fn rules_for_one_peer_add_up() {
    let t = table(&set(
        Direction::Ingress,
        vec![
            rule(ids(&[2]), Some(vec![tcp(80, 80)])),
            rule(ids(&[2, 3]), Some(vec![tcp(8000, 8100)])),
        ],
    ));
    assert!(t.verdict(B, A, TCP, 80).is_ok());
    assert!(t.verdict(B, A, TCP, 8050).is_ok());
    assert!(t.verdict(C, A, TCP, 8050).is_ok());
    assert!(t.verdict(C, A, TCP, 80).is_err());
}

#[test]
fn a_malformed_set_is_refused() {
    let mut s = set(Direction::Ingress, vec![]);
    s.pods[0].ingress = Some(7);
    assert!(matches!(
        PolicyTable::build(&s, 1, &mut PolicySlots::default()),
        Err(PolicyError::NoGroup { .. })
    ));
    let mut s = set(Direction::Ingress, vec![]);
    s.pods[0].egress = Some(0);
    assert!(matches!(
        PolicyTable::build(&s, 1, &mut PolicySlots::default()),
        Err(PolicyError::WrongDirection { .. })
    ));
    let s = set(
        Direction::Ingress,
        vec![rule(
            Peers::Some {
                identities: vec![],
                blocks: vec![IpBlock {
                    cidr: "198.18.0.0/33".into(),
                    except: vec![],
                }],
            },
            None,
        )],
    );
    assert!(matches!(
        PolicyTable::build(&s, 1, &mut PolicySlots::default()),
        Err(PolicyError::BadBlock { .. })
    ));
}

#[test]
fn counter_slots_stay_with_a_policy_across_sets() {
    let mut slots = PolicySlots::default();
    let mut s = set(Direction::Ingress, vec![]);
    s.groups[0].policies = vec!["x/q".into(), "x/p".into()];
    let t = PolicyTable::build(&s, 1, &mut slots).unwrap();
    assert_eq!(&*t.groups()[0].slots, &[0, 1]);
    s.groups[0].policies = vec!["x/p".into()];
    let t = PolicyTable::build(&s, 2, &mut slots).unwrap();
    assert_eq!(&*t.groups()[0].slots, &[1]);
    assert_eq!(t.slots(), 2);
}

#[test]
fn trace_names_the_rule_that_allows() {
    let mut r = rule(ids(&[2]), Some(vec![tcp(80, 80)]));
    r.index = 3;
    let t = table(&set(Direction::Ingress, vec![r]));
    let steps = t.trace(B, A, TCP, 80).join("\n");
    assert!(steps.contains("allowed by x/p ingress rule 3"), "{steps}");
    let steps = t.trace(C, A, TCP, 80).join("\n");
    assert!(steps.contains("policy_denied"), "{steps}");
}
