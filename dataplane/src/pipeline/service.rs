//! The Service stage: conntrack, then Service DNAT for a flow's first packet.
//!
//! ```text
//! packet ─▶ l4::parse ─▶ conntrack hit, original direction ─▶ backend still listed? ─▶ DNAT
//!                    │                                      ├─ no: TCP RST (UDP: balanced anew)
//!                    │       (no Service, destination now one: new connection balanced to it)
//!                    ├─▶ conntrack hit, reply direction ─▶ reverse NAT (source back to the VIP)
//!                    ├─▶ conntrack hit, a flow another worker owns ─▶ handed there (REROUTE)
//!                    ├─▶ ICMP error quoting a tracked flow ─▶ quote and addresses translated back
//!                    └─▶ miss ─▶ frontend? ─▶ from outside, another worker's flow: handed there
//!                                         ├─▶ affinity │ Maglev ─▶ track ─▶ DNAT (+ SNAT)
//!                                         └─ no endpoint: TCP RST, ICMP port unreachable
//! ```
//!
//! Runs on the worker of the port the packet came in on (for a flow from beyond a multi-queue
//! uplink, its owner's: [`crate::tables::routes::RouteTable::inbound_owner`]), before
//! routing, which then routes the translated packet. A reply received on another worker is
//! routed statelessly to the client's port, whose worker owns the flow and translates it in
//! [`deliver`]; an answer to an SNAT port, or one a backend's worker hands back, in
//! [`super::reroute`].

use std::net::Ipv4Addr;

use super::eth::HEADER_LEN;
use super::ipv4::Header;
use super::l4::{self, L4};
use super::nat::{self, End};
use super::{icmp, policy, reject, Action, Context, InPort, PortKind};
use crate::conntrack::frag::{FragKey, FragTo};
use crate::conntrack::{FlowKey, Hit, Refused, Seen, ICMP, TCP};
use crate::drop::DropReason;
use crate::tables::maglev::mix64;
use crate::tables::services::{Backend, FrontKind, SvcPort, SvcRef};
use crate::tables::View;

/// Per-Service-port counters a worker keeps (indexed by slot).
#[derive(Debug, Clone, Copy, Default)]
pub struct SvcCount {
    pub flows: u64,
    pub packets: u64,
    pub rejected: u64,
    /// The incarnation these counts belong to: a reused slot starts from zero.
    pub incarnation: u32,
}

/// The flow hash that picks a backend: every field of the 5-tuple, so a client's
/// connections spread over the backends.
#[inline]
pub fn flow_hash(k: &FlowKey) -> u64 {
    let a = (u64::from(u32::from(k.src)) << 32) | u64::from(u32::from(k.dst));
    let b = (u64::from(k.sport) << 32) | (u64::from(k.dport) << 8) | u64::from(k.proto);
    mix64(a ^ mix64(b))
}

/// How a packet leaves the Service stage, when it goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// A packet of a tracked flow (or a later fragment or ICMP error of one), translated as
    /// the flow is; the flow's policy verdict was checked when it started, and again since
    /// the policies last changed.
    Tracked,
    /// A packet of no tracked flow, as parsed: the policy stage decides.
    Untracked(L4),
}

