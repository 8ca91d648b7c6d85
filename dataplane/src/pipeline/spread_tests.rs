//! An uplink whose receive queues are spread over two workers (socket 9 on worker 0, socket 10
//! on worker 1), as a multi-queue NIC's: a flow from beyond it to a Service is translated by
//! one worker, its owner (a client's flows one owner under ClientIP affinity), whichever
//! queue the NIC puts each frame on, and the answers of a flow whose backend is another
//! worker's go back through the owner.

use super::*;
use crate::conntrack::FlowKey;
use crate::pipeline::service::Handed;
use crate::pipeline::{reroute, FROM_UPLINK, OWNED, REROUTE};

/// Worker 1's socket, on the uplink's second queue.
fn uplink1() -> InPort<'static> {
    InPort { id: 10, ..uplink() }
}

/// Service t/web (NodePorts 30080 TCP and 30053 UDP) with `endpoints`; pod A on worker 0,
/// pod B on worker 1; the uplink's queues on both workers.
fn spread(mut spec: ServiceSpec) -> (DesiredServices, Tables, [Context; 2]) {
    spec.ports[0].node_port = Some(30080);
    spec.ports[1].node_port = Some(30053);
    let mut d = DesiredServices::default();
    d.set(spec, &[Ipv4Addr::from(NODE)]).unwrap();
    let mut t = node_tables(&mut d, 2);
    t.routes.uplink_workers = 2;
    t.routes.local.get_mut(&IpAddr::from(B)).unwrap().worker = 1;
    let mut w0 = Context::new(0, 256);
    w0.uplink_tx = Some(9);
    let mut w1 = Context::new(1, 256);
    w1.uplink_tx = Some(10);
    (d, t, [w0, w1])
}

/// `web` with backend B only, under `externalTrafficPolicy: Local`.
fn local_web() -> ServiceSpec {
    let mut spec = web(vec![endpoint(B, 8080)]);
    spec.external_local = true;
    spec
}

/// A client beyond the uplink whose flows to a Service with ClientIP affinity worker `w`
/// owns.
fn client_of(t: &Tables, w: u16) -> [u8; 4] {
    (2..=250u8)
        .map(|i| [198, 18, 0, i])
        .find(|c| {
            t.routes
                .inbound_owner(&key(*c, 5000, (NODE, 30080), 6), true)
                == Some(w)
        })
        .unwrap()
}

fn key(c: [u8; 4], sport: u16, dst: ([u8; 4], u16), proto: u8) -> FlowKey {
    FlowKey {
        src: Ipv4Addr::from(c),
        dst: Ipv4Addr::from(dst.0),
        sport,
        dport: dst.1,
        proto,
    }
}

/// A source port of EXT's whose flow to `dst` (`proto`) worker `w` owns.
fn sport_of(t: &Tables, dst: ([u8; 4], u16), proto: u8, w: u16) -> u16 {
    (5000..6000)
        .find(|&p| t.routes.inbound_owner(&key(EXT, p, dst, proto), false) == Some(w))
        .unwrap()
}

/// A frame handed to `ctx`'s worker for one of its ports, as `deliver` leaves it.
fn deliver(
    frame: &[u8],
    t: &Tables,
    ctx: &mut Context,
    owner: Option<u16>,
) -> Result<Vec<u8>, DropReason> {
    let mut buf = frame.to_vec();
    buf.resize(2048, 0);
    let handed = Handed {
        confirm: false,
        owner,
    };
    crate::pipeline::service::deliver(&mut buf, frame.len(), &t.view(), ctx, handed)?;
    buf.truncate(frame.len());
    Ok(buf)
}

/// A frame handed to `ctx`'s worker with REROUTE: the action and the frame as it leaves.
fn rerouted(frame: &[u8], t: &Tables, ctx: &mut Context) -> (Action, Vec<u8>) {
    let mut buf = frame.to_vec();
    buf.resize(2048, 0);
    let a = reroute(&mut buf, frame.len(), &t.view(), ctx);
    buf.truncate(frame.len());
    (a, buf)
}

fn handoff(worker: u16, port: u32, frame: &[u8]) -> Action {
    Action::Handoff {
        worker,
        port,
        len: frame.len(),
    }
}

