//! A worker's flows and ClientIP affinities kept across a restart of stromd
//! (docs/design.md, "Across a restart of stromd"): saved when stromd stops, taken up by the
//! next start on the same worker, so masqueraded and SNATed flows keep their ports, flows
//! keep their backends and clients their affinity.
//!
//! What is saved names no slot of this run's Service table: a flow's Service port is an index
//! into the snapshot's list of ports (by key and protocol), which the next start maps to its
//! own slots once it has set the same Services again. Times are saved as what was left of
//! them; the next start takes away the time stromd was gone.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::affinity::Affinity;
use super::{Conntrack, Entry, FlowKey, FlowState, TcpState};
use crate::tables::services::{Backend, SvcRef};

/// A tracked flow as saved (the record's `Repr`, in smoltcp's terms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedFlow {
    pub orig: FlowKey,
    pub reply: FlowKey,
    /// Its Service port, an index into the snapshot's ports; `None`: a flow of no Service
    /// (masqueraded, or inbound to a pod).
    pub svc: Option<u32>,
    pub backend: Backend,
    pub state: FlowState,
    pub fins: u8,
    /// Time left before it expires, in ms.
    pub left_ms: u64,
    pub packets: u64,
    /// The worker that owns the flow, when this one only sends it answers there.
    pub owner: Option<u16>,
}

/// Where each field of a flow's record is (big-endian numbers). Hand-written rather than
/// serde-derived: a table of a million flows goes through a fixed-size record in tens of
/// milliseconds and 55 MiB, where CBOR maps of the same fields took 180 MB and two seconds
/// to read back (BENCHMARKS.md, "Services"), time the node's pods wait for.
mod field {
    use std::ops::Range;

    /// A tuple: source, destination, source port, destination port, protocol.
    pub const TUPLE_LEN: usize = 13;
    pub const ORIG: usize = 0;
    pub const REPLY: usize = 13;
    /// u32::MAX: no Service.
    pub const SVC: Range<usize> = 26..30;
    pub const BACKEND_IP: Range<usize> = 30..34;
    pub const BACKEND_PORT: Range<usize> = 34..36;
    pub const STATE: usize = 36;
    pub const FINS: usize = 37;
    pub const LEFT_MS: Range<usize> = 38..46;
    pub const PACKETS: Range<usize> = 46..54;
    /// u16::MAX: this worker's own flow.
    pub const OWNER: Range<usize> = 54..56;
}

/// The size of a flow's record.
pub const RECORD_LEN: usize = 56;
/// The size of a flow's record in snapshots of version 1, before its owner (the first 54
/// bytes of this one's).
pub const V1_RECORD_LEN: usize = 54;

/// A record's state byte: a TCP state, or 0x10 with bit 0 for replied, bit 1 for closed.
const DATAGRAM: u8 = 0x10;
const TCP_STATES: [TcpState; 6] = [
    TcpState::SynSent,
    TcpState::SynRecv,
    TcpState::Established,
    TcpState::FinWait,
    TcpState::TimeWait,
    TcpState::Close,
];

fn state_byte(s: FlowState) -> u8 {
    match s {
        // TCP_STATES' order.
        FlowState::Tcp(t) => match t {
            TcpState::SynSent => 0,
            TcpState::SynRecv => 1,
            TcpState::Established => 2,
            TcpState::FinWait => 3,
            TcpState::TimeWait => 4,
            TcpState::Close => 5,
        },
        FlowState::Datagram { replied, closed } => {
            DATAGRAM | u8::from(replied) | u8::from(closed) << 1
        }
    }
}

