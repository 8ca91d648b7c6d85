//! Connection tracking: one table per worker, holding the flows that started on the ports it
//! serves (docs/design.md, "Where a flow's state lives"), so no entry is ever shared between
//! cores and nothing is locked.
//!
//! An entry is found by its original tuple (as the first packet came) and by its reply tuple
//! (as the answer comes back, translated), and says what each direction is rewritten to. The
//! table is bounded: entries, the index and the free list are allocated once, when the worker
//! starts, for `max` flows; a new flow finding it full fails with a counted reason and memory
//! never grows. Expired entries go in a sweep of a few slots per loop and on lookup, so
//! expiry never stalls a worker.

pub mod affinity;
pub mod frag;
pub mod persist;
pub mod tcp;

use std::net::Ipv4Addr;

use std::sync::Arc;

use hashbrown::HashMap;
use strom_xdp::bpf::EchoIds;

use crate::tables::services::{Backend, SvcRef};
pub use tcp::TcpState;

/// IP protocol numbers.
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const SCTP: u8 = 132;

/// Linux's defaults (`nf_conntrack_udp_timeout`, `_udp_timeout_stream`, `_icmp_timeout`).
pub const UDP_UNREPLIED_MS: u64 = 30_000;
pub const UDP_REPLIED_MS: u64 = 120_000;
pub const ICMP_MS: u64 = 30_000;
/// SCTP: until answered as UDP; answered, as an established TCP connection; after ABORT or
/// SHUTDOWN COMPLETE, as a reset one.
pub const SCTP_UNREPLIED_MS: u64 = 30_000;

/// Slots the sweep looks at per worker loop: a million entries are gone over in about 16k
/// loops (well under a second busy; an idle worker's lookups expire what they find).
pub const SWEEP_PER_LOOP: usize = 64;
/// Slots a new flow finding the table full looks at for an expired entry to take.
const SWEEP_WHEN_FULL: usize = 256;

/// A flow's 5-tuple (for ICMP queries, both ports are the identifier).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl FlowKey {
    /// The same flow seen from the other end.
    #[inline]
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
        }
    }
}

impl std::fmt::Display for FlowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{} -> {}:{}",
            self.src, self.sport, self.dst, self.dport
        )
    }
}

/// Where a flow is, per protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    Tcp(TcpState),
    /// UDP, SCTP and ICMP: whether an answer has come; SCTP also whether it was ended.
    Datagram {
        replied: bool,
        closed: bool,
    },
}

impl FlowState {
    fn timeout_ms(self, proto: u8) -> u64 {
        match (self, proto) {
            (FlowState::Tcp(s), _) => s.timeout_ms(),
            (FlowState::Datagram { closed: true, .. }, _) => tcp::CLOSE_MS,
            (FlowState::Datagram { replied, .. }, UDP) => {
                if replied {
                    UDP_REPLIED_MS
                } else {
                    UDP_UNREPLIED_MS
                }
            }
            (FlowState::Datagram { replied, .. }, SCTP) => {
                if replied {
                    tcp::ESTABLISHED_MS
                } else {
                    SCTP_UNREPLIED_MS
                }
            }
            _ => ICMP_MS,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FlowState::Tcp(s) => s.name(),
            FlowState::Datagram { closed: true, .. } => "closed",
            FlowState::Datagram { replied: true, .. } => "replied",
            FlowState::Datagram { replied: false, .. } => "unreplied",
        }
    }
}

/// What a packet tells the state machine: TCP flags, or that an SCTP association ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seen {
    pub tcp_flags: u8,
    pub sctp_end: bool,
}

/// One tracked flow.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The flow as its first packet came.
    pub orig: FlowKey,
    /// The flow as its answers come (the translated original, reversed).
    pub reply: FlowKey,
    /// The Service port it was balanced for, and the backend chosen.
    pub svc: SvcRef,
    pub backend: Backend,
    pub state: FlowState,
    fins: u8,
    pub expires_ms: u64,
    pub packets: u64,
    /// The Service table generation at which the backend was last found listed.
    pub checked: u64,
    /// The policy table generation under which the flow was last found allowed.
    pub policy_checked: u64,
    /// [`Entry::owner`], u16::MAX for none (two bytes keep the entry at 80).
    owner: u16,
    live: bool,
}

