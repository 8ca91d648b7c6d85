//! The Service stage over whole frames, on the pipeline tests' topology (pod A 198.18.16.2,
//! pod B 198.18.16.3) plus a Service `t/web` on 198.19.0.10:80 (TCP and UDP 53), backends
//! B:8080 (and A:8080 where a test adds it). Packets are built with etherparse and checked
//! with smoltcp's full checksum computations, independent of the incremental updates.

use std::net::{IpAddr, Ipv4Addr};

use etherparse::PacketBuilder;
use proptest::prelude::*;
use smoltcp::wire::{IpAddress, Ipv4Packet, TcpPacket, UdpPacket};
use strom_api::{EndpointSpec, Protocol, ServicePortSpec, ServiceSpec};

use crate::drop::DropReason;
use crate::mac::Mac;
use crate::pipeline::{process, Action, Context, InPort, PortKind};
use crate::tables::services::DesiredServices;
use crate::tables::{Next, NodeTable, RouteTable, Tables};

const A_MAC: Mac = [2, 0, 0, 0, 0, 0x0a];
const B_MAC: Mac = [2, 0, 0, 0, 0, 0x0b];
const HA_MAC: Mac = [2, 0, 0, 0, 0, 0xa0];
const HB_MAC: Mac = [2, 0, 0, 0, 0, 0xb0];
const A: [u8; 4] = [198, 18, 16, 2];
const B: [u8; 4] = [198, 18, 16, 3];
const VIP: [u8; 4] = [198, 19, 0, 10];
const GW: [u8; 4] = [169, 254, 1, 1];

const A_IPS: [IpAddr; 1] = [IpAddr::V4(Ipv4Addr::new(198, 18, 16, 2))];
const B_IPS: [IpAddr; 1] = [IpAddr::V4(Ipv4Addr::new(198, 18, 16, 3))];

fn port_a() -> InPort<'static> {
    InPort {
        id: 0,
        kind: PortKind::Pod,
        host_mac: HA_MAC,
        pod_mac: A_MAC,
        ips: &A_IPS,
    }
}

fn port_b() -> InPort<'static> {
    InPort {
        id: 1,
        kind: PortKind::Pod,
        host_mac: HB_MAC,
        pod_mac: B_MAC,
        ips: &B_IPS,
    }
}

fn endpoint(ip: [u8; 4], port: u16) -> EndpointSpec {
    EndpointSpec {
        ip: IpAddr::from(ip),
        port,
        ready: true,
        serving: true,
        terminating: false,
        local: true,
        in_topology: true,
        target: String::new(),
    }
}

fn web(endpoints: Vec<EndpointSpec>) -> ServiceSpec {
    ServiceSpec {
        namespace: "t".into(),
        name: "web".into(),
        cluster_ips: vec![IpAddr::from(VIP)],
        external_ips: vec![],
        load_balancer_ips: vec![],
        ports: vec![
            ServicePortSpec {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: None,
                endpoints: endpoints.clone(),
            },
            ServicePortSpec {
                name: "dns".into(),
                protocol: Protocol::Udp,
                port: 53,
                node_port: None,
                endpoints: endpoints
                    .iter()
                    .map(|e| EndpointSpec {
                        port: 5353,
                        ..e.clone()
                    })
                    .collect(),
            },
        ],
        affinity_timeout_s: None,
        external_local: false,
        internal_local: false,
        health_check_node_port: None,
    }
}

fn tables(d: &mut DesiredServices) -> Tables {
    let mut t = Tables {
        node: NodeTable::new(Ipv4Addr::from(GW)),
        routes: RouteTable::default(),
        services: d.table(),
        policy: Default::default(),
    };
    for (ip, port, mac, host) in [(A, 0, A_MAC, HA_MAC), (B, 1, B_MAC, HB_MAC)] {
        t.routes.local.insert(
            IpAddr::from(ip),
            Next {
                port,
                worker: 0,
                dst_mac: mac,
                src_mac: host,
                mtu: 1500,
            },
        );
    }
    t
}

fn with(spec: ServiceSpec) -> (DesiredServices, Tables) {
    let mut d = DesiredServices::default();
    d.set(spec, &[]).unwrap();
    let t = tables(&mut d);
    (d, t)
}

fn tcp(src_mac: Mac, src: ([u8; 4], u16), dst: ([u8; 4], u16), syn: bool) -> Vec<u8> {
    let host = if src_mac == A_MAC { HA_MAC } else { HB_MAC };
    let mut b = PacketBuilder::ethernet2(src_mac, host)
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 1000, 65535);
    if syn {
        b = b.syn();
    } else {
        b = b.ack(5000);
    }
    let mut v = Vec::new();
    b.write(&mut v, if syn { b"" } else { b"data" }).unwrap();
    v
}