fn state_of(b: u8) -> Option<FlowState> {
    match b {
        0..=5 => Some(FlowState::Tcp(TCP_STATES[b as usize])),
        DATAGRAM..=0x13 => Some(FlowState::Datagram {
            replied: b & 1 != 0,
            closed: b & 2 != 0,
        }),
        _ => None,
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn u32_in(b: &[u8], r: std::ops::Range<usize>) -> u32 {
    u32::from_be_bytes(b[r].try_into().unwrap_or_default())
}

fn u64_in(b: &[u8], r: std::ops::Range<usize>) -> u64 {
    u64::from_be_bytes(b[r].try_into().unwrap_or_default())
}

fn emit_tuple(k: &FlowKey, out: &mut [u8]) {
    out[0..4].copy_from_slice(&k.src.octets());
    out[4..8].copy_from_slice(&k.dst.octets());
    out[8..10].copy_from_slice(&k.sport.to_be_bytes());
    out[10..12].copy_from_slice(&k.dport.to_be_bytes());
    out[12] = k.proto;
}

fn parse_tuple(b: &[u8]) -> FlowKey {
    FlowKey {
        src: Ipv4Addr::from(u32_in(b, 0..4)),
        dst: Ipv4Addr::from(u32_in(b, 4..8)),
        sport: u16_at(b, 8),
        dport: u16_at(b, 10),
        proto: b[12],
    }
}

impl SavedFlow {
    /// Writes the record into `out` (`RECORD_LEN` bytes).
    pub fn emit(&self, out: &mut [u8; RECORD_LEN]) {
        emit_tuple(
            &self.orig,
            &mut out[field::ORIG..field::ORIG + field::TUPLE_LEN],
        );
        emit_tuple(
            &self.reply,
            &mut out[field::REPLY..field::REPLY + field::TUPLE_LEN],
        );
        out[field::SVC].copy_from_slice(&self.svc.unwrap_or(u32::MAX).to_be_bytes());
        out[field::BACKEND_IP].copy_from_slice(&self.backend.ip.octets());
        out[field::BACKEND_PORT].copy_from_slice(&self.backend.port.to_be_bytes());
        out[field::STATE] = state_byte(self.state);
        out[field::FINS] = self.fins;
        out[field::LEFT_MS].copy_from_slice(&self.left_ms.to_be_bytes());
        out[field::PACKETS].copy_from_slice(&self.packets.to_be_bytes());
        out[field::OWNER].copy_from_slice(&self.owner.unwrap_or(u16::MAX).to_be_bytes());
    }

    /// Reads a record; None when it is cut short or its state byte is none of the states.
    pub fn parse(b: &[u8]) -> Option<SavedFlow> {
        if b.len() < RECORD_LEN {
            return None;
        }
        let svc = u32_in(b, field::SVC);
        Some(SavedFlow {
            orig: parse_tuple(&b[field::ORIG..field::ORIG + field::TUPLE_LEN]),
            reply: parse_tuple(&b[field::REPLY..field::REPLY + field::TUPLE_LEN]),
            svc: (svc != u32::MAX).then_some(svc),
            backend: Backend {
                ip: Ipv4Addr::from(u32_in(b, field::BACKEND_IP)),
                port: u16_at(b, field::BACKEND_PORT.start),
            },
            state: state_of(b[field::STATE])?,
            fins: b[field::FINS],
            left_ms: u64_in(b, field::LEFT_MS),
            packets: u64_in(b, field::PACKETS),
            owner: Some(u16_at(b, field::OWNER.start)).filter(|&w| w != u16::MAX),
        })
    }
}

/// Saved flows: their records one after another, a CBOR byte string in the snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecords(#[serde(with = "serde_bytes")] Vec<u8>);

impl FlowRecords {
    pub fn push(&mut self, f: &SavedFlow) {
        let mut r = [0u8; RECORD_LEN];
        f.emit(&mut r);
        self.0.extend_from_slice(&r);
    }

    /// Records held (a cut-short one at the end counts as one).
    pub fn len(&self) -> usize {
        self.0.len().div_ceil(RECORD_LEN)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Bytes the records take.
    pub fn bytes(&self) -> usize {
        self.0.len()
    }

    /// Records as bytes, as a snapshot holds them.
    #[cfg(test)]
    pub fn from_bytes(b: Vec<u8>) -> FlowRecords {
        FlowRecords(b)
    }

    /// Records of `len` bytes each, of an older format whose fields are the first of this
    /// one's, as this format's: what it lacks is filled with 0xff, which reads as none for
    /// the one field added since (the owner; a field added later needs its own filling). A
    /// record cut short stays short (malformed).
    pub fn upgraded(&self, len: usize) -> FlowRecords {
        let mut out = Vec::with_capacity(self.0.len().div_ceil(len.max(1)) * RECORD_LEN);
        for r in self.0.chunks(len.max(1)) {
            out.extend_from_slice(r);
            if r.len() == len {
                out.resize(out.len() + RECORD_LEN.saturating_sub(len), 0xff);
            }
        }
        FlowRecords(out)
    }

    /// Each record read (None: malformed).
    pub fn iter(&self) -> impl Iterator<Item = Option<SavedFlow>> + '_ {
        self.0.chunks(RECORD_LEN).map(SavedFlow::parse)
    }
}

/// A client's ClientIP affinity as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedClient {
    /// Its Service port, an index into the snapshot's ports.
    pub svc: u32,
    pub client: Ipv4Addr,
    pub backend: Backend,
    pub left_ms: u64,
}

/// One worker's saved tables.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedTables {
    pub flows: FlowRecords,
    pub clients: Vec<SavedClient>,
}