/// The Service stage for a packet from `port`: `Err` when the packet goes no further
/// (rejected, dropped, handed over); otherwise the packet may have been translated and `hdr`
/// says where it goes now.
#[inline]
pub fn stage(
    buf: &mut [u8],
    len: usize,
    hdr: &mut Header,
    port: &InPort<'_>,
    t: &View<'_>,
    ctx: &mut Context,
) -> Result<Pass, Action> {
    if t.services.is_empty() && ctx.ct.is_empty() && !t.node.masquerade && t.policy.is_empty() {
        return Ok(Pass::Untracked(L4::None));
    }
    let end = HEADER_LEN + hdr.total_len.min(len - HEADER_LEN);
    let parsed = l4::parse(&buf[HEADER_LEN..end], hdr);
    match parsed {
        L4::Fragment => {
            match translate_fragment(&mut buf[HEADER_LEN..end], hdr, ctx) {
                Some(FragTo::Addrs(..)) => return Ok(Pass::Tracked),
                Some(FragTo::Worker { worker, port }) => {
                    return Err(Action::Handoff { worker, port, len })
                }
                None => {}
            }
            if t.services.is_vip(hdr.dst) {
                return Err(Action::Drop(DropReason::ServiceUnknownPort));
            }
            // Of a pod's datagram leaving the cluster whose first fragment was not seen (or
            // not first): it cannot be masqueraded, and must not leave with the pod's address.
            if port.kind == PortKind::Pod && t.node.masquerades(hdr.dst) {
                return Err(Action::Drop(DropReason::FragmentUntranslated));
            }
            Ok(Pass::Untracked(parsed))
        }
        L4::None => {
            if t.services.is_vip(hdr.dst) {
                return Err(Action::Drop(DropReason::ServiceUnknownPort));
            }
            Ok(Pass::Untracked(parsed))
        }
        L4::IcmpError { inner, inner_at } => {
            // About a flow another worker owns (a pod's port unreachable to a client of
            // its): that worker translates it.
            if let Some(w) = owner_elsewhere(ctx, &inner.reversed()) {
                return Err(Action::Handoff {
                    worker: w,
                    port: super::REROUTE,
                    len,
                });
            }
            if icmp_error(&mut buf[HEADER_LEN..end], hdr, inner, inner_at, ctx) {
                return Ok(Pass::Tracked);
            }
            // About a packet that left from one of the node's SNAT ports another worker
            // owns (a router's fragmentation-needed about a masqueraded flow, say): that
            // worker translates it back.
            if inner.src == hdr.dst && t.node.addrs.contains(&std::net::IpAddr::V4(hdr.dst)) {
                if let Some(w) = t.node.snat.owner(inner.sport).filter(|&w| w != ctx.worker) {
                    return Err(Action::Handoff {
                        worker: w,
                        port: super::REROUTE,
                        len,
                    });
                }
            }
            // About an answer a Service frontend sent to a client beyond the uplink: to the
            // worker that owns the flow it quotes (the quote is the answer: the flow as the
            // client started it is its reverse).
            let frontend = match port.kind {
                PortKind::Uplink if t.routes.uplink_workers > 1 => {
                    t.services.frontend(inner.src, inner.sport, inner.proto)
                }
                _ => None,
            };
            if let Some((svc, _)) = frontend {
                let owner = t
                    .routes
                    .inbound_owner(&inner.reversed(), svc.affinity_ms.is_some());
                if let Some(o) = owner.filter(|&o| o != ctx.worker) {
                    return Err(Action::Handoff {
                        worker: o,
                        port: super::FROM_UPLINK,
                        len,
                    });
                }
            }
            Ok(Pass::Untracked(parsed))
        }
        L4::Flow {
            key,
            tcp_flags,
            sctp_end,
        } => {
            let seen = Seen {
                tcp_flags,
                sctp_end,
            };
            flow(buf, len, end, hdr, key, seen, port, t, ctx)
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline]
fn flow(
    buf: &mut [u8],
    len: usize,
    end: usize,
    hdr: &mut Header,
    key: FlowKey,
    seen: Seen,
    port: &InPort<'_>,
    t: &View<'_>,
    ctx: &mut Context,
) -> Result<Pass, Action> {
    let now = ctx.now_ms;
    if let Some(Hit { slot, reply }) = ctx.ct.lookup(&key, now) {
        policy::recheck(ctx, t, slot)?;
        let e = ctx.ct.entry(slot);
        if let Some(w) = e.owner() {
            // A flow another worker translated and owns (its backend on this worker's port):
            // its answers go there as they are, to be translated.
            ctx.ct.entry_mut(slot).seen(reply, seen, now);
            return Err(hand(ctx, hdr, w, super::REROUTE, len));
        }
        if reply {
            let (to_src, to_dst) = e.rewrite_to(true);
            ctx.ct.entry_mut(slot).seen(true, seen, now);
            translate(ctx, &mut buf[HEADER_LEN..end], hdr, to_src, to_dst);
            return Ok(Pass::Tracked);
        }
        if !e.reopened_by(seen) {
            let gen = t.services.generation();
            let (svc, backend) = (e.svc, e.backend);
            let listed = if svc == SvcRef::NONE {
                // Masqueraded and inbound flows belong to no Service, and no Service change
                // removes them; but one that began before a Service took its destination (a
                // pod reaching a ClusterIP before stromd had it: masqueraded out, never
                // answered) must not keep a new connection on its tuple from the Service.
                !superseded(&key, seen, e.checked == gen, t)
            } else {
                e.checked == gen || t.services.port(svc).is_some_and(|p| p.lists(backend))
            };
            if listed {
                let e = ctx.ct.entry_mut(slot);
                e.checked = gen;
                e.seen(false, seen, now);
                let (to_src, to_dst) = e.rewrite_to(false);
                ctx.count(svc, |c| c.packets += 1);
                translate(ctx, &mut buf[HEADER_LEN..end], hdr, to_src, to_dst);
                return Ok(Pass::Tracked);
            }
            // The backend has left the Service: a TCP connection is reset at once, from
            // the address the client used; other flows are balanced anew. A superseded
            // flow of no Service is balanced to its Service.
            ctx.ct.remove(slot);
            if key.proto == TCP && svc != SvcRef::NONE {
                return Err(reject_tcp(
                    ctx,
                    buf,
                    len,
                    port,
                    key.dst,
                    DropReason::BackendGone,
                ));
            }
        } else {
            ctx.ct.remove(slot);
        }
    }
    let Some((svc, kind)) = t.services.frontend(key.dst, key.dport, key.proto) else {
        return no_service(buf, len, end, hdr, key, seen, port, t, ctx);
    };
    new_flow(buf, len, end, hdr, key, seen, port, t, ctx, svc, kind)
}

/// Whether a tracked flow of no Service gives way to a Service that now owns its destination:
/// a new TCP connection on the flow's tuple (a SYN: the client reused its port, the old
/// attempt went unanswered; Linux's conntrack would keep the stale binding), or any other
/// packet (UDP, as kube-proxy clears a Service's stale UDP entries; SCTP too, having no
/// SYN to tell a new association by) once the Service table changed since the flow was
/// last looked at (`same_table`). An established TCP connection keeps its path, as Linux's
/// conntrack keeps its NAT binding.
#[inline]
fn superseded(key: &FlowKey, seen: Seen, same_table: bool, t: &View<'_>) -> bool {
    let new_connection = if key.proto == TCP {
        seen.tcp_flags & crate::conntrack::tcp::SYN != 0
            && seen.tcp_flags & crate::conntrack::tcp::ACK == 0
    } else {
        !same_table
    };
    new_connection && t.services.frontend(key.dst, key.dport, key.proto).is_some()
}

/// A flow's first packet to no Service: an answer to an SNAT port another worker tracks
/// (handed to it), a node port nobody serves, a Service address on a port it lacks, or a
/// pod's connection leaving the cluster (masqueraded); anything else is routed as it is.
#[allow(clippy::too_many_arguments)]
#[inline]
fn no_service(
    buf: &mut [u8],
    len: usize,
    end: usize,
    hdr: &mut Header,
    key: FlowKey,
    seen: Seen,
    port: &InPort<'_>,
    t: &View<'_>,
    ctx: &mut Context,
) -> Result<Pass, Action> {
    let untracked = Pass::Untracked(L4::Flow {
        key,
        tcp_flags: seen.tcp_flags,
        sctp_end: seen.sctp_end,
    });
    if t.node.addrs.contains(&std::net::IpAddr::V4(key.dst)) {
        // The XDP programs hand stromd only NodePorts and SNAT ports of node addresses.
        return Err(match t.node.snat.owner(key.dport) {
            Some(w) if w != ctx.worker => hand(ctx, hdr, w, super::REROUTE, len),
            _ => Action::Drop(DropReason::NodePortUnknown),
        });
    }
    if t.services.is_vip(key.dst) {
        return Err(Action::Drop(DropReason::ServiceUnknownPort));
    }
    // A connection from outside to a pod (the policy stage tracks it where masquerade
    // needs); an echo reply with no flow (to a ping from outside this worker did not track),
    // which is nobody's new connection; a flow that stays in the cluster: as they are.
    if port.kind == PortKind::Uplink
        || !t.node.masquerades(key.dst)
        || key.proto == ICMP && buf.get(HEADER_LEN + hdr.header_len) == Some(&l4::ECHO_REPLY)
    {
        return Ok(untracked);
    }
    let Some(node) = t.node.v4 else {
        return Ok(untracked);
    };
    let backend = Backend {
        ip: key.dst,
        port: key.dport,
    };
    policy::admit_translated(ctx, t, &key, backend)?;
    match track_snat(ctx, t, key, node, backend, SvcRef::NONE, seen) {
        Ok(p) => {
            translate(
                ctx,
                &mut buf[HEADER_LEN..end],
                hdr,
                (node, p),
                (key.dst, key.dport),
            );
            Ok(Pass::Tracked)
        }
        Err(r) => Err(Action::Drop(r)),
    }
}

/// Tracks a new flow whose source becomes `node:PORT`, PORT taken from this worker's share of
/// the SNAT range (one whose answer tuple no flow uses); returns the port.
fn track_snat(
    ctx: &mut Context,
    t: &View<'_>,
    key: FlowKey,
    node: Ipv4Addr,
    backend: Backend,
    svc: SvcRef,
    seen: Seen,
) -> Result<u16, DropReason> {
    let (lo, hi) = t.node.snat.share(ctx.worker);
    let n = u32::from(hi - lo) + 1;
    let gen = t.services.generation();
    for _ in 0..SNAT_TRIES {
        let p = lo + (ctx.snat_next % n) as u16;
        ctx.snat_next = ctx.snat_next.wrapping_add(1);
        // An echo identifier is given to one ping at a time (the XDP programs know them by
        // identifier alone).
        if key.proto == ICMP && ctx.ct.echo_id_taken(p) {
            continue;
        }
        let reply = FlowKey {
            src: backend.ip,
            dst: node,
            sport: backend.port,
            dport: p,
            proto: key.proto,
        };
        match ctx
            .ct
            .insert(key, reply, svc, backend, seen, gen, ctx.now_ms)
        {
            Ok(slot) => {
                ctx.ct.entry_mut(slot).policy_checked = t.policy.generation();
                return Ok(p);
            }
            Err(Refused::Clash) => continue,
            Err(Refused::Full) => return Err(DropReason::ConntrackFull),
        }
    }
    Err(DropReason::SnatPortsExhausted)
}

/// Ports a new flow tries before it is refused for want of one.
const SNAT_TRIES: usize = 64;

#[allow(clippy::too_many_arguments)]
#[inline]
fn new_flow(
    buf: &mut [u8],
    len: usize,
    end: usize,
    hdr: &mut Header,
    key: FlowKey,
    seen: Seen,
    port: &InPort<'_>,
    t: &View<'_>,
    ctx: &mut Context,
    svc: &SvcPort,
    kind: FrontKind,
) -> Result<Pass, Action> {
    // From beyond an uplink spread over workers: the flow is its owner's.
    if port.kind == PortKind::Uplink {
        let owner = t.routes.inbound_owner(&key, svc.affinity_ms.is_some());
        if let Some(o) = owner.filter(|&o| o != ctx.worker) {
            return Err(hand(ctx, hdr, o, super::FROM_UPLINK, len));
        }
    }
    let now = ctx.now_ms;
    // From pods: internalTrafficPolicy for ClusterIPs, every serving endpoint for the
    // Service's external addresses (kube-proxy short-circuits those inside the cluster);
    // from outside: externalTrafficPolicy.
    let pool = match (port.kind, kind) {
        (PortKind::Pod, FrontKind::ClusterIp) => &svc.internal,
        (PortKind::Pod, _) => &svc.cluster,
        (PortKind::Uplink, _) => &svc.external,
    };
    let remembered = svc.affinity_ms.and_then(|_| {
        ctx.affinity
            .get(svc.id, key.src, now)
            .filter(|b| pool.serves(*b))
    });
    let Some(backend) = remembered.or_else(|| pool.pick(flow_hash(&key))) else {
        ctx.count(svc.id, |c| c.rejected += 1);
        return Err(if key.proto == TCP {
            reject_tcp(ctx, buf, len, port, key.dst, DropReason::ServiceNoEndpoints)
        } else {
            super::icmp_error(ctx, DropReason::ServiceNoEndpoints, || {
                icmp::port_unreachable(buf, len, port.host_mac, key.dst)
            })
        });
    };
    policy::admit_translated(ctx, t, &key, backend)?;
    if let Some(ms) = svc.affinity_ms {
        if !ctx.affinity.set(svc.id, key.src, backend, ms, now) {
            ctx.affinity_full += 1;
        }
    }
    // From outside under `externalTrafficPolicy: Cluster`: from the node, so that the
    // backend's answer comes back through it wherever the backend runs. Likewise from a pod
    // to an endpoint outside the cluster (an EndpointSlice naming an outside address), which
    // the pod's own connection there would be masqueraded for.
    let from_node = match port.kind {
        PortKind::Uplink => svc.snat_external,
        PortKind::Pod => t.node.masquerades(backend.ip),
    };
    if from_node {
        if let Some(node) = t.node.v4 {
            return match track_snat(ctx, t, key, node, backend, svc.id, seen) {
                Ok(p) => {
                    ctx.count(svc.id, |c| {
                        c.flows += 1;
                        c.packets += 1;
                    });
                    translate(
                        ctx,
                        &mut buf[HEADER_LEN..end],
                        hdr,
                        (node, p),
                        (backend.ip, backend.port),
                    );
                    Ok(Pass::Tracked)
                }
                Err(r) => Err(Action::Drop(r)),
            };
        }
    }
    // Hairpin: a pod reaching itself through its Service would get a packet from its own
    // address, which its kernel drops as a martian; it comes from the gateway instead.
    let src = if backend.ip == key.src {
        t.node.gateway_v4
    } else {
        key.src
    };
    let reply = FlowKey {
        src: backend.ip,
        dst: src,
        sport: backend.port,
        dport: key.sport,
        proto: key.proto,
    };
    let gen = t.services.generation();
    match ctx.ct.insert(key, reply, svc.id, backend, seen, gen, now) {
        Ok(slot) => ctx.ct.entry_mut(slot).policy_checked = t.policy.generation(),
        Err(Refused::Full) => return Err(Action::Drop(DropReason::ConntrackFull)),
        Err(Refused::Clash) => return Err(Action::Drop(DropReason::ConntrackClash)),
    }
    ctx.count(svc.id, |c| {
        c.flows += 1;
        c.packets += 1;
    });
    translate(
        ctx,
        &mut buf[HEADER_LEN..end],
        hdr,
        (src, key.sport),
        (backend.ip, backend.port),
    );
    Ok(Pass::Tracked)
}

/// Rewrites the packet's source and destination (each only if it changes).
#[inline]
fn translate(
    ctx: &mut Context,
    ip: &mut [u8],
    hdr: &mut Header,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
) {
    // A first fragment: the later ones get its addresses (`translate_fragment`), unchanged
    // ones too (an answer on a connection from outside, which must not be taken for a pod's
    // datagram leaving the cluster).
    if hdr.more_frags {
        ctx.frags
            .record(frag_key(hdr), FragTo::Addrs(src.0, dst.0), ctx.now_ms);
    }
    nat::rewrite(ip, hdr.header_len, hdr.proto, End::Dst, dst.0, dst.1);
    nat::rewrite(ip, hdr.header_len, hdr.proto, End::Src, src.0, src.1);
    hdr.src = src.0;
    hdr.dst = dst.0;
}

/// A fragment's datagram (RFC 791's reassembly key).
pub(super) fn frag_key(hdr: &Header) -> FragKey {
    FragKey {
        src: hdr.src,
        dst: hdr.dst,
        ident: hdr.ident,
        proto: hdr.proto,
    }
}

/// A later fragment of a datagram (no transport header): given the addresses its first
/// fragment was translated to, if it was translated here; what became of the first, if
/// anything.
fn translate_fragment(ip: &mut [u8], hdr: &mut Header, ctx: &Context) -> Option<FragTo> {
    let to = ctx.frags.lookup(&frag_key(hdr), ctx.now_ms)?;
    if let FragTo::Addrs(src, dst) = to {
        nat::rewrite_addr(ip, End::Src, src);
        nat::rewrite_addr(ip, End::Dst, dst);
        hdr.src = src;
        hdr.dst = dst;
    }
    Some(to)
}

/// Hands the packet to worker `worker` (`port`: what that worker does with it); when it is
/// a datagram's first fragment, its later ones, which have no ports to tell their flow by,
/// follow it there.
#[inline]
fn hand(ctx: &mut Context, hdr: &Header, worker: u16, port: u32, len: usize) -> Action {
    if hdr.more_frags && hdr.frag_offset == 0 {
        ctx.frags
            .record(frag_key(hdr), FragTo::Worker { worker, port }, ctx.now_ms);
    }
    Action::Handoff { worker, port, len }
}

/// The worker that owns the tracked flow `key` belongs to, when it is another's.
#[inline]
fn owner_elsewhere(ctx: &mut Context, key: &FlowKey) -> Option<u16> {
    let hit = ctx.ct.lookup(key, ctx.now_ms)?;
    ctx.ct.entry(hit.slot).owner()
}

/// A RST back to the client from `from`, out of the port the segment came in on, at the
/// worker's ICMP error rate (a flood of segments to a Service without endpoints must not
/// make stromd a reflector).
fn reject_tcp(
    ctx: &mut Context,
    buf: &mut [u8],
    len: usize,
    port: &InPort<'_>,
    from: Ipv4Addr,
    reason: DropReason,
) -> Action {
    super::icmp_error(ctx, reason, || {
        reject::tcp_rst(buf, len, port.host_mac, from)
    })
}

/// Translates an ICMP error about a tracked flow back to what the other end knows: the
/// quoted packet and the outer addresses (Linux's `nf_nat_icmp_reply_translation`). An error
/// about no tracked flow is left as it is.
fn icmp_error(
    ip: &mut [u8],
    hdr: &mut Header,
    inner: FlowKey,
    inner_at: usize,
    ctx: &mut Context,
) -> bool {
    // The quoted packet went from inner.src to inner.dst; the flow it belongs to is tracked
    // under the tuple that packet's answer (this error) would have.
    let Some(Hit { slot, reply }) = ctx.ct.lookup(&inner.reversed(), ctx.now_ms) else {
        return false;
    };
    let e = ctx.ct.entry(slot);
    let icmp_at = hdr.header_len;
    if reply {
        // The error answers a packet of the original direction, as translated: the quote
        // is restored to what the client sent, and the error comes from the address it used.
        let (orig, replyk) = (e.orig, e.reply);
        nat::rewrite_quoted(ip, icmp_at, inner_at, End::Dst, orig.dst, orig.dport);
        nat::rewrite_quoted(ip, icmp_at, inner_at, End::Src, orig.src, orig.sport);
        if replyk.src != orig.dst {
            nat::rewrite_addr(ip, End::Src, orig.dst);
            hdr.src = orig.dst;
        }
        if replyk.dst != orig.src {
            nat::rewrite_addr(ip, End::Dst, orig.src);
            hdr.dst = orig.src;
        }
    } else {
        // The error answers a reply as the client saw it: the quote becomes the reply as the
        // backend sent it, and the error goes to the backend.
        let (orig, replyk) = (e.orig, e.reply);
        nat::rewrite_quoted(ip, icmp_at, inner_at, End::Src, replyk.src, replyk.sport);
        nat::rewrite_quoted(ip, icmp_at, inner_at, End::Dst, replyk.dst, replyk.dport);
        if replyk.src != orig.dst {
            nat::rewrite_addr(ip, End::Dst, replyk.src);
            hdr.dst = replyk.src;
        }
        if replyk.dst != orig.src {
            nat::rewrite_addr(ip, End::Src, replyk.dst);
            hdr.src = replyk.dst;
        }
    }
    true
}

/// What became of a frame offered to [`translate_answer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A packet (or an ICMP error, or a later fragment) of a flow this worker tracks:
    /// translated as the flow is.
    Translated,
    /// Of a flow this worker tracked, which the policies now deny: the entry is gone, the
    /// packet is to be dropped.
    Denied,
    /// Of no flow of this worker's.
    Unknown,
}

/// How a frame was handed to this worker's port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Handed {
    /// With [`policy::CONFIRM`]: the policies deny it on its own.
    pub confirm: bool,
    /// With [`super::OWNED`]: of a flow the worker that handed it over translated and owns.
    pub owner: Option<u16>,
}

