//! The policy stage over whole frames, on the Service tests' topology: pods A and B
//! (identities 1 and 2), the Service `t/web` where a test needs it.

use strom_api::{Direction, IsolatedPod, PeerAddr, Peers, PolicySet, PortRange, Rule, RuleGroup};

use super::*;
use crate::pipeline::policy::CONFIRM;
use crate::tables::policy::{PolicySlots, PolicyTable};

/// `pod` isolated in `direction`, allowed what `rules` say (identities: A 1, B 2).
fn isolate(pod: [u8; 4], direction: Direction, rules: Vec<Rule>) -> PolicySet {
    let (ingress, egress) = match direction {
        Direction::Ingress => (Some(0), None),
        Direction::Egress => (None, Some(0)),
    };
    PolicySet {
        peers: vec![
            PeerAddr {
                ip: IpAddr::from(A),
                identity: 1,
            },
            PeerAddr {
                ip: IpAddr::from(B),
                identity: 2,
            },
        ],
        pods: vec![IsolatedPod {
            pod: "t/pod".into(),
            ips: vec![IpAddr::from(pod)],
            ingress,
            egress,
        }],
        groups: vec![RuleGroup {
            direction,
            policies: vec!["t/p".into()],
            rules,
        }],
    }
}

fn from(identity: u32, port: u16) -> Rule {
    Rule {
        policy: "t/p".into(),
        index: 0,
        peers: Peers::Some {
            identities: vec![identity],
            blocks: vec![],
        },
        ports: Some(vec![PortRange {
            protocol: Protocol::Tcp,
            first: port,
            last: port,
        }]),
    }
}

/// A hand-off marked with CONFIRM.
fn confirmed() -> crate::pipeline::service::Handed {
    crate::pipeline::service::Handed {
        confirm: true,
        owner: None,
    }
}

fn apply(t: &mut Tables, set: &PolicySet, generation: u64) {
    t.policy = PolicyTable::build(set, generation, &mut PolicySlots::default()).unwrap();
}

/// Tables with no Service, B served by worker `b_worker`.
fn pods(b_worker: u16) -> Tables {
    let mut d = DesiredServices::default();
    let mut t = tables(&mut d);
    if let Some(n) = t.routes.local.get_mut(&IpAddr::from(B)) {
        n.worker = b_worker;
    }
    t
}

#[test]
fn an_isolated_pod_gets_only_what_a_policy_allows_and_the_answers_of_its_own_connections() {
    let mut t = pods(0);
    apply(&mut t, &isolate(A, Direction::Ingress, vec![]), 1);
    let mut ctx = Context::default();
    let (a, _) = run(
        &tcp(B_MAC, (B, 40000), (A, 80), true),
        &port_b(),
        &t,
        &mut ctx,
    );
    assert_eq!(a, Action::Drop(DropReason::PolicyDenied));
    // A's own connection out, and its answer, which A's ingress alone would deny.
    let (a, _) = run(
        &tcp(A_MAC, (A, 40001), (B, 80), true),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { port: 1, .. }), "{a:?}");
    let (a, _) = run(
        &tcp(B_MAC, (B, 80), (A, 40001), false),
        &port_b(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { port: 0, .. }), "{a:?}");
    assert_eq!(ctx.ct.len(), 1);
}

#[test]
fn an_allowed_flow_passes_and_a_rule_for_one_port_opens_no_other() {
    let mut t = pods(0);
    apply(
        &mut t,
        &isolate(A, Direction::Ingress, vec![from(2, 80)]),
        1,
    );
    let mut ctx = Context::default();
    let (a, _) = run(
        &tcp(B_MAC, (B, 40000), (A, 80), true),
        &port_b(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { port: 0, .. }), "{a:?}");
    let (a, _) = run(
        &tcp(B_MAC, (B, 40000), (A, 81), true),
        &port_b(),
        &t,
        &mut ctx,
    );
    assert_eq!(a, Action::Drop(DropReason::PolicyDenied));
    let (a, _) = run(
        &udp(B_MAC, (B, 40000), (A, 80), b"x"),
        &port_b(),
        &t,
        &mut ctx,
    );
    assert_eq!(
        a,
        Action::Drop(DropReason::PolicyDenied),
        "a TCP rule opens no UDP"
    );
    // The answer passes (as the connection's, tracked while the node has a policy).
    let (a, _) = run(
        &tcp(A_MAC, (A, 80), (B, 40000), false),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { port: 1, .. }), "{a:?}");
    assert_eq!(ctx.ct.len(), 1, "the allowed connection is tracked");
}