#[test]
fn a_local_services_flow_is_translated_by_its_owner_and_answered_through_it() {
    let (_d, t, [mut w0, mut w1]) = spread(local_web());
    let (c, p) = (EXT, sport_of(&t, (NODE, 30080), 6, 0));
    // The SYN comes in on worker 1's queue: handed to the flow's owner as it came.
    let syn = from_outside((c, p), (NODE, 30080));
    let (a, out) = run(&syn, &uplink1(), &t, &mut w1);
    assert_eq!(a, handoff(0, FROM_UPLINK, &syn));
    assert_eq!(out, syn, "as it came");
    // The owner translates it, the client's address kept, for the backend's worker, which
    // tracks it as the owner's.
    let (a, out) = run(&out, &uplink(), &t, &mut w0);
    assert_eq!(a, handoff(1, 1 | OWNED, &out));
    assert_eq!(endpoints(&out), ((c, p), (B, 8080)));
    deliver(&out, &t, &mut w1, Some(0)).unwrap();
    // B's answer would leave by worker 1's own queue with B's address: it goes to the owner
    // as it is, and leaves by the owner's queue as from the NodePort.
    let synack = with_tcp_flags(tcp(B_MAC, (B, 8080), (c, p), false), 0x12);
    let (a, out) = run(&synack, &port_b(), &t, &mut w1);
    assert_eq!(a, handoff(0, REROUTE, &synack));
    let (a, out) = rerouted(&out, &t, &mut w0);
    assert!(matches!(a, Action::Tx { port: 9, .. }), "{a:?}");
    assert_eq!(endpoints(&out), ((NODE, 30080), (c, p)));
    // The next segment, on the owner's own queue this time, goes the same way.
    let ack = with_tcp_flags(from_outside((c, p), (NODE, 30080)), 0x10);
    let (a, out) = run(&ack, &uplink(), &t, &mut w0);
    assert_eq!(a, handoff(1, 1 | OWNED, &out));
    deliver(&out, &t, &mut w1, Some(0)).unwrap();
    assert_eq!((w0.ct.len(), w1.ct.len()), (1, 1));
    // A flow worker 1 owns, arriving on worker 0's queue: translated on worker 1, whose
    // own port B is; nothing to mark.
    let p1 = sport_of(&t, (NODE, 30080), 6, 1);
    let syn = from_outside((c, p1), (NODE, 30080));
    let (a, out) = run(&syn, &uplink(), &t, &mut w0);
    assert_eq!(a, handoff(1, FROM_UPLINK, &syn));
    let (a, out) = run(&out, &uplink1(), &t, &mut w1);
    assert!(matches!(a, Action::Tx { port: 1, .. }), "{a:?}");
    assert_eq!(endpoints(&out), ((c, p1), (B, 8080)));
    let synack = with_tcp_flags(tcp(B_MAC, (B, 8080), (c, p1), false), 0x12);
    let (a, out) = run(&synack, &port_b(), &t, &mut w1);
    assert!(matches!(a, Action::Tx { port: 10, .. }), "{a:?}");
    assert_eq!(endpoints(&out), ((NODE, 30080), (c, p1)));
}

#[test]
fn a_clients_connections_from_any_queue_keep_one_client_ip_affinity() {
    let mut spec = web(vec![endpoint(A, 8080), endpoint(B, 8080)]);
    spec.affinity_timeout_s = Some(10800);
    let (_d, t, [mut w0, mut w1]) = spread(spec);
    let c = client_of(&t, 0);
    let mut backends = std::collections::BTreeSet::new();
    for i in 0..32u16 {
        let syn = from_outside((c, 6000 + i), (NODE, 30080));
        // The NIC's hash puts each connection on either queue.
        let mut frame = syn.clone();
        if i % 2 == 1 {
            let (a, out) = run(&syn, &uplink1(), &t, &mut w1);
            assert_eq!(a, handoff(0, FROM_UPLINK, &syn));
            frame = out;
        }
        let (a, out) = run(&frame, &uplink(), &t, &mut w0);
        let backend = endpoints(&out).1;
        // SNATed to the node (Cluster): the answers find the owner by its port, unmarked.
        if backend.0 == B {
            assert_eq!(a, handoff(1, 1, &out));
        } else {
            assert!(matches!(a, Action::Tx { port: 0, .. }), "{a:?}");
        }
        backends.insert(backend);
    }
    assert_eq!(
        backends.len(),
        1,
        "one backend for the client: {backends:?}"
    );
    assert!(w1.ct.is_empty() && w1.affinity.is_empty());
}

