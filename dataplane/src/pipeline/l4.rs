//! The transport header as the stateful stages need it: ports (or an ICMP query's
//! identifier), TCP flags, whether an SCTP association ends, and for an ICMP error the header
//! it quotes. Offsets are named as in the RFCs; the packet is read in place.

use super::ipv4::Header;
use crate::conntrack::{FlowKey, ICMP, SCTP, TCP, UDP};

/// TCP (RFC 9293 §3.1): ports, then flags in byte 13; checksum at 16.
pub const TCP_FLAGS: usize = 13;
pub const TCP_CHECKSUM: usize = 16;
pub const TCP_MIN: usize = 20;
/// UDP (RFC 768): checksum at 6.
pub const UDP_CHECKSUM: usize = 6;
pub const UDP_LEN: usize = 8;
/// SCTP (RFC 9260 §3.1): a 12-byte common header with the CRC32c at 8, then chunks (type
/// first).
pub const SCTP_CHECKSUM: usize = 8;
pub const SCTP_COMMON: usize = 12;
const SCTP_ABORT: u8 = 6;
const SCTP_SHUTDOWN_COMPLETE: u8 = 14;
/// ICMP (RFC 792): type, code, checksum at 2, identifier at 4 for queries; an error quotes
/// the offending IP header and 8 bytes of its payload from offset 8.
pub const ICMP_CHECKSUM: usize = 2;
pub const ICMP_ID: usize = 4;
pub const ICMP_HEADER: usize = 8;
pub const ECHO_REPLY: u8 = 0;
pub const ECHO_REQUEST: u8 = 8;

/// What a packet carries above IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// TCP, UDP or SCTP with ports; an ICMP echo with its identifier as the requester's port
    /// (a request's source port, a reply's destination port; the other 0).
    Flow {
        key: FlowKey,
        tcp_flags: u8,
        sctp_end: bool,
    },
    /// An ICMP error quoting a packet of `inner` (as that packet went: from its source to the
    /// host that answered), whose IP header starts at `inner_at` from the outer IP header.
    IcmpError { inner: FlowKey, inner_at: usize },
    /// A fragment after a datagram's first, which carries no transport header (and an SCTP
    /// first fragment: its CRC covers the whole datagram): translated, if at all, as its
    /// first fragment was (`conntrack::frag`).
    Fragment,
    /// Another protocol, or an ICMP message stromd does not translate: no flow to track.
    None,
}

/// Reads the transport header of the IPv4 packet `pkt` (validated: `h` is its header).
/// Truncated headers are `None` too: they are forwarded or dropped by the stages that need
/// them, never read past.
#[inline]
pub fn parse(pkt: &[u8], h: &Header) -> L4 {
    // A first fragment has the transport header, and is parsed as a whole packet would be.
    if h.frag_offset != 0 || h.more_frags && h.proto == SCTP {
        return L4::Fragment;
    }
    let at = h.header_len;
    let end = h.total_len.min(pkt.len());
    let Some(l4) = pkt.get(at..end) else {
        return L4::None;
    };
    let ports = |b: &[u8]| {
        (
            u16::from_be_bytes([b[0], b[1]]),
            u16::from_be_bytes([b[2], b[3]]),
        )
    };
    let key = |sport, dport| FlowKey {
        src: h.src,
        dst: h.dst,
        sport,
        dport,
        proto: h.proto,
    };
    match h.proto {
        TCP if l4.len() >= TCP_MIN => {
            let (s, d) = ports(l4);
            L4::Flow {
                key: key(s, d),
                tcp_flags: l4[TCP_FLAGS],
                sctp_end: false,
            }
        }
        UDP if l4.len() >= UDP_LEN => {
            let (s, d) = ports(l4);
            L4::Flow {
                key: key(s, d),
                tcp_flags: 0,
                sctp_end: false,
            }
        }
        SCTP if l4.len() > SCTP_COMMON => {
            let (s, d) = ports(l4);
            let chunk = l4[SCTP_COMMON];
            L4::Flow {
                key: key(s, d),
                tcp_flags: 0,
                sctp_end: chunk == SCTP_ABORT || chunk == SCTP_SHUTDOWN_COMPLETE,
            }
        }
        ICMP if l4.len() >= ICMP_HEADER => match l4[0] {
            // Echo request and reply (RFC 792): the identifier stands for the requester's
            // port, so a reply's tuple is its request's reversed.
            ECHO_REQUEST | ECHO_REPLY if l4[1] == 0 => {
                let id = u16::from_be_bytes([l4[ICMP_ID], l4[ICMP_ID + 1]]);
                let (s, d) = if l4[0] == ECHO_REQUEST {
                    (id, 0)
                } else {
                    (0, id)
                };
                L4::Flow {
                    key: key(s, d),
                    tcp_flags: 0,
                    sctp_end: false,
                }
            }
            // Destination unreachable, time exceeded, parameter problem: quote a packet.
            3 | 11 | 12 => inner(l4)
                .map(|inner| L4::IcmpError {
                    inner,
                    inner_at: at + ICMP_HEADER,
                })
                .unwrap_or(L4::None),
            _ => L4::None,
        },
        _ => L4::None,
    }
}

/// The flow of the packet an ICMP error quotes (its IP header and at least the 4 bytes of
/// ports; of a quoted ICMP echo, its first 8 bytes, which hold the identifier, keyed as
/// [`parse`] keys the echo itself).
fn inner(icmp: &[u8]) -> Option<FlowKey> {
    let q = icmp.get(ICMP_HEADER..)?;
    if q.len() < 20 || q[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(q[0] & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    let proto = q[9];
    let (sport, dport) = match proto {
        TCP | UDP | SCTP => {
            let p = q.get(ihl..ihl + 4)?;
            (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            )
        }
        ICMP => {
            let e = q.get(ihl..ihl + ICMP_HEADER)?;
            let id = u16::from_be_bytes([e[ICMP_ID], e[ICMP_ID + 1]]);
            match (e[0], e[1]) {
                (ECHO_REQUEST, 0) => (id, 0),
                (ECHO_REPLY, 0) => (0, id),
                // An error about an error (or another message) is not answered: RFC 1122.
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(FlowKey {
        src: std::net::Ipv4Addr::new(q[12], q[13], q[14], q[15]),
        dst: std::net::Ipv4Addr::new(q[16], q[17], q[18], q[19]),
        sport,
        dport,
        proto,
    })
}