fn udp(src_mac: Mac, src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    let host = if src_mac == A_MAC { HA_MAC } else { HB_MAC };
    let b = PacketBuilder::ethernet2(src_mac, host)
        .ipv4(src.0, dst.0, 64)
        .udp(src.1, dst.1);
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

/// Runs a frame through the pipeline: the action, and the frame as it leaves.
fn run(pkt: &[u8], port: &InPort<'_>, t: &Tables, ctx: &mut Context) -> (Action, Vec<u8>) {
    let mut buf = vec![0u8; 2048];
    buf[..pkt.len()].copy_from_slice(pkt);
    let a = process(&mut buf, pkt.len(), port, &t.view(), ctx);
    let len = match a {
        Action::Tx { len, .. }
        | Action::Hairpin { len }
        | Action::Handoff { len, .. }
        | Action::IcmpError { len, .. } => len,
        Action::Drop(_) => pkt.len(),
    };
    buf.truncate(len);
    (a, buf)
}

/// The addresses and ports of a TCP or UDP frame, after checking every checksum in full.
fn endpoints(frame: &[u8]) -> (([u8; 4], u16), ([u8; 4], u16)) {
    let ip = Ipv4Packet::new_checked(&frame[14..]).unwrap();
    assert!(ip.verify_checksum(), "IP checksum");
    let (s, d) = (ip.src_addr(), ip.dst_addr());
    let (sa, da) = (IpAddress::Ipv4(s), IpAddress::Ipv4(d));
    let ports = match ip.next_header() {
        smoltcp::wire::IpProtocol::Tcp => {
            let t = TcpPacket::new_checked(ip.payload()).unwrap();
            assert!(t.verify_checksum(&sa, &da), "TCP checksum");
            (t.src_port(), t.dst_port())
        }
        smoltcp::wire::IpProtocol::Udp => {
            let u = UdpPacket::new_checked(ip.payload()).unwrap();
            assert!(
                u.checksum() == 0 || u.verify_checksum(&sa, &da),
                "UDP checksum"
            );
            (u.src_port(), u.dst_port())
        }
        p => panic!("{p}"),
    };
    ((s.octets(), ports.0), (d.octets(), ports.1))
}

#[test]
fn a_connection_to_a_cluster_ip_reaches_the_backend_and_the_answer_comes_from_the_cluster_ip() {
    let (_d, t) = with(web(vec![endpoint(B, 8080)]));
    let mut ctx = Context::default();
    let (a, out) = run(
        &tcp(A_MAC, (A, 40000), (VIP, 80), true),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { port: 1, .. }), "{a:?}");
    assert_eq!(endpoints(&out), ((A, 40000), (B, 8080)));
    let (a, out) = run(
        &tcp(B_MAC, (B, 8080), (A, 40000), false),
        &port_b(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { port: 0, .. }), "{a:?}");
    assert_eq!(endpoints(&out), ((VIP, 80), (A, 40000)));
    // The next packet of the flow finds its entry.
    let (_, out) = run(
        &tcp(A_MAC, (A, 40000), (VIP, 80), false),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert_eq!(endpoints(&out), ((A, 40000), (B, 8080)));
    assert_eq!(ctx.ct.len(), 1);
    assert_eq!(
        ctx.svc_counts.len(),
        0,
        "the worker sizes counters, not the stage"
    );
}

#[test]
fn a_reply_handed_over_from_another_worker_is_translated_by_the_owner() {
    let (_d, t) = with(web(vec![endpoint(B, 8080)]));
    let mut owner = Context::default();
    let mut other = Context::new(1, 16);
    run(
        &tcp(A_MAC, (A, 40001), (VIP, 80), true),
        &port_a(),
        &t,
        &mut owner,
    );
    // B's worker routes the answer statelessly...
    let (_, mut out) = run(
        &tcp(B_MAC, (B, 8080), (A, 40001), false),
        &port_b(),
        &t,
        &mut other,
    );
    assert_eq!(endpoints(&out), ((B, 8080), (A, 40001)));
    // ...and A's worker, which owns the flow, translates it before sending.
    let len = out.len();
    out.resize(2048, 0);
    super::deliver(&mut out, len, &t.view(), &mut owner, Default::default()).unwrap();
    out.truncate(len);
    assert_eq!(endpoints(&out), ((VIP, 80), (A, 40001)));
}

#[test]
fn a_service_without_endpoints_rejects_tcp_with_a_reset_and_udp_with_port_unreachable() {
    let (_d, t) = with(web(vec![]));
    let mut ctx = Context::default();
    let (a, out) = run(
        &tcp(A_MAC, (A, 40000), (VIP, 80), true),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert!(
        matches!(
            a,
            Action::IcmpError {
                reason: DropReason::ServiceNoEndpoints,
                ..
            }
        ),
        "{a:?}"
    );
    assert_eq!(endpoints(&out), ((VIP, 80), (A, 40000)));
    let ip = Ipv4Packet::new_checked(&out[14..]).unwrap();
    let rst = TcpPacket::new_checked(ip.payload()).unwrap();
    assert!(rst.rst() && rst.ack());
    assert_eq!(
        rst.ack_number(),
        smoltcp::wire::TcpSeqNumber(1001),
        "SYN counts one"
    );
    assert_eq!(&out[..6], &A_MAC);
    let (a, out) = run(
        &udp(A_MAC, (A, 4000), (VIP, 53), b"q"),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert!(
        matches!(
            a,
            Action::IcmpError {
                reason: DropReason::ServiceNoEndpoints,
                ..
            }
        ),
        "{a:?}"
    );
    let ip = Ipv4Packet::new_checked(&out[14..]).unwrap();
    assert!(ip.verify_checksum());
    assert_eq!(ip.src_addr().octets(), VIP);
    assert_eq!(&ip.payload()[..2], &[3, 3], "port unreachable");
    assert!(ctx.ct.is_empty());
}

#[test]
fn a_service_address_on_a_port_it_does_not_serve_is_dropped_by_name() {
    let (_d, t) = with(web(vec![endpoint(B, 8080)]));
    let (a, _) = run(
        &tcp(A_MAC, (A, 40000), (VIP, 81), true),
        &port_a(),
        &t,
        &mut Context::default(),
    );
    assert_eq!(a, Action::Drop(DropReason::ServiceUnknownPort));
}

#[test]
fn a_pod_reaching_itself_through_its_service_gets_through_from_the_gateway() {
    let (_d, t) = with(web(vec![endpoint(A, 8080)]));
    let mut ctx = Context::default();
    let (a, out) = run(
        &tcp(A_MAC, (A, 40000), (VIP, 80), true),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Hairpin { .. }), "{a:?}");
    assert_eq!(endpoints(&out), ((GW, 40000), (A, 8080)));
    // A answers the gateway; the answer goes back to A as from the Service.
    let (a, out) = run(
        &tcp(A_MAC, (A, 8080), (GW, 40000), false),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Hairpin { .. }), "{a:?}");
    assert_eq!(endpoints(&out), ((VIP, 80), (A, 40000)));
}

#[test]
fn a_flow_whose_backend_left_is_reset_and_udp_is_balanced_anew() {
    let (mut d, t) = with(web(vec![endpoint(B, 8080)]));
    let mut ctx = Context::default();
    run(
        &tcp(A_MAC, (A, 40000), (VIP, 80), true),
        &port_a(),
        &t,
        &mut ctx,
    );
    run(
        &udp(A_MAC, (A, 4000), (VIP, 53), b"q"),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert_eq!(ctx.ct.len(), 2);
    d.set(web(vec![endpoint(A, 8080)]), &[]).unwrap();
    let t = tables(&mut d);
    let (a, out) = run(
        &tcp(A_MAC, (A, 40000), (VIP, 80), false),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert!(
        matches!(
            a,
            Action::IcmpError {
                reason: DropReason::BackendGone,
                ..
            }
        ),
        "{a:?}"
    );
    let ip = Ipv4Packet::new_checked(&out[14..]).unwrap();
    assert!(TcpPacket::new_checked(ip.payload()).unwrap().rst());
    let (_, out) = run(
        &udp(A_MAC, (A, 4000), (VIP, 53), b"q"),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert_eq!(endpoints(&out).1, (A, 5353), "the remaining backend");
}

#[test]
fn a_udp_datagram_without_a_checksum_keeps_none() {
    let (_d, t) = with(web(vec![endpoint(B, 8080)]));
    let mut pkt = udp(A_MAC, (A, 4000), (VIP, 53), b"q");
    pkt[14 + 20 + 6] = 0;
    pkt[14 + 20 + 7] = 0;
    let (_, out) = run(&pkt, &port_a(), &t, &mut Context::default());
    assert_eq!(endpoints(&out), ((A, 4000), (B, 5353)));
    assert_eq!(&out[14 + 20 + 6..14 + 20 + 8], &[0, 0]);
}

#[test]
fn an_icmp_error_from_the_backend_reaches_the_client_about_the_service() {
    let (_d, t) = with(web(vec![endpoint(B, 8080)]));
    let mut ctx = Context::default();
    let (_, sent) = run(
        &udp(A_MAC, (A, 4000), (VIP, 53), b"query"),
        &port_a(),
        &t,
        &mut ctx,
    );
    // B has nothing on 5353: port unreachable quoting what it got.
    let quote = &sent[14..14 + 28];
    let b = PacketBuilder::ethernet2(B_MAC, HB_MAC)
        .ipv4(B, A, 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        ));
    let mut pkt = Vec::new();
    b.write(&mut pkt, quote).unwrap();
    let (a, out) = run(&pkt, &port_b(), &t, &mut ctx);
    assert!(matches!(a, Action::Tx { port: 0, .. }), "{a:?}");
    let ip = Ipv4Packet::new_checked(&out[14..]).unwrap();
    assert!(ip.verify_checksum());
    assert_eq!(ip.src_addr().octets(), VIP, "from the address A used");
    let icmp = smoltcp::wire::Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert!(icmp.verify_checksum());
    let inner = Ipv4Packet::new_unchecked(icmp.data());
    assert!(inner.verify_checksum());
    assert_eq!(inner.dst_addr().octets(), VIP);
    assert_eq!(
        &icmp.data()[20..24],
        &[0x0f, 0xa0, 0, 53],
        "ports 4000 -> 53"
    );
}

#[test]
fn a_full_conntrack_table_refuses_new_flows_by_name() {
    let (_d, t) = with(web(vec![endpoint(B, 8080)]));
    let mut ctx = Context::new(0, 2);
    // Two established connections (picked up mid-stream: answered, so not dropped early).
    for p in 0..2 {
        run(
            &tcp(A_MAC, (A, 100 + p), (VIP, 80), false),
            &port_a(),
            &t,
            &mut ctx,
        );
    }
    let (a, _) = run(
        &tcp(A_MAC, (A, 999), (VIP, 80), true),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert_eq!(a, Action::Drop(DropReason::ConntrackFull));
    // Traffic that is no Service's still flows.
    let (a, _) = run(
        &tcp(A_MAC, (A, 999), (B, 80), true),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { port: 1, .. }));
}

#[test]
fn new_connections_spread_evenly_and_a_removed_backend_moves_only_its_own() {
    let c: [u8; 4] = [198, 18, 16, 4];
    let eps = vec![endpoint(A, 8080), endpoint(B, 8080), endpoint(c, 8080)];
    let (mut d, t) = with(web(eps.clone()));
    let pick = |t: &Tables, sport: u16| {
        let (_, out) = run(
            &tcp(A_MAC, (A, sport), (VIP, 80), true),
            &port_a(),
            t,
            &mut Context::default(),
        );
        endpoints(&out).1 .0
    };
    let before: Vec<[u8; 4]> = (0..1000).map(|p| pick(&t, 20000 + p)).collect();
    for b in [A, B, c] {
        let n = before.iter().filter(|x| **x == b).count();
        assert!((283..=383).contains(&n), "{b:?}: {n} of 1000 (±15% of 333)");
    }
    d.set(web(vec![eps[0].clone(), eps[2].clone()]), &[])
        .unwrap();
    let t = tables(&mut d);
    let after: Vec<[u8; 4]> = (0..1000).map(|p| pick(&t, 20000 + p)).collect();
    let moved = before
        .iter()
        .zip(&after)
        .filter(|(x, y)| x != y && **x != B)
        .count();
    assert!(moved < 50, "{moved} flows of the remaining backends moved");
}

#[test]
fn client_ip_affinity_keeps_a_client_on_its_backend() {
    let c: [u8; 4] = [198, 18, 16, 4];
    let mut spec = web(vec![endpoint(B, 8080), endpoint(c, 8080)]);
    spec.affinity_timeout_s = Some(10);
    let (_d, t) = with(spec);
    let mut ctx = Context::default();
    let mut seen = std::collections::BTreeSet::new();
    for p in 0..100 {
        let (_, out) = run(
            &tcp(A_MAC, (A, 30000 + p), (VIP, 80), true),
            &port_a(),
            &t,
            &mut ctx,
        );
        seen.insert(endpoints(&out).1 .0);
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
    // Past the timeout, the client is balanced anew (over many, both backends come up).
    let mut later = std::collections::BTreeSet::new();
    for p in 0..100u16 {
        ctx.now_ms = 11_000 + u64::from(p) * 11_000;
        let (_, out) = run(
            &tcp(A_MAC, (A, 31000 + p), (VIP, 80), true),
            &port_a(),
            &t,
            &mut ctx,
        );
        later.insert(endpoints(&out).1 .0);
    }
    assert_eq!(later.len(), 2, "{later:?}");
}

proptest! {
    /// Any packets of a flow and its answers, through DNAT and back, carry the original
    /// addresses and valid checksums.
    #[test]
    fn dnat_and_back_restore_the_addresses_with_valid_checksums(
        sport in 1u16..,
        udp_proto in any::<bool>(),
        payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..6),
        from_client in proptest::collection::vec(any::<bool>(), 1..6),
    ) {
        let (_d, t) = with(web(vec![endpoint(B, 8080)]));
        let mut ctx = Context::default();
        let (vport, bport) = if udp_proto { (53, 5353) } else { (80, 8080) };
        for (i, payload) in payloads.iter().enumerate() {
            let client = i == 0 || from_client[i % from_client.len()];
            let pkt = match (client, udp_proto) {
                (true, true) => udp(A_MAC, (A, sport), (VIP, vport), payload),
                (false, true) => udp(B_MAC, (B, bport), (A, sport), payload),
                (true, false) => {
                    let b = PacketBuilder::ethernet2(A_MAC, HA_MAC).ipv4(A, VIP, 64).tcp(sport, vport, 7, 100);
                    let b = if i == 0 { b.syn() } else { b.ack(9) };
                    let mut v = Vec::new();
                    b.write(&mut v, payload).unwrap();
                    v
                }
                (false, false) => {
                    let b = PacketBuilder::ethernet2(B_MAC, HB_MAC).ipv4(B, A, 64).tcp(bport, sport, 9, 100).ack(8);
                    let mut v = Vec::new();
                    b.write(&mut v, payload).unwrap();
                    v
                }
            };
            let port = if client { port_a() } else { port_b() };
            let (a, out) = run(&pkt, &port, &t, &mut ctx);
            prop_assert!(matches!(a, Action::Tx { .. }), "{:?}", a);
            let want = if client { ((A, sport), (B, bport)) } else { ((VIP, vport), (A, sport)) };
            prop_assert_eq!(endpoints(&out), want);
        }
    }
}

const NODE: [u8; 4] = [198, 18, 0, 1];
const EXT: [u8; 4] = [198, 18, 0, 2];
const UP_MAC: Mac = [2, 0, 0, 0, 0, 0xee];
const GW_MAC: Mac = [2, 0, 0, 0, 0, 0xef];

/// The tables with a node address, an uplink (port 9) to the outside, masquerade on, and
/// SNAT ports shared by `workers`.
fn node_tables(d: &mut DesiredServices, workers: u16) -> Tables {
    let mut t = tables(d);
    t.node.addrs.insert(IpAddr::from(NODE));
    t.node.v4 = Some(Ipv4Addr::from(NODE));
    t.node.pod_cidr = Some("198.18.16.0/20".parse().unwrap());
    t.node.masquerade = true;
    t.node.snat.workers = workers;
    t.routes.uplink = Some(Next {
        port: 9,
        worker: 0,
        dst_mac: GW_MAC,
        src_mac: UP_MAC,
        mtu: 1500,
    });
    t
}

fn uplink() -> InPort<'static> {
    InPort {
        id: 9,
        kind: PortKind::Uplink,
        host_mac: UP_MAC,
        pod_mac: [0; 6],
        ips: &[],
    }
}

fn from_outside(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(GW_MAC, UP_MAC)
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 1, 100)
        .syn();
    let mut v = Vec::new();
    b.write(&mut v, b"").unwrap();
    v
}

/// `frame` (Ethernet, IPv4 without options, TCP) with other TCP flags and its checksum
/// computed again, as the sender would have.
fn with_tcp_flags(mut frame: Vec<u8>, flags: u8) -> Vec<u8> {
    frame[14 + 20 + 13] = flags;
    let ip = Ipv4Packet::new_unchecked(&frame[14..]);
    let (s, d) = (ip.src_addr(), ip.dst_addr());
    let mut seg = TcpPacket::new_unchecked(&mut frame[14 + 20..]);
    seg.fill_checksum(&IpAddress::Ipv4(s), &IpAddress::Ipv4(d));
    frame
}

#[test]
fn a_pods_connection_leaving_the_cluster_is_masqueraded_and_its_answer_comes_back() {
    let mut d = DesiredServices::default();
    let t = node_tables(&mut d, 1);
    let mut ctx = Context::default();
    let (a, out) = run(
        &tcp(A_MAC, (A, 40000), (EXT, 80), true),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { port: 9, .. }), "{a:?}");
    let ((src, p), dst) = endpoints(&out);
    assert_eq!((src, dst), (NODE, (EXT, 80)));
    assert!((61000..=65535).contains(&p), "{p}");
    let answer = with_tcp_flags(from_outside((EXT, 80), (NODE, p)), 0x12); // SYN-ACK
    let (a, out) = run(&answer, &uplink(), &t, &mut ctx);
    assert!(matches!(a, Action::Tx { port: 0, .. }), "{a:?}");
    assert_eq!(endpoints(&out), ((EXT, 80), (A, 40000)));
    // Inside the cluster nothing is masqueraded.
    let (_, out) = run(
        &tcp(A_MAC, (A, 40001), (B, 80), true),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert_eq!(endpoints(&out).0, (A, 40001));
}

#[test]
fn a_node_port_from_outside_is_snated_to_the_node_under_cluster_policy_and_not_under_local() {
    let mut spec = web(vec![endpoint(B, 8080)]);
    spec.ports[0].node_port = Some(30080);
    let mut d = DesiredServices::default();
    d.set(spec.clone(), &[Ipv4Addr::from(NODE)]).unwrap();
    let t = node_tables(&mut d, 1);
    let mut ctx = Context::default();
    let (a, out) = run(
        &from_outside((EXT, 5555), (NODE, 30080)),
        &uplink(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { port: 1, .. }), "{a:?}");
    let ((src, p), dst) = endpoints(&out);
    assert_eq!((src, dst), (NODE, (B, 8080)), "from the node: Cluster");
    // B answers the node; the answer leaves as from the NodePort, to the client.
    let (a, out) = run(
        &tcp(B_MAC, (B, 8080), (NODE, p), false),
        &port_b(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { port: 9, .. }), "{a:?}");
    assert_eq!(endpoints(&out), ((NODE, 30080), (EXT, 5555)));

    spec.external_local = true;
    d.set(spec, &[Ipv4Addr::from(NODE)]).unwrap();
    let t = node_tables(&mut d, 1);
    let (_, out) = run(
        &from_outside((EXT, 5556), (NODE, 30080)),
        &uplink(),
        &t,
        &mut ctx,
    );
    assert_eq!(
        endpoints(&out),
        ((EXT, 5556), (B, 8080)),
        "client kept: Local"
    );
}

#[test]
fn an_answer_to_another_workers_snat_port_is_handed_to_it_and_translated_there() {
    let mut d = DesiredServices::default();
    let t = node_tables(&mut d, 2);
    let mut owner = Context::new(0, 64);
    let mut other = Context::new(1, 64);
    let (_, out) = run(
        &tcp(A_MAC, (A, 40000), (EXT, 80), true),
        &port_a(),
        &t,
        &mut owner,
    );
    let ((_, p), _) = endpoints(&out);
    assert_eq!(t.node.snat.owner(p), Some(0));
    let answer = with_tcp_flags(from_outside((EXT, 80), (NODE, p)), 0x10);
    let (a, mut out) = run(&answer, &uplink(), &t, &mut other);
    assert_eq!(
        a,
        Action::Handoff {
            worker: 0,
            port: crate::pipeline::REROUTE,
            len: answer.len()
        }
    );
    let len = out.len();
    out.resize(2048, 0);
    let a = crate::pipeline::reroute(&mut out, len, &t.view(), &mut owner);
    assert!(matches!(a, Action::Tx { port: 0, .. }), "{a:?}");
    out.truncate(len);
    assert_eq!(endpoints(&out), ((EXT, 80), (A, 40000)));
    // An answer to a port no flow has is dropped by name, on the owner too.
    let (a, _) = run(
        &from_outside((EXT, 81), (NODE, 61001)),
        &uplink(),
        &t,
        &mut owner,
    );
    assert_eq!(a, Action::Drop(DropReason::NodePortUnknown));
}

#[test]
fn a_backends_answer_to_a_node_port_client_is_rerouted_to_the_owner_and_leaves_by_the_uplink() {
    let mut spec = web(vec![endpoint(B, 8080)]);
    spec.ports[0].node_port = Some(30080);
    let mut d = DesiredServices::default();
    d.set(spec, &[Ipv4Addr::from(NODE)]).unwrap();
    let t = node_tables(&mut d, 2);
    let mut uplink_worker = Context::new(0, 64);
    let mut backend_worker = Context::new(1, 64);
    let (_, out) = run(
        &from_outside((EXT, 5555), (NODE, 30080)),
        &uplink(),
        &t,
        &mut uplink_worker,
    );
    let ((_, p), _) = endpoints(&out);
    let (a, mut out) = run(
        &tcp(B_MAC, (B, 8080), (NODE, p), false),
        &port_b(),
        &t,
        &mut backend_worker,
    );
    assert!(
        matches!(
            a,
            Action::Handoff {
                worker: 0,
                port: crate::pipeline::REROUTE,
                ..
            }
        ),
        "{a:?}"
    );
    let len = out.len();
    out.resize(2048, 0);
    let a = crate::pipeline::reroute(&mut out, len, &t.view(), &mut uplink_worker);
    assert!(matches!(a, Action::Tx { port: 9, .. }), "{a:?}");
    out.truncate(len);
    assert_eq!(endpoints(&out), ((NODE, 30080), (EXT, 5555)));
}

#[test]
fn fragmentation_needed_toward_a_backend_reaches_the_client_about_the_node_port() {
    let mut spec = web(vec![endpoint(B, 8080)]);
    spec.ports[0].node_port = Some(30080);
    let mut d = DesiredServices::default();
    d.set(spec, &[Ipv4Addr::from(NODE)]).unwrap();
    let mut t = node_tables(&mut d, 1);
    t.routes.local.get_mut(&IpAddr::from(B)).unwrap().mtu = 1000;
    let b = PacketBuilder::ethernet2(GW_MAC, UP_MAC)
        .ipv4(EXT, NODE, 64)
        .tcp(5555, 30080, 1, 100)
        .syn();
    let mut big = Vec::new();
    b.write(&mut big, &[0u8; 1200]).unwrap();
    big[14 + 6] |= 0x40; // DF
    big[14 + 10] = 0;
    big[14 + 11] = 0;
    let c = {
        let ip = Ipv4Packet::new_unchecked(&big[14..]);
        !smoltcp::wire::checksum::data(&ip.as_ref()[..20])
    };
    big[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    let (a, out) = run(&big, &uplink(), &t, &mut Context::default());
    assert!(
        matches!(
            a,
            Action::IcmpError {
                reason: DropReason::FragNeeded,
                ..
            }
        ),
        "{a:?}"
    );
    let ip = Ipv4Packet::new_checked(&out[14..]).unwrap();
    assert!(ip.verify_checksum());
    assert_eq!(ip.dst_addr().octets(), EXT, "to the client");
    let icmp = smoltcp::wire::Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert!(icmp.verify_checksum());
    let inner = Ipv4Packet::new_unchecked(icmp.data());
    assert_eq!(
        (inner.src_addr().octets(), inner.dst_addr().octets()),
        (EXT, NODE),
        "the quote as the client sent it"
    );
    assert_eq!(
        &icmp.data()[20..24],
        &[0x15, 0xb3, 0x75, 0x80],
        "5555 -> 30080"
    );
}

#[test]
fn a_pods_answer_to_a_connection_from_outside_is_not_masqueraded() {
    let mut d = DesiredServices::default();
    let mut t = node_tables(&mut d, 2);
    // Pod A on worker 0 (the uplink's), pod B on worker 1.
    t.routes.local.get_mut(&IpAddr::from(B)).unwrap().worker = 1;
    let mut w0 = Context::new(0, 64);
    let mut w1 = Context::new(1, 64);
    // A: the uplink's worker tracks the connection as it comes in.
    let (a, _) = run(&from_outside((EXT, 5555), (A, 80)), &uplink(), &t, &mut w0);
    assert!(matches!(a, Action::Tx { port: 0, .. }), "{a:?}");
    let (a, out) = run(
        &tcp(A_MAC, (A, 80), (EXT, 5555), false),
        &port_a(),
        &t,
        &mut w0,
    );
    assert!(matches!(a, Action::Tx { port: 9, .. }), "{a:?}");
    assert_eq!(
        endpoints(&out),
        ((A, 80), (EXT, 5555)),
        "A's answer as it is"
    );
    // B: handed to worker 1, which tracks it on delivery.
    let (a, mut out) = run(&from_outside((EXT, 5556), (B, 80)), &uplink(), &t, &mut w0);
    let Action::Handoff { worker: 1, len, .. } = a else {
        panic!("{a:?}")
    };
    out.resize(2048, 0);
    super::deliver(&mut out, len, &t.view(), &mut w1, Default::default()).unwrap();
    let (a, out) = run(
        &tcp(B_MAC, (B, 80), (EXT, 5556), false),
        &port_b(),
        &t,
        &mut w1,
    );
    assert!(matches!(a, Action::Handoff { port: 9, .. }), "{a:?}");
    assert_eq!(
        endpoints(&out),
        ((B, 80), (EXT, 5556)),
        "B's answer as it is"
    );
    // A connection B opens is masqueraded.
    let (_, out) = run(
        &tcp(B_MAC, (B, 81), (EXT, 5556), true),
        &port_b(),
        &t,
        &mut w1,
    );
    assert_eq!(endpoints(&out).0 .0, NODE);
}

#[test]
fn a_masqueraded_connection_survives_a_change_of_any_service() {
    let mut d = DesiredServices::default();
    let t = node_tables(&mut d, 1);
    let mut ctx = Context::default();
    let (_, out) = run(
        &tcp(A_MAC, (A, 40000), (EXT, 80), true),
        &port_a(),
        &t,
        &mut ctx,
    );
    let first = endpoints(&out).0;
    d.set(web(vec![endpoint(B, 8080)]), &[]).unwrap();
    let t = node_tables(&mut d, 1);
    let (a, out) = run(
        &tcp(A_MAC, (A, 40000), (EXT, 80), false),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { port: 9, .. }), "{a:?}");
    assert_eq!(endpoints(&out).0, first, "the same translation");
}

#[test]
fn a_flow_that_began_before_its_destination_became_a_service_gives_way_to_the_service() {
    // A pod reaches 198.19.0.10 before stromd has the Service: masqueraded out, unanswered.
    let mut d = DesiredServices::default();
    let t = node_tables(&mut d, 1);
    let mut ctx = Context::default();
    let mut snat = 0;
    for src in [(A, 40000), (A, 40001)] {
        let (a, out) = run(&tcp(A_MAC, src, (VIP, 80), true), &port_a(), &t, &mut ctx);
        assert!(matches!(a, Action::Tx { port: 9, .. }), "{a:?}");
        let (node, port) = endpoints(&out).0;
        assert_eq!(node, NODE, "masqueraded");
        snat = port;
    }
    let (a, _) = run(
        &udp(A_MAC, (A, 40002), (VIP, 53), b"q"),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { port: 9, .. }), "{a:?}");
    // The second connection is answered (its SYN-ACK back to the pod); the pod's ACK after
    // the Service appears establishes it.
    let answer = with_tcp_flags(from_outside((VIP, 80), (NODE, snat)), 0x12);
    let (_, out) = run(&answer, &uplink(), &t, &mut ctx);
    assert_eq!(endpoints(&out), ((VIP, 80), (A, 40001)));

    // The Service appears. The pod's next connection on the first tuple (its port reused)
    // goes to the backend, and so does its next datagram; the established connection keeps
    // its path.
    d.set(web(vec![endpoint(B, 8080)]), &[]).unwrap();
    let t = node_tables(&mut d, 1);
    let (a, out) = run(
        &tcp(A_MAC, (A, 40000), (VIP, 80), true),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { port: 1, .. }), "{a:?}");
    assert_eq!(endpoints(&out), ((A, 40000), (B, 8080)));
    let (a, out) = run(
        &udp(A_MAC, (A, 40002), (VIP, 53), b"q"),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { port: 1, .. }), "{a:?}");
    assert_eq!(endpoints(&out), ((A, 40002), (B, 5353)));
    let (a, out) = run(
        &tcp(A_MAC, (A, 40001), (VIP, 80), false),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert!(matches!(a, Action::Tx { port: 9, .. }), "{a:?}");
    assert_eq!(
        endpoints(&out).0,
        (NODE, snat),
        "the established connection as before"
    );
}

