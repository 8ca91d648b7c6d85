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
    csum_offloaded: AtomicU64,
    /// How deep the port's fill ring is kept now (stored about once a second).
    fill_depth: AtomicU64,
}

/// Plain counters a worker accumulates during one loop.
#[derive(Debug, Default, Clone, Copy)]
pub struct Local {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drops: u64,
    /// Sent with checksum offload asked of the kernel (a part of `tx_packets`).
    pub csum_offloaded: u64,
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
        self.csum_offloaded.fetch_add(l.csum_offloaded, Relaxed);
        *l = Local::default();
    }

    /// Stores the port's fill depth (a gauge, not a count).
    pub fn set_fill_depth(&self, depth: u32) {
        self.fill_depth.store(u64::from(depth), Relaxed);
    }

    /// The port's fill depth as last stored.
    pub fn fill_depth(&self) -> u64 {
        self.fill_depth.load(Relaxed)
    }

    /// A consistent-enough copy for display.
    pub fn read(&self) -> Counters {
        Counters {
            rx_packets: self.rx_packets.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            tx_packets: self.tx_packets.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            drops: self.drops.load(Relaxed),
            csum_offloaded: self.csum_offloaded.load(Relaxed),
        }
    }
}

/// Per-worker drop counters by reason, plus loop accounting.
#[derive(Debug)]
pub struct WorkerCounters {
    pub packets: SharedCounters,
    drops: [AtomicU64; DropReason::COUNT],
    pub loops: AtomicU64,
    pub sleeps: AtomicU64,
    /// The worker's UMEM slice in all.
    pub frames_total: AtomicU64,
    /// Frames in its free pool and in its ports' fill rings, from the same moment (stored
    /// together when the kernel's drop counters are read): see [`WorkerCounters::frames`].
    frames: AtomicU64,
    /// The depth every port's fill ring keeps at least, the most the worker's fill rings may
    /// hold together, and what their depths add up to now (stored with `frames`).
    pub fill_floor: AtomicU64,
    pub fill_budget: AtomicU64,
    pub fill_reserved: AtomicU64,
    /// Milliseconds on the monotonic clock when the worker last went through its upkeep
    /// (every few thousand loops, and at least once a second while it sleeps): a worker whose
    /// heartbeat stops is stuck. 0 before it starts.
    pub heartbeat_ms: AtomicU64,
    /// Set when the worker thread ends, normally or by a panic (with the panic's message).
    pub ended: std::sync::OnceLock<String>,
    /// The worker thread's id, stored when it starts (0 before): the API thread reads the
    /// kernel's accounting of that thread ([`core_wait`]) when asked for stats.
    pub tid: AtomicU64,
}

impl Default for WorkerCounters {
    fn default() -> Self {
        WorkerCounters {
            packets: SharedCounters::default(),
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            loops: AtomicU64::default(),
            sleeps: AtomicU64::default(),
            frames_total: AtomicU64::default(),
            frames: AtomicU64::default(),
            fill_floor: AtomicU64::default(),
            fill_budget: AtomicU64::default(),
            fill_reserved: AtomicU64::default(),
            heartbeat_ms: AtomicU64::default(),
            ended: std::sync::OnceLock::new(),
            tid: AtomicU64::default(),
        }
    }
}

/// Plain per-reason drop counts a worker accumulates during one loop.
#[derive(Debug, Clone, Copy)]
pub struct LocalDrops {
    pub by_reason: [u64; DropReason::COUNT],
    pub any: bool,
}

impl Default for LocalDrops {
    fn default() -> Self {
        LocalDrops {
            by_reason: [0; DropReason::COUNT],
            any: false,
        }
    }
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

/// Milliseconds on the monotonic clock (CLOCK_MONOTONIC, the same for every thread).
pub fn monotonic_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// Milliseconds on the coarse monotonic clock (CLOCK_MONOTONIC_COARSE: a few ns from the vDSO,
/// a tick's resolution): cheap enough for once per worker loop.
pub fn coarse_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

impl WorkerCounters {
    /// Stores the frames in the free pool and in the fill rings as one word, so that a reader
    /// never adds a fresh count to a stale one (the two together never exceed the slice). A
    /// worker's slice is far below 2^32 frames.
    pub fn store_frames(&self, free: u64, in_fill: u64) {
        let word = (free.min(u64::from(u32::MAX)) << 32) | in_fill.min(u64::from(u32::MAX));
        self.frames.store(word, Relaxed);
    }