/// A worker's stateful tables, as it leaves them when it stops.
#[derive(Debug)]
pub struct FlowTables {
    pub ct: Conntrack,
    pub affinity: Affinity,
}

impl FlowTables {
    /// What the next start takes up (see [`Conntrack::save`] and [`Affinity::save`]).
    pub fn save(&self, now_ms: u64, mut svc: impl FnMut(SvcRef) -> Option<u32>) -> SavedTables {
        SavedTables {
            flows: self.ct.save(now_ms, &mut svc),
            clients: self.affinity.save(now_ms, &mut svc),
        }
    }
}

/// How many saved entries a restore took up, and why the others were not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    pub taken: usize,
    /// Expired while stromd was gone.
    pub expired: usize,
    /// Their Service port is not set in the new run.
    pub no_service: usize,
    /// The table was full, or another flow already held a tuple.
    pub refused: usize,
    /// A record that does not read as a flow.
    pub malformed: usize,
}

impl Conntrack {
    /// The live flows at `now_ms`, for the next start of stromd. `svc` names a flow's
    /// Service port by its index in the snapshot (`None`: the port is gone, the flow is not
    /// saved; a flow of no Service is always saved).
    pub fn save(&self, now_ms: u64, mut svc: impl FnMut(SvcRef) -> Option<u32>) -> FlowRecords {
        let mut out = FlowRecords(Vec::with_capacity(self.len() * RECORD_LEN));
        for (_, e) in self.iter().filter(|(_, e)| e.expires_ms > now_ms) {
            let svc = if e.svc == SvcRef::NONE {
                None
            } else {
                match svc(e.svc) {
                    Some(i) => Some(i),
                    None => continue,
                }
            };
            out.push(&SavedFlow {
                orig: e.orig,
                reply: e.reply,
                svc,
                backend: e.backend,
                state: e.state,
                fins: e.fins,
                left_ms: e.expires_ms - now_ms,
                packets: e.packets,
                owner: e.owner(),
            });
        }
        out
    }