#[test]
fn a_routers_fragmentation_needed_about_a_masqueraded_flow_is_translated_by_its_owner() {
    let mut d = DesiredServices::default();
    let t = node_tables(&mut d, 2);
    let mut owner = Context::new(0, 64);
    let mut uplink_worker = Context::new(1, 64);
    let (_, sent) = run(
        &tcp(A_MAC, (A, 40000), (EXT, 80), true),
        &port_a(),
        &t,
        &mut owner,
    );
    // A router beyond the uplink answers the masqueraded packet: to the node's address,
    // quoting node:p -> EXT:80.
    const ROUTER: [u8; 4] = [198, 18, 0, 254];
    let b = PacketBuilder::ethernet2(GW_MAC, UP_MAC)
        .ipv4(ROUTER, NODE, 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1280 },
        ));
    let mut err = Vec::new();
    b.write(&mut err, &sent[14..14 + 28]).unwrap();
    let (a, mut out) = run(&err, &uplink(), &t, &mut uplink_worker);
    assert_eq!(
        a,
        Action::Handoff {
            worker: 0,
            port: crate::pipeline::REROUTE,
            len: err.len()
        },
        "the SNAT port's owner translates it"
    );
    let len = out.len();
    out.resize(2048, 0);
    let a = crate::pipeline::reroute(&mut out, len, &t.view(), &mut owner);
    assert!(matches!(a, Action::Tx { port: 0, .. }), "to pod A: {a:?}");
    out.truncate(len);
    let ip = Ipv4Packet::new_checked(&out[14..]).unwrap();
    assert!(ip.verify_checksum());
    assert_eq!(
        (ip.src_addr().octets(), ip.dst_addr().octets()),
        (ROUTER, A)
    );
    let icmp = smoltcp::wire::Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert!(icmp.verify_checksum());
    let inner = Ipv4Packet::new_unchecked(icmp.data());
    assert_eq!(
        (inner.src_addr().octets(), inner.dst_addr().octets()),
        (A, EXT),
        "the quote as pod A sent it"
    );
    assert_eq!(&icmp.data()[20..22], &40000u16.to_be_bytes());
    // On the owner's own queue it is translated at once.
    let (a, out) = run(&err, &uplink(), &t, &mut owner);
    assert!(matches!(a, Action::Tx { port: 0, .. }), "{a:?}");
    let ip = Ipv4Packet::new_checked(&out[14..]).unwrap();
    assert_eq!(ip.dst_addr().octets(), A);
}

