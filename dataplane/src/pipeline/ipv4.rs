//! IPv4 header validation and TTL handling.

use std::net::Ipv4Addr;

use smoltcp::wire::Ipv4Packet;

use super::csum;
use crate::drop::DropReason;

const TTL: usize = 8;
const MIN_HEADER: usize = 20;
const CHECKSUM: usize = 10;

/// The header fields later stages need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub header_len: usize,
    pub total_len: usize,
    /// The Don't Fragment flag.
    pub dont_frag: bool,
    /// The protocol number of the payload.
    pub proto: u8,
    /// Fragment offset (in 8-byte units) and the More Fragments flag: a fragment other than
    /// a whole datagram carries no complete transport header to translate.
    pub frag_offset: u16,
    pub more_frags: bool,
    /// Identification: with the addresses and protocol, which datagram a fragment is of.
    pub ident: u16,
}

/// Checks version, IHL, total length against the frame, and the header checksum. Options and
/// fragments are valid IPv4 and are forwarded (a router does not reassemble).
#[inline]
pub fn validate(pkt: &[u8]) -> Result<Header, DropReason> {
    validate_head(pkt, pkt.len())
}

/// As [`validate`], for a packet of which `pkt` is the first buffer and `wire` bytes the whole
/// (a multi-buffer frame: its total length is checked against `wire`, the header against
/// `pkt`). Bytes past `pkt` are never read.
#[inline]
pub fn validate_head(pkt: &[u8], wire: usize) -> Result<Header, DropReason> {
    // smoltcp's `new_checked` measures the total length against the slice; a head holds only
    // part of a multi-buffer packet, so the same checks are made here against `wire`.
    let ip = Ipv4Packet::new_unchecked(pkt);
    if pkt.len() < MIN_HEADER {
        return Err(DropReason::Ipv4Malformed);
    }
    let (ihl, total) = (usize::from(ip.header_len()), usize::from(ip.total_len()));
    if ihl < MIN_HEADER || ihl > total || ihl > pkt.len() || total > wire.max(pkt.len()) {
        return Err(DropReason::Ipv4Malformed);
    }
    if ip.version() != 4 {
        return Err(DropReason::Ipv4Malformed);
    }
    if !ip.verify_checksum() {
        return Err(DropReason::Ipv4BadChecksum);
    }
    Ok(Header {
        src: ip.src_addr(),
        dst: ip.dst_addr(),
        header_len: ihl,
        total_len: total,
        dont_frag: ip.dont_frag(),
        proto: ip.next_header().into(),
        frag_offset: ip.frag_offset(),
        more_frags: ip.more_frags(),
        ident: ip.ident(),
    })
}

/// Decrements the TTL with an incremental checksum update. Returns false (and leaves the
/// packet untouched) when the TTL would reach zero: the packet must not be forwarded.
#[inline]
pub fn decrement_ttl(pkt: &mut [u8]) -> bool {
    let ttl = pkt[TTL];
    if ttl <= 1 {
        return false;
    }
    let proto = pkt[TTL + 1];
    let old = u16::from_be_bytes([ttl, proto]);
    let new = u16::from_be_bytes([ttl - 1, proto]);
    let check = u16::from_be_bytes([pkt[CHECKSUM], pkt[CHECKSUM + 1]]);
    pkt[TTL] = ttl - 1;
    pkt[CHECKSUM..CHECKSUM + 2].copy_from_slice(&csum::update16(check, old, new).to_be_bytes());
    true
}

/// Whether no router forwards to `dst` (RFC 1812 §5.3.7, RFC 3927): "this network" 0/8,
/// loopback 127/8, reserved 240/4 (the limited broadcast included) and link-local 169.254/16
/// (the gateway, which is link-local too, is handled before this).
#[inline]
pub fn martian_destination(dst: Ipv4Addr) -> bool {
    let o = dst.octets();
    o[0] == 0 || o[0] == 127 || o[0] >= 240 || (o[0] == 169 && o[1] == 254)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 20-byte header of a packet `total` bytes long, checksummed.
    fn header(total: u16) -> Vec<u8> {
        let mut h = vec![0u8; 20];
        let mut ip = Ipv4Packet::new_unchecked(&mut h[..]);
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len(total);
        ip.set_hop_limit(64);
        ip.set_next_header(smoltcp::wire::IpProtocol::Udp);
        ip.set_src_addr(Ipv4Addr::new(198, 18, 0, 1));
        ip.set_dst_addr(Ipv4Addr::new(198, 18, 0, 2));
        ip.fill_checksum();
        h
    }

    #[test]
    fn a_head_is_checked_against_the_whole_packet_and_only_the_header_is_read() {
        let mut head = header(64_000);
        head.resize(3840, 0);
        // The first buffer of a 64 000-byte packet: valid against its wire length.
        let h = validate_head(&head, 64_000).expect("a valid head");
        assert_eq!(h.total_len, 64_000);
        // Alone, or longer than the frame that carried it: malformed.
        assert_eq!(validate(&head), Err(DropReason::Ipv4Malformed));
        assert_eq!(validate_head(&head, 63_999), Err(DropReason::Ipv4Malformed));
        // A head shorter than the header itself.
        assert_eq!(
            validate_head(&head[..19], 64_000),
            Err(DropReason::Ipv4Malformed)
        );
        // A whole packet is as `validate` always took it.
        let mut whole = header(60);
        whole.resize(60, 0);
        assert!(validate(&whole).is_ok());
    }

    #[test]
    fn martian_destinations_are_named() {
        for m in [
            "0.1.2.3",
            "127.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "169.254.9.9",
        ] {
            assert!(martian_destination(m.parse().unwrap()), "{m}");
        }
        for ok in ["198.18.16.2", "10.0.0.1", "1.1.1.1", "223.255.255.254"] {
            assert!(!martian_destination(ok.parse().unwrap()), "{ok}");
        }
    }
}