/// The owner's part for a frame another worker routed to one of this worker's ports: a reply
/// (or an ICMP error) of a flow this worker tracks is translated back before it leaves. A
/// frame handed over with [`policy::CONFIRM`] (the policies deny it on its own) goes only
/// as a packet of such a flow. A flow the sender owns ([`super::OWNED`]) is tracked as the
/// sender's, its answers to be handed back there. Others, or frames not IPv4, are left as
/// they are; a connection from outside, or one whose answers the policies would deny, is
/// tracked here, where its answers come.
#[inline]
pub fn deliver(
    buf: &mut [u8],
    len: usize,
    t: &View<'_>,
    ctx: &mut Context,
    handed: Handed,
) -> Result<(), DropReason> {
    let confirm = handed.confirm;
    let idle =
        handed.owner.is_none() && ctx.ct.is_empty() && !t.node.masquerade && t.policy.is_empty();
    let denied = if confirm {
        Err(DropReason::PolicyDenied)
    } else {
        Ok(())
    };
    if idle || len <= HEADER_LEN || buf[12..14] != [0x08, 0x00] {
        return denied;
    }
    let Ok(mut hdr) = super::ipv4::validate(&buf[HEADER_LEN..len]) else {
        return denied;
    };
    match translate_answer(buf, &mut hdr, t, ctx) {
        Answer::Translated => return Ok(()),
        Answer::Denied => return Err(DropReason::PolicyDenied),
        Answer::Unknown => {}
    }
    let end = (HEADER_LEN + hdr.total_len).min(len);
    let parsed = l4::parse(&buf[HEADER_LEN..end], &hdr);
    if confirm {
        if let Err(d) = policy::packet_verdict(t, &hdr, parsed) {
            policy::count(ctx, t, d);
        }
        return denied;
    }
    if let L4::Flow {
        key,
        tcp_flags,
        sctp_end,
    } = parsed
    {
        let seen = Seen {
            tcp_flags,
            sctp_end,
        };
        if let Some(w) = handed.owner {
            return track_owned(ctx, t, key, seen, w);
        }
        let inbound = t.node.masquerade && t.node.masquerades(hdr.src);
        if inbound || !t.policy.is_empty() {
            // A full table leaves it untracked: its answers would be masqueraded or denied,
            // and the connection fail.
            let _ = policy::track(ctx, t, key, seen);
        }
    }
    Ok(())
}

