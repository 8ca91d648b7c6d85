//! The policy stage: NetworkPolicy for packets of no tracked flow.
//!
//! ```text
//! service::stage ─▶ tracked flow (its policy checked when it started, again on a change) ─▶ route
//!                └▶ untracked ─▶ node's own traffic? ─▶ route
//!                              ─▶ verdict (source's egress, destination's ingress)
//!                                   ├ allowed ─▶ tracked when its answers would be denied ─▶ route
//!                                   └ denied ─▶ route ─▶ to another worker's port: handed over
//!                                                │        with CONFIRM (passes there only as
//!                                                │        a packet of a flow it tracks)
//!                                                └ else: dropped (policy_denied)
//! ```
//!
//! A flow's state lives on the worker of the port it started from, so a packet denied on its
//! own may still be the answer of a connection another worker tracks: the worker of its
//! destination's port, which is where the connection started. That worker decides
//! ([`super::service::deliver`]).
//!
//! Translated flows (Services, masquerade) are checked in `service` before their entry is
//! made, with the client's own address and the backend: the verdict is about the pods the
//! packet really goes between.

use std::net::{IpAddr, Ipv4Addr};

use super::ipv4::Header;
use super::l4::L4;
use super::{Action, Context, InPort, PortKind};
use crate::conntrack::{FlowKey, Refused, Seen};
use crate::drop::DropReason;
use crate::tables::policy::Denied;
use crate::tables::services::{Backend, SvcRef};
use crate::tables::View;

/// Marks the port of an [`Action::Handoff`] whose frame the policies deny on its own: the
/// receiving worker sends it only if it is a packet of a flow it tracks.
pub const CONFIRM: u32 = 1 << 31;

/// Whether `ip` is the node's (its addresses, the pod gateway): traffic between a pod and its
/// node is always allowed.
#[inline]
pub fn is_node(t: &View<'_>, ip: Ipv4Addr) -> bool {
    ip == t.node.gateway_v4 || t.node.addrs.contains(&IpAddr::V4(ip))
}

/// The verdict on a packet from `src`:`sport` to `dst` on (`proto`, `port`), the node's own
/// traffic allowed (the source port is not judged, only kept for the log).
#[inline]
pub fn verdict(
    t: &View<'_>,
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    proto: u8,
    port: u16,
) -> Result<(), Denied> {
    if t.policy.is_empty() || is_node(t, src) || is_node(t, dst) {
        return Ok(());
    }
    t.policy
        .verdict(src, dst, proto, port)
        .map_err(|d| Denied { sport, ..d })
}

/// The verdict on a packet of no tracked flow: by its ports when it has them (`l4` as the
/// Service stage parsed it), by its protocol alone otherwise.
#[inline]
pub fn packet_verdict(t: &View<'_>, hdr: &Header, l4: L4) -> Result<(), Denied> {
    let (proto, sport, dport) = match l4 {
        L4::Flow { key, .. } => (key.proto, key.sport, key.dport),
        _ => (hdr.proto, 0, 0),
    };
    verdict(t, hdr.src, sport, hdr.dst, proto, dport)
}

/// A direction's index in a policy's drop counters.
#[inline]
pub fn direction_index(d: strom_api::Direction) -> usize {
    match d {
        strom_api::Direction::Ingress => 0,
        strom_api::Direction::Egress => 1,
    }
}

/// Counts a drop against every policy that isolates the pod in that direction, and logs it
/// if this worker's log rate allows a line now.
#[inline]
pub fn count(ctx: &mut Context, t: &View<'_>, d: Denied) {
    let Some(g) = t.policy.group(d.group) else {
        return;
    };
    ctx.count_policy_drop(
        t.policy.generation(),
        d.group,
        direction_index(d.direction),
        &g.slots,
    );
    if ctx.policy_log_allowed() {
        log(t, g, d);
    }
}

/// One line about a denied packet: its 5-tuple, the pod whose policies denied it, in which
/// direction, and those policies (none of their rules allowed it). Cold: at most
/// [`super::POLICY_LOG_PER_SEC`] lines per second per worker.
#[cold]
fn log(t: &View<'_>, g: &crate::tables::policy::Group, d: Denied) {
    let pod = match d.direction {
        strom_api::Direction::Ingress => d.dst,
        strom_api::Direction::Egress => d.src,
    };
    tracing::info!(
        target: "strom::policy",
        "denied {} {}:{} -> {}:{} (protocol {}): {} {} ({}) isolated by {}; no rule allows it",
        strom_api::Protocol::from_number(d.proto).map_or("ip", |p| p.name()),
        d.src,
        d.sport,
        d.dst,
        d.port,
        d.proto,
        d.direction.name(),
        t.policy.name(pod).unwrap_or("?"),
        pod,
        g.policies.join(", ")
    );
}

/// A new translated flow's check, before its entry is made: from the client's address to
/// the backend.
#[inline]
pub fn admit_translated(
    ctx: &mut Context,
    t: &View<'_>,
    key: &FlowKey,
    backend: Backend,
) -> Result<(), Action> {
    verdict(t, key.src, key.sport, backend.ip, key.proto, backend.port).map_err(|d| {
        count(ctx, t, d);
        Action::Drop(DropReason::PolicyDenied)
    })
}

