//! Address and port rewriting with checksums kept right: the IPv4 header checksum and the
//! TCP and UDP checksums (whose pseudo-header covers the addresses) are updated incrementally
//! (RFC 1624); a UDP datagram sent without a checksum (0) keeps none; SCTP's CRC32c covers
//! the ports but not the addresses, so it is computed again only when a port changes.

use std::net::Ipv4Addr;

use super::csum::update16;
use super::l4::{
    ECHO_REPLY, ECHO_REQUEST, ICMP_CHECKSUM, ICMP_ID, SCTP_CHECKSUM, TCP_CHECKSUM, UDP_CHECKSUM,
};
use crate::conntrack::{ICMP, SCTP, TCP, UDP};

const IP_CHECKSUM: usize = 10;
const IP_SRC: usize = 12;
const IP_DST: usize = 16;

/// Which end of the packet is rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Src,
    Dst,
}

fn word(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Updates the 16-bit checksum at `at` for the 32-bit value `old` becoming `new`.
fn update32(b: &mut [u8], at: usize, old: [u8; 4], new: [u8; 4]) {
    let mut c = word(b, at);
    c = update16(
        c,
        u16::from_be_bytes([old[0], old[1]]),
        u16::from_be_bytes([new[0], new[1]]),
    );
    c = update16(
        c,
        u16::from_be_bytes([old[2], old[3]]),
        u16::from_be_bytes([new[2], new[3]]),
    );
    put(b, at, c);
}

/// Where the transport checksum is, and whether the addresses are in it.
fn l4_checksum(proto: u8) -> Option<(usize, bool)> {
    match proto {
        TCP => Some((TCP_CHECKSUM, true)),
        UDP => Some((UDP_CHECKSUM, true)),
        ICMP => Some((ICMP_CHECKSUM, false)),
        _ => None,
    }
}

/// Rewrites one end of the IPv4 packet `pkt` (header length `ihl`, protocol `proto`, its
/// transport header complete: the caller parsed it) to `ip:port`. For an ICMP echo the port
/// is its identifier, at the requester's end only. `l4_len` is how much of the transport segment is
/// in `pkt` (SCTP's CRC covers all of it).
#[inline]
pub fn rewrite(pkt: &mut [u8], ihl: usize, proto: u8, end: End, ip: Ipv4Addr, port: u16) {
    let addr_at = match end {
        End::Src => IP_SRC,
        End::Dst => IP_DST,
    };
    // An ICMP echo's identifier is the requester's port: a request's source, a reply's
    // destination; the other end has none (l4::parse).
    let port_at = match (end, proto) {
        (End::Src, ICMP) if pkt[ihl] == ECHO_REQUEST => Some(ihl + ICMP_ID),
        (End::Dst, ICMP) if pkt[ihl] == ECHO_REPLY => Some(ihl + ICMP_ID),
        (_, ICMP) => None,
        (End::Src, _) => Some(ihl),
        (End::Dst, _) => Some(ihl + 2),
    };
    let old_ip: [u8; 4] = [
        pkt[addr_at],
        pkt[addr_at + 1],
        pkt[addr_at + 2],
        pkt[addr_at + 3],
    ];
    let new_ip = ip.octets();
    // No port at this end: it keeps what it has.
    let old_port = port_at.map_or(port, |at| word(pkt, at));
    if old_ip == new_ip && old_port == port {
        return;
    }
    if old_ip != new_ip {
        update32(pkt, IP_CHECKSUM, old_ip, new_ip);
        pkt[addr_at..addr_at + 4].copy_from_slice(&new_ip);
    }
    match l4_checksum(proto) {
        // A UDP datagram without a checksum keeps none.
        Some((c, _)) if proto == UDP && word(pkt, ihl + c) == 0 => {}
        Some((c, pseudo)) => {
            let at = ihl + c;
            if pseudo && old_ip != new_ip {
                update32(pkt, at, old_ip, new_ip);
            }
            let mut sum = update16(word(pkt, at), old_port, port);
            // 0 would mean "no checksum" in UDP: its one's-complement twin is sent instead.
            if proto == UDP && sum == 0 {
                sum = 0xffff;
            }
            put(pkt, at, sum);
        }
        None => {}
    }
    // SCTP's CRC is computed again only over a packet that arrived intact: a corrupted one
    // keeps its (now doubly) wrong CRC, for the receiver to drop.
    let sctp_intact = proto == SCTP && old_port != port && sctp_crc_ok(&pkt[ihl..]);
    if let Some(at) = port_at {
        put(pkt, at, port);
    }
    if sctp_intact {
        sctp_crc(&mut pkt[ihl..]);
    }
}

/// Whether an SCTP packet's CRC32c is right.
fn sctp_crc_ok(sctp: &[u8]) -> bool {
    let Some(stored) = sctp.get(SCTP_CHECKSUM..SCTP_CHECKSUM + 4) else {
        return false;
    };
    let stored = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]);
    let crc = crc32c::crc32c(&sctp[..SCTP_CHECKSUM]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &sctp[SCTP_CHECKSUM + 4..]) == stored
}

