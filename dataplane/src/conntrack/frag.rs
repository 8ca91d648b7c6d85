//! Fragments of translated datagrams. stromd does not reassemble: a datagram's first fragment
//! carries the transport header and is translated with its flow (the transport checksum
//! covers the whole datagram, and an incremental update of it stays right), the later ones
//! carry none and are given the first one's addresses from here, as Cilium's IPv4 fragment
//! map does. A later fragment that comes before its first, or after [`FRAG_MS`], is not
//! found.
//!
//! A fixed table per worker, one entry per slot of a hash of (source, destination, protocol,
//! identification): a datagram whose slot another takes loses the rest of its fragments to
//! it. Fragmented traffic through a translation is rare; the table costs 32 KiB and never
//! allocates.

use std::net::Ipv4Addr;

use crate::tables::maglev::mix64;

/// How long a datagram's fragments are translated after its first (Linux's `ipfrag_time`).
pub const FRAG_MS: u64 = 30_000;

/// Slots of the table (a power of two).
const SLOTS: usize = 1024;

/// What identifies the fragments of one datagram (RFC 791): as they arrive, untranslated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragKey {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ident: u16,
    pub proto: u8,
}

impl FragKey {
    fn slot(&self) -> usize {
        let a = (u64::from(u32::from(self.src)) << 32) | u64::from(u32::from(self.dst));
        let b = (u64::from(self.ident) << 8) | u64::from(self.proto);
        (mix64(a ^ mix64(b)) as usize) & (SLOTS - 1)
    }
}

/// What becomes of a datagram's later fragments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FragTo {
    /// They get the addresses its first fragment was translated to: (source, destination).
    Addrs(Ipv4Addr, Ipv4Addr),
    /// They follow its first fragment to another worker, which translated it: handed there
    /// as it was (`port`, the hand-off's port: what the worker does with it).
    Worker { worker: u16, port: u32 },
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    key: FragKey,
    to: FragTo,
    expires_ms: u64,
}

/// A worker's translated datagrams whose later fragments are still to come.
#[derive(Debug)]
pub struct Frags {
    slots: Vec<Option<Entry>>,
}

impl Default for Frags {
    fn default() -> Self {
        Frags {
            slots: vec![None; SLOTS],
        }
    }
}

impl Frags {
    /// Records what becomes of the datagram `key`'s later fragments (its first fragment
    /// just translated, or handed over).
    #[inline]
    pub fn record(&mut self, key: FragKey, to: FragTo, now_ms: u64) {
        self.slots[key.slot()] = Some(Entry {
            key,
            to,
            expires_ms: now_ms + FRAG_MS,
        });
    }

    /// What becomes of a later fragment of `key`.
    #[inline]
    pub fn lookup(&self, key: &FragKey, now_ms: u64) -> Option<FragTo> {
        self.slots[key.slot()]
            .filter(|e| e.key == *key && e.expires_ms > now_ms)
            .map(|e| e.to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ident: u16) -> FragKey {
        FragKey {
            src: Ipv4Addr::new(198, 18, 16, 2),
            dst: Ipv4Addr::new(198, 19, 0, 10),
            ident,
            proto: 17,
        }
    }

    #[test]
    fn a_datagrams_later_fragments_find_its_translation_until_it_expires() {
        let mut f = Frags::default();
        let (s, d) = (Ipv4Addr::new(169, 254, 1, 1), Ipv4Addr::new(198, 18, 16, 3));
        f.record(key(7), FragTo::Addrs(s, d), 1000);
        assert_eq!(f.lookup(&key(7), 1000), Some(FragTo::Addrs(s, d)));
        assert_eq!(f.lookup(&key(8), 1000), None, "another datagram");
        let mut other = key(7);
        other.proto = 6;
        assert_eq!(f.lookup(&other, 1000), None, "another protocol");
        assert_eq!(f.lookup(&key(7), 1000 + FRAG_MS), None, "expired");
        let to = FragTo::Worker { worker: 1, port: 9 };
        f.record(key(9), to, 1000);
        assert_eq!(
            f.lookup(&key(9), 1000),
            Some(to),
            "handed over as the first"
        );
    }
}