#[test]
fn a_pods_connection_to_an_endpoint_outside_the_cluster_leaves_from_the_node() {
    let mut d = DesiredServices::default();
    d.set(web(vec![endpoint(EXT, 8080)]), &[Ipv4Addr::from(NODE)])
        .unwrap();
    let t = node_tables(&mut d, 1);
    let mut ctx = Context::default();
    let (a, out) = run(
        &tcp(A_MAC, (A, 40000), (VIP, 80), true),
        &port_a(),
        &t,
        &mut ctx,
    );
    assert!(
        matches!(a, Action::Tx { port: 9, .. }),
        "out by the uplink: {a:?}"
    );
    let ((src, p), dst) = endpoints(&out);
    assert_eq!((src, dst), (NODE, (EXT, 8080)), "DNAT and masquerade");
    let answer = with_tcp_flags(from_outside((EXT, 8080), (NODE, p)), 0x12);
    let (a, out) = run(&answer, &uplink(), &t, &mut ctx);
    assert!(matches!(a, Action::Tx { port: 0, .. }), "{a:?}");
    assert_eq!(
        endpoints(&out),
        ((VIP, 80), (A, 40000)),
        "as from the Service"
    );
}

fn echo(src_mac: Mac, src: [u8; 4], dst: [u8; 4], id: u16, request: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, if src_mac == GW_MAC { UP_MAC } else { HA_MAC })
        .ipv4(src, dst, 64);
    let b = if request {
        b.icmpv4_echo_request(id, 7)
    } else {
        b.icmpv4_echo_reply(id, 7)
    };
    let mut v = Vec::new();
    b.write(&mut v, b"ping").unwrap();
    v
}