    /// Takes up saved flows at `now_ms`, each with `elapsed_ms` less time left (the time
    /// stromd was gone). `svc` gives the slot a saved Service port has now (`None`: it is
    /// not set, and its flows are not taken up). A flow taken up is checked again on its
    /// next packet: its backend against the Service, the flow against the policies.
    pub fn restore(
        &mut self,
        flows: &FlowRecords,
        elapsed_ms: u64,
        now_ms: u64,
        mut svc: impl FnMut(u32) -> Option<SvcRef>,
    ) -> Restored {
        let mut r = Restored::default();
        for f in flows.iter() {
            let Some(f) = f else {
                r.malformed += 1;
                continue;
            };
            let Some(left) = f.left_ms.checked_sub(elapsed_ms).filter(|&l| l > 0) else {
                r.expired += 1;
                continue;
            };
            // Never more than its state gives it (the file is data from disk).
            let left = left.min(f.state.timeout_ms(f.orig.proto));
            let svc = match f.svc {
                None => SvcRef::NONE,
                Some(i) => match svc(i) {
                    Some(s) => s,
                    None => {
                        r.no_service += 1;
                        continue;
                    }
                },
            };
            let e = Entry {
                orig: f.orig,
                reply: f.reply,
                svc,
                backend: f.backend,
                state: f.state,
                fins: f.fins,
                expires_ms: now_ms.saturating_add(left),
                packets: f.packets,
                // Never equal to a generation: checked on the next packet.
                checked: u64::MAX,
                policy_checked: u64::MAX,
                owner: f.owner.unwrap_or(u16::MAX),
                live: true,
            };
            match self.put(e, now_ms) {
                Ok(_) => r.taken += 1,
                Err(_) => r.refused += 1,
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::tests::{backend, reply_of};
    use crate::conntrack::{tcp, Seen, TCP, UDP};

    fn key(sport: u16, proto: u8) -> FlowKey {
        FlowKey {
            src: "198.18.16.2".parse().unwrap(),
            dst: "198.19.0.10".parse().unwrap(),
            sport,
            dport: 80,
            proto,
        }
    }

    const SVC: SvcRef = SvcRef {
        slot: 3,
        incarnation: 7,
    };
    const UDP_REPLIED: u64 = crate::conntrack::UDP_REPLIED_MS;

    fn seen(tcp_flags: u8) -> Seen {
        Seen {
            tcp_flags,
            sctp_end: false,
        }
    }

    /// A table with an established TCP flow of SVC, an answered masqueraded UDP flow and a
    /// TCP flow of a Service port the snapshot does not know.
    fn table() -> Conntrack {
        let mut ct = Conntrack::new(8);
        let t = key(40000, TCP);
        let s = ct
            .insert(t, reply_of(t), SVC, backend(), seen(tcp::SYN), 5, 0)
            .unwrap();
        ct.entry_mut(s).seen(true, seen(tcp::SYN | tcp::ACK), 0);
        ct.entry_mut(s).seen(false, seen(tcp::ACK), 1000);
        let u = key(40001, UDP);
        let s = ct
            .insert(u, reply_of(u), SvcRef::NONE, backend(), seen(0), 5, 0)
            .unwrap();
        ct.entry_mut(s).seen(true, seen(0), 2000);
        let gone = key(40002, TCP);
        let other = SvcRef {
            slot: 4,
            incarnation: 1,
        };
        ct.insert(gone, reply_of(gone), other, backend(), seen(tcp::SYN), 5, 0)
            .unwrap();
        ct
    }

    #[test]
    fn saved_flows_come_back_with_their_state_time_left_and_new_service_slot() {
        let saved = table().save(3000, |s| (s == SVC).then_some(0));
        let flows: Vec<SavedFlow> = saved.iter().map(Option::unwrap).collect();
        assert_eq!(flows.len(), 2, "the flow of an unknown port is not saved");
        let tcp = &flows[0];
        assert_eq!(tcp.svc, Some(0));
        assert_eq!(tcp.state, FlowState::Tcp(TcpState::Established));
        assert_eq!(tcp.left_ms, 1000 + tcp::ESTABLISHED_MS - 3000);
        assert_eq!(tcp.packets, 3);
        let udp = &flows[1];
        assert_eq!((udp.svc, udp.left_ms), (None, 2000 + UDP_REPLIED - 3000));

        // The next start: its own clock, 500 ms gone, the Service at another slot.
        let now = 77;
        let moved = SvcRef {
            slot: 0,
            incarnation: 1,
        };
        let mut next = Conntrack::new(8);
        let r = next.restore(&saved, 500, now, |i| (i == 0).then_some(moved));
        assert_eq!(
            r,
            Restored {
                taken: 2,
                ..Restored::default()
            }
        );
        let hit = next.lookup(&key(40000, TCP), now).unwrap();
        let e = next.entry(hit.slot);
        assert_eq!((e.svc, e.backend), (moved, backend()));
        assert_eq!(e.state, FlowState::Tcp(TcpState::Established));
        assert_eq!(e.expires_ms, now + tcp.left_ms - 500);
        assert_eq!((e.checked, e.policy_checked), (u64::MAX, u64::MAX));
        let back = next.lookup(&reply_of(key(40001, UDP)), now).unwrap();
        assert!(back.reply, "found by its reply tuple");
        let e = next.entry(back.slot);
        assert_eq!(e.svc, SvcRef::NONE);
        assert_eq!(
            e.state,
            FlowState::Datagram {
                replied: true,
                closed: false
            }
        );
    }

    #[test]
    fn a_saved_flow_is_dropped_when_expired_its_service_is_gone_or_the_table_is_full() {
        let saved = table().save(3000, |s| (s == SVC).then_some(0));
        let mut next = Conntrack::new(8);
        // The UDP flow's 120 s have passed; the TCP one's Service is not set.
        let r = next.restore(&saved, UDP_REPLIED, 0, |_| None);
        assert_eq!(
            r,
            Restored {
                expired: 1,
                no_service: 1,
                ..Restored::default()
            }
        );
        assert!(next.is_empty());
        // A table of one takes the first; the other, answered, finds no room.
        let mut small = Conntrack::new(1);
        let r = small.restore(&saved, 0, 0, |_| Some(SvcRef::default()));
        assert_eq!((r.taken, r.refused), (1, 1));
        assert_eq!(small.len(), 1);
    }

    /// An established TCP flow of Service port 2, 198.18.16.2:40000 → 198.19.0.10:80, DNATed
    /// to 198.18.16.3:8080, 90 s and 7 packets in, and its record.
    fn fixture() -> (SavedFlow, [u8; RECORD_LEN]) {
        let orig = key(40000, TCP);
        let f = SavedFlow {
            orig,
            reply: reply_of(orig),
            svc: Some(2),
            backend: backend(),
            state: FlowState::Tcp(TcpState::Established),
            fins: 0,
            left_ms: 90_000,
            packets: 7,
            owner: None,
        };
        #[rustfmt::skip]
        let bytes = [
            198, 18, 16, 2,  198, 19, 0, 10,  0x9c, 0x40,  0, 80,  6,
            198, 18, 16, 3,  198, 18, 16, 2,  0x1f, 0x90,  0x9c, 0x40,  6,
            0, 0, 0, 2,
            198, 18, 16, 3,  0x1f, 0x90,
            2,
            0,
            0, 0, 0, 0, 0, 1, 0x5f, 0x90,
            0, 0, 0, 0, 0, 0, 0, 7,
            0xff, 0xff,
        ];
        (f, bytes)
    }

    #[test]
    fn a_flow_record_reads_and_writes_as_its_bytes() {
        let (f, bytes) = fixture();
        let mut out = [0u8; RECORD_LEN];
        f.emit(&mut out);
        assert_eq!(out, bytes);
        assert_eq!(SavedFlow::parse(&bytes), Some(f.clone()));
        // Every state comes back as itself.
        for state in
            TCP_STATES
                .iter()
                .map(|&t| FlowState::Tcp(t))
                .chain([false, true].into_iter().flat_map(|replied| {
                    [false, true]
                        .into_iter()
                        .map(move |closed| FlowState::Datagram { replied, closed })
                }))
        {
            let g = SavedFlow {
                state,
                svc: None,
                ..f.clone()
            };
            g.emit(&mut out);
            assert_eq!(SavedFlow::parse(&out), Some(g));
        }
        // A flow another worker owns names it.
        let g = SavedFlow {
            owner: Some(1),
            ..f
        };
        g.emit(&mut out);
        assert_eq!(out[field::OWNER], [0, 1]);
        assert_eq!(SavedFlow::parse(&out), Some(g));
    }

    #[test]
    fn a_version_1_record_reads_as_a_flow_of_no_other_owner() {
        let (f, bytes) = fixture();
        let mut old = FlowRecords::default();
        old.0.extend_from_slice(&bytes[..V1_RECORD_LEN]);
        old.0.extend_from_slice(&bytes[..V1_RECORD_LEN]);
        old.0.extend_from_slice(&bytes[..10]);
        let new = old.upgraded(V1_RECORD_LEN);
        assert_eq!(new.len(), 3);
        let read: Vec<_> = new.iter().collect();
        assert_eq!(
            read,
            vec![Some(f.clone()), Some(f), None],
            "the cut one stays cut"
        );
    }

    #[test]
    fn a_malformed_record_is_counted_and_the_others_taken_up() {
        let (f, bytes) = fixture();
        let mut bad = bytes;
        bad[field::STATE] = 0x20;
        assert_eq!(SavedFlow::parse(&bad), None, "no such state");
        assert_eq!(
            SavedFlow::parse(&bytes[..RECORD_LEN - 1]),
            None,
            "cut short"
        );
        let second = SavedFlow {
            orig: key(40001, TCP),
            reply: reply_of(key(40001, TCP)),
            ..f
        };
        let mut records = FlowRecords::default();
        records.0.extend_from_slice(&bad);
        records.push(&second);
        records.0.extend_from_slice(&bytes[..10]);
        assert_eq!(records.len(), 3);
        let mut ct = Conntrack::new(8);
        let r = ct.restore(&records, 0, 0, |_| Some(SVC));
        assert_eq!(
            r,
            Restored {
                taken: 1,
                malformed: 2,
                ..Restored::default()
            }
        );
        assert!(ct.lookup(&key(40001, TCP), 0).is_some());
    }

    #[test]
    fn saved_tables_read_back_from_cbor_as_written() {
        let t = SavedTables {
            flows: table().save(3000, |_| Some(1)),
            clients: vec![SavedClient {
                svc: 1,
                client: "198.18.16.2".parse().unwrap(),
                backend: backend(),
                left_ms: 9000,
            }],
        };
        let mut buf = Vec::new();
        ciborium::into_writer(&t, &mut buf).unwrap();
        let back: SavedTables = ciborium::from_reader(buf.as_slice()).unwrap();
        assert_eq!(back, t);
    }

    fn tuple() -> impl proptest::strategy::Strategy<Value = FlowKey> {
        use proptest::prelude::*;
        (
            any::<u32>(),
            any::<u32>(),
            any::<u16>(),
            any::<u16>(),
            any::<u8>(),
        )
            .prop_map(|(s, d, sport, dport, proto)| FlowKey {
                src: Ipv4Addr::from(s),
                dst: Ipv4Addr::from(d),
                sport,
                dport,
                proto,
            })
    }

    proptest::proptest! {
        #[test]
        fn any_flow_reads_back_from_its_record_as_itself(
            orig in tuple(),
            reply in tuple(),
            svc in proptest::option::of(0..u32::MAX),
            ip in proptest::prelude::any::<u32>(),
            port in proptest::prelude::any::<u16>(),
            state in 0..10usize,
            fins in proptest::prelude::any::<u8>(),
            left_ms in proptest::prelude::any::<u64>(),
            packets in proptest::prelude::any::<u64>(),
            owner in proptest::option::of(0..u16::MAX),
        ) {
            let state = match state {
                0..=5 => FlowState::Tcp(TCP_STATES[state]),
                n => FlowState::Datagram { replied: n & 1 != 0, closed: n & 2 != 0 },
            };
            let f = SavedFlow {
                orig,
                reply,
                svc,
                backend: Backend { ip: Ipv4Addr::from(ip), port },
                state,
                fins,
                left_ms,
                packets,
                owner,
            };
            let mut out = [0u8; RECORD_LEN];
            f.emit(&mut out);
            proptest::prop_assert_eq!(SavedFlow::parse(&out), Some(f));
        }
    }
}