impl Entry {
    /// Another worker that owns the flow and its translation (a connection from beyond a
    /// multi-queue uplink to a Service, translated there, its backend on this worker's port):
    /// this entry only sends the flow's answers there, untranslated.
    #[inline]
    pub fn owner(&self) -> Option<u16> {
        (self.owner != u16::MAX).then_some(self.owner)
    }

    /// Makes the flow worker `owner`'s (`None`: this worker's own).
    pub fn set_owner(&mut self, owner: Option<u16>) {
        self.owner = owner.unwrap_or(u16::MAX);
    }

    /// Takes a packet of the flow into account: state and expiry.
    #[inline]
    pub fn seen(&mut self, reply: bool, s: Seen, now_ms: u64) {
        self.packets += 1;
        self.state = match self.state {
            FlowState::Tcp(t) => FlowState::Tcp(t.next(s.tcp_flags, reply, &mut self.fins)),
            FlowState::Datagram { replied, closed } => FlowState::Datagram {
                replied: replied || reply,
                closed: closed || s.sctp_end,
            },
        };
        self.expires_ms = now_ms + self.state.timeout_ms(self.orig.proto);
    }

    /// What a packet of the flow becomes, source and destination: in the original direction
    /// the translated tuple (the reply tuple reversed), in the reply direction the original
    /// one reversed.
    #[inline]
    pub fn rewrite_to(&self, reply: bool) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
        let k = if reply { self.orig } else { self.reply };
        ((k.dst, k.dport), (k.src, k.sport))
    }

    /// Whether a new connection on the same tuple replaces this one (a SYN after the old one
    /// closed).
    pub fn reopened_by(&self, s: Seen) -> bool {
        matches!(self.state, FlowState::Tcp(t) if t.reopens())
            && s.tcp_flags & tcp::SYN != 0
            && s.tcp_flags & tcp::ACK == 0
    }
}

/// Why a flow could not be tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The table holds `max` live flows.
    Full,
    /// Another flow already answers on the reply tuple.
    Clash,
}

/// A hit: the entry's slot and whether the packet goes in the reply direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub slot: u32,
    pub reply: bool,
}

/// A worker's conntrack table.
pub struct Conntrack {
    /// Original and reply tuples → slot << 1 | reply.
    index: HashMap<FlowKey, u32>,
    entries: Vec<Entry>,
    free: Vec<u32>,
    max: usize,
    live: usize,
    sweep_at: usize,
    /// The XDP programs' record of the echo identifiers pods' pings are masqueraded to.
    echo_ids: Option<Arc<EchoIds>>,
    early_drops: u64,
}

impl std::fmt::Debug for Conntrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conntrack({}/{})", self.live, self.max)
    }
}

impl Conntrack {
    /// A table for at most `max` flows, allocated now. The index gets room for twice its two
    /// keys per flow: at a quarter load or less hashbrown's removals leave empty buckets
    /// rather than tombstones, and should tombstones ever use up its room, it rehashes in
    /// place instead of growing (it grows only past half its room): it never allocates on a
    /// worker's path. About 244 bytes a flow in all (BENCHMARKS.md, "Services").
    pub fn new(max: usize) -> Self {
        let max = max.min(u32::MAX as usize / 2);
        Conntrack {
            index: HashMap::with_capacity(max * 4),
            entries: Vec::with_capacity(max),
            free: Vec::with_capacity(max),
            max,
            live: 0,
            sweep_at: 0,
            echo_ids: None,
            early_drops: 0,
        }
    }

    /// Keeps `ids` (the XDP programs' `echo_ids`) up to date with the masqueraded pings this
    /// table tracks.
    pub fn set_echo_ids(&mut self, ids: Option<Arc<EchoIds>>) {
        self.echo_ids = ids;
    }

