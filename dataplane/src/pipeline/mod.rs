//! The per-packet pipeline: pure functions over one frame, no I/O, no allocation, no locks.
//!
//! ```text
//! frame ─▶ eth::classify ─▶ arp::answer_gateway ──────────────────────────▶ Hairpin (ARP reply)
//!                       └─▶ dst MAC ─▶ ipv4::validate ─▶ spoof::check ─▶ service::stage
//!        ─▶ policy::stage ─▶ martians ─▶ route ─▶ MTU ─▶ ipv4::decrement_ttl ─▶ rewrite::macs
//!        ─▶ Forward (a packet the policies deny on its own: policy::confirm)
//!                                  │        └─ expired ─▶ icmp::time_exceeded ─▶ IcmpError
//!                                  └─ too big, DF ─▶ icmp::frag_needed ─▶ IcmpError
//! ```
//! `service::stage` (conntrack, Service DNAT, reverse NAT) runs before the checks on the
//! destination, which then see the translated packet; `policy::stage` judges the packets of
//! no tracked flow. A worker's own state the stages may change (conntrack, affinity, the ICMP
//! rate, counters) lives in its [`Context`].

pub mod arp;
pub mod csum;
pub mod eth;
pub mod icmp;
pub mod ipv4;
pub mod l4;
pub mod nat;
pub mod offload;
pub mod policy;
pub mod reject;
pub mod rewrite;
pub mod service;
pub mod spoof;

use std::net::IpAddr;

use crate::drop::DropReason;
use crate::mac::Mac;
use crate::tables::services::SvcRef;
use crate::tables::{Next, View};

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

/// The outcome for one frame, final: the worker only carries it out. The frame buffer may
/// have been rewritten in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Drop and count.
    Drop(DropReason),
    /// Send `len` bytes back out of the port it came in on (ARP reply, or a frame routed
    /// back to where it came from).
    Hairpin { len: usize },
    /// The original is dropped for `reason`; `len` bytes of ICMP error go back out of the
    /// port it came in on.
    IcmpError { reason: DropReason, len: usize },
    /// Send `len` bytes out of this worker's port `port` (the frame itself: a worker's ports
    /// share its UMEM slice).
    Tx { port: u32, len: usize },
    /// Hand `len` bytes to worker `worker`, which sends them out of its port `port` (a copy:
    /// each worker has its own UMEM slice).
    Handoff { worker: u16, port: u32, len: usize },
}

/// ICMP errors a worker sends per second at most, and in one burst (as Linux's
/// `icmp_msgs_per_sec` and `icmp_msgs_burst`).
pub const ICMP_PER_SEC: u64 = 1000;
pub const ICMP_BURST: u64 = 50;

/// Lines about denied packets a worker logs per second at most, and in one burst: enough to
/// see what is denied, never a flood (every drop is counted per policy regardless).
pub const POLICY_LOG_PER_SEC: u64 = 10;
pub const POLICY_LOG_BURST: u64 = 10;

/// A token bucket on the worker's coarse clock: `per_sec` tokens a second, at most `burst`.
#[derive(Debug)]
struct Bucket {
    tokens: u64,
    filled_ms: u64,
    per_sec: u64,
    burst: u64,
}

impl Bucket {
    fn new(per_sec: u64, burst: u64) -> Self {
        Bucket {
            tokens: burst,
            filled_ms: 0,
            per_sec,
            burst,
        }
    }

