//! Pipeline scenarios. Every test is one behaviour, on this topology:
//!
//! ```text
//!   pod A 198.18.16.2 ──veth── [port 0 | stromd | port 1] ──veth── pod B 198.18.16.3
//!   mac 02:..:0a               host 02:..:a0   host 02:..:b0        mac 02:..:0b
//!                      gateway 169.254.1.1 (answered on every port)
//! ```
//! Packets are built and checked with etherparse, an independent implementation.

use std::net::{IpAddr, Ipv4Addr};

use etherparse::{Ipv4Header, PacketBuilder};
use proptest::prelude::*;

use super::*;
use crate::tables::{Next, NodeTable, RouteTable, Tables};

const A_MAC: Mac = [2, 0, 0, 0, 0, 0x0a];
const B_MAC: Mac = [2, 0, 0, 0, 0, 0x0b];
const HA_MAC: Mac = [2, 0, 0, 0, 0, 0xa0];
const HB_MAC: Mac = [2, 0, 0, 0, 0, 0xb0];
const A_IP: [u8; 4] = [198, 18, 16, 2];
const B_IP: [u8; 4] = [198, 18, 16, 3];
const GW: [u8; 4] = [169, 254, 1, 1];

fn tables() -> Tables {
    let mut t = Tables {
        node: NodeTable::new(Ipv4Addr::from(GW)),
        routes: RouteTable::default(),
        services: Default::default(),
        policy: Default::default(),
    };
    t.routes.local.insert(
        IpAddr::from(A_IP),
        Next {
            port: 0,
            worker: 0,
            dst_mac: A_MAC,
            src_mac: HA_MAC,
            mtu: 1500,
        },
    );
    t.routes.local.insert(
        IpAddr::from(B_IP),
        Next {
            port: 1,
            worker: 1,
            dst_mac: B_MAC,
            src_mac: HB_MAC,
            mtu: 1500,
        },
    );
    t.node.addrs.insert(IpAddr::from([198, 18, 0, 1]));
    t
}

const A_IPS: [IpAddr; 1] = [IpAddr::V4(Ipv4Addr::new(198, 18, 16, 2))];

fn port_a() -> InPort<'static> {
    InPort {
        id: 0,
        kind: PortKind::Pod,
        host_mac: HA_MAC,
        pod_mac: A_MAC,
        ips: &A_IPS,
    }
}

/// The uplink's socket `id` (one per receive queue), its host side MAC `host_mac`.
fn uplink_port(id: u32, host_mac: [u8; 6]) -> InPort<'static> {
    InPort {
        id,
        kind: PortKind::Uplink,
        host_mac,
        pod_mac: [0; 6],
        ips: &[],
    }
}

/// A frame buffer as a UMEM frame: the packet, then room to grow.
fn frame(pkt: &[u8]) -> (Vec<u8>, usize) {
    let mut buf = vec![0u8; 2048];
    buf[..pkt.len()].copy_from_slice(pkt);
    (buf, pkt.len())
}

fn udp(src_mac: Mac, src: [u8; 4], dst: [u8; 4], ttl: u8) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, HA_MAC)
        .ipv4(src, dst, ttl)
        .udp(4000, 53);
    let payload = b"hello";
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    v
}

fn icmp_echo(ttl: u8) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(A_MAC, HA_MAC)
        .ipv4(A_IP, B_IP, ttl)
        .icmpv4_echo_request(7, 1);
    let mut v = Vec::new();
    b.write(&mut v, b"ping-payload").unwrap();
    v
}

fn arp(op: u16, sha: Mac, spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&[0xff; 6]);
    v.extend_from_slice(&sha);
    v.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4]);
    v.extend_from_slice(&op.to_be_bytes());
    v.extend_from_slice(&sha);
    v.extend_from_slice(&spa);
    v.extend_from_slice(&[0; 6]);
    v.extend_from_slice(&tpa);
    v
}