    /// Whether a masqueraded ping of this table's uses echo identifier `id` (one identifier
    /// per ping: its bit goes when its flow does).
    pub fn echo_id_taken(&self, id: u16) -> bool {
        self.echo_ids.as_ref().is_some_and(|ids| ids.is_set(id))
    }

    /// The identifier a masqueraded ping's answers carry: the reply tuple's, when the flow
    /// is an ICMP echo whose source is translated.
    fn echo_id(orig: &FlowKey, reply: &FlowKey) -> Option<u16> {
        (orig.proto == ICMP && reply.dst != orig.src).then_some(reply.dport)
    }

    /// The flow `key` belongs to, if tracked and not expired (an expired one is removed).
    #[inline]
    pub fn lookup(&mut self, key: &FlowKey, now_ms: u64) -> Option<Hit> {
        let v = *self.index.get(key)?;
        let slot = v >> 1;
        if self.entries[slot as usize].expires_ms <= now_ms {
            self.remove(slot);
            return None;
        }
        Some(Hit {
            slot,
            reply: v & 1 == 1,
        })
    }

    #[inline]
    pub fn entry(&self, slot: u32) -> &Entry {
        &self.entries[slot as usize]
    }

    #[inline]
    pub fn entry_mut(&mut self, slot: u32) -> &mut Entry {
        &mut self.entries[slot as usize]
    }

    /// Tracks a new flow. `reply` is the tuple its answers will come on.
    #[allow(clippy::too_many_arguments)] // one flow's fields, each its own type
    pub fn insert(
        &mut self,
        orig: FlowKey,
        reply: FlowKey,
        svc: SvcRef,
        backend: Backend,
        first: Seen,
        checked: u64,
        now_ms: u64,
    ) -> Result<u32, Refused> {
        let state = if orig.proto == TCP {
            FlowState::Tcp(TcpState::first(first.tcp_flags))
        } else {
            FlowState::Datagram {
                replied: false,
                closed: first.sctp_end,
            }
        };
        let e = Entry {
            orig,
            reply,
            svc,
            backend,
            state,
            fins: 0,
            expires_ms: now_ms + state.timeout_ms(orig.proto),
            packets: 1,
            checked,
            policy_checked: 0,
            owner: u16::MAX,
            live: true,
        };
        self.put(e, now_ms)
    }

    /// Puts `e` in a free slot and indexes it both ways.
    fn put(&mut self, e: Entry, now_ms: u64) -> Result<u32, Refused> {
        let (orig, reply) = (e.orig, e.reply);
        if self.index.contains_key(&orig) || (reply != orig && self.index.contains_key(&reply)) {
            return Err(Refused::Clash);
        }
        if self.live >= self.max && !self.make_room(now_ms) {
            return Err(Refused::Full);
        }
        let slot = match self.free.pop() {
            Some(s) => {
                self.entries[s as usize] = e;
                s
            }
            None if self.entries.len() < self.max => {
                self.entries.push(e);
                (self.entries.len() - 1) as u32
            }
            None => return Err(Refused::Full),
        };
        self.index.insert(orig, slot << 1);
        self.index.insert(reply, slot << 1 | 1);
        self.live += 1;
        if let (Some(ids), Some(id)) = (&self.echo_ids, Self::echo_id(&orig, &reply)) {
            ids.set(id);
        }
        Ok(slot)
    }

    /// Forgets the flow in `slot`.
    pub fn remove(&mut self, slot: u32) {
        let e = &mut self.entries[slot as usize];
        if !e.live {
            return;
        }
        e.live = false;
        let (o, r) = (e.orig, e.reply);
        self.index.remove(&o);
        self.index.remove(&r);
        self.free.push(slot);
        self.live -= 1;
        if let (Some(ids), Some(id)) = (&self.echo_ids, Self::echo_id(&o, &r)) {
            ids.clear(id);
        }
    }