/// (source, destination, identifier) of an echo frame, its checksums checked.
fn echo_of(frame: &[u8]) -> ([u8; 4], [u8; 4], u16) {
    let ip = Ipv4Packet::new_checked(&frame[14..]).unwrap();
    assert!(ip.verify_checksum(), "IP checksum");
    let icmp = smoltcp::wire::Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert!(icmp.verify_checksum(), "ICMP checksum");
    (
        ip.src_addr().octets(),
        ip.dst_addr().octets(),
        icmp.echo_ident(),
    )
}

#[test]
fn a_pods_ping_to_the_outside_is_masqueraded_and_its_reply_comes_back() {
    let mut d = DesiredServices::default();
    let t = node_tables(&mut d, 1);
    let mut ctx = Context::default();
    let (a, out) = run(&echo(A_MAC, A, EXT, 77, true), &port_a(), &t, &mut ctx);
    assert!(matches!(a, Action::Tx { port: 9, .. }), "{a:?}");
    let (src, dst, id) = echo_of(&out);
    assert_eq!((src, dst), (NODE, EXT));
    assert!((61000..=65535).contains(&id), "{id}");
    // The next request of the same ping keeps its identifier.
    let (_, again) = run(&echo(A_MAC, A, EXT, 77, true), &port_a(), &t, &mut ctx);
    assert_eq!(echo_of(&again), (NODE, EXT, id));
    let (a, back) = run(&echo(GW_MAC, EXT, NODE, id, false), &uplink(), &t, &mut ctx);
    assert!(matches!(a, Action::Tx { port: 0, .. }), "{a:?}");
    assert_eq!(
        echo_of(&back),
        (EXT, A, 77),
        "the reply as pod A's ping expects it"
    );
    // A pod's ping inside the cluster is not translated, and its echo reply to a ping
    // nobody tracked starts nothing.
    let (_, out) = run(&echo(A_MAC, A, B, 78, true), &port_a(), &t, &mut ctx);
    assert_eq!(echo_of(&out), (A, B, 78));
    let (_, out) = run(&echo(A_MAC, A, EXT, 79, false), &port_a(), &t, &mut ctx);
    assert_eq!(echo_of(&out), (A, EXT, 79));
}