fn run(pkt: &[u8]) -> (Action, Vec<u8>) {
    let (mut buf, len) = frame(pkt);
    let a = process(
        &mut buf,
        len,
        &port_a(),
        &tables().view(),
        &mut Context::default(),
    );
    (a, buf)
}

fn ip_checksum_ok(ip: &[u8]) -> bool {
    let (h, _) = Ipv4Header::from_slice(ip).unwrap();
    h.header_checksum == h.calc_header_checksum()
}

#[test]
fn arp_request_for_gateway_is_answered_with_host_mac() {
    let (a, out) = run(&arp(1, A_MAC, A_IP, GW));
    let Action::Hairpin { len } = a else {
        panic!("{a:?}")
    };
    assert_eq!(len, 42);
    assert_eq!(&out[0..6], &A_MAC, "reply goes to the asker");
    assert_eq!(&out[6..12], &HA_MAC);
    assert_eq!(&out[20..22], &[0, 2], "op = reply");
    assert_eq!(&out[22..28], &HA_MAC, "sender hw = host side MAC");
    assert_eq!(&out[28..32], &GW);
    assert_eq!(&out[32..38], &A_MAC);
    assert_eq!(&out[38..42], &A_IP);
}

#[test]
fn arp_not_for_the_gateway_is_dropped() {
    assert_eq!(
        run(&arp(1, A_MAC, A_IP, B_IP)).0,
        Action::Drop(DropReason::ArpNotForGateway)
    );
    assert_eq!(
        run(&arp(2, A_MAC, A_IP, GW)).0,
        Action::Drop(DropReason::ArpNotForGateway),
        "replies are not answered"
    );
}

#[test]
fn arp_from_another_mac_or_ip_is_spoofing() {
    assert_eq!(
        run(&arp(1, B_MAC, A_IP, GW)).0,
        Action::Drop(DropReason::SpoofedMac)
    );
    assert_eq!(
        run(&arp(1, A_MAC, B_IP, GW)).0,
        Action::Drop(DropReason::SpoofedIp)
    );
}

#[test]
fn truncated_arp_is_malformed() {
    let p = arp(1, A_MAC, A_IP, GW);
    assert_eq!(run(&p[..30]).0, Action::Drop(DropReason::ArpMalformed));
}

#[test]
fn pod_to_pod_is_forwarded_with_new_macs_and_ttl() {
    let (a, out) = run(&udp(A_MAC, A_IP, B_IP, 64));
    let Action::Handoff { worker, port, len } = a else {
        panic!("{a:?}")
    };
    assert_eq!((worker, port), (1, 1), "B's port, on B's worker");
    assert_eq!(&out[0..6], &B_MAC);
    assert_eq!(&out[6..12], &HB_MAC);
    let (h, _) = Ipv4Header::from_slice(&out[14..len]).unwrap();
    assert_eq!(h.time_to_live, 63);
    assert_eq!(h.source, A_IP);
    assert_eq!(h.destination, B_IP, "no NAT between pods");
    assert!(ip_checksum_ok(&out[14..len]));
}

#[test]
fn ttl_one_gets_time_exceeded_from_the_gateway() {
    let orig = icmp_echo(1);
    let (a, out) = run(&orig);
    let Action::IcmpError { reason, len } = a else {
        panic!("{a:?}")
    };
    assert_eq!(reason, DropReason::TtlExpired);
    let p = etherparse::SlicedPacket::from_ethernet(&out[..len]).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    assert_eq!(ip.header().source(), GW);
    assert_eq!(ip.header().destination(), A_IP);
    assert!(ip_checksum_ok(&out[14..len]));
    assert_eq!(&out[0..6], &A_MAC);
    assert_eq!(&out[6..12], &HA_MAC);
    let icmp = &out[34..len];
    assert_eq!(icmp[0], 11, "time exceeded");
    assert_eq!(icmp[1], 0, "in transit");
    assert_eq!(smoltcp::wire::checksum::data(icmp), 0xffff, "ICMP checksum");
    assert_eq!(
        &icmp[8..8 + 28],
        &orig[14..14 + 28],
        "quotes the original header + 8 bytes"
    );
}

