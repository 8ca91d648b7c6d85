//! IPv4 header validation and TTL handling.

use std::net::Ipv4Addr;

use smoltcp::wire::Ipv4Packet;

use super::csum;
use crate::drop::DropReason;

const TTL: usize = 8;
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
    let ip = Ipv4Packet::new_checked(pkt).map_err(|_| DropReason::Ipv4Malformed)?;
    if ip.version() != 4 {
        return Err(DropReason::Ipv4Malformed);
    }
    if !ip.verify_checksum() {
        return Err(DropReason::Ipv4BadChecksum);
    }
    Ok(Header {
        src: ip.src_addr(),
        dst: ip.dst_addr(),
        header_len: usize::from(ip.header_len()),
        total_len: usize::from(ip.total_len()),
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
