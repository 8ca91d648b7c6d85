//! Transport checksums of the frames pods send, on their way out.
//!
//! A pod's stack with transmit checksum offload on leaves a TCP or UDP checksum *partial*: the
//! field holds the sum of the pseudo-header only (`CHECKSUM_PARTIAL`), for the device to
//! finish. AF_XDP carries no such state, so stromd tells the two apart by the field itself
//! ([`classify`], on the way in, before any translation): a complete checksum equals the
//! pseudo-header's sum only by a 1-in-65536 chance, and then completing it again gives the
//! same value. On the way out:
//! - to a pod's port with transmit metadata, every TCP/UDP frame a pod sent gets the
//!   pseudo-header's sum of its final addresses and a request for checksum offload
//!   ([`offload`]); the kernel hands it to the receiving pod as `CHECKSUM_PARTIAL`, which that
//!   stack takes as verified, as it would from a pod on a kernel-forwarded veth: the receiver
//!   no longer reads a 64 KB segment through once more to verify it, on stromd's core (veth
//!   delivers inside stromd's transmit call);
//! - anywhere else (the uplink), a partial checksum is completed here in software
//!   ([`complete`]), so that frames leaving the node carry full checksums.
//!
//! SCTP's CRC32c cannot be offloaded through AF_XDP's metadata: a pod with SCTP checksum
//! offload on leaves the field 0, and stromd computes the CRC itself wherever the packet goes,
//! for a packet that fits one buffer (a longer one keeps 0; a packet that a CRC of 0 fits, or
//! a peer that agreed to zero checksums (RFC 9653), gets a correct CRC all the same).
//!
//! Frames from the uplink keep their checksums as they came, verified by the pod that receives
//! them: a frame corrupted on the wire must not be passed off as verified. Both ways start from
//! scratch over the final header, so an incremental update a stage made to a partial checksum
//! (which is not the sum it assumes) does not matter.

use smoltcp::wire::checksum;
use smoltcp::wire::IpProtocol;
use strom_xdp::xsk::ChecksumOffload;

use std::net::Ipv4Addr;

use super::eth;
use super::ipv4::{self, Header};
use super::l4::{SCTP_CHECKSUM, SCTP_COMMON, TCP_CHECKSUM, TCP_MIN, UDP_CHECKSUM, UDP_LEN};
use super::nat::sctp_crc;
use crate::conntrack::{SCTP, TCP, UDP};

/// What a frame's transport checksum needs on its way out (set by the pipeline for each
/// frame, carried with a hand-off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TxChecksum {
    /// Nothing: a frame from the uplink, stromd's own message, another protocol, a fragment,
    /// a UDP datagram without a checksum.
    #[default]
    AsIs,
    /// A TCP segment or UDP datagram a pod sent, its checksum complete or `partial`.
    Pod { partial: bool },
    /// An SCTP packet a pod sent with its CRC32c left to the device (0).
    SctpPartial,
}

/// Where a packet's transport checksum is, and what its pseudo-header holds.
#[derive(Debug, Clone, Copy)]
struct Transport {
    /// The transport header's start in the frame, and the checksum field's offset in it.
    at: usize,
    field: usize,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    /// The transport segment's length (from the IP header).
    len: usize,
}

impl Transport {
    /// For the IPv4 packet with header `h` in `frame` (its first buffer): an unfragmented TCP,
    /// UDP or SCTP packet whose transport header lies in `frame`.
    #[inline]
    fn of(frame: &[u8], h: &Header) -> Option<Transport> {
        // A fragment: the checksum covers the whole datagram.
        if h.frag_offset != 0 || h.more_frags {
            return None;
        }
        let (field, min) = match h.proto {
            TCP => (TCP_CHECKSUM, TCP_MIN),
            UDP => (UDP_CHECKSUM, UDP_LEN),
            SCTP => (SCTP_CHECKSUM, SCTP_COMMON),
            _ => return None,
        };
        let at = eth::HEADER_LEN + h.header_len;
        let len = h.total_len.checked_sub(h.header_len)?;
        if len < min || frame.len() < at + min {
            return None;
        }
        Some(Transport {
            at,
            field: at + field,
            src: h.src,
            dst: h.dst,
            proto: h.proto,
            len,
        })
    }