#[test]
fn no_icmp_error_about_an_icmp_error() {
    let mut p = icmp_echo(1);
    // Turn the echo request into a destination-unreachable (type 3) and fix its checksum.
    p[34] = 3;
    p[36] = 0;
    p[37] = 0;
    let c = !smoltcp::wire::checksum::data(&p[34..]);
    p[36..38].copy_from_slice(&c.to_be_bytes());
    assert_eq!(run(&p).0, Action::Drop(DropReason::TtlExpired));
}

#[test]
fn a_pod_sends_only_as_itself() {
    assert_eq!(
        run(&udp(B_MAC, A_IP, B_IP, 64)).0,
        Action::Drop(DropReason::SpoofedMac)
    );
    assert_eq!(
        run(&udp(A_MAC, [198, 18, 16, 99], B_IP, 64)).0,
        Action::Drop(DropReason::SpoofedIp)
    );
}

#[test]
fn uplink_frames_for_pods_are_routed_without_spoofing_checks() {
    let (mut buf, len) = frame(&udp([9; 6], [198, 18, 0, 2], B_IP, 64));
    let a = process(
        &mut buf,
        len,
        &uplink_port(9, HA_MAC),
        &tables().view(),
        &mut Context::default(),
    );
    assert!(matches!(a, Action::Handoff { port: 1, .. }), "{a:?}");
}

#[test]
fn outside_destinations_leave_through_the_uplink_once_its_gateway_is_known() {
    let mut t = tables();
    t.node.pod_cidr = Some("198.18.16.0/20".parse().unwrap());
    let (mut buf, len) = frame(&udp(A_MAC, A_IP, [198, 18, 0, 2], 64));
    assert_eq!(
        process(&mut buf, len, &port_a(), &t.view(), &mut Context::default()),
        Action::Drop(DropReason::NoRoute),
        "gateway unknown"
    );
    let up = Next {
        port: 9,
        worker: 0,
        dst_mac: [7; 6],
        src_mac: [8; 6],
        mtu: 1500,
    };
    t.routes.uplink = Some(up);
    let (mut buf, len) = frame(&udp(A_MAC, A_IP, [198, 18, 0, 2], 64));
    let a = process(&mut buf, len, &port_a(), &t.view(), &mut Context::default());
    assert_eq!(
        a,
        Action::Tx { port: up.port, len },
        "the uplink's port, on this worker"
    );
    assert_eq!(&buf[0..6], &[7; 6]);
    assert_eq!(&buf[6..12], &[8; 6]);
    let (mut buf, len) = frame(&udp(A_MAC, A_IP, [198, 18, 16, 99], 64));
    assert_eq!(
        process(&mut buf, len, &port_a(), &t.view(), &mut Context::default()),
        Action::Drop(DropReason::NoRoute),
        "an unknown pod is not sent out"
    );
    // What came in on the uplink never goes back out of it, on whichever of its receive
    // queues (socket 9 is queue 0's, socket 10 another queue's) it arrived.
    for id in [9, 10] {
        let (mut buf, len) = frame(&udp([9; 6], [198, 18, 0, 2], [198, 18, 0, 3], 64));
        assert_eq!(
            process(
                &mut buf,
                len,
                &uplink_port(id, HA_MAC),
                &t.view(),
                &mut Context::default()
            ),
            Action::Drop(DropReason::NoRoute),
            "from uplink socket {id}"
        );
    }
}