    /// Frames in the free pool and in the fill rings, as last stored together.
    pub fn frames(&self) -> (u64, u64) {
        let word = self.frames.load(Relaxed);
        (word >> 32, word & u64::from(u32::MAX))
    }

    /// Stores and returns the worker's heartbeat (called in its upkeep, never per packet).
    pub fn heartbeat(&self) -> u64 {
        let now = monotonic_ms();
        self.heartbeat_ms.store(now, Relaxed);
        now
    }

    /// Adds and resets the local drop counts: by reason, and their sum to the worker's
    /// packet counters (every drop has a reason, so the two always agree).
    #[inline]
    pub fn publish_drops(&self, l: &mut LocalDrops) {
        if !l.any {
            return;
        }
        let mut all = 0;
        for (a, v) in self.drops.iter().zip(l.by_reason.iter()) {
            if *v != 0 {
                a.fetch_add(*v, Relaxed);
                all += *v;
            }
        }
        self.packets.drops.fetch_add(all, Relaxed);
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

/// How long a thread waited for its core, from the kernel's own accounting of it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CoreWait {
    /// Time it was runnable but another task held the core (schedstat's run_delay), in ns.
    pub wait_ns: u64,
    /// Times another task took the core from it (involuntary context switches).
    pub preemptions: u64,
}

/// Reads thread `tid` of this process from /proc: two small files, read when stats are asked
/// for, never by the worker. None when the thread is gone or not started yet (`tid` 0: no
/// task has that id), or the kernel lacks schedstats.
pub fn core_wait(tid: u64) -> Option<CoreWait> {
    let dir = format!("/proc/self/task/{tid}");
    let sched = std::fs::read_to_string(format!("{dir}/schedstat")).ok()?;
    let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    parse_core_wait(&sched, &status)
}

fn parse_core_wait(schedstat: &str, status: &str) -> Option<CoreWait> {
    // schedstat: time on the core, time waiting for it (ns), timeslices.
    let wait_ns = schedstat.split_whitespace().nth(1)?.parse().ok()?;
    let preemptions = status
        .lines()
        .find_map(|l| l.strip_prefix("nonvoluntary_ctxt_switches:"))?
        .trim()
        .parse()
        .ok()?;
    Some(CoreWait {
        wait_ns,
        preemptions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_and_in_fill_frames_are_read_as_stored_together() {
        let c = WorkerCounters::default();
        assert_eq!(c.frames(), (0, 0));
        c.store_frames(8192 - 5952, 5952);
        assert_eq!(c.frames(), (2240, 5952));
        c.store_frames(u64::MAX, 7);
        assert_eq!(c.frames(), (u64::from(u32::MAX), 7));
    }

    #[test]
    fn core_wait_is_read_from_schedstat_and_status() {
        let status = "Name:\tstrom-worker-0\nvoluntary_ctxt_switches:\t3\n\
                      nonvoluntary_ctxt_switches:\t274\n";
        assert_eq!(
            parse_core_wait("5993000000 9600000 1277\n", status),
            Some(CoreWait {
                wait_ns: 9_600_000,
                preemptions: 274
            })
        );
        assert_eq!(parse_core_wait("", status), None);
        assert_eq!(parse_core_wait("1 2 3\n", "Name:\tx\n"), None);
    }

    #[test]
    fn this_thread_has_a_core_wait() {
        let tid = nix::unistd::gettid().as_raw() as u64;
        assert!(
            core_wait(tid).is_some(),
            "schedstat and status of this thread"
        );
        assert_eq!(core_wait(u64::from(u32::MAX)), None);
        assert_eq!(core_wait(0), None, "a worker not started yet");
    }
}