    /// Takes a token at `now_ms`, if there is one.
    #[inline]
    fn take(&mut self, now_ms: u64) -> bool {
        let earned = now_ms.saturating_sub(self.filled_ms) * self.per_sec / 1000;
        if earned > 0 {
            self.tokens = (self.tokens + earned).min(self.burst);
            // Only the time the tokens were earned for: the fraction left counts next time.
            self.filled_ms += earned * 1000 / self.per_sec;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// Flows a worker tracks unless configured otherwise (`dataplane.conntrack_max`).
pub const CONNTRACK_MAX: usize = 131_072;
/// Flows the default context (tests, benchmarks) tracks.
const CONNTRACK_DEFAULT_TEST: usize = 4096;

/// A worker's own state, changed by the pipeline (one per worker: never shared).
#[derive(Debug)]
pub struct Context {
    /// The worker this context belongs to.
    pub worker: u16,
    /// This worker's socket on one of the uplink's receive queues, if it has one: what it
    /// sends frames for the uplink out of (the others hand them to the uplink route's worker).
    pub uplink_tx: Option<u32>,
    /// The coarse monotonic clock in ms, set by the worker once per loop.
    pub now_ms: u64,
    /// What the transport checksum of the frame just processed needs on its way out (set for
    /// every frame by [`process_frame`], read by the worker with the action; [`reroute`] sets
    /// it to `AsIs`, and the worker then puts back the class the frame was handed over with).
    pub tx_csum: offload::TxChecksum,
    /// ICMP errors that may still be sent.
    icmp: Bucket,
    /// Lines about denied packets that may still be logged.
    policy_log: Bucket,
    /// The flows that started on this worker's ports, or from beyond the uplink and owned
    /// here (and those other workers own whose answers come from this worker's ports).
    pub ct: crate::conntrack::Conntrack,
    /// ClientIP affinity of the clients on this worker's ports, or beyond the uplink and
    /// owned here.
    pub affinity: crate::conntrack::affinity::Affinity,
    /// Clients balanced without being remembered: the affinity table was full.
    pub affinity_full: u64,
    /// Where the next SNAT port is looked for in this worker's share.
    pub snat_next: u32,
    /// Datagrams whose later fragments are still to come: translated here, or handed over.
    pub frags: crate::conntrack::frag::Frags,
    /// Counters per Service port slot (grown by the worker between loops when the Service
    /// table gains slots, never on a packet's path).
    pub svc_counts: Vec<service::SvcCount>,
    /// Drops per policy counter slot, ingress and egress (grown between loops; read through
    /// [`Context::policy_counts`], which folds in the per-group counts).
    policy_drops: Vec<[u64; 2]>,
    /// Drops per group of the policy table of generation `policy_gen` (the one the worker
    /// follows), and each group's direction and counter slots: a drop costs one add
    /// however many policies select the pod, folded into `policy_drops` when the table
    /// changes or the counts are asked for (between loops).
    policy_gen: u64,
    policy_group_drops: Vec<u64>,
    policy_groups: Vec<(usize, Box<[u32]>)>,
}

impl Default for Context {
    fn default() -> Self {
        Context::new(0, CONNTRACK_DEFAULT_TEST)
    }
}

impl Context {
    /// Worker `worker`'s context, tracking at most `conntrack_max` flows.
    pub fn new(worker: u16, conntrack_max: usize) -> Self {
        Context {
            worker,
            uplink_tx: None,
            now_ms: 0,
            tx_csum: offload::TxChecksum::AsIs,
            icmp: Bucket::new(ICMP_PER_SEC, ICMP_BURST),
            policy_log: Bucket::new(POLICY_LOG_PER_SEC, POLICY_LOG_BURST),
            ct: crate::conntrack::Conntrack::new(conntrack_max),
            affinity: crate::conntrack::affinity::Affinity::new(conntrack_max),
            affinity_full: 0,
            snat_next: 0,
            frags: Default::default(),
            svc_counts: Vec::new(),
            policy_drops: Vec::new(),
            policy_gen: 0,
            policy_group_drops: Vec::new(),
            policy_groups: Vec::new(),
        }
    }

    /// Makes room for the counters of `slots` Service ports (between loops).
    pub fn size_counters(&mut self, slots: usize) {
        if self.svc_counts.len() < slots {
            self.svc_counts.resize(slots, service::SvcCount::default());
        }
    }

    /// Makes room for the drop counters of `slots` policies (between loops).
    pub fn size_policy_counters(&mut self, slots: usize) {
        if self.policy_drops.len() < slots {
            self.policy_drops.resize(slots, [0; 2]);
        }
    }

    /// Follows policy table `t` (between loops): its counter slots, and per-group counting
    /// for its generation, the previous generation's drops folded into the policies first.
    pub fn follow_policy(&mut self, t: &crate::tables::policy::PolicyTable) {
        self.size_policy_counters(t.slots());
        if self.policy_gen == t.generation() {
            return;
        }
        self.fold_policy_drops();
        self.policy_gen = t.generation();
        self.policy_groups = t
            .groups()
            .iter()
            .map(|g| (policy::direction_index(g.direction), g.slots.clone()))
            .collect();
        self.policy_group_drops.clear();
        self.policy_group_drops.resize(self.policy_groups.len(), 0);
    }

    /// Adds the drops counted per group to their policies' counters.
    fn fold_policy_drops(&mut self) {
        for (n, (dir, slots)) in self
            .policy_group_drops
            .iter_mut()
            .zip(self.policy_groups.iter())
        {
            if *n == 0 {
                continue;
            }
            add_to_slots(&mut self.policy_drops, slots, *dir, *n);
            *n = 0;
        }
    }

    /// Drops per policy counter slot, ingress and egress, up to now (between loops).
    pub fn policy_counts(&mut self) -> &[[u64; 2]] {
        self.fold_policy_drops();
        &self.policy_drops
    }

    /// Counts a drop for group `g` of the table of generation `gen`: one add when it is the
    /// table this worker follows; otherwise (a table the worker has not followed yet, tests)
    /// straight into each of the group's `slots`.
    #[inline]
    fn count_policy_drop(&mut self, gen: u64, g: u32, dir: usize, slots: &[u32]) {
        if self.policy_gen == gen {
            if let Some(n) = self.policy_group_drops.get_mut(g as usize) {
                *n += 1;
                return;
            }
        }
        add_to_slots(&mut self.policy_drops, slots, dir, 1);
    }

    /// Counts for Service port `id` (nothing if the worker has not grown to its slot yet); a
    /// slot's counts start again from zero for a new incarnation.
    #[inline]
    fn count(&mut self, id: SvcRef, f: impl FnOnce(&mut service::SvcCount)) {
        if let Some(c) = self.svc_counts.get_mut(id.slot as usize) {
            if c.incarnation != id.incarnation {
                *c = service::SvcCount {
                    incarnation: id.incarnation,
                    ..Default::default()
                };
            }
            f(c);
        }
    }

    /// Takes a token for one ICMP error, if the rate allows one now.
    #[inline]
    fn icmp_allowed(&mut self) -> bool {
        self.icmp.take(self.now_ms)
    }

    /// Takes a token for one line about a denied packet, if the rate allows one now.
    #[inline]
    pub fn policy_log_allowed(&mut self) -> bool {
        self.policy_log.take(self.now_ms)
    }
}

/// Adds `n` drops in direction `dir` to each of `slots`.
fn add_to_slots(drops: &mut [[u64; 2]], slots: &[u32], dir: usize, n: u64) {
    for &s in slots {
        if let Some(c) = drops.get_mut(s as usize) {
            c[dir] += n;
        }
    }
}

/// Runs the pipeline over `buf[..len]`. `buf` is the whole frame buffer: stages that grow the
/// packet (ICMP errors) use the room behind `len`.
#[inline]
pub fn process(
    buf: &mut [u8],
    len: usize,
    port: &InPort<'_>,
    t: &View<'_>,
    ctx: &mut Context,
) -> Action {
    process_frame(buf, len, len, port, t, ctx)
}

/// As [`process`], for a frame of `wire` bytes of which `buf[..len]` is the first buffer (a
/// multi-buffer frame: the rest follows in further buffers, which no stage reads or changes;
/// the headers lie in the first). The stages read and rewrite headers only; what they need
/// of the whole (its length, for the route's MTU) comes from the IP header, checked against
/// `wire`. An action's `len` is the first buffer's; an ICMP error replaces the whole frame.
#[inline]
pub fn process_frame(
    buf: &mut [u8],
    len: usize,
    wire: usize,
    port: &InPort<'_>,
    t: &View<'_>,
    ctx: &mut Context,
) -> Action {
    let len = len.min(buf.len());
    let wire = wire.max(len);
    ctx.tx_csum = offload::TxChecksum::AsIs;
    match eth::classify(&buf[..len]) {
        Err(r) => Action::Drop(r),
        // ARP fits a buffer many times over: a longer frame is no ARP stromd answers.
        Ok(eth::L3::Arp) if wire > len => Action::Drop(DropReason::ArpMalformed),
        Ok(eth::L3::Arp) => {
            if let Err(r) = spoof::check_mac(&buf[..len], port) {
                return Action::Drop(r);
            }
            match arp::answer_gateway(&mut buf[..len], port, t.node.gateway_v4) {
                Ok(n) => Action::Hairpin { len: n },
                Err(r) => Action::Drop(r),
            }
        }
        Ok(eth::L3::Ipv4) => forward_ipv4(buf, len, wire, port, t, ctx),
    }
}

/// An ICMP error in place of the frame, if the worker's rate allows one; the frame is
/// counted as dropped for `reason` either way.
#[inline]
fn icmp_error(
    ctx: &mut Context,
    reason: DropReason,
    make: impl FnOnce() -> Option<usize>,
) -> Action {
    if !ctx.icmp_allowed() {
        return Action::Drop(reason);
    }
    match make() {
        Some(len) => Action::IcmpError { reason, len },
        None => Action::Drop(reason),
    }
}

#[inline]
fn forward_ipv4(
    buf: &mut [u8],
    len: usize,
    wire: usize,
    port: &InPort<'_>,
    t: &View<'_>,
    ctx: &mut Context,
) -> Action {
    // Only frames addressed to the gateway (the port's own MAC) are routed.
    if buf[..6] != port.host_mac {
        return Action::Drop(DropReason::ForeignDstMac);
    }
    let mut hdr = match ipv4::validate_head(&buf[eth::HEADER_LEN..len], wire - eth::HEADER_LEN) {
        Ok(h) => h,
        Err(r) => return Action::Drop(r),
    };
    if let Err(r) = spoof::check(&buf[..len], port, IpAddr::V4(hdr.src)) {
        return Action::Drop(r);
    }
    if port.kind == PortKind::Pod {
        // Before any stage changes the header: a partial checksum is told by its addresses.
        ctx.tx_csum = offload::classify(&buf[..len], &hdr);
    }
    let (src, dst) = (hdr.src, hdr.dst);
    let pass = match service::stage(buf, len, &mut hdr, port, t, ctx) {
        Ok(p) => p,
        Err(a) => return a,
    };
    let denied = match pass {
        service::Pass::Tracked => None,
        service::Pass::Untracked(l4) => match policy::stage(&hdr, l4, port, t, ctx) {
            Ok(d) => d,
            Err(a) => return a,
        },
    };
    let a = route_out(buf, len, &hdr, port, t, ctx);
    if let Some(d) = denied {
        return policy::confirm(a, d, t, ctx);
    }
    // A flow from beyond an uplink spread over workers, translated here for a Service
    // and keeping the client's address (`externalTrafficPolicy: Local`), whose backend is
    // another worker's: its answers, addressed to the client, would leave by that worker's
    // own queue untranslated. That worker tracks it as this one's and hands them back (the
    // mark on a later fragment or an ICMP error of such a flow changes nothing there: only a
    // packet with ports starts an entry).
    if let Action::Handoff {
        worker,
        port: out_port,
        len: n,
    } = a
    {
        if port.kind == PortKind::Uplink
            && pass == service::Pass::Tracked
            && hdr.src == src
            && hdr.dst != dst
            && t.routes.uplink_workers > 1
            && out_port & (policy::CONFIRM | OWNED) == 0
        {
            return Action::Handoff {
                worker,
                port: out_port | OWNED,
                len: n,
            };
        }
    }
    // An ICMP error about a translated packet (fragmentation needed toward a backend with a
    // smaller MTU, say) quotes it as translated: it goes back as the sender knows the flow,
    // as an error from the flow's far end would (PMTU discovery through a Service).
    if let Action::IcmpError { len: n, .. } = a {
        if (hdr.src, hdr.dst) != (src, dst) {
            if let Ok(mut h) = ipv4::validate(&buf[eth::HEADER_LEN..n]) {
                service::translate_answer(buf, &mut h, t, ctx);
            }
        }
    }
    a
}

/// The port a [`Action::Handoff`] names for a frame the receiving worker must route itself:
/// an answer of a flow it owns (to one of its SNAT ports, or tracked by the sender as the
/// receiver's), translated there first ([`reroute`]).
pub const REROUTE: u32 = u32::MAX;

/// The port a [`Action::Handoff`] names for a frame from beyond the uplink that the worker
/// it came in on hands to the worker owning its flow
/// ([`crate::tables::routes::RouteTable::inbound_owner`]), which processes it as if it had
/// come in on its own uplink socket.
pub const FROM_UPLINK: u32 = u32::MAX - 1;

/// Marks the port of an [`Action::Handoff`] of a flow this worker translated and owns whose
/// answers would not come back here on their own (see `forward_ipv4`): the receiving worker
/// tracks it as this worker's ([`crate::conntrack::Entry::owner`]) and hands its answers
/// back, to be translated here.
pub const OWNED: u32 = 1 << 30;

/// A frame another worker handed over because this worker owns its flow (an answer to one of
/// its SNAT ports, or to a client of its beyond the uplink): translated, then routed from
/// here. Errors about it are dropped (counted): it has no port to go back out of.
#[inline]
pub fn reroute(buf: &mut [u8], len: usize, t: &View<'_>, ctx: &mut Context) -> Action {
    let len = len.min(buf.len());
    ctx.tx_csum = offload::TxChecksum::AsIs;
    let mut hdr = match ipv4::validate(&buf[eth::HEADER_LEN..len]) {
        Ok(h) => h,
        Err(r) => return Action::Drop(r),
    };
    match service::translate_answer(buf, &mut hdr, t, ctx) {
        service::Answer::Translated => {}
        service::Answer::Denied => return Action::Drop(DropReason::PolicyDenied),
        service::Answer::Unknown => return Action::Drop(DropReason::NodePortUnknown),
    }
    // Not the uplink's kind, whose frames never leave by the uplink: a backend's answer to a
    // NodePort client outside, SNATed to this worker's port, leaves by it once translated.
    let from = InPort {
        id: REROUTE,
        kind: PortKind::Pod,
        host_mac: [0; 6],
        pod_mac: [0; 6],
        ips: &[],
    };
    route_out(buf, len, &hdr, &from, t, ctx)
}

/// Routes a packet (translated, if a stage did): checks on the destination, the route, MTU,
/// TTL, MACs, and the port it leaves by.
#[inline]
fn route_out(
    buf: &mut [u8],
    len: usize,
    hdr: &ipv4::Header,
    port: &InPort<'_>,
    t: &View<'_>,
    ctx: &mut Context,
) -> Action {
    if hdr.dst == t.node.gateway_v4 {
        return Action::Drop(DropReason::ToGateway);
    }
    if hdr.dst.is_broadcast() || hdr.dst.is_multicast() || hdr.dst.is_unspecified() {
        return Action::Drop(DropReason::NotUnicast);
    }
    if ipv4::martian_destination(hdr.dst) || t.node.broadcasts.contains(&hdr.dst) {
        return Action::Drop(DropReason::MartianDst);
    }
    let Some(next) = t.route(IpAddr::V4(hdr.dst)).copied() else {
        return Action::Drop(DropReason::NoRoute);
    };
    let to_uplink = t.routes.is_uplink(&next);
    if port.kind == PortKind::Uplink && to_uplink {
        // Never send a frame back out of the uplink it came in on, whatever its queue (no
        // routing loops).
        return Action::Drop(DropReason::NoRoute);
    }
    // ICMP errors come from the gateway to pods, from the node to senders beyond the uplink.
    let from = match port.kind {
        PortKind::Pod => t.node.gateway_v4,
        PortKind::Uplink => t.node.v4.unwrap_or(t.node.gateway_v4),
    };
    if hdr.total_len > usize::from(next.mtu) {
        if !hdr.dont_frag {
            return Action::Drop(DropReason::TooBigNoDf);
        }
        return icmp_error(ctx, DropReason::FragNeeded, || {
            icmp::frag_needed(buf, len, port.host_mac, from, next.mtu)
        });
    }
    if !ipv4::decrement_ttl(&mut buf[eth::HEADER_LEN..len]) {
        return icmp_error(ctx, DropReason::TtlExpired, || {
            icmp::time_exceeded(buf, len, port.host_mac, from)
        });
    }
    rewrite::macs(&mut buf[..len], &next);
    out(next, to_uplink, port, ctx, len)
}

/// Where a routed frame leaves: the uplink has a socket per receive queue, and a worker
/// serving one of them sends on its own; a port of this worker gets the frame itself; the
/// port it came in on, a hairpin; any other, a hand-off to its worker.
#[inline]
fn out(next: Next, to_uplink: bool, port: &InPort<'_>, ctx: &Context, len: usize) -> Action {
    let (out_port, worker) = match ctx.uplink_tx {
        Some(local) if to_uplink => (local, ctx.worker),
        _ => (next.port, next.worker),
    };
    if out_port == port.id {
        Action::Hairpin { len }
    } else if worker == ctx.worker {
        Action::Tx {
            port: out_port,
            len,
        }
    } else {
        Action::Handoff {
            worker,
            port: out_port,
            len,
        }
    }
}

#[cfg(test)]
mod tests;