#[test]
fn arp_on_the_uplink_is_never_answered() {
    let (mut buf, len) = frame(&arp(1, [9; 6], [198, 18, 0, 2], GW));
    assert_eq!(
        process(
            &mut buf,
            len,
            &uplink_port(9, HA_MAC),
            &tables().view(),
            &mut Context::default()
        ),
        Action::Drop(DropReason::ArpNotForGateway)
    );
}

#[test]
fn unroutable_gateway_and_broadcast_destinations_are_dropped() {
    assert_eq!(
        run(&udp(A_MAC, A_IP, [10, 9, 9, 9], 64)).0,
        Action::Drop(DropReason::NoRoute)
    );
    assert_eq!(
        run(&udp(A_MAC, A_IP, GW, 64)).0,
        Action::Drop(DropReason::ToGateway)
    );
    assert_eq!(
        run(&udp(A_MAC, A_IP, [255, 255, 255, 255], 64)).0,
        Action::Drop(DropReason::NotUnicast)
    );
    assert_eq!(
        run(&udp(A_MAC, A_IP, [224, 0, 0, 251], 64)).0,
        Action::Drop(DropReason::NotUnicast)
    );
}

#[test]
fn martian_destinations_never_leave_even_with_an_uplink() {
    let mut t = tables();
    t.routes.uplink = Some(Next {
        port: 9,
        worker: 0,
        dst_mac: [7; 6],
        src_mac: [8; 6],
        mtu: 1500,
    });
    t.node.broadcasts.insert(Ipv4Addr::new(198, 18, 0, 255));
    for dst in [
        [127, 0, 0, 1],
        [0, 1, 2, 3],
        [240, 0, 0, 1],
        [169, 254, 1, 2],
        [198, 18, 0, 255],
    ] {
        let (mut buf, len) = frame(&udp(A_MAC, A_IP, dst, 64));
        assert_eq!(
            process(&mut buf, len, &port_a(), &t.view(), &mut Context::default()),
            Action::Drop(DropReason::MartianDst),
            "{dst:?}"
        );
    }
    let (mut buf, len) = frame(&udp(A_MAC, A_IP, [198, 18, 0, 2], 64));
    assert!(matches!(
        process(&mut buf, len, &port_a(), &t.view(), &mut Context::default()),
        Action::Tx { .. } | Action::Handoff { .. }
    ));
}

#[test]
fn frames_not_addressed_to_the_gateway_are_not_routed() {
    for dst_mac in [[0xff; 6], [0x01, 0, 0x5e, 0, 0, 1], [2, 0, 0, 0, 0, 0x77]] {
        let mut p = udp(A_MAC, A_IP, B_IP, 64);
        p[..6].copy_from_slice(&dst_mac);
        assert_eq!(
            run(&p).0,
            Action::Drop(DropReason::ForeignDstMac),
            "{dst_mac:?}"
        );
    }
}

/// A UDP datagram of `total` IP bytes from A to B, with Don't Fragment as given.
fn big_udp(total: usize, df: bool) -> Vec<u8> {
    let mut h = etherparse::Ipv4Header::new(0, 64, etherparse::IpNumber::UDP, A_IP, B_IP).unwrap();
    h.dont_fragment = df;
    let b = PacketBuilder::ethernet2(A_MAC, HA_MAC)
        .ip(etherparse::IpHeaders::Ipv4(h, Default::default()))
        .udp(4000, 53);
    let payload = vec![0x61; total - 28];
    let mut v = Vec::new();
    b.write(&mut v, &payload).unwrap();
    v
}

/// The first buffer of a multi-buffer frame: the first `RX_ROOM` bytes of `pkt` in a frame
/// buffer, and the whole frame's length.
fn head_of(pkt: &[u8]) -> (Vec<u8>, usize, usize) {
    let room = crate::xsk::RX_ROOM as usize;
    let mut buf = pkt[..room.min(pkt.len())].to_vec();
    let len = buf.len();
    buf.resize(room, 0);
    (buf, len, pkt.len())
}

