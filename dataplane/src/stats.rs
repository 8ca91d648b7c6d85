//! Counters. Workers count in plain integers per batch and publish with relaxed atomic adds,
//! so the per-packet path has no atomic read-modify-write.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use strom_api::Counters;

use crate::drop::DropReason;

/// A port's or a worker's packet counters, readable from the API thread.
#[derive(Debug, Default)]
pub struct SharedCounters {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    drops: AtomicU64,
}

/// Plain counters a worker accumulates during one loop.
#[derive(Debug, Default, Clone, Copy)]
pub struct Local {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drops: u64,
}

impl Local {
    /// True when nothing was counted.
    pub fn is_zero(&self) -> bool {
        self.rx_packets | self.tx_packets | self.drops == 0
    }
}

impl SharedCounters {
    /// Adds a worker's local counts and resets them.
    #[inline]
    pub fn publish(&self, l: &mut Local) {
        if l.is_zero() {
            return;
        }
        self.rx_packets.fetch_add(l.rx_packets, Relaxed);
        self.rx_bytes.fetch_add(l.rx_bytes, Relaxed);
        self.tx_packets.fetch_add(l.tx_packets, Relaxed);
        self.tx_bytes.fetch_add(l.tx_bytes, Relaxed);
        self.drops.fetch_add(l.drops, Relaxed);
        *l = Local::default();
    }

    /// A consistent-enough copy for display.
    pub fn read(&self) -> Counters {
        Counters {
            rx_packets: self.rx_packets.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            tx_packets: self.tx_packets.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            drops: self.drops.load(Relaxed),
        }
    }
}

/// Per-worker drop counters by reason, plus loop accounting.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    pub packets: SharedCounters,
    drops: [AtomicU64; DropReason::COUNT],
    pub loops: AtomicU64,
    pub sleeps: AtomicU64,
    /// The worker's UMEM slice: frames in its free pool (stored once per loop), and in all.
    pub frames_free: AtomicU64,
    pub frames_total: AtomicU64,
    /// Frames in its ports' fill rings (stored when the kernel's drop counters are read).
    pub frames_in_fill: AtomicU64,
    /// How deep each of its ports' fill rings is topped up now (stored with frames_in_fill).
    pub fill_depth: AtomicU64,
}

/// Plain per-reason drop counts a worker accumulates during one loop.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalDrops {
    pub by_reason: [u64; DropReason::COUNT],
    pub any: bool,
}

impl LocalDrops {
    /// Counts one drop.
    #[inline]
    pub fn count(&mut self, r: DropReason) {
        self.count_n(r, 1);
    }

    /// Counts `n` drops.
    #[inline]
    pub fn count_n(&mut self, r: DropReason, n: u64) {
        self.by_reason[r.index()] += n;
        self.any = true;
    }
}

impl WorkerCounters {
    /// Adds and resets the local drop counts.
    #[inline]
    pub fn publish_drops(&self, l: &mut LocalDrops) {
        if !l.any {
            return;
        }
        for (a, v) in self.drops.iter().zip(l.by_reason.iter()) {
            if *v != 0 {
                a.fetch_add(*v, Relaxed);
            }
        }
        *l = LocalDrops::default();
    }

    /// Non-zero drop reasons.
    pub fn drops(&self) -> Vec<(String, u64)> {
        DropReason::ALL
            .iter()
            .filter_map(|r| {
                let v = self.drops[r.index()].load(Relaxed);
                (v != 0).then(|| (r.name().to_string(), v))
            })
            .collect()
    }
}