    /// As [`Transport::of`], reading the header of the frame as it leaves (a stage may have
    /// rewritten it since it was validated; a frame that is no IPv4 is none). The frame may
    /// be the first buffer of a longer one: its total length is not held against `frame`.
    #[inline]
    fn read(frame: &[u8]) -> Option<Transport> {
        if !matches!(eth::classify(frame), Ok(eth::L3::Ipv4)) {
            return None;
        }
        let h = ipv4::validate_head(&frame[eth::HEADER_LEN..], usize::MAX).ok()?;
        Transport::of(frame, &h)
    }

    /// The pseudo-header's sum (RFC 9293 §3.1, RFC 768), folded, not complemented: what a
    /// partial checksum holds.
    #[inline]
    fn pseudo(&self) -> u16 {
        checksum::pseudo_header_v4(
            &self.src,
            &self.dst,
            IpProtocol::from(self.proto),
            self.len as u32,
        )
    }
}

/// One's complement equality: 0x0000 and 0xffff are the same value.
#[inline]
fn same(a: u16, b: u16) -> bool {
    a == b || (a | b == 0xffff && (a == 0 || b == 0))
}

/// The checksum class of a frame a pod sent (`frame` its first buffer, `h` its validated IPv4
/// header), read before any stage changes it.
#[inline]
pub fn classify(frame: &[u8], h: &Header) -> TxChecksum {
    let Some(t) = Transport::of(frame, h) else {
        return TxChecksum::AsIs;
    };
    let f = t.field;
    if t.proto == SCTP {
        return if frame[f..f + 4] == [0; 4] {
            TxChecksum::SctpPartial
        } else {
            TxChecksum::AsIs
        };
    }
    let check = u16::from_be_bytes([frame[f], frame[f + 1]]);
    if t.proto == UDP && check == 0 {
        return TxChecksum::AsIs;
    }
    TxChecksum::Pod {
        partial: same(check, t.pseudo()),
    }
}

/// For a port with transmit metadata: the frame's checksum field gets the pseudo-header's
/// sum of its final header, and the request for the kernel to finish it is returned. `None`
/// (the frame left as it is) for a frame that is not a pod's TCP or UDP packet.
#[inline]
pub fn offload(frame: &mut [u8], c: TxChecksum) -> Option<ChecksumOffload> {
    if !matches!(c, TxChecksum::Pod { .. }) {
        return None;
    }
    let t = Transport::read(frame)?;
    if t.proto == SCTP {
        return None;
    }
    frame[t.field..t.field + 2].copy_from_slice(&t.pseudo().to_be_bytes());
    Some(ChecksumOffload {
        start: t.at as u16,
        offset: (t.field - t.at) as u16,
    })
}