#[test]
fn a_multi_buffer_frame_is_routed_on_its_first_buffer_and_checked_against_the_mtu_whole() {
    let mut t = tables();
    t.routes.local.get_mut(&IpAddr::from(B_IP)).unwrap().mtu = 65_000;
    // 64 000 bytes of IP: the first buffer is routed, TTL and MACs rewritten in it.
    let pkt = big_udp(64_000, true);
    let (mut buf, len, wire) = head_of(&pkt);
    assert!(len < wire);
    let a = process_frame(
        &mut buf,
        len,
        wire,
        &port_a(),
        &t.view(),
        &mut Context::default(),
    );
    assert_eq!(
        a,
        Action::Handoff {
            worker: 1,
            port: 1,
            len
        }
    );
    assert_eq!(&buf[0..6], &B_MAC);
    assert_eq!(buf[14 + 8], pkt[14 + 8] - 1, "TTL decremented");
    assert!(
        Ipv4Header::from_slice(&buf[14..len]).is_ok(),
        "header checksum still right"
    );
    // The same head claiming more than the frame holds: malformed, never read past.
    let (mut buf, len, _) = head_of(&pkt);
    assert_eq!(
        process_frame(
            &mut buf,
            len,
            wire - 1,
            &port_a(),
            &t.view(),
            &mut Context::default()
        ),
        Action::Drop(DropReason::Ipv4Malformed)
    );
    // Toward a 1500-byte MTU: fragmentation-needed from the first buffer, with the MTU.
    t.routes.local.get_mut(&IpAddr::from(B_IP)).unwrap().mtu = 1500;
    let (mut buf, len, wire) = head_of(&pkt);
    let a = process_frame(
        &mut buf,
        len,
        wire,
        &port_a(),
        &t.view(),
        &mut Context::default(),
    );
    let Action::IcmpError { reason, len } = a else {
        panic!("{a:?}")
    };
    assert_eq!(reason, DropReason::FragNeeded);
    let icmp = &buf[34..len];
    assert_eq!((icmp[0], icmp[1]), (3, 4));
    assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1500, "next-hop MTU");
    assert_eq!(smoltcp::wire::checksum::data(icmp), 0xffff, "ICMP checksum");
    let quoted = Ipv4Header::from_slice(&icmp[8..]).unwrap().0;
    assert_eq!(quoted.total_len, 64_000, "the original header quoted");
    // Without DF: dropped by name.
    let pkt = big_udp(64_000, false);
    let (mut buf, len, wire) = head_of(&pkt);
    assert_eq!(
        process_frame(
            &mut buf,
            len,
            wire,
            &port_a(),
            &t.view(),
            &mut Context::default()
        ),
        Action::Drop(DropReason::TooBigNoDf)
    );
    // ARP never spans buffers.
    let mut arp = vec![0u8; 5000];
    arp[..6].copy_from_slice(&[0xff; 6]);
    arp[6..12].copy_from_slice(&A_MAC);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let (mut buf, len, wire) = head_of(&arp);
    assert_eq!(
        process_frame(
            &mut buf,
            len,
            wire,
            &port_a(),
            &t.view(),
            &mut Context::default()
        ),
        Action::Drop(DropReason::ArpMalformed)
    );
}