#[test]
fn a_direct_connection_to_a_pod_is_answered_by_the_pods_worker_as_it_is() {
    let (_d, t, [mut w0, mut w1]) = spread(local_web());
    // To pod B itself, on worker 0's queue: no Service, no owner; routed to B's worker and
    // tracked there as a connection from outside.
    let (c, p) = (EXT, 7000);
    let syn = from_outside((c, p), (B, 80));
    let (a, out) = run(&syn, &uplink(), &t, &mut w0);
    assert_eq!(a, handoff(1, 1, &syn));
    deliver(&out, &t, &mut w1, None).unwrap();
    let synack = with_tcp_flags(tcp(B_MAC, (B, 80), (c, p), false), 0x12);
    let (a, out) = run(&synack, &port_b(), &t, &mut w1);
    assert!(matches!(a, Action::Tx { port: 10, .. }), "{a:?}");
    assert_eq!(endpoints(&out), ((B, 80), (c, p)), "as it is");
    // The same on worker 1's queue.
    let syn = from_outside((c, 7001), (B, 80));
    let (a, _) = run(&syn, &uplink1(), &t, &mut w1);
    assert!(matches!(a, Action::Tx { port: 1, .. }), "{a:?}");
    let synack = with_tcp_flags(tcp(B_MAC, (B, 80), (c, 7001), false), 0x12);
    let (a, _) = run(&synack, &port_b(), &t, &mut w1);
    assert!(matches!(a, Action::Tx { port: 10, .. }), "{a:?}");
}

#[test]
fn a_fragmented_datagram_and_its_fragmented_answer_follow_their_first_fragments() {
    let (_d, t, [mut w0, mut w1]) = spread(local_web());
    let (c, p) = (EXT, sport_of(&t, (NODE, 30053), 17, 0));
    let b = PacketBuilder::ethernet2(GW_MAC, UP_MAC)
        .ipv4(c, NODE, 64)
        .udp(p, 30053);
    let mut big = Vec::new();
    b.write(&mut big, &[5u8; 1400]).unwrap();
    let (f1, f2) = fragments(&big, 1000);
    // Both fragments come in on worker 1's queue (the NIC hashes fragments by address):
    // the first goes to the owner by its ports, the second follows it.
    let mut at_owner = Vec::new();
    for f in [&f1, &f2] {
        let (a, out) = run(f, &uplink1(), &t, &mut w1);
        assert_eq!(a, handoff(0, FROM_UPLINK, f));
        let (a, out) = run(&out, &uplink(), &t, &mut w0);
        assert_eq!(a, handoff(1, 1 | OWNED, &out));
        at_owner.push(deliver(&out, &t, &mut w1, Some(0)).unwrap());
    }
    assert_eq!(reassembled(&at_owner[0], &at_owner[1]), ((c, p), (B, 5353)));
    // B's fragmented answer goes back to the owner, both fragments, and leaves from there.
    let answer = udp(B_MAC, (B, 5353), (c, p), &[6u8; 1400]);
    let (f1, f2) = fragments(&answer, 1000);
    let mut left = Vec::new();
    for f in [&f1, &f2] {
        let (a, out) = run(f, &port_b(), &t, &mut w1);
        assert_eq!(a, handoff(0, REROUTE, f));
        let (a, out) = rerouted(&out, &t, &mut w0);
        assert!(matches!(a, Action::Tx { port: 9, .. }), "{a:?}");
        left.push(out);
    }
    assert_eq!(reassembled(&left[0], &left[1]), ((NODE, 30053), (c, p)));
}