/// Computes an SCTP packet's CRC32c again (RFC 9260 appendix A: over the whole packet with
/// the checksum field zeroed, sent least significant byte first, as Linux stores it).
pub fn sctp_crc(sctp: &mut [u8]) {
    if sctp.len() < SCTP_CHECKSUM + 4 {
        return;
    }
    sctp[SCTP_CHECKSUM..SCTP_CHECKSUM + 4].fill(0);
    let crc = crc32c::crc32c(sctp);
    sctp[SCTP_CHECKSUM..SCTP_CHECKSUM + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Rewrites one end of the packet an ICMP error quotes (at `inner_at` in `pkt`, the outer
/// IPv4 packet whose ICMP header starts at `icmp_at`): its address and port (a quoted ICMP
/// echo's identifier, at the requester's end), its own header checksum, and its transport
/// checksum where the quote has it; then the ICMP checksum, which covers the whole quote, is
/// computed again (the message is short).
pub fn rewrite_quoted(
    pkt: &mut [u8],
    icmp_at: usize,
    inner_at: usize,
    end: End,
    ip: Ipv4Addr,
    port: u16,
) {
    let Some(q) = pkt.get_mut(inner_at..) else {
        return;
    };
    if q.len() < 20 {
        return;
    }
    let ihl = usize::from(q[0] & 0x0f) * 4;
    if ihl < 20 {
        return;
    }
    let proto = q[9];
    let addr_at = match end {
        End::Src => IP_SRC,
        End::Dst => IP_DST,
    };
    // A quoted ICMP echo's identifier stands for the requester's port, as in `rewrite`.
    let port_at = match (end, proto) {
        (End::Src, ICMP) if q.get(ihl) == Some(&ECHO_REQUEST) => Some(ihl + ICMP_ID),
        (End::Dst, ICMP) if q.get(ihl) == Some(&ECHO_REPLY) => Some(ihl + ICMP_ID),
        (_, ICMP) => None,
        (End::Src, _) => Some(ihl),
        (End::Dst, _) => Some(ihl + 2),
    };
    if port_at.is_some_and(|at| q.len() < at + 2) {
        return;
    }
    let old_ip = [q[addr_at], q[addr_at + 1], q[addr_at + 2], q[addr_at + 3]];
    let new_ip = ip.octets();
    let old_port = port_at.map_or(port, |at| word(q, at));
    update32(q, IP_CHECKSUM, old_ip, new_ip);
    q[addr_at..addr_at + 4].copy_from_slice(&new_ip);
    // The quoted transport checksum, when the quote reaches it (the first 8 bytes hold UDP's
    // and ICMP's, TCP's lies beyond a minimal quote); ICMP's covers no addresses.
    if let Some((c, pseudo)) = l4_checksum(proto).filter(|(c, _)| q.len() >= ihl + c + 2) {
        let at = ihl + c;
        if !(proto == UDP && word(q, at) == 0) {
            if pseudo {
                update32(q, at, old_ip, new_ip);
            }
            let s = update16(word(q, at), old_port, port);
            put(q, at, s);
        }
    }
    if let Some(at) = port_at {
        put(q, at, port);
    }
    let icmp = &mut pkt[icmp_at..];
    put(icmp, ICMP_CHECKSUM, 0);
    let sum = !smoltcp::wire::checksum::data(icmp);
    put(icmp, ICMP_CHECKSUM, sum);
}

/// Rewrites one end of the outer IPv4 header only (an ICMP error's source or destination):
/// ICMP's checksum does not cover the addresses.
pub fn rewrite_addr(pkt: &mut [u8], end: End, ip: Ipv4Addr) {
    let at = match end {
        End::Src => IP_SRC,
        End::Dst => IP_DST,
    };
    let old = [pkt[at], pkt[at + 1], pkt[at + 2], pkt[at + 3]];
    if old != ip.octets() {
        update32(pkt, IP_CHECKSUM, old, ip.octets());
        pkt[at..at + 4].copy_from_slice(&ip.octets());
    }
}