    /// Frees a slot in a full table: the expired flows among the next `SWEEP_WHEN_FULL`
    /// slots go; if none had, the first of them never answered goes instead (Linux's
    /// `early_drop`: a flood of SYNs or unanswered datagrams does not lock answered flows'
    /// newcomers out for two minutes). False: every flow looked at is alive and answered.
    fn make_room(&mut self, now_ms: u64) -> bool {
        let start = self.sweep_at;
        if self.sweep(now_ms, SWEEP_WHEN_FULL) > 0 {
            return true;
        }
        let len = self.entries.len();
        let victim = (0..SWEEP_WHEN_FULL.min(len))
            .map(|i| ((start + i) % len) as u32)
            .find(|&s| {
                let e = &self.entries[s as usize];
                e.live
                    && matches!(
                        e.state,
                        FlowState::Tcp(TcpState::SynSent)
                            | FlowState::Datagram { replied: false, .. }
                    )
            });
        if let Some(s) = victim {
            self.remove(s);
            self.early_drops += 1;
        }
        victim.is_some()
    }

    /// Unanswered flows dropped to make room for new ones.
    pub fn early_drops(&self) -> u64 {
        self.early_drops
    }

    /// Looks at the next `n` slots and removes the expired flows; returns how many went.
    pub fn sweep(&mut self, now_ms: u64, n: usize) -> usize {
        let len = self.entries.len();
        if len == 0 {
            return 0;
        }
        let mut gone = 0;
        for _ in 0..n.min(len) {
            if self.sweep_at >= len {
                self.sweep_at = 0;
            }
            let slot = self.sweep_at as u32;
            self.sweep_at += 1;
            let e = &self.entries[slot as usize];
            if e.live && e.expires_ms <= now_ms {
                self.remove(slot);
                gone += 1;
            }
        }
        gone
    }

    /// Live flows.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Bytes the table holds (allocated when it was made: the same whatever it tracks).
    pub fn memory_bytes(&self) -> usize {
        self.index.allocation_size()
            + self.entries.capacity() * std::mem::size_of::<Entry>()
            + self.free.capacity() * std::mem::size_of::<u32>()
    }

