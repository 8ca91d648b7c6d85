//! The per-packet pipeline: pure functions over one frame, no I/O, no allocation, no locks.
//!
//! ```text
//! frame ─▶ eth::classify ─▶ arp::answer_gateway ──────────────────────────▶ Hairpin (ARP reply)
//!                       └─▶ spoof::check ─▶ ipv4::validate ─▶ route ─▶ ipv4::decrement_ttl
//!                                                              │            └─ expired ─▶ icmp::time_exceeded ─▶ IcmpError
//!                                                              └─▶ rewrite::macs ─▶ Forward
//! ```
//! Later stages (conntrack, Services, policy, overlay) slot in between `validate` and `route`.

pub mod arp;
pub mod csum;
pub mod eth;
pub mod icmp;
pub mod ipv4;
pub mod rewrite;
pub mod spoof;

use std::net::IpAddr;

use crate::drop::DropReason;
use crate::mac::Mac;
use crate::tables::{Next, Tables};

/// What kind of port a frame came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortKind {
    /// A pod's host-side veth: anti-spoofing applies, ARP for the gateway is answered.
    Pod,
    /// The node's uplink: traffic for the pod CIDR routed to the node.
    Uplink,
}

/// The port a frame arrived on, as the pipeline needs it.
#[derive(Debug, Clone, Copy)]
pub struct InPort<'a> {
    pub id: u32,
    pub kind: PortKind,
    /// MAC of the host side (what the pod knows as its gateway's MAC).
    pub host_mac: Mac,
    /// The pod's MAC (the only source MAC allowed from a pod port).
    pub pod_mac: Mac,
    /// The pod's addresses (the only source IPs allowed from a pod port).
    pub ips: &'a [IpAddr],
}

/// The outcome for one frame. The frame buffer may have been rewritten in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Drop and count.
    Drop(DropReason),
    /// Send `len` bytes back out of the port it came in on (ARP reply).
    Hairpin { len: usize },
    /// The original is dropped for `reason`; `len` bytes of ICMP error go back out of the
    /// port it came in on.
    IcmpError { reason: DropReason, len: usize },
    /// Send `len` bytes out of `next.port`.
    Forward { next: Next, len: usize },
}

/// Runs the pipeline over `buf[..len]`. `buf` is the whole frame buffer: stages that grow the
/// packet (ICMP errors) use the room behind `len`.
#[inline]
pub fn process(buf: &mut [u8], len: usize, port: &InPort<'_>, t: &Tables) -> Action {
    let len = len.min(buf.len());
    match eth::classify(&buf[..len]) {
        Err(r) => Action::Drop(r),
        Ok(eth::L3::Arp) => {
            if let Err(r) = spoof::check_mac(&buf[..len], port) {
                return Action::Drop(r);
            }
            match arp::answer_gateway(&mut buf[..len], port, t.gateway_v4) {
                Ok(n) => Action::Hairpin { len: n },
                Err(r) => Action::Drop(r),
            }
        }
        Ok(eth::L3::Ipv4) => forward_ipv4(buf, len, port, t),
    }
}

#[inline]
fn forward_ipv4(buf: &mut [u8], len: usize, port: &InPort<'_>, t: &Tables) -> Action {
    let hdr = match ipv4::validate(&buf[eth::HEADER_LEN..len]) {
        Ok(h) => h,
        Err(r) => return Action::Drop(r),
    };
    if let Err(r) = spoof::check(&buf[..len], port, IpAddr::V4(hdr.src)) {
        return Action::Drop(r);
    }
    if hdr.dst == t.gateway_v4 {
        return Action::Drop(DropReason::ToGateway);
    }
    if hdr.dst.is_broadcast() || hdr.dst.is_multicast() || hdr.dst.is_unspecified() {
        return Action::Drop(DropReason::NotUnicast);
    }
    let Some(next) = t.route(IpAddr::V4(hdr.dst)).copied() else {
        return Action::Drop(DropReason::NoRoute);
    };
    if port.kind == PortKind::Uplink && t.uplink.is_some_and(|u| u.port == next.port) {
        // Never send a frame back out of the uplink it came in on, whatever its queue (no
        // routing loops).
        return Action::Drop(DropReason::NoRoute);
    }
    if !ipv4::decrement_ttl(&mut buf[eth::HEADER_LEN..len]) {
        return match icmp::time_exceeded(buf, len, port.host_mac, t.gateway_v4) {
            Some(n) => Action::IcmpError {
                reason: DropReason::TtlExpired,
                len: n,
            },
            None => Action::Drop(DropReason::TtlExpired),
        };
    }
    rewrite::macs(&mut buf[..len], &next);
    Action::Forward { next, len }
}

#[cfg(test)]
mod tests;