#[test]
fn icmp_errors_about_a_clients_flow_reach_its_owner_from_either_side() {
    let (_d, t, [mut w0, mut w1]) = spread(local_web());
    let (c, p) = (EXT, sport_of(&t, (NODE, 30053), 17, 0));
    let b = PacketBuilder::ethernet2(GW_MAC, UP_MAC)
        .ipv4(c, NODE, 64)
        .udp(p, 30053);
    let mut q = Vec::new();
    b.write(&mut q, b"query").unwrap();
    let (_, out) = run(&q, &uplink(), &t, &mut w0);
    let sent = deliver(&out, &t, &mut w1, Some(0)).unwrap();
    // B has nothing on 5353: its port unreachable goes to the owner, and leaves from there
    // about the NodePort.
    let b = PacketBuilder::ethernet2(B_MAC, HB_MAC)
        .ipv4(B, c, 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        ));
    let mut err = Vec::new();
    b.write(&mut err, &sent[14..14 + 28]).unwrap();
    let (a, out) = run(&err, &port_b(), &t, &mut w1);
    assert_eq!(a, handoff(0, REROUTE, &err));
    let (a, out) = rerouted(&out, &t, &mut w0);
    assert!(matches!(a, Action::Tx { port: 9, .. }), "{a:?}");
    let ip = Ipv4Packet::new_checked(&out[14..]).unwrap();
    assert!(ip.verify_checksum());
    assert_eq!((ip.src_addr().octets(), ip.dst_addr().octets()), (NODE, c));
    let icmp = smoltcp::wire::Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert!(icmp.verify_checksum());
    assert_eq!(
        &icmp.data()[20..22],
        &p.to_be_bytes(),
        "from the client's port"
    );
    assert_eq!(
        &icmp.data()[22..24],
        &30053u16.to_be_bytes(),
        "to the NodePort"
    );
    // A router's error about an answer that left from the NodePort to the client, on
    // worker 1's queue: to the client's owner.
    const ROUTER: [u8; 4] = [198, 18, 0, 254];
    let answer = udp(B_MAC, (B, 5353), (c, p), b"answer");
    let (_, out) = run(&answer, &port_b(), &t, &mut w1);
    let (_, left) = rerouted(&out, &t, &mut w0);
    let b = PacketBuilder::ethernet2(GW_MAC, UP_MAC)
        .ipv4(ROUTER, NODE, 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Host,
        ));
    let mut err = Vec::new();
    b.write(&mut err, &left[14..14 + 28]).unwrap();
    let (a, out) = run(&err, &uplink1(), &t, &mut w1);
    assert_eq!(a, handoff(0, FROM_UPLINK, &err));
    let (a, out) = run(&out, &uplink(), &t, &mut w0);
    assert!(matches!(a, Action::Handoff { worker: 1, .. }), "{a:?}");
    let ip = Ipv4Packet::new_checked(&out[14..]).unwrap();
    assert_eq!(
        (ip.src_addr().octets(), ip.dst_addr().octets()),
        (ROUTER, B),
        "to the backend, about its answer"
    );
}

#[test]
fn later_fragments_of_an_answer_to_another_workers_snat_port_follow_the_first() {
    let mut d = DesiredServices::default();
    let mut t = node_tables(&mut d, 2);
    t.routes.local.get_mut(&IpAddr::from(A)).unwrap().worker = 1;
    let mut uplink_worker = Context::new(0, 64);
    let mut a_worker = Context::new(1, 64);
    let (_, sent) = run(
        &udp(A_MAC, (A, 5000), (EXT, 53), b"query"),
        &port_a(),
        &t,
        &mut a_worker,
    );
    let ((_, p), _) = endpoints(&sent);
    assert_eq!(t.node.snat.owner(p), Some(1));
    let b = PacketBuilder::ethernet2(GW_MAC, UP_MAC)
        .ipv4(EXT, NODE, 64)
        .udp(53, p);
    let mut big = Vec::new();
    b.write(&mut big, &[4u8; 1400]).unwrap();
    let (f1, f2) = fragments(&big, 1000);
    let mut at_pod = Vec::new();
    for f in [&f1, &f2] {
        let (a, out) = run(f, &uplink(), &t, &mut uplink_worker);
        assert_eq!(a, handoff(1, REROUTE, f));
        let (a, out) = rerouted(&out, &t, &mut a_worker);
        assert!(matches!(a, Action::Tx { port: 0, .. }), "{a:?}");
        at_pod.push(out);
    }
    assert_eq!(reassembled(&at_pod[0], &at_pod[1]), ((EXT, 53), (A, 5000)));
}