/// A partial checksum (or SCTP CRC) completed in software, over the whole packet in `frame`
/// (a frame of one buffer: a longer packet is left as it is), for a port without transmit
/// metadata or a packet it cannot offload. Anything else is left as it is.
#[inline]
pub fn complete(frame: &mut [u8], c: TxChecksum) {
    if !matches!(
        c,
        TxChecksum::Pod { partial: true } | TxChecksum::SctpPartial
    ) {
        return;
    }
    let Some(t) = Transport::read(frame) else {
        return;
    };
    let end = t.at + t.len;
    if end > frame.len() {
        return;
    }
    if t.proto == SCTP {
        sctp_crc(&mut frame[t.at..end]);
        return;
    }
    frame[t.field..t.field + 2].fill(0);
    let sum = checksum::combine(&[t.pseudo(), checksum::data(&frame[t.at..end])]);
    let mut check = !sum;
    if t.proto == UDP && check == 0 {
        // RFC 768: a computed 0 is sent as all ones (0 means no checksum).
        check = 0xffff;
    }
    frame[t.field..t.field + 2].copy_from_slice(&check.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    /// A pod's TCP segment with `payload`, its checksum complete.
    fn tcp(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([198, 18, 0, 10], [198, 18, 0, 11], 64)
            .tcp(40000, 80, 7, 64000);
        let mut v = Vec::new();
        b.write(&mut v, payload).unwrap();
        v
    }

    fn udp(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([198, 18, 0, 10], [198, 18, 0, 11], 64)
            .udp(40000, 53);
        let mut v = Vec::new();
        b.write(&mut v, payload).unwrap();
        v
    }

    const TCP_FIELD: usize = 34 + TCP_CHECKSUM;
    const UDP_FIELD: usize = 34 + UDP_CHECKSUM;

    fn field(f: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([f[at], f[at + 1]])
    }

    /// What a stack with checksum offload sends: the pseudo-header's sum in the field.
    fn made_partial(mut f: Vec<u8>, at: usize) -> Vec<u8> {
        let t = Transport::read(&f).unwrap();
        f[at..at + 2].copy_from_slice(&t.pseudo().to_be_bytes());
        f
    }

    /// The class of `f` as the pipeline reads it on the way in.
    fn class(f: &[u8]) -> TxChecksum {
        classify(
            f,
            &ipv4::validate_head(&f[eth::HEADER_LEN..], usize::MAX).unwrap(),
        )
    }

    /// The IP header's checksum made right again after a test changed the header.
    fn refill(f: &mut [u8]) {
        smoltcp::wire::Ipv4Packet::new_unchecked(&mut f[eth::HEADER_LEN..]).fill_checksum();
    }

    fn valid_tcp(f: &[u8]) -> bool {
        let p = etherparse::SlicedPacket::from_ethernet(f).unwrap();
        let (Some(etherparse::NetSlice::Ipv4(ip)), Some(etherparse::TransportSlice::Tcp(t))) =
            (p.net, p.transport)
        else {
            panic!("not TCP over IPv4");
        };
        let h = ip.header();
        t.calc_checksum_ipv4(h.source(), h.destination()).unwrap() == t.checksum()
    }

    fn valid_udp(f: &[u8]) -> bool {
        let p = etherparse::SlicedPacket::from_ethernet(f).unwrap();
        let (Some(etherparse::NetSlice::Ipv4(ip)), Some(etherparse::TransportSlice::Udp(u))) =
            (p.net, p.transport)
        else {
            panic!("not UDP over IPv4");
        };
        u.to_header()
            .calc_checksum_ipv4(&ip.header().to_header(), u.payload())
            .unwrap()
            == u.checksum()
    }

    #[test]
    fn a_complete_checksum_is_told_from_a_partial_one() {
        let f = tcp(b"hello, pod");
        assert!(valid_tcp(&f));
        assert_eq!(class(&f), TxChecksum::Pod { partial: false });
        let p = made_partial(f, TCP_FIELD);
        assert!(!valid_tcp(&p));
        assert_eq!(class(&p), TxChecksum::Pod { partial: true });
        let u = made_partial(udp(&[7; 100]), UDP_FIELD);
        assert_eq!(class(&u), TxChecksum::Pod { partial: true });
    }

    #[test]
    fn fragments_other_protocols_and_udp_without_checksum_stay_as_they_are() {
        let mut u = udp(&[1; 64]);
        u[UDP_FIELD..UDP_FIELD + 2].fill(0);
        assert_eq!(class(&u), TxChecksum::AsIs);
        let mut frag = tcp(&[3; 64]);
        frag[20] |= 0x20; // more fragments
        refill(&mut frag);
        assert_eq!(class(&frag), TxChecksum::AsIs);
        let mut icmp = tcp(&[3; 64]);
        icmp[23] = 1;
        refill(&mut icmp);
        assert_eq!(class(&icmp), TxChecksum::AsIs);
        // A frame that is no IPv4 on its way out is left alone.
        let mut arp = made_partial(tcp(&[3; 64]), TCP_FIELD);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let before = arp.clone();
        assert_eq!(offload(&mut arp, TxChecksum::Pod { partial: true }), None);
        complete(&mut arp, TxChecksum::Pod { partial: true });
        assert_eq!(arp, before);
        // Cut inside the TCP header.
        assert_eq!(class(&tcp(&[])[..40]), TxChecksum::AsIs);
        let mut left = tcp(&[9; 32]);
        assert_eq!(offload(&mut left, TxChecksum::AsIs), None);
        let before = left.clone();
        complete(&mut left, TxChecksum::Pod { partial: false });
        assert_eq!(left, before);
    }

    #[test]
    fn a_partial_checksum_is_completed_in_software_after_a_translation() {
        let payload: Vec<u8> = (0..1400u32).map(|i| (i * 7) as u8).collect();
        let mut p = made_partial(tcp(&payload), TCP_FIELD);
        let c = class(&p);
        // DNAT after classification: the partial sum no longer matches, and is rebuilt.
        p[30..34].copy_from_slice(&[198, 18, 16, 5]);
        refill(&mut p);
        complete(&mut p, c);
        assert!(valid_tcp(&p));
        let mut u = made_partial(udp(&payload[..333]), UDP_FIELD);
        let c = class(&u);
        complete(&mut u, c);
        assert!(valid_udp(&u));
        assert_ne!(field(&u, UDP_FIELD), 0);
    }

    #[test]
    fn an_sctp_crc_left_to_the_device_is_computed() {
        let mut f = udp(&[0x11; 200]);
        f[23] = SCTP;
        refill(&mut f);
        f[34 + SCTP_CHECKSUM..34 + SCTP_CHECKSUM + 4].fill(0);
        let c = class(&f);
        assert_eq!(c, TxChecksum::SctpPartial);
        assert_eq!(offload(&mut f, c), None);
        complete(&mut f, c);
        let sctp = &f[34..];
        let mut zeroed = sctp.to_vec();
        zeroed[SCTP_CHECKSUM..SCTP_CHECKSUM + 4].fill(0);
        assert_eq!(
            sctp[SCTP_CHECKSUM..SCTP_CHECKSUM + 4],
            crc32c::crc32c(&zeroed).to_le_bytes()
        );
        // A CRC already there is the pod's own.
        assert_eq!(class(&f), TxChecksum::AsIs);
    }

    #[test]
    fn offload_leaves_the_pseudo_header_sum_the_kernel_finishes() {
        let payload = [0x5a; 999];
        for partial in [false, true] {
            let mut f = tcp(&payload);
            if partial {
                f = made_partial(f, TCP_FIELD);
            }
            let c = class(&f);
            let req = offload(&mut f, c).expect("a pod's TCP segment is offloaded");
            assert_eq!(
                req,
                ChecksumOffload {
                    start: 34,
                    offset: TCP_CHECKSUM as u16
                }
            );
            // What the kernel does with CHECKSUM_PARTIAL: the sum from `start` to the end,
            // the field included, complemented into the field.
            let start = usize::from(req.start);
            let at = start + usize::from(req.offset);
            let sum = !checksum::data(&f[start..]);
            f[at..at + 2].copy_from_slice(&sum.to_be_bytes());
            assert!(valid_tcp(&f), "partial: {partial}");
        }
        let mut u = udp(&payload[..10]);
        let c = class(&u);
        assert_eq!(
            offload(&mut u, c).map(|r| r.offset),
            Some(UDP_CHECKSUM as u16)
        );
    }
}