#[test]
fn a_routers_error_about_a_masqueraded_ping_reaches_the_pod_with_its_own_identifier() {
    let mut d = DesiredServices::default();
    let t = node_tables(&mut d, 1);
    let mut ctx = Context::default();
    let (_, sent) = run(&echo(A_MAC, A, EXT, 77, true), &port_a(), &t, &mut ctx);
    let (_, _, id) = echo_of(&sent);
    // A router on the way (EXT stands for it) answers time exceeded, quoting the request as
    // it left the node: from the node, with the node's identifier.
    let quote = &sent[14..14 + 28];
    let b = PacketBuilder::ethernet2(GW_MAC, UP_MAC)
        .ipv4(EXT, NODE, 64)
        .icmpv4(etherparse::Icmpv4Type::TimeExceeded(
            etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
        ));
    let mut pkt = Vec::new();
    b.write(&mut pkt, quote).unwrap();
    let (a, out) = run(&pkt, &uplink(), &t, &mut ctx);
    assert!(matches!(a, Action::Tx { port: 0, .. }), "{a:?}");
    let ip = Ipv4Packet::new_checked(&out[14..]).unwrap();
    assert!(ip.verify_checksum());
    assert_eq!((ip.src_addr().octets(), ip.dst_addr().octets()), (EXT, A));
    let icmp = smoltcp::wire::Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert!(
        icmp.verify_checksum(),
        "the error's checksum over the quote"
    );
    let inner = Ipv4Packet::new_unchecked(icmp.data());
    assert!(inner.verify_checksum());
    assert_eq!(
        (inner.src_addr().octets(), inner.dst_addr().octets()),
        (A, EXT),
        "the quote as pod A sent it"
    );
    let original = echo(A_MAC, A, EXT, 77, true);
    assert_eq!(
        &icmp.data()[20..28],
        &original[34..42],
        "the quoted echo header as pod A sent it: its identifier and checksum"
    );
    assert_ne!(id, 77, "the identifier was translated on the way out");
    // An error about an error is not translated (and starts nothing).
    let mut nested = Vec::new();
    PacketBuilder::ethernet2(GW_MAC, UP_MAC)
        .ipv4(EXT, NODE, 64)
        .icmpv4(etherparse::Icmpv4Type::TimeExceeded(
            etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
        ))
        .write(&mut nested, &pkt[14..14 + 28])
        .unwrap();
    let (_, out) = run(&nested, &uplink(), &t, &mut ctx);
    let ip = Ipv4Packet::new_checked(&out[14..]).unwrap();
    assert_eq!(ip.dst_addr().octets(), NODE, "left to the node");
}