#[test]
fn larger_than_the_egress_mtu_with_df_gets_fragmentation_needed_with_the_mtu() {
    let mut t = tables();
    t.routes.local.get_mut(&IpAddr::from(B_IP)).unwrap().mtu = 1400;
    let (mut buf, len) = frame(&big_udp(1400, true));
    assert!(matches!(
        process(&mut buf, len, &port_a(), &t.view(), &mut Context::default()),
        Action::Tx { .. } | Action::Handoff { .. }
    ));
    let (mut buf, len) = frame(&big_udp(1401, true));
    let a = process(&mut buf, len, &port_a(), &t.view(), &mut Context::default());
    let Action::IcmpError { reason, len } = a else {
        panic!("{a:?}")
    };
    assert_eq!(reason, DropReason::FragNeeded);
    let sliced = etherparse::SlicedPacket::from_ethernet(&buf[..len]).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = sliced.net else {
        panic!("not IPv4")
    };
    assert_eq!(ip.header().source(), GW);
    assert_eq!(ip.header().destination(), A_IP);
    assert_eq!(&buf[0..6], &A_MAC, "back to the sender");
    let icmp = &buf[34..len];
    assert_eq!(
        (icmp[0], icmp[1]),
        (3, 4),
        "destination unreachable, frag needed"
    );
    assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1400, "next-hop MTU");
    assert_eq!(smoltcp::wire::checksum::data(icmp), 0xffff, "ICMP checksum");
    let (mut buf, len) = frame(&big_udp(1401, false));
    assert_eq!(
        process(&mut buf, len, &port_a(), &t.view(), &mut Context::default()),
        Action::Drop(DropReason::TooBigNoDf)
    );
}

#[test]
fn icmp_errors_are_rate_limited_per_worker() {
    let mut ctx = Context {
        now_ms: 1_000,
        ..Context::default()
    };
    let mut sent = 0;
    for _ in 0..200 {
        let (mut buf, len) = frame(&udp(A_MAC, A_IP, B_IP, 1));
        match process(&mut buf, len, &port_a(), &tables().view(), &mut ctx) {
            Action::IcmpError { .. } => sent += 1,
            Action::Drop(DropReason::TtlExpired) => {}
            a => panic!("{a:?}"),
        }
    }
    assert_eq!(
        sent, ICMP_BURST,
        "a burst, then nothing within the same millisecond"
    );
    ctx.now_ms += 10;
    let (mut buf, len) = frame(&udp(A_MAC, A_IP, B_IP, 1));
    assert!(
        matches!(
            process(&mut buf, len, &port_a(), &tables().view(), &mut ctx),
            Action::IcmpError { .. }
        ),
        "10 ms later, 10 more"
    );
}

#[test]
fn layer2_oddities_are_dropped_by_name() {
    assert_eq!(run(&[0u8; 13]).0, Action::Drop(DropReason::Runt));
    assert_eq!(run(&[]).0, Action::Drop(DropReason::Runt));
    let mut vlan = udp(A_MAC, A_IP, B_IP, 64);
    vlan[12..14].copy_from_slice(&[0x81, 0x00]);
    assert_eq!(run(&vlan).0, Action::Drop(DropReason::VlanTagged));
    let mut unknown = udp(A_MAC, A_IP, B_IP, 64);
    unknown[12..14].copy_from_slice(&[0x88, 0xcc]);
    assert_eq!(run(&unknown).0, Action::Drop(DropReason::UnknownEthertype));
    let mut v6 = udp(A_MAC, A_IP, B_IP, 64);
    v6[12..14].copy_from_slice(&[0x86, 0xdd]);
    assert_eq!(run(&v6).0, Action::Drop(DropReason::Ipv6NotSupported));
}

#[test]
fn malformed_ipv4_is_dropped_by_name() {
    let p = udp(A_MAC, A_IP, B_IP, 64);
    assert_eq!(
        run(&p[..14 + 19]).0,
        Action::Drop(DropReason::Ipv4Malformed),
        "truncated header"
    );
    type Mutation = fn(&mut Vec<u8>);
    let cases: [(&str, Mutation); 5] = [
        ("IHL below 5", |f| f[14] = 0x44),
        ("IHL beyond the packet", |f| f[14] = 0x4f),
        ("total length beyond the frame", |f| {
            f[16..18].copy_from_slice(&1400u16.to_be_bytes())
        }),
        ("total length below the header", |f| {
            f[16..18].copy_from_slice(&10u16.to_be_bytes())
        }),
        ("version 6 in an IPv4 frame", |f| f[14] = 0x65),
    ];
    for (what, mutate) in cases {
        let mut f = p.clone();
        mutate(&mut f);
        assert_eq!(run(&f).0, Action::Drop(DropReason::Ipv4Malformed), "{what}");
    }
    let mut c = p.clone();
    c[24] ^= 0xff;
    assert_eq!(run(&c).0, Action::Drop(DropReason::Ipv4BadChecksum));
}