/// Tracks `key` (as it comes, translated) as a flow worker `owner` owns: its answers are
/// handed there untranslated. Refused when the table is full: the answers would otherwise
/// leave with the backend's address.
fn track_owned(
    ctx: &mut Context,
    t: &View<'_>,
    key: FlowKey,
    seen: Seen,
    owner: u16,
) -> Result<(), DropReason> {
    let backend = Backend {
        ip: key.dst,
        port: key.dport,
    };
    let gen = t.services.generation();
    let slot = ctx
        .ct
        .insert(
            key,
            key.reversed(),
            SvcRef::NONE,
            backend,
            seen,
            gen,
            ctx.now_ms,
        )
        .map_err(|r| match r {
            Refused::Full => DropReason::ConntrackFull,
            Refused::Clash => DropReason::ConntrackClash,
        })?;
    let e = ctx.ct.entry_mut(slot);
    e.set_owner(Some(owner));
    e.policy_checked = t.policy.generation();
    Ok(())
}

/// Translates an answer (or an ICMP error) of a flow this worker tracks.
#[inline]
pub fn translate_answer(
    buf: &mut [u8],
    hdr: &mut Header,
    t: &View<'_>,
    ctx: &mut Context,
) -> Answer {
    // Whole packets only reach here (validated against their buffer), but never past it.
    let end = (HEADER_LEN + hdr.total_len).min(buf.len());
    let done = |b: bool| {
        if b {
            Answer::Translated
        } else {
            Answer::Unknown
        }
    };
    match l4::parse(&buf[HEADER_LEN..end], hdr) {
        L4::Flow {
            key,
            tcp_flags,
            sctp_end,
        } => {
            let now = ctx.now_ms;
            let seen = Seen {
                tcp_flags,
                sctp_end,
            };
            let Some(Hit { slot, reply }) = ctx.ct.lookup(&key, now) else {
                return Answer::Unknown;
            };
            if !reply && ctx.ct.entry(slot).reopened_by(seen) {
                // A new connection on the tuple of a closed one (a client outside reusing
                // its port): the old entry goes, the new connection is tracked anew.
                ctx.ct.remove(slot);
                return Answer::Unknown;
            }
            if policy::recheck(ctx, t, slot).is_err() {
                return Answer::Denied;
            }
            let e = ctx.ct.entry_mut(slot);
            e.seen(reply, seen, now);
            // The original direction of a flow this worker tracks (a client outside, say,
            // whose connection another worker handed here) only keeps the entry alive.
            if reply {
                let (to_src, to_dst) = e.rewrite_to(true);
                translate(ctx, &mut buf[HEADER_LEN..end], hdr, to_src, to_dst);
            }
            Answer::Translated
        }
        L4::IcmpError { inner, inner_at } => done(icmp_error(
            &mut buf[HEADER_LEN..end],
            hdr,
            inner,
            inner_at,
            ctx,
        )),
        L4::Fragment => done(matches!(
            translate_fragment(&mut buf[HEADER_LEN..end], hdr, ctx),
            Some(FragTo::Addrs(..))
        )),
        L4::None => Answer::Unknown,
    }
}