#[test]
fn a_packet_denied_on_its_own_toward_another_worker_passes_there_only_as_an_answer() {
    let mut t = pods(1);
    apply(&mut t, &isolate(A, Direction::Ingress, vec![]), 1);
    let mut w0 = Context::new(0, 16);
    let mut w1 = Context::new(1, 16);
    // A (worker 0) connects to B (worker 1): tracked on worker 0, where it started.
    let (a, _) = run(
        &tcp(A_MAC, (A, 40002), (B, 80), true),
        &port_a(),
        &t,
        &mut w0,
    );
    assert!(
        matches!(
            a,
            Action::Handoff {
                worker: 1,
                port: 1,
                ..
            }
        ),
        "{a:?}"
    );
    // B's answer, received on worker 1, is denied there on its own: handed to A's worker to
    // confirm, which knows the connection.
    let (a, mut out) = run(
        &tcp(B_MAC, (B, 80), (A, 40002), false),
        &port_b(),
        &t,
        &mut w1,
    );
    assert_eq!(
        a,
        Action::Handoff {
            worker: 0,
            port: CONFIRM,
            len: out.len()
        }
    );
    let len = out.len();
    out.resize(2048, 0);
    assert_eq!(
        crate::pipeline::service::deliver(&mut out, len, &t.view(), &mut w0, confirmed()),
        Ok(())
    );
    // A new connection from B to A is no answer: worker 0 drops it.
    let (a, mut out) = run(
        &tcp(B_MAC, (B, 40003), (A, 80), true),
        &port_b(),
        &t,
        &mut w1,
    );
    assert!(matches!(a, Action::Handoff { port: CONFIRM, .. }), "{a:?}");
    let len = out.len();
    out.resize(2048, 0);
    assert_eq!(
        crate::pipeline::service::deliver(&mut out, len, &t.view(), &mut w0, confirmed()),
        Err(DropReason::PolicyDenied)
    );
    assert_eq!(
        w0.policy_counts().len(),
        0,
        "sized by the worker, not the stage"
    );
}

#[test]
fn a_policy_change_cuts_the_connections_it_denies_and_keeps_the_others() {
    let mut t = pods(0);
    apply(
        &mut t,
        &isolate(A, Direction::Ingress, vec![from(2, 80)]),
        1,
    );
    let mut ctx = Context::default();
    ctx.size_policy_counters(1);
    // Tracked: A's answers would be denied on their own by its egress.
    let mut both = isolate(A, Direction::Ingress, vec![from(2, 80)]);
    both.pods[0].egress = Some(1);
    both.groups.push(RuleGroup {
        direction: Direction::Egress,
        policies: vec!["t/p".into()],
        rules: vec![],
    });
    apply(&mut t, &both, 2);
    let (a, _) = run(
        &tcp(B_MAC, (B, 40000), (A, 80), true),
        &port_b(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { .. }), "{a:?}");
    assert_eq!(ctx.ct.len(), 1);
    let (a, _) = run(
        &tcp(A_MAC, (A, 80), (B, 40000), false),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { .. }), "the answer: {a:?}");
    // The same rules published again: the connection stays.
    apply(&mut t, &both, 3);
    let (a, _) = run(
        &tcp(B_MAC, (B, 40000), (A, 80), false),
        &port_b(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { .. }), "{a:?}");
    // Now port 80 is closed: the next packet, either way, ends the connection.
    let mut closed = both.clone();
    closed.groups[0].rules = vec![from(2, 81)];
    apply(&mut t, &closed, 4);
    let (a, _) = run(
        &tcp(A_MAC, (A, 80), (B, 40000), false),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert_eq!(a, Action::Drop(DropReason::PolicyDenied));
    assert_eq!(ctx.ct.len(), 0);
    assert_eq!(
        ctx.policy_counts()[0],
        [1, 0],
        "counted for the ingress it broke"
    );
    let (a, _) = run(
        &tcp(B_MAC, (B, 40000), (A, 80), false),
        &port_b(),
        &t,
        &mut ctx,
    );
    assert_eq!(a, Action::Drop(DropReason::PolicyDenied));
}