    /// Every live flow with its slot.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Entry)> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.live)
            .map(|(i, e)| (i as u32, e))
    }

    /// Removes every live flow `f` picks; returns how many.
    pub fn remove_where(&mut self, mut f: impl FnMut(&Entry) -> bool) -> usize {
        let slots: Vec<u32> = self.iter().filter(|(_, e)| f(e)).map(|(s, _)| s).collect();
        for s in &slots {
            self.remove(*s);
        }
        slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sport: u16) -> FlowKey {
        FlowKey {
            src: "198.18.16.2".parse().unwrap(),
            dst: "198.19.0.10".parse().unwrap(),
            sport,
            dport: 80,
            proto: TCP,
        }
    }

    /// Shared with the other tests of conntrack.
    pub(super) fn reply_of(k: FlowKey) -> FlowKey {
        FlowKey {
            src: "198.18.16.3".parse().unwrap(),
            sport: 8080,
            ..k.reversed()
        }
    }

    pub(super) fn backend() -> Backend {
        Backend {
            ip: "198.18.16.3".parse().unwrap(),
            port: 8080,
        }
    }

    const SYN: Seen = Seen {
        tcp_flags: tcp::SYN,
        sctp_end: false,
    };

    #[test]
    fn a_flow_is_found_both_ways_and_expires_by_its_state() {
        let mut ct = Conntrack::new(4);
        let k = key(40000);
        let s = ct
            .insert(k, reply_of(k), SvcRef::default(), backend(), SYN, 0, 1000)
            .unwrap();
        assert_eq!(
            ct.lookup(&k, 1000),
            Some(Hit {
                slot: s,
                reply: false
            })
        );
        assert_eq!(
            ct.lookup(&reply_of(k), 1000),
            Some(Hit {
                slot: s,
                reply: true
            })
        );
        // SYN_SENT lives 120 s.
        assert!(ct.lookup(&k, 1000 + tcp::SYN_SENT_MS - 1).is_some());
        assert!(ct.lookup(&k, 1000 + tcp::SYN_SENT_MS).is_none());
        assert!(ct.lookup(&reply_of(k), 1000).is_none(), "removed whole");
        assert!(ct.is_empty());
    }

    #[test]
    fn a_full_table_refuses_new_flows_until_one_expires_and_never_grows() {
        let mut ct = Conntrack::new(3);
        let cap = (ct.index.capacity(), ct.entries.capacity());
        for p in 0..3 {
            let k = key(p);
            let s = ct
                .insert(k, reply_of(k), SvcRef::default(), backend(), SYN, 0, 0)
                .unwrap();
            // Answered: no early drop takes them.
            let syn_ack = Seen {
                tcp_flags: tcp::SYN | tcp::ACK,
                sctp_end: false,
            };
            ct.entry_mut(s).seen(true, syn_ack, 0);
        }
        let k = key(9);
        assert_eq!(
            ct.insert(k, reply_of(k), SvcRef::default(), backend(), SYN, 0, 1),
            Err(Refused::Full)
        );
        // Once they have expired, the new flow takes a slot without waiting for the sweep.
        assert!(ct
            .insert(
                k,
                reply_of(k),
                SvcRef::default(),
                backend(),
                SYN,
                0,
                tcp::SYN_RECV_MS + 1
            )
            .is_ok());
        assert_eq!(ct.len(), 1);
        for round in 0..1000u64 {
            let now = tcp::SYN_SENT_MS * (round + 2);
            let k = key(100 + (round % 50) as u16);
            let _ = ct.insert(k, reply_of(k), SvcRef::default(), backend(), SYN, 0, now);
            ct.sweep(now, SWEEP_PER_LOOP);
        }
        assert_eq!(
            (ct.index.capacity(), ct.entries.capacity()),
            cap,
            "memory never grows"
        );
        assert!(ct.len() <= 3);
    }

    #[test]
    fn a_full_table_of_unanswered_flows_makes_room_for_a_new_one() {
        let mut ct = Conntrack::new(4);
        for p in 0..4 {
            let k = key(p);
            ct.insert(k, reply_of(k), SvcRef::default(), backend(), SYN, 0, 0)
                .unwrap();
        }
        // A flood of SYNs no one answers does not lock the next connection out.
        let k = key(9);
        assert!(ct
            .insert(k, reply_of(k), SvcRef::default(), backend(), SYN, 0, 1)
            .is_ok());
        assert_eq!((ct.len(), ct.early_drops()), (4, 1));
        assert!(ct.lookup(&k, 2).is_some());
    }

    #[test]
    fn a_clashing_reply_tuple_is_refused() {
        let mut ct = Conntrack::new(8);
        let (a, b) = (key(1), key(2));
        ct.insert(a, reply_of(a), SvcRef::default(), backend(), SYN, 0, 0)
            .unwrap();
        // b's answers would come on a's reply tuple.
        assert_eq!(
            ct.insert(b, reply_of(a), SvcRef::default(), backend(), SYN, 0, 0),
            Err(Refused::Clash)
        );
        let _ = b;
    }

    #[test]
    fn udp_lives_longer_once_answered_and_the_sweep_removes_the_expired() {
        let mut ct = Conntrack::new(8);
        let mut k = key(5);
        k.proto = UDP;
        let s = ct
            .insert(
                k,
                reply_of(k),
                SvcRef::default(),
                backend(),
                Seen::default(),
                0,
                0,
            )
            .unwrap();
        assert_eq!(ct.entry(s).expires_ms, UDP_UNREPLIED_MS);
        ct.entry_mut(s).seen(true, Seen::default(), 10);
        assert_eq!(ct.entry(s).expires_ms, 10 + UDP_REPLIED_MS);
        assert_eq!(ct.sweep(10 + UDP_REPLIED_MS - 1, 8), 0);
        assert_eq!(ct.sweep(10 + UDP_REPLIED_MS, 8), 1);
        assert!(ct.is_empty());
    }
}