/// A tracked flow's packet: checked again when the policies changed since its last check
/// (the original source against the translated destination); a flow they now deny is cut
/// (its entry goes, the packet is dropped), whichever direction the packet goes.
#[inline]
pub fn recheck(ctx: &mut Context, t: &View<'_>, slot: u32) -> Result<(), Action> {
    let gen = t.policy.generation();
    let e = ctx.ct.entry(slot);
    if e.policy_checked == gen {
        return Ok(());
    }
    match verdict(
        t,
        e.orig.src,
        e.orig.sport,
        e.reply.src,
        e.orig.proto,
        e.reply.sport,
    ) {
        Ok(()) => {
            ctx.ct.entry_mut(slot).policy_checked = gen;
            Ok(())
        }
        Err(d) => {
            count(ctx, t, d);
            ctx.ct.remove(slot);
            Err(Action::Drop(DropReason::PolicyDenied))
        }
    }
}

/// Whether the answers of an allowed flow would be denied on their own: then the flow needs
/// an entry for them to pass.
#[inline]
pub fn answers_denied(t: &View<'_>, key: &FlowKey) -> bool {
    !t.policy.is_empty()
        && (t.policy.isolated(key.src) || t.policy.isolated(key.dst))
        && verdict(t, key.dst, key.dport, key.src, key.proto, key.sport).is_err()
}

/// Tracks an allowed flow as it is (no translation) from now on.
#[inline]
pub fn track(ctx: &mut Context, t: &View<'_>, key: FlowKey, seen: Seen) -> Result<(), Refused> {
    let backend = Backend {
        ip: key.dst,
        port: key.dport,
    };
    let slot = ctx.ct.insert(
        key,
        key.reversed(),
        SvcRef::NONE,
        backend,
        seen,
        t.services.generation(),
        ctx.now_ms,
    )?;
    ctx.ct.entry_mut(slot).policy_checked = t.policy.generation();
    Ok(())
}

/// The stage for a packet of no tracked flow (`l4` as the Service stage parsed it). `Ok(None)`:
/// it goes on; `Ok(Some(denied))`: the policies deny it on its own, and it passes only as a
/// packet of a connection its destination's worker tracks ([`confirm`] after routing);
/// `Err`: it goes no further.
#[inline]
pub fn stage(
    hdr: &Header,
    l4: L4,
    port: &InPort<'_>,
    t: &View<'_>,
    ctx: &mut Context,
) -> Result<Option<Denied>, Action> {
    let inbound = port.kind == PortKind::Uplink
        && t.node.masquerade
        && t.route(IpAddr::V4(hdr.dst))
            .is_some_and(|n| n.worker == ctx.worker && !t.routes.is_uplink(n));
    if t.policy.is_empty() && !inbound {
        return Ok(None);
    }
    if let Err(d) = packet_verdict(t, hdr, l4) {
        return Ok(Some(d));
    }
    // A datagram's first fragment: its later ones, without ports, pass as it did.
    if hdr.more_frags
        && hdr.frag_offset == 0
        && (t.policy.isolated(hdr.src) || t.policy.isolated(hdr.dst))
    {
        ctx.frags.record(
            super::service::frag_key(hdr),
            crate::conntrack::frag::FragTo::Addrs(hdr.src, hdr.dst),
            ctx.now_ms,
        );
    }
    let L4::Flow {
        key,
        tcp_flags,
        sctp_end,
    } = l4
    else {
        return Ok(None);
    };
    // A connection from outside to a pod of this worker: tracked, so that the pod's answers
    // are not taken for new connections leaving the cluster (masquerade); a pod of another
    // worker is tracked there when the frame reaches it. With policies on the node, every
    // flow a pod starts is tracked here, where it started: its answers pass even when a
    // later change isolates the pod against them, and a change that denies the flow itself
    // cuts it (`recheck`).
    let own = port.kind == PortKind::Pod || inbound;
    if own && (inbound || !t.policy.is_empty()) {
        let seen = Seen {
            tcp_flags,
            sctp_end,
        };
        match track(ctx, t, key, seen) {
            Ok(()) | Err(Refused::Clash) => {}
            // Its answers could not pass: refused at once rather than left half-open. A
            // connection from outside that only masquerade wanted tracked goes on untracked.
            Err(Refused::Full) if answers_denied(t, &key) => {
                return Err(Action::Drop(DropReason::ConntrackFull));
            }
            Err(Refused::Full) => {}
        }
    }
    Ok(None)
}

/// The routed action for a packet the policies deny on its own: a hand-off to the worker of
/// its destination's port, marked, which sends it only as a packet of a flow it tracks;
/// anything else is dropped (this worker tracks no flow of it: the Service stage looked).
#[inline]
pub fn confirm(a: Action, d: Denied, t: &View<'_>, ctx: &mut Context) -> Action {
    match a {
        Action::Handoff { worker, port, len } if port & CONFIRM == 0 => Action::Handoff {
            worker,
            port: port | CONFIRM,
            len,
        },
        _ => {
            count(ctx, t, d);
            Action::Drop(DropReason::PolicyDenied)
        }
    }
}