#[test]
fn a_service_connection_is_judged_from_the_client_to_the_backend() {
    let (mut d, mut t) = with(web(vec![endpoint(B, 8080)]));
    t.services = d.table();
    let mut ctx = Context::default();
    // B lets A in on 8080 (the backend's port), not on 80 (the Service's).
    apply(
        &mut t,
        &isolate(B, Direction::Ingress, vec![from(1, 8080)]),
        1,
    );
    let (a, out) = run(
        &tcp(A_MAC, (A, 40000), (VIP, 80), true),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { port: 1, .. }), "{a:?}");
    assert_eq!(endpoints(&out), ((A, 40000), (B, 8080)));
    apply(
        &mut t,
        &isolate(B, Direction::Ingress, vec![from(1, 80)]),
        2,
    );
    let (a, _) = run(
        &tcp(A_MAC, (A, 40001), (VIP, 80), true),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert_eq!(a, Action::Drop(DropReason::PolicyDenied));
    // The first connection, tracked, is now denied too: cut.
    let (a, _) = run(
        &tcp(A_MAC, (A, 40000), (VIP, 80), false),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert_eq!(a, Action::Drop(DropReason::PolicyDenied));
}

#[test]
fn traffic_between_a_pod_and_its_node_always_passes() {
    let mut t = pods(0);
    t.node.addrs.insert(IpAddr::from([198, 18, 0, 1]));
    apply(&mut t, &isolate(A, Direction::Ingress, vec![]), 1);
    let v = t.view();
    assert!(
        crate::pipeline::policy::verdict(&v, Ipv4Addr::from(GW), 1, Ipv4Addr::from(A), 6, 80)
            .is_ok()
    );
    assert!(crate::pipeline::policy::verdict(
        &v,
        Ipv4Addr::new(198, 18, 0, 1),
        1,
        Ipv4Addr::from(A),
        6,
        80
    )
    .is_ok());
    assert!(
        crate::pipeline::policy::verdict(&v, Ipv4Addr::from(B), 1, Ipv4Addr::from(A), 6, 80)
            .is_err()
    );
}

#[test]
fn later_fragments_of_an_allowed_datagram_pass_as_its_first_did() {
    let mut t = pods(0);
    let mut udp_rule = from(2, 5000);
    udp_rule.ports = Some(vec![PortRange {
        protocol: Protocol::Udp,
        first: 5000,
        last: 5000,
    }]);
    apply(&mut t, &isolate(A, Direction::Ingress, vec![udp_rule]), 1);
    let mut ctx = Context::default();
    let big = udp(B_MAC, (B, 40000), (A, 5000), &[7u8; 1200]);
    let (first, second) = fragments(&big, 600);
    let (a, _) = run(&first, &port_b(), &t, &mut ctx);
    assert!(matches!(a, Action::Tx { port: 0, .. }), "{a:?}");
    let (a, _) = run(&second, &port_b(), &t, &mut ctx);
    assert!(matches!(a, Action::Tx { port: 0, .. }), "{a:?}");
    // A later fragment of a datagram whose first was never seen carries no port: denied.
    let other = with_ident(udp(B_MAC, (B, 40001), (A, 5000), &[7u8; 1200]), 99);
    let (_, second) = fragments(&other, 600);
    let (a, _) = run(&second, &port_b(), &t, &mut ctx);
    assert_eq!(a, Action::Drop(DropReason::PolicyDenied));
}

#[test]
fn denied_packets_are_logged_at_a_bounded_rate() {
    let mut ctx = Context {
        now_ms: 5_000,
        ..Default::default()
    };
    let burst = (0..100).filter(|_| ctx.policy_log_allowed()).count() as u64;
    assert_eq!(burst, crate::pipeline::POLICY_LOG_BURST);
    ctx.now_ms += 1000 / crate::pipeline::POLICY_LOG_PER_SEC;
    assert!(
        ctx.policy_log_allowed(),
        "a line again after its share of a second"
    );
    assert!(!ctx.policy_log_allowed());
}

#[test]
fn drops_counted_per_group_reach_every_selecting_policy_once_folded() {
    let mut t = pods(0);
    let mut set = isolate(A, Direction::Ingress, vec![from(2, 80)]);
    set.groups[0].policies = vec!["t/p".into(), "t/q".into()];
    apply(&mut t, &set, 1);
    let mut ctx = Context::default();
    let v = t.view();
    ctx.follow_policy(v.policy);
    let syn = tcp(B_MAC, (B, 40000), (A, 81), true);
    for _ in 0..3 {
        let (a, _) = run(&syn, &port_b(), &t, &mut ctx);
        assert_eq!(a, Action::Drop(DropReason::PolicyDenied));
    }
    let counts = ctx.policy_counts().to_vec();
    assert_eq!(counts.len(), 2, "a slot per policy");
    assert_eq!(
        counts,
        vec![[3, 0], [3, 0]],
        "each selecting policy, ingress"
    );
    // A new table: what was counted stays, and counting goes on under it.
    apply(&mut t, &set, 2);
    let v = t.view();
    ctx.follow_policy(v.policy);
    let (a, _) = run(&syn, &port_b(), &t, &mut ctx);
    assert_eq!(a, Action::Drop(DropReason::PolicyDenied));
    assert_eq!(ctx.policy_counts(), &[[4, 0], [4, 0]]);
}

#[test]
fn a_connection_started_under_other_policies_keeps_its_answers_when_its_pod_is_isolated() {
    let mut t = pods(0);
    // A policy on the node, selecting neither A nor B: A's connection to B is tracked all the
    // same.
    apply(
        &mut t,
        &isolate([198, 18, 16, 9], Direction::Ingress, vec![]),
        1,
    );
    let mut ctx = Context::default();
    let (a, _) = run(
        &tcp(A_MAC, (A, 40000), (B, 80), true),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { .. }), "{a:?}");
    assert_eq!(ctx.ct.len(), 1, "tracked while the node has a policy");
    // Now A accepts nothing: B's answers still reach it, B's new connections do not.
    apply(&mut t, &isolate(A, Direction::Ingress, vec![]), 2);
    let (a, _) = run(
        &tcp(B_MAC, (B, 80), (A, 40000), false),
        &port_b(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { .. }), "the answer: {a:?}");
    let (a, _) = run(
        &tcp(B_MAC, (B, 40001), (A, 80), true),
        &port_b(),
        &t,
        &mut ctx,
    );
    assert_eq!(a, Action::Drop(DropReason::PolicyDenied));
}