/// `frame` (Ethernet + IPv4, no options) as two fragments: the first carries `first` bytes of
/// the IP payload (a multiple of 8), the second the rest.
fn fragments(frame: &[u8], first: usize) -> (Vec<u8>, Vec<u8>) {
    let payload = &frame[34..];
    let part = |from: usize, to: usize, more: bool| {
        let mut f = frame[..34].to_vec();
        f.extend_from_slice(&payload[from..to]);
        let total = (20 + to - from) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        let flags_off = ((from / 8) as u16) | if more { 0x2000 } else { 0 };
        f[20..22].copy_from_slice(&flags_off.to_be_bytes());
        f[24] = 0;
        f[25] = 0;
        let c = !smoltcp::wire::checksum::data(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f
    };
    (part(0, first, true), part(first, payload.len(), false))
}

/// `frame` with another IP identification (another datagram's fragment).
fn with_ident(mut frame: Vec<u8>, ident: u16) -> Vec<u8> {
    frame[18..20].copy_from_slice(&ident.to_be_bytes());
    frame[24] = 0;
    frame[25] = 0;
    let c = !smoltcp::wire::checksum::data(&frame[14..34]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
    frame
}

/// The datagram two fragments make (in order), its UDP checksum checked whole.
fn reassembled(first: &[u8], second: &[u8]) -> (([u8; 4], u16), ([u8; 4], u16)) {
    let a = Ipv4Packet::new_checked(&first[14..]).unwrap();
    let b = Ipv4Packet::new_checked(&second[14..]).unwrap();
    assert!(a.verify_checksum() && b.verify_checksum(), "IP checksums");
    assert_eq!(a.ident(), b.ident());
    assert_eq!((a.src_addr(), a.dst_addr()), (b.src_addr(), b.dst_addr()));
    let mut udp = a.payload().to_vec();
    udp.extend_from_slice(b.payload());
    let (s, d) = (a.src_addr(), a.dst_addr());
    let u = UdpPacket::new_checked(&udp[..]).unwrap();
    assert!(
        u.verify_checksum(&IpAddress::Ipv4(s), &IpAddress::Ipv4(d)),
        "the whole datagram's UDP checksum"
    );
    ((s.octets(), u.src_port()), (d.octets(), u.dst_port()))
}

#[test]
fn a_fragmented_datagram_through_a_service_is_translated_fragment_by_fragment() {
    let (_d, t) = with(web(vec![endpoint(B, 8080)]));
    let mut ctx = Context::default();
    let big = udp(A_MAC, (A, 5000), (VIP, 53), &[7u8; 1600]);
    let (f1, f2) = fragments(&big, 1480);
    let (a1, o1) = run(&f1, &port_a(), &t, &mut ctx);
    let (a2, o2) = run(&f2, &port_a(), &t, &mut ctx);
    assert!(matches!(a1, Action::Tx { port: 1, .. }), "{a1:?}");
    assert!(matches!(a2, Action::Tx { port: 1, .. }), "{a2:?}");
    assert_eq!(reassembled(&o1, &o2), ((A, 5000), (B, 5353)));
    // B's fragmented answer comes back as from the Service.
    let answer = udp(B_MAC, (B, 5353), (A, 5000), &[8u8; 1600]);
    let (f1, f2) = fragments(&answer, 1480);
    let (_, o1) = run(&f1, &port_b(), &t, &mut ctx);
    let (_, o2) = run(&f2, &port_b(), &t, &mut ctx);
    assert_eq!(reassembled(&o1, &o2), ((VIP, 53), (A, 5000)));
    // A later fragment whose first was never seen is not a Service's to guess: dropped.
    let lone = udp(A_MAC, (A, 5001), (VIP, 53), &[7u8; 1600]);
    let (_, f2) = fragments(&lone, 1480);
    let (a, _) = run(&with_ident(f2, 0x55), &port_a(), &t, &mut ctx);
    assert_eq!(a, Action::Drop(DropReason::ServiceUnknownPort));
}

#[test]
fn a_pods_fragmented_datagram_to_the_outside_is_masqueraded_or_dropped_never_leaked() {
    let mut d = DesiredServices::default();
    let t = node_tables(&mut d, 1);
    let mut ctx = Context::default();
    let big = udp(A_MAC, (A, 5000), (EXT, 53), &[7u8; 1400]);
    let (f1, f2) = fragments(&big, 1000);
    let (_, o1) = run(&f1, &port_a(), &t, &mut ctx);
    let (_, o2) = run(&f2, &port_a(), &t, &mut ctx);
    let ((src, _), dst) = reassembled(&o1, &o2);
    assert_eq!((src, dst), (NODE, (EXT, 53)));
    // The second fragment of another datagram, first (out of order): not with A's address.
    let other = udp(A_MAC, (A, 5002), (EXT, 53), &[7u8; 1400]);
    let (_, f2) = fragments(&other, 1000);
    let (a, _) = run(&with_ident(f2, 0x55), &port_a(), &t, &mut ctx);
    assert_eq!(a, Action::Drop(DropReason::FragmentUntranslated));
    // Between pods, fragments pass as they are.
    let inside = udp(A_MAC, (A, 5003), (B, 53), &[7u8; 1400]);
    let (_, f2) = fragments(&inside, 1000);
    let (a, _) = run(&f2, &port_a(), &t, &mut ctx);
    assert!(matches!(a, Action::Tx { port: 1, .. }), "{a:?}");
}

#[test]
fn a_pods_fragmented_answer_to_a_client_outside_leaves_whole_and_unmasqueraded() {
    let mut d = DesiredServices::default();
    let t = node_tables(&mut d, 1);
    let mut ctx = Context::default();
    let b = PacketBuilder::ethernet2(GW_MAC, UP_MAC)
        .ipv4(EXT, A, 64)
        .udp(7000, 53);
    let mut q = Vec::new();
    b.write(&mut q, b"query").unwrap();
    let (a, _) = run(&q, &uplink(), &t, &mut ctx);
    assert!(matches!(a, Action::Tx { port: 0, .. }), "{a:?}");
    let answer = udp(A_MAC, (A, 53), (EXT, 7000), &[9u8; 1400]);
    let (f1, f2) = fragments(&answer, 1000);
    let (a1, o1) = run(&f1, &port_a(), &t, &mut ctx);
    let (a2, o2) = run(&f2, &port_a(), &t, &mut ctx);
    assert!(matches!(a1, Action::Tx { port: 9, .. }), "{a1:?}");
    assert!(matches!(a2, Action::Tx { port: 9, .. }), "{a2:?}");
    assert_eq!(reassembled(&o1, &o2), ((A, 53), (EXT, 7000)));
}

#[path = "policy_tests.rs"]
mod policy_tests;

#[path = "spread_tests.rs"]
mod spread_tests;