/// What stromd would do with the first packet of `key` arriving from a pod, in words
/// (`stromctl trace`): the frontend, the pool, the backend Maglev picks, the translation,
/// then the policies' verdict on the packet as translated.
pub fn trace(key: &FlowKey, t: &View<'_>, gateway: Ipv4Addr) -> Vec<String> {
    let mut steps = Vec::new();
    let to = trace_service(key, t, gateway, &mut steps);
    if let Some((dst, dport)) = to.filter(|_| !t.policy.is_empty()) {
        if policy::is_node(t, key.src) || policy::is_node(t, dst) {
            steps.push("policy: between a pod and its node: always allowed".into());
        } else {
            steps.extend(t.policy.trace(key.src, dst, key.proto, dport));
        }
    }
    steps
}

/// The Service part of [`trace`]; the destination the packet goes to, if it goes on.
fn trace_service(
    key: &FlowKey,
    t: &View<'_>,
    gateway: Ipv4Addr,
    steps: &mut Vec<String>,
) -> Option<(Ipv4Addr, u16)> {
    steps.push(format!("packet {key} proto {}", key.proto));
    let Some((svc, kind)) = t.services.frontend(key.dst, key.dport, key.proto) else {
        if t.services.is_vip(key.dst) {
            steps.push(format!(
                "{} is a Service address but not on this port and protocol: dropped (service_unknown_port)",
                key.dst
            ));
            return None;
        }
        steps.push("no Service frontend: routed as it is".into());
        return Some((key.dst, key.dport));
    };
    steps.push(format!("frontend {} of {}", kind.name(), svc.key));
    let pool = match kind {
        FrontKind::ClusterIp => &svc.internal,
        _ => &svc.cluster,
    };
    steps.push(format!(
        "{} serving endpoint(s) for traffic from pods{}",
        pool.backends.len(),
        if svc.affinity_ms.is_some() {
            " (ClientIP affinity: a client's earlier choice comes first)"
        } else {
            ""
        }
    ));
    match pool.pick(flow_hash(key)) {
        None => {
            steps.push(if key.proto == TCP {
                "no endpoint: rejected with a TCP RST".into()
            } else {
                "no endpoint: rejected with ICMP port unreachable".into()
            });
            None
        }
        Some(Backend { ip, port }) => {
            let src = if ip == key.src { gateway } else { key.src };
            steps.push(format!("Maglev picks {ip}:{port}"));
            steps.push(format!(
                "translated to {src}:{} -> {ip}:{port}{}",
                key.sport,
                if src != key.src {
                    " (hairpin: from the gateway)"
                } else {
                    ""
                }
            ));
            Some((ip, port))
        }
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