#[test]
fn ipv4_options_and_fragments_are_forwarded() {
    // A header with one 4-byte option (NOP NOP NOP EOL): IHL 6.
    let p = udp(A_MAC, A_IP, B_IP, 64);
    let mut o = Vec::new();
    o.extend_from_slice(&p[..14]);
    o.push(0x46);
    o.extend_from_slice(&p[15..34]);
    o.extend_from_slice(&[1, 1, 1, 0]);
    o.extend_from_slice(&p[34..]);
    let total = (o.len() - 14) as u16;
    o[16..18].copy_from_slice(&total.to_be_bytes());
    o[24..26].copy_from_slice(&[0, 0]);
    let c = !smoltcp::wire::checksum::data(&o[14..38]);
    o[24..26].copy_from_slice(&c.to_be_bytes());
    let (a, out) = run(&o);
    assert!(
        matches!(a, Action::Tx { .. } | Action::Handoff { .. }),
        "{a:?}"
    );
    assert!(ip_checksum_ok(&out[14..o.len()]));
    // A middle fragment (offset 8 bytes, more fragments).
    let mut f = udp(A_MAC, A_IP, B_IP, 64);
    f[20..22].copy_from_slice(&0x2001u16.to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let c = !smoltcp::wire::checksum::data(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let (a, out) = run(&f);
    assert!(
        matches!(a, Action::Tx { .. } | Action::Handoff { .. }),
        "{a:?}"
    );
    assert!(ip_checksum_ok(&out[14..f.len()]));
    // An expired middle fragment gets no ICMP error.
    f[22] = 1;
    f[24..26].copy_from_slice(&[0, 0]);
    let c = !smoltcp::wire::checksum::data(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(run(&f).0, Action::Drop(DropReason::TtlExpired));
}

proptest! {
    /// Whatever arrives, the pipeline returns an action inside the frame and never panics.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), claimed in 0usize..300) {
        let (mut buf, len) = frame(&bytes);
        let len = claimed.min(len.max(claimed.min(2048)));
        let a = process(&mut buf, len, &port_a(), &tables().view(), &mut Context::default());
        match a {
            Action::Hairpin { len: n } | Action::IcmpError { len: n, .. } | Action::Tx { len: n, .. } | Action::Handoff { len: n, .. } => prop_assert!(n <= 2048),
            Action::Drop(_) => {}
        }
    }

    /// Valid packets with arbitrary header bytes stay valid when forwarded.
    #[test]
    fn forwarded_headers_keep_valid_checksums(ttl in 2u8.., tos in any::<u8>(), id in any::<u16>(), payload in proptest::collection::vec(any::<u8>(), 0..100)) {
        let mut h = etherparse::Ipv4Header::new(0, ttl, etherparse::IpNumber::UDP, A_IP, B_IP).unwrap();
        h.dscp = etherparse::IpDscp::try_new(tos >> 2).unwrap();
        h.identification = id;
        let b = PacketBuilder::ethernet2(A_MAC, HA_MAC).ip(etherparse::IpHeaders::Ipv4(h, Default::default())).udp(1, 2);
        let mut v = Vec::new();
        b.write(&mut v, &payload).unwrap();
        let (a, out) = run(&v);
        prop_assert!(matches!(a, Action::Tx { .. } | Action::Handoff { .. }), "{:?}", a);
        prop_assert!(ip_checksum_ok(&out[14..v.len()]));
        prop_assert_eq!(out[22], ttl - 1);
    }
}
