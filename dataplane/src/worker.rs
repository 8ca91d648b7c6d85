//! A worker: one pinned thread running the pipeline to completion over its ports' batches.
//!
//! ```text
//! loop {
//!   commands (add/remove port)      ── between batches, never per packet
//!   closed sockets ─▶ their frames back to the pool
//!   tables = snapshot()              ── one atomic load per loop
//!   for port: rx batch ─▶ pipeline ─▶ hairpin │ forward (same worker: the frame itself,
//!                                             │   no copy: its ports share its UMEM slice)
//!                                             │ forward (other worker: hand-off queue)
//!   hand-off queue ─▶ tx
//!   for port: kick tx (one syscall per batch), reap completions, refill fill ring
//!   idle? adaptive mode sleeps in poll(2) on the sockets and the waker
//! }
//! ```

use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use crossbeam_queue::{ArrayQueue, SegQueue};
use xdpilone::xdp::XdpDesc;

use crate::config::PollMode;
use crate::conntrack::persist::{FlowTables, Restored, SavedTables};
use crate::drop::DropReason;
use crate::mac::Mac;
use crate::pipeline::offload::{self, TxChecksum};
use crate::pipeline::{self, Action, InPort, PortKind};
use crate::stats::{Local, LocalDrops, SharedCounters, WorkerCounters};
use crate::tables::services::SvcRef;
use crate::tables::TableHandle;
use crate::xsk::{
    continues, packet_len, BindMode, Closed, PollSet, SharedUmem, Waker, WorkerUmem, XskError,
    XskPort, XskSizes, MAX_CHAIN, PREFETCH_AHEAD, RX_HEADROOM, RX_ROOM,
};

/// Conntrack entries one worker lists at most in an answer (all are counted).
const CONNTRACK_LIST_MAX: usize = 10_000;
/// Frames read from one rx ring per loop.
pub const BATCH: usize = 64;
/// Idle loops before an adaptive worker sleeps.
const SPIN_BEFORE_SLEEP: u32 = 2000;
/// Longest sleep of an adaptive worker (it wakes earlier on traffic, hand-offs and commands).
/// Nothing needs a worker whose ports are silent: every loop publishes its counters, and the
/// kernel's drop counts are read just before it sleeps. Each timeout still costs the
/// `SPIN_BEFORE_SLEEP` loops over every port (with 100 ports, 50 ms timeouts kept 12% of a
/// core busy; BENCHMARKS.md section 5).
const SLEEP_MS: i32 = 1000;
/// Loops between two reads of the kernel's drop counters of every socket, at most (and at
/// least every `UPKEEP_MS`).
const KERNEL_STATS_LOOPS: u32 = 4096;
/// Milliseconds between two heartbeats of a busy worker (and reads of the kernel's drop
/// counters, at least): far below `api::health::STUCK_AFTER_MS`, whatever a loop costs.
const UPKEEP_MS: u64 = 100;
/// Entries in each worker's cross-worker hand-off queue.
const HANDOFF_CAP: usize = 2048;
/// Milliseconds between two reviews of the ports' fill depths (`XskPort::review`).
const REVIEW_MS: u64 = 1000;

/// Bytes a [`Handoff`] carries inline: a frame of the uplink's MTU (at most
/// `MAX_UPLINK_MTU`) and most of the pods'. A larger one goes in one of the receiving worker's
/// large buffers.
pub const HANDOFF_INLINE: usize = 2048;
/// Large buffers each worker keeps for frames handed to it, when there is more than one
/// worker.
const LARGE_HANDOFFS: usize = 128;
/// Bytes of a large buffer: the longest chain the kernel sends as one packet.
const LARGE_BYTES: usize = MAX_CHAIN * RX_ROOM as usize;
/// Descriptors one receive reads at most: a batch, and the rest of the packet its last
/// descriptor belongs to.
const RX_DESCS: usize = BATCH + MAX_CHAIN;

/// A frame copied to another worker: each worker has its own slice of the UMEM. One queue
/// carries both kinds, so the frames of a flow keep their order whatever their sizes.
pub struct Handoff {
    port: u32,
    /// The worker that handed it over.
    from: u16,
    len: u32,
    /// What the frame's transport checksum needs when it leaves (`offload`).
    csum: TxChecksum,
    data: HandoffData,
}

/// Where a handed-over frame's bytes are.
// The inline variant is the point: a small frame crosses in the queue's own slot, with no
// buffer to take and give back; the queue's slots are that large either way.
#[allow(clippy::large_enum_variant)]
enum HandoffData {
    Inline([u8; HANDOFF_INLINE]),
    /// One of the receiving worker's large buffers (allocated when the worker is created,
    /// never per packet), which it takes back once the frame is sent.
    Large(Box<[u8]>),
}

impl Handoff {
    fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.data {
            HandoffData::Inline(b) => b,
            HandoffData::Large(b) => b,
        }
    }
}

/// A socket a worker opened: a duplicate of its fd (for the XSKMAP; it keeps the socket open
/// only as long as it is held) and whether it bound in zero-copy mode.
#[derive(Debug)]
pub struct Opened {
    pub fd: OwnedFd,
    pub zero_copy: bool,
}

/// Port details a worker needs.
pub struct PortSetup {
    pub id: u32,
    pub kind: PortKind,
    pub ifindex: u32,
    /// The receive queue the socket binds to.
    pub queue: u32,
    pub host_mac: Mac,
    pub pod_mac: Mac,
    pub ips: Vec<IpAddr>,
    pub counters: Arc<SharedCounters>,
}

/// Why a worker could not open a port's socket.
#[derive(Debug)]
pub struct OpenFailure {
    /// The kernel is still releasing the queue's previous socket: try again shortly.
    pub busy: bool,
    pub message: String,
}

/// Commands from the API thread.
pub enum Command {
    /// Open the socket and start serving; replies with the socket fd for the XSKMAP.
    /// Opens the port's socket; the reply carries a duplicate of its fd (for the XSKMAP),
    /// which keeps the socket open only as long as the controller holds it.
    AddPort(PortSetup, Sender<Result<Opened, OpenFailure>>),
    /// Stop serving the port and hand its socket to the reaper, which closes it and gives its
    /// frames back; replies once the worker has let go. With `linger`, the interface is being
    /// deleted: the reaper waits for the kernel to unbind the socket first (see [`Closing`]).
    RemovePort {
        id: u32,
        linger: bool,
        reply: Sender<()>,
    },
    /// The tracked flows matching a filter, or just how many (`count_only`); with `flush`
    /// they are forgotten instead (with their clients' affinities when the filter names a
    /// Service), and the answer is how many went.
    Conntrack {
        query: ConntrackQuery,
        reply: Sender<(u64, Vec<strom_api::ConntrackEntry>)>,
    },
    /// The worker's counters per Service port slot.
    ServiceCounts(Sender<Vec<crate::pipeline::service::SvcCount>>),
    /// The worker's policy drops per counter slot (ingress, egress).
    PolicyCounts(Sender<Vec<[u64; 2]>>),
    /// Take up the flows and clients the last stop of stromd saved for this worker; `svc`
    /// gives the slot each saved Service port has now. Replies with what was taken up.
    Restore {
        saved: Box<SavedTables>,
        svc: Vec<Option<SvcRef>>,
        elapsed_ms: u64,
        reply: Sender<(Restored, usize)>,
    },
    /// Leave the loop.
    Stop,
}

/// What a [`Command::Conntrack`] asks.
pub struct ConntrackQuery {
    pub filter: strom_api::ConntrackFilter,
    pub count_only: bool,
    pub flush: bool,
}

/// What other threads share with a worker.
pub struct WorkerShared {
    pub id: usize,
    pub core: Option<usize>,
    pub counters: WorkerCounters,
    handoff: ArrayQueue<Handoff>,
    /// This worker's large buffers free for frames handed to it (each is here, in a hand-off
    /// on its way, or being copied by a sender or sent by this worker).
    large_free: ArrayQueue<Box<[u8]>>,
    waker: Waker,
    sleeping: AtomicBool,
    commands: Sender<Command>,
    reaper: Sender<Closing>,
    /// This worker's sockets the reaper has closed: their frames can come back.
    closed: SegQueue<Closed>,
}

/// Longest an AF_XDP socket waits for its interface's deletion before it is closed anyway
/// (a DEL's deletion takes tens of milliseconds). Shorter than the time an AddPort for the
/// same queue waits for the kernel to release the previous socket (`api::BUSY_RETRIES`).
const LINGER_MAX: Duration = Duration::from_millis(500);
/// How often the reaper looks whether a lingering socket has been unbound.
const LINGER_CHECK: Duration = Duration::from_millis(5);

/// A socket on its way out, for the reaper thread: closing an AF_XDP socket waits for an RCU
/// grace period in the kernel, which the forwarding loop must not.
///
/// When the port's interface is being deleted (`linger_until`), the socket stays open until the
/// kernel has unbound it in that deletion: the unregistration then drops the socket's hold on
/// the interface on the spot. Closed while the deletion runs, the socket would leave that hold
/// to deferred work after a grace period, and the deletion would wait for it in rounds of RCU
/// barriers and sleeps (a CNI DEL's p90 went from 32 to 48 ms that way).
struct Closing {
    xsk: XskPort,
    worker: Arc<WorkerShared>,
    linger_until: Option<std::time::Instant>,
}

impl Closing {
    fn due(&self) -> bool {
        self.linger_until
            .is_none_or(|t| std::time::Instant::now() >= t || self.xsk.unbound())
    }

    fn close(self) {
        self.worker.closed.push(self.xsk.close());
        self.worker.waker.wake();
    }
}

/// The reaper thread: closes sockets as they come, lingering ones once they are due.
fn reap(dead: Receiver<Closing>) {
    let mut lingering: Vec<Closing> = Vec::new();
    loop {
        let next = if lingering.is_empty() {
            dead.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            dead.recv_timeout(LINGER_CHECK)
        };
        match next {
            Ok(c) => lingering.push(c),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let mut i = 0;
        while i < lingering.len() {
            if lingering[i].due() {
                lingering.swap_remove(i).close();
            } else {
                i += 1;
            }
        }
    }
    lingering.into_iter().for_each(Closing::close);
}

impl WorkerShared {
    /// Sends a command and wakes the worker.
    pub fn command(&self, c: Command) -> bool {
        let ok = self.commands.send(c).is_ok();
        self.waker.wake();
        ok
    }

    /// Queues a frame for this worker; false (the frame handed back to the pool it came
    /// from, when large) when the queue is full.
    #[inline]
    fn push_handoff(&self, h: Handoff) -> bool {
        match self.handoff.push(h) {
            Ok(()) => {
                if self.sleeping.load(Ordering::SeqCst) {
                    self.waker.wake();
                }
                true
            }
            Err(h) => {
                if let HandoffData::Large(b) = h.data {
                    let _ = self.large_free.push(b);
                }
                false
            }
        }
    }

    /// Copies `bytes` into a hand-off from worker `from` for this worker's port `port`:
    /// inline when it fits, in one of this worker's large buffers otherwise.
    #[inline]
    fn hand_bytes(
        &self,
        from: u16,
        port: u32,
        bytes: &[u8],
        csum: TxChecksum,
    ) -> Result<(), DropReason> {
        let len = bytes.len();
        let data = if len <= HANDOFF_INLINE {
            let mut b = [0; HANDOFF_INLINE];
            b[..len].copy_from_slice(bytes);
            HandoffData::Inline(b)
        } else {
            let mut b = self.large_free.pop().ok_or(DropReason::HandoffFull)?;
            match b.get_mut(..len) {
                Some(dst) => dst.copy_from_slice(bytes),
                None => {
                    let _ = self.large_free.push(b);
                    return Err(DropReason::TooManyBuffers);
                }
            }
            HandoffData::Large(b)
        };
        if self.push_handoff(Handoff {
            port,
            from,
            len: len as u32,
            csum,
            data,
        }) {
            Ok(())
        } else {
            Err(DropReason::HandoffFull)
        }
    }
}

struct Port {
    kind: PortKind,
    host_mac: Mac,
    pod_mac: Mac,
    ips: Vec<IpAddr>,
    xsk: XskPort,
    counters: Arc<SharedCounters>,
    local: Local,
    /// The last batch ended inside a chain (`chain_broken`): the next starts with its rest.
    mid_chain: bool,
}

/// The shared halves of the workers and their command receivers.
pub type Created = (Vec<Arc<WorkerShared>>, Vec<Receiver<Command>>);

impl Port {
    /// Commits this loop's tx batch, counts what went out (and what did not fit) on the port
    /// and the worker, and publishes the port's counters.
    #[inline]
    fn flush(&mut self, umem: &mut WorkerUmem, totals: &mut Local, drops: &mut LocalDrops) {
        let f = self.xsk.flush(umem);
        self.local.tx_packets += f.packets;
        self.local.tx_bytes += f.bytes;
        self.local.csum_offloaded += f.offloaded;
        totals.tx_packets += f.packets;
        totals.tx_bytes += f.bytes;
        totals.csum_offloaded += f.offloaded;
        if f.dropped > 0 {
            drops.count_n(DropReason::TxFull, f.dropped);
            self.local.drops += f.dropped;
        }
        self.counters.publish(&mut self.local);
    }

    /// Counts what the kernel dropped on the port's socket since the last look.
    fn kernel_drops(&mut self, drops: &mut LocalDrops) {
        let k = self.xsk.kernel_drops();
        if k.total() == 0 {
            return;
        }
        drops.count_n(DropReason::XskNoFillFrame, k.no_fill_frame);
        drops.count_n(DropReason::XskRxTooLarge, k.too_large);
        drops.count_n(DropReason::XskRxRingFull, k.rx_ring_full);
        drops.count_n(DropReason::XskInvalidDesc, k.invalid_desc);
        self.local.drops += k.total();
        self.counters.publish(&mut self.local);
    }
}

/// Creates the shared halves of `n` workers and their command receivers.
pub fn create(n: usize, cores: &[usize]) -> Result<Created, crate::xsk::XskError> {
    let mut shared = Vec::with_capacity(n);
    let mut rxs = Vec::with_capacity(n);
    let (reaper, dead) = crossbeam_channel::unbounded::<Closing>();
    std::thread::Builder::new()
        .name("strom-reaper".into())
        .spawn(move || reap(dead))
        .map_err(crate::xsk::XskError::EventFd)?;
    for id in 0..n {
        let (tx, rx) = crossbeam_channel::unbounded();
        shared.push(Arc::new(WorkerShared {
            id,
            core: (!cores.is_empty()).then(|| cores[id % cores.len()]),
            counters: WorkerCounters::default(),
            handoff: ArrayQueue::new(HANDOFF_CAP),
            large_free: {
                // A lone worker is never handed anything.
                let q = ArrayQueue::new(LARGE_HANDOFFS);
                for _ in 0..if n > 1 { LARGE_HANDOFFS } else { 0 } {
                    let _ = q.push(vec![0u8; LARGE_BYTES].into_boxed_slice());
                }
                q
            },
            waker: Waker::new()?,
            sleeping: AtomicBool::new(false),
            commands: tx,
            reaper: reaper.clone(),
            closed: SegQueue::new(),
        }));
        rxs.push(rx);
    }
    Ok((shared, rxs))
}

/// The worker thread body.
pub struct Worker {
    me: Arc<WorkerShared>,
    all: Arc<[Arc<WorkerShared>]>,
    commands: Receiver<Command>,
    tables: TableHandle,
    mode: PollMode,
    umem: WorkerUmem,
    /// Ports by id (id = XSKMAP slot); `active` lists the ids present.
    ports: Vec<Option<Box<Port>>>,
    active: Vec<u32>,
    poll: PollSet,
    drops: LocalDrops,
    totals: Local,
    /// What the pipeline keeps per worker (the ICMP rate, conntrack, affinity).
    ctx: pipeline::Context,
}

impl Worker {
    /// Builds a worker; `run` it on its own thread.
    pub fn new(
        me: Arc<WorkerShared>,
        all: Arc<[Arc<WorkerShared>]>,
        commands: Receiver<Command>,
        tables: TableHandle,
        mode: PollMode,
        umem: WorkerUmem,
        ctx: pipeline::Context,
    ) -> Self {
        Worker {
            me,
            all,
            commands,
            tables,
            mode,
            umem,
            ports: (0..crate::api::MAX_PORTS).map(|_| None).collect(),
            active: Vec::new(),
            poll: PollSet::default(),
            drops: LocalDrops::default(),
            totals: Local::default(),
            ctx,
        }
    }

    /// Runs until `Command::Stop`; returns its flows and clients (for the next start).
    pub fn run(mut self) -> FlowTables {
        if let Some(core) = self.me.core {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                tracing::warn!(worker = self.me.id, core, "cannot pin worker");
            }
        }
        self.me
            .counters
            .tid
            .store(nix::unistd::gettid().as_raw() as u64, Ordering::Relaxed);
        self.rebuild_poll();
        self.me
            .counters
            .frames_total
            .store(self.umem.total_frames() as u64, Ordering::Relaxed);
        self.me
            .counters
            .store_frames(self.umem.free_frames() as u64, 0);
        self.me
            .counters
            .fill_floor
            .store(u64::from(self.umem.fill_floor()), Ordering::Relaxed);
        self.me
            .counters
            .fill_budget
            .store(u64::from(self.umem.fill_budget()), Ordering::Relaxed);
        let mut idle = 0u32;
        let mut since_stats = 0u32;
        let mut last_review = self.me.counters.heartbeat();
        let mut last_upkeep = last_review;
        let mut descs = [XdpDesc {
            addr: 0,
            len: 0,
            options: 0,
        }; RX_DESCS];
        loop {
            if !self.commands.is_empty() && !self.handle_commands() {
                break;
            }
            while let Some(closed) = self.me.closed.pop() {
                let n = self.umem.reclaim(closed);
                tracing::debug!(worker = self.me.id, frames = n, "frames reclaimed");
            }
            let loaded = self.tables.load();
            let tables = loaded.view();
            self.ctx.now_ms = crate::stats::coarse_ms();
            self.ctx.size_counters(tables.services.slot_count());
            self.ctx.follow_policy(tables.policy);
            self.ctx
                .ct
                .sweep(self.ctx.now_ms, crate::conntrack::SWEEP_PER_LOOP);
            self.ctx
                .affinity
                .sweep(self.ctx.now_ms, crate::conntrack::SWEEP_PER_LOOP);
            let mut work = 0usize;
            for i in 0..self.active.len() {
                let id = self.active[i];
                work += self.rx_batch(id, &mut descs, &tables);
            }
            work += self.drain_handoff(&tables);
            for i in 0..self.active.len() {
                let id = self.active[i] as usize;
                if let Some(p) = self.ports[id].as_mut() {
                    p.flush(&mut self.umem, &mut self.totals, &mut self.drops);
                }
            }
            drop(loaded);
            since_stats += 1;
            // Also just before an adaptive worker goes to sleep, so that what was dropped
            // shows while it sleeps.
            let sleeps_next = self.mode == PollMode::Adaptive && idle == SPIN_BEFORE_SLEEP;
            if since_stats >= KERNEL_STATS_LOOPS
                || sleeps_next
                || self.ctx.now_ms.saturating_sub(last_upkeep) >= UPKEEP_MS
            {
                since_stats = 0;
                let mut in_fill = 0u64;
                for i in 0..self.active.len() {
                    let id = self.active[i] as usize;
                    if let Some(p) = self.ports[id].as_mut() {
                        p.kernel_drops(&mut self.drops);
                        in_fill += u64::from(p.xsk.fill_queued());
                    }
                }
                // The free pool does not change while the rings are read: the kernel takes
                // frames out of fill rings meanwhile, never puts any into the pool.
                self.me
                    .counters
                    .store_frames(self.umem.free_frames() as u64, in_fill);
                self.me
                    .counters
                    .fill_reserved
                    .store(u64::from(self.umem.fill_reserved()), Ordering::Relaxed);
                let now = self.me.counters.heartbeat();
                last_upkeep = self.ctx.now_ms;
                if now.saturating_sub(last_review) >= REVIEW_MS {
                    last_review = now;
                    for i in 0..self.active.len() {
                        let id = self.active[i] as usize;
                        if let Some(p) = self.ports[id].as_mut() {
                            p.xsk.review(&mut self.umem);
                            p.counters.set_fill_depth(p.xsk.fill_depth());
                        }
                    }
                }
            }
            self.me.counters.publish_drops(&mut self.drops);
            self.me.counters.packets.publish(&mut self.totals);
            // Release: the reconciler frees a replaced table once every worker's count moved
            // on (Acquire there), so this loop's reads of the old table come before it.
            self.me.counters.loops.fetch_add(1, Ordering::Release);
            if work == 0 {
                idle = idle.saturating_add(1);
                if self.mode == PollMode::Adaptive && idle > SPIN_BEFORE_SLEEP {
                    self.sleep();
                    idle = 0;
                }
            } else {
                idle = 0;
            }
        }
        tracing::info!(worker = self.me.id, "worker stopped");
        FlowTables {
            ct: std::mem::replace(&mut self.ctx.ct, crate::conntrack::Conntrack::new(0)),
            affinity: std::mem::replace(
                &mut self.ctx.affinity,
                crate::conntrack::affinity::Affinity::new(0),
            ),
        }
    }

    fn sleep(&mut self) {
        self.me.sleeping.store(true, Ordering::SeqCst);
        if self.me.handoff.is_empty() && self.commands.is_empty() && self.me.closed.is_empty() {
            self.poll.wait(SLEEP_MS);
            self.me.counters.sleeps.fetch_add(1, Ordering::Relaxed);
        }
        self.me.sleeping.store(false, Ordering::SeqCst);
        self.me.waker.drain();
    }

    fn rebuild_poll(&mut self) {
        let fds: Vec<i32> = self
            .active
            .iter()
            .filter_map(|&id| self.ports[id as usize].as_ref().map(|p| p.xsk.fd()))
            .chain(std::iter::once(self.me.waker.fd()))
            .collect();
        self.poll.set(fds);
    }

    /// Returns false on Stop.
    fn handle_commands(&mut self) -> bool {
        while let Ok(c) = self.commands.try_recv() {
            match c {
                Command::Stop => return false,
                Command::Restore {
                    saved,
                    svc,
                    elapsed_ms,
                    reply,
                } => {
                    let now = crate::stats::coarse_ms();
                    let slot = |i: u32| svc.get(i as usize).copied().flatten();
                    let flows = self.ctx.ct.restore(&saved.flows, elapsed_ms, now, slot);
                    let clients = self
                        .ctx
                        .affinity
                        .restore(&saved.clients, elapsed_ms, now, slot);
                    let _ = reply.send((flows, clients));
                }
                Command::AddPort(s, reply) => {
                    let id = s.id;
                    // A port the controller gave up on (its removal timed out) and whose id
                    // it now reuses: closed first, so that its frames and budget come back.
                    self.remove_port(id, false);
                    // The uplink binds zero-copy where its driver has it; a pod's veth has no
                    // zero-copy, and copy is asked for outright.
                    let mode = match s.kind {
                        PortKind::Uplink => BindMode::Auto,
                        PortKind::Pod => BindMode::Copy,
                    };
                    // A pod's socket takes frames larger than one buffer (its veth's MTU may
                    // be up to 65 535 toward the node's pods); the uplink's MTU stays within
                    // one frame (`MAX_UPLINK_MTU`), and it may bind zero-copy.
                    let multi_buffer = s.kind == PortKind::Pod;
                    // Pods' ports ask the kernel to finish checksums (`pipeline::offload`);
                    // the uplink's socket may be zero-copy, where that rests on the driver,
                    // and stromd completes checksums for it itself.
                    let tx_metadata = s.kind == PortKind::Pod;
                    let r = self
                        .umem
                        .open(s.ifindex, s.queue, mode, multi_buffer, tx_metadata)
                        .and_then(|xsk| {
                            if tx_metadata && !xsk.tx_metadata() {
                                no_tx_metadata_warning();
                            }
                            let zero_copy = xsk.zero_copy();
                            let fd = xsk
                                .as_fd()
                                .try_clone_to_owned()
                                .map(|fd| Opened { fd, zero_copy })
                                .map_err(XskError::Dup);
                            s.counters.set_fill_depth(xsk.fill_depth());
                            let kind = s.kind;
                            self.ports[id as usize] = Some(Box::new(Port {
                                kind,
                                host_mac: s.host_mac,
                                pod_mac: s.pod_mac,
                                ips: s.ips,
                                xsk,
                                counters: s.counters,
                                local: Local::default(),
                                mid_chain: false,
                            }));
                            self.active.push(id);
                            if kind == PortKind::Uplink && self.ctx.uplink_tx.is_none() {
                                self.ctx.uplink_tx = Some(id);
                            }
                            if fd.is_err() {
                                self.remove_port(id, false);
                            }
                            fd
                        });
                    let _ = reply.send(r.map_err(|e| OpenFailure {
                        busy: e.is_busy(),
                        message: e.to_string(),
                    }));
                    self.rebuild_poll();
                }
                Command::RemovePort { id, linger, reply } => {
                    self.remove_port(id, linger);
                    self.rebuild_poll();
                    let _ = reply.send(());
                }
                Command::Conntrack { query, reply } => {
                    let _ = reply.send(self.conntrack(&query));
                }
                Command::ServiceCounts(reply) => {
                    let _ = reply.send(self.ctx.svc_counts.clone());
                }
                Command::PolicyCounts(reply) => {
                    let _ = reply.send(self.ctx.policy_counts().to_vec());
                }
            }
        }
        true
    }

    /// A frame handed here because this worker owns its flow (an answer to one of its SNAT
    /// ports, or one a backend's worker hands back): translated and routed from here, its
    /// checksum class (`csum`, read by the worker it came in on) kept.
    fn rerouted(
        &mut self,
        data: &mut [u8],
        len: usize,
        csum: TxChecksum,
        tables: &crate::tables::View<'_>,
    ) {
        let action = pipeline::reroute(data, len, tables, &mut self.ctx);
        self.ctx.tx_csum = csum;
        let r = match action {
            Action::Tx { port, len } => Self::transmit_copy(
                &mut self.umem,
                self.ports
                    .get_mut(port as usize)
                    .and_then(|p| p.as_deref_mut()),
                &data[..len],
                self.ctx.tx_csum,
            ),
            Action::Handoff { worker, port, len } if port != pipeline::REROUTE => {
                match self.all.get(usize::from(worker)) {
                    Some(w) => w.hand_bytes(self.ctx.worker, port, &data[..len], self.ctx.tx_csum),
                    None => Err(DropReason::PortGone),
                }
            }
            Action::Drop(r) | Action::IcmpError { reason: r, .. } => Err(r),
            Action::Handoff { .. } | Action::Hairpin { .. } => Err(DropReason::NoRoute),
        };
        self.account_tx(r);
    }

    /// A frame from beyond the uplink that another worker received and handed here, where
    /// its flow is owned (`RouteTable::inbound_owner`): processed as if it had come
    /// in on this worker's own uplink socket, and sent on from here (a reset or an ICMP error
    /// answering it, out of that socket).
    fn take_from_uplink(&mut self, data: &mut [u8], len: usize, tables: &crate::tables::View<'_>) {
        let Some(up) = self.ctx.uplink_tx else {
            self.drops.count(DropReason::PortGone);
            return;
        };
        let action = match self.ports.get(up as usize).and_then(|p| p.as_deref()) {
            Some(p) => {
                let port = InPort {
                    id: up,
                    kind: p.kind,
                    host_mac: p.host_mac,
                    pod_mac: p.pod_mac,
                    ips: &p.ips,
                };
                pipeline::process(data, len, &port, tables, &mut self.ctx)
            }
            None => Action::Drop(DropReason::PortGone),
        };
        let (out, n) = match action {
            Action::Drop(r) => {
                self.drops.count(r);
                return;
            }
            Action::IcmpError { reason, len } => {
                self.drops.count(reason);
                (up, len)
            }
            Action::Hairpin { len } => (up, len),
            Action::Tx { port, len } => (port, len),
            Action::Handoff { worker, port, len } => {
                let r = match self.all.get(usize::from(worker)) {
                    Some(w) => w.hand_bytes(self.ctx.worker, port, &data[..len], self.ctx.tx_csum),
                    None => Err(DropReason::PortGone),
                };
                self.account_tx(r);
                return;
            }
        };
        let r = Self::transmit_copy(
            &mut self.umem,
            self.ports
                .get_mut(out as usize)
                .and_then(|p| p.as_deref_mut()),
            &data[..n],
            self.ctx.tx_csum,
        );
        self.account_tx(r);
    }

    /// Answers a conntrack query (between batches).
    fn conntrack(&mut self, q: &ConntrackQuery) -> (u64, Vec<strom_api::ConntrackEntry>) {
        let tables = self.tables.load();
        let services = tables.view().services;
        let now = crate::stats::coarse_ms();
        let f = &q.filter;
        let service_of = |e: &crate::conntrack::Entry| {
            services
                .port(e.svc)
                .map(|p| p.service.as_str())
                .unwrap_or("")
                .to_string()
        };
        let matches = |e: &crate::conntrack::Entry| {
            let keys = [e.orig, e.reply];
            f.addr.is_none_or(|a| {
                keys.iter()
                    .any(|k| IpAddr::V4(k.src) == a || IpAddr::V4(k.dst) == a)
            }) && f
                .port
                .is_none_or(|p| keys.iter().any(|k| k.sport == p || k.dport == p))
                && f.service.as_ref().is_none_or(|s| *s == service_of(e))
        };
        if q.flush {
            let n = self.ctx.ct.remove_where(|e| matches(e));
            if let Some(name) = &f.service {
                let slots: Vec<crate::tables::services::SvcRef> = services
                    .ports()
                    .filter(|p| p.service == *name)
                    .map(|p| p.id)
                    .collect();
                self.ctx.affinity.forget(|s| slots.contains(&s));
            }
            return (n as u64, Vec::new());
        }
        let mut total = 0u64;
        let mut out = Vec::new();
        for (_, e) in self.ctx.ct.iter().filter(|(_, e)| matches(e)) {
            total += 1;
            if q.count_only || out.len() >= CONNTRACK_LIST_MAX {
                continue;
            }
            let translated = crate::conntrack::FlowKey {
                src: e.reply.dst,
                dst: e.reply.src,
                sport: e.reply.dport,
                dport: e.reply.sport,
                proto: e.reply.proto,
            };
            out.push(strom_api::ConntrackEntry {
                worker: self.me.id,
                protocol: match e.orig.proto {
                    // An echo: its identifier shows as the requester's port.
                    crate::conntrack::ICMP => "icmp",
                    n => strom_api::Protocol::from_number(n).map_or("other", |p| p.name()),
                }
                .to_string(),
                original: e.orig.to_string(),
                translated: translated.to_string(),
                state: e.state.name().to_string(),
                expires_in_s: e.expires_ms.saturating_sub(now) / 1000,
                service: service_of(e),
                packets: e.packets,
                owner: e.owner().map(usize::from),
            });
        }
        (total, out)
    }

    /// Takes port `id` out of the loop and hands its socket to the reaper (`linger`: its
    /// interface is being deleted). Nothing when there is no such port.
    fn remove_port(&mut self, id: u32, linger: bool) {
        if let Some(mut p) = self.ports.get_mut(id as usize).and_then(Option::take) {
            p.kernel_drops(&mut self.drops);
            self.me.counters.publish_drops(&mut self.drops);
            p.counters.publish(&mut p.local);
            p.xsk.retire(&mut self.umem);
            // The frames lent to the socket come back once the reaper closed it.
            let closing = Closing {
                xsk: p.xsk,
                worker: self.me.clone(),
                linger_until: linger.then(|| std::time::Instant::now() + LINGER_MAX),
            };
            if let Err(e) = self.me.reaper.send(closing) {
                e.into_inner().close();
            }
        }
        self.active.retain(|&a| a != id);
        if self.ctx.uplink_tx == Some(id) {
            self.ctx.uplink_tx = None;
        }
    }

    /// Receives and processes one batch of port `id`. Returns the number of packets.
    #[inline]
    fn rx_batch(
        &mut self,
        id: u32,
        descs: &mut [XdpDesc; RX_DESCS],
        tables: &crate::tables::View<'_>,
    ) -> usize {
        let Some(mut port) = self.ports[id as usize].take() else {
            return 0;
        };
        let n = port.xsk.recv(&mut self.umem, descs);
        let mut packets = 0;
        let mut i = 0;
        if port.mid_chain {
            // The rest of a chain cut short in the last batch: not a packet of its own.
            while i < n {
                let d = descs[i];
                self.umem.recycle(d.addr);
                i += 1;
                if !continues(&d) {
                    port.mid_chain = false;
                    break;
                }
            }
        }
        while i < n {
            // A packet is a chain of descriptors, each but the last marked as continued.
            let Some(k) = packet_len(&descs[i..n]) else {
                // `recv` ends on a whole packet: a chain cut short is never forwarded.
                for d in &descs[i..n] {
                    self.umem.recycle(d.addr);
                }
                self.drops.count(DropReason::ChainBroken);
                port.local.drops += 1;
                port.mid_chain = true;
                break;
            };
            let last = i + k - 1;
            let chain = &descs[i..=last];
            i = last + 1;
            // `recv` started loading the first frames' headers; keep that many ahead.
            if let Some(ahead) = descs[..n].get(last + PREFETCH_AHEAD) {
                self.umem.prefetch(ahead.addr);
            }
            let wire: usize = chain.iter().map(|d| d.len as usize).sum();
            packets += 1;
            port.local.rx_packets += 1;
            port.local.rx_bytes += wire as u64;
            self.totals.rx_bytes += wire as u64;
            if chain.len() > MAX_CHAIN {
                self.drop_chain(&mut port, chain, DropReason::TooManyBuffers);
                continue;
            }
            let head = chain[0];
            let action = {
                let Port {
                    kind,
                    host_mac,
                    pod_mac,
                    ips,
                    ..
                } = &*port;
                let inp = InPort {
                    id,
                    kind: *kind,
                    host_mac: *host_mac,
                    pod_mac: *pod_mac,
                    ips,
                };
                pipeline::process_frame(
                    self.umem.frame_mut(head.addr),
                    head.len as usize,
                    wire,
                    &inp,
                    tables,
                    &mut self.ctx,
                )
            };
            match action {
                Action::Drop(r) => self.drop_chain(&mut port, chain, r),
                Action::Hairpin { len } => {
                    let (out, k) = with_head_len(chain, len);
                    if !send_packet(&mut self.umem, &mut port, &out[..k], self.ctx.tx_csum) {
                        self.drops.count(DropReason::TxFull);
                        port.local.drops += 1;
                    }
                }
                Action::IcmpError { reason, len } => {
                    // The error replaces the frame: its first buffer carries it back.
                    for d in &chain[1..] {
                        self.umem.recycle(d.addr);
                    }
                    self.drops.count(reason);
                    port.local.drops += 1;
                    self.hairpin(&mut port, head.addr, len);
                }
                Action::Tx {
                    port: out_port,
                    len,
                } => {
                    // The worker's ports share its UMEM slice: the frames themselves go out.
                    let (out, k) = with_head_len(chain, len);
                    let r = match self.ports[out_port as usize].as_deref_mut() {
                        Some(o) if k > 1 && !o.xsk.multi_buffer() => Err(DropReason::NoMultiBuffer),
                        Some(o) => {
                            if send_packet(&mut self.umem, o, &out[..k], self.ctx.tx_csum) {
                                Ok(())
                            } else {
                                Err(DropReason::TxFull)
                            }
                        }
                        None => Err(DropReason::PortGone),
                    };
                    if r.is_err() {
                        for d in chain {
                            self.umem.recycle(d.addr);
                        }
                    }
                    self.account_tx(r);
                }
                Action::Handoff {
                    worker,
                    port: out_port,
                    len,
                } => {
                    let r = match self.all.get(usize::from(worker)) {
                        Some(w) => Self::hand_off(
                            &mut self.umem,
                            w,
                            self.ctx.worker,
                            out_port,
                            chain,
                            len,
                            self.ctx.tx_csum,
                        ),
                        None => Err(DropReason::PortGone),
                    };
                    if let Err(r) = r {
                        self.drops.count(r);
                        port.local.drops += 1;
                    }
                    for d in chain {
                        self.umem.recycle(d.addr);
                    }
                }
            }
        }
        self.totals.rx_packets += packets as u64;
        self.ports[id as usize] = Some(port);
        packets
    }

    /// Drops a received packet for `reason`: every frame of its chain back to the pool.
    #[inline]
    fn drop_chain(&mut self, port: &mut Port, chain: &[XdpDesc], reason: DropReason) {
        self.drops.count(reason);
        port.local.drops += 1;
        for d in chain {
            self.umem.recycle(d.addr);
        }
    }

    /// Copies the packet in `chain` (its first buffer now `len` bytes long) to worker `w`,
    /// which sends it out of its port `out_port`: inline in the hand-off when it fits, in one
    /// of `w`'s large buffers otherwise. The frames stay the caller's.
    #[inline]
    fn hand_off(
        umem: &mut WorkerUmem,
        w: &WorkerShared,
        from: u16,
        out_port: u32,
        chain: &[XdpDesc],
        len: usize,
        csum: TxChecksum,
    ) -> Result<(), DropReason> {
        if let [one] = chain {
            let bytes = umem.frame_mut(one.addr);
            return w.hand_bytes(
                from,
                out_port,
                bytes.get(..len).ok_or(DropReason::PortGone)?,
                csum,
            );
        }
        let wire = len + chain[1..].iter().map(|d| d.len as usize).sum::<usize>();
        let mut data = w.large_free.pop().ok_or(DropReason::HandoffFull)?;
        if wire > data.len() {
            let _ = w.large_free.push(data);
            return Err(DropReason::TooManyBuffers);
        }
        let mut at = 0;
        for (i, d) in chain.iter().enumerate() {
            let n = if i == 0 { len } else { d.len as usize };
            match umem.frame_mut(d.addr).get(..n) {
                Some(b) => data[at..at + n].copy_from_slice(b),
                None => {
                    let _ = w.large_free.push(data);
                    return Err(DropReason::PortGone);
                }
            }
            at += n;
        }
        if w.push_handoff(Handoff {
            port: out_port,
            from,
            len: wire as u32,
            csum,
            data: HandoffData::Large(data),
        }) {
            Ok(())
        } else {
            Err(DropReason::HandoffFull)
        }
    }

    #[inline]
    fn hairpin(&mut self, port: &mut Port, addr: u64, len: usize) {
        // Sent frames are counted when `flush` commits them.
        if !port.xsk.send(&mut self.umem, addr, len) {
            self.drops.count(DropReason::TxFull);
            port.local.drops += 1;
        }
    }

    /// Copies `frame` into free frames of this worker's UMEM (as many as it needs, a chain
    /// when it is larger than one; behind the kernel's headroom, as a received frame is, which
    /// leaves room for transmit metadata) and queues it on `out`.
    #[inline]
    fn transmit_copy(
        umem: &mut WorkerUmem,
        out: Option<&mut Port>,
        frame: &[u8],
        csum: TxChecksum,
    ) -> Result<(), DropReason> {
        let out = out.ok_or(DropReason::PortGone)?;
        if frame.is_empty() {
            return Err(DropReason::Runt);
        }
        let k = frame.len().div_ceil(RX_ROOM as usize);
        if k > MAX_CHAIN {
            return Err(DropReason::TooManyBuffers);
        }
        if k > 1 && !out.xsk.multi_buffer() {
            return Err(DropReason::NoMultiBuffer);
        }
        let mut chain = [XdpDesc {
            addr: 0,
            len: 0,
            options: 0,
        }; MAX_CHAIN];
        for (i, part) in frame.chunks(RX_ROOM as usize).enumerate() {
            let copied = umem.take_free().and_then(|frame| {
                let addr = frame + u64::from(RX_HEADROOM);
                match umem.frame_mut(addr).get_mut(..part.len()) {
                    Some(dst) => {
                        dst.copy_from_slice(part);
                        Some(addr)
                    }
                    None => {
                        umem.recycle(frame);
                        None
                    }
                }
            });
            let Some(addr) = copied else {
                for d in &chain[..i] {
                    umem.recycle(d.addr);
                }
                return Err(DropReason::NoFrame);
            };
            chain[i] = XdpDesc {
                addr,
                len: part.len() as u32,
                options: 0,
            };
        }
        if !send_packet(umem, out, &chain[..k], csum) {
            return Err(DropReason::TxFull);
        }
        Ok(())
    }

    #[inline]
    fn account_tx(&mut self, r: Result<(), DropReason>) {
        if let Err(reason) = r {
            self.drops.count(reason);
        }
    }

    fn drain_handoff(&mut self, tables: &crate::tables::View<'_>) -> usize {
        let mut n = 0;
        while n < HANDOFF_CAP / 2 {
            let Some(mut h) = self.me.handoff.pop() else {
                break;
            };
            n += 1;
            let (port, from, len, csum) = (h.port, h.from, h.len as usize, h.csum);
            let data = h.bytes_mut();
            let len = len.min(data.len());
            if port == pipeline::REROUTE {
                self.rerouted(data, len, csum, tables);
            } else if port == pipeline::FROM_UPLINK {
                self.take_from_uplink(data, len, tables);
            } else {
                let r = self.deliver_handed(port, from, data, len, csum, tables);
                self.account_tx(r);
            }
            if let HandoffData::Large(b) = h.data {
                let _ = self.me.large_free.push(b);
            }
        }
        n
    }

    /// Sends a frame worker `from` handed over (`data[..len]`) out of this worker's port
    /// `port`. This worker owns the flows of its ports: a reply another worker routed here is
    /// translated back before it leaves (and one the policies deny on its own goes only as a
    /// packet of such a flow, `CONFIRM`); a flow `from` translated and owns (`OWNED`) is
    /// tracked here as its, so that its answers go back there.
    fn deliver_handed(
        &mut self,
        port: u32,
        from: u16,
        data: &mut [u8],
        len: usize,
        csum: TxChecksum,
        tables: &crate::tables::View<'_>,
    ) -> Result<(), DropReason> {
        let confirm = port & pipeline::policy::CONFIRM != 0;
        let owner = (port & pipeline::OWNED != 0).then_some(from);
        let out = port & !(pipeline::policy::CONFIRM | pipeline::OWNED);
        let handed = pipeline::service::Handed { confirm, owner };
        pipeline::service::deliver(data, len, tables, &mut self.ctx, handed).and_then(|()| {
            Self::transmit_copy(
                &mut self.umem,
                self.ports
                    .get_mut(out as usize)
                    .and_then(|p| p.as_deref_mut()),
                &data[..len],
                csum,
            )
        })
    }
}

/// Logs, once for the process, that the kernel registers no transmit metadata.
fn no_tx_metadata_warning() {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "the kernel refused transmit metadata on a pod's AF_XDP socket (Linux 6.11 or later \
             has it): frames to pods keep their checksums as sent, and a pod with transmit \
             checksum offload on reaches other pods only with frames of one buffer"
        );
    }
}

/// Queues the packet in `chain` on `out`, its transport checksum finished as `csum` and the
/// port need: the kernel asked to finish it where the port has transmit metadata (a pod's),
/// a partial one completed here where it has not (the uplink) or where the kernel cannot
/// (SCTP's CRC), in a frame of one buffer (the only kind the uplink sends).
#[inline]
fn send_packet(umem: &mut WorkerUmem, out: &mut Port, chain: &[XdpDesc], csum: TxChecksum) -> bool {
    // Toward a port without metadata only a partial checksum needs the frame.
    let needed = match csum {
        TxChecksum::AsIs => false,
        TxChecksum::Pod { partial } => partial || out.xsk.tx_metadata(),
        TxChecksum::SctpPartial => true,
    };
    if let (Some(head), true) = (chain.first(), needed) {
        let frame = umem.frame_mut(head.addr);
        let n = (head.len as usize).min(frame.len());
        let frame = &mut frame[..n];
        if out.xsk.tx_metadata() {
            if let Some(req) = offload::offload(frame, csum) {
                return out.xsk.send_offloaded(umem, chain, req);
            }
        }
        if chain.len() == 1 {
            offload::complete(frame, csum);
        }
    }
    out.xsk.send_chain(umem, chain)
}

/// The descriptors of `chain` with the first buffer's length set to `len` (a stage may have
/// shortened or grown the headers), on the stack.
#[inline]
fn with_head_len(chain: &[XdpDesc], len: usize) -> ([XdpDesc; MAX_CHAIN], usize) {
    let mut out = [XdpDesc {
        addr: 0,
        len: 0,
        options: 0,
    }; MAX_CHAIN];
    let k = chain.len().min(MAX_CHAIN);
    out[..k].copy_from_slice(&chain[..k]);
    if let Some(h) = out.first_mut() {
        h.len = len as u32;
    }
    (out, k)
}

/// Registers the UMEM (one slice of `sizes.frames` frames per worker) and spawns the worker
/// threads.
pub fn spawn(
    shared: &[Arc<WorkerShared>],
    receivers: Vec<Receiver<Command>>,
    tables: &TableHandle,
    mode: PollMode,
    sizes: XskSizes,
    conntrack_max: usize,
    echo_ids: Option<Arc<strom_xdp::bpf::EchoIds>>,
) -> Result<Vec<std::thread::JoinHandle<Option<FlowTables>>>, XskError> {
    let umem = SharedUmem::new(sizes, shared.len() as u32)?;
    let all: Arc<[Arc<WorkerShared>]> = shared.to_vec().into();
    receivers
        .into_iter()
        .enumerate()
        .map(|(i, rx)| {
            let w = Worker::new(
                all[i].clone(),
                all.clone(),
                rx,
                tables.clone(),
                mode,
                umem.worker(i as u32)?,
                {
                    let mut ctx = pipeline::Context::new(i as u16, conntrack_max);
                    ctx.ct.set_echo_ids(echo_ids.clone());
                    ctx
                },
            );
            let me = all[i].clone();
            std::thread::Builder::new()
                .name(format!("strom-worker-{i}"))
                .spawn(move || run_guarded(&me.counters, || w.run()))
                .map_err(XskError::EventFd)
        })
        .collect()
}

/// Runs a worker's body and records how it ended, a panic with its message, so that
/// `status` turns not-ready with the reason (the thread is gone either way). Returns what the
/// body returned, None after a panic.
fn run_guarded<T>(counters: &WorkerCounters, body: impl FnOnce() -> T) -> Option<T> {
    let (how, out) = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(out) => ("stopped".to_string(), Some(out)),
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(error = %msg, "worker panicked");
            (format!("panicked: {msg}"), None)
        }
    };
    let _ = counters.ended.set(how);
    out
}

/// Waits for a reply from a worker, bounded.
pub fn wait_reply<T>(rx: &Receiver<T>) -> Option<T> {
    rx.recv_timeout(Duration::from_secs(5)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_that_panics_is_recorded_with_its_message() {
        let c = WorkerCounters::default();
        assert!(run_guarded(&c, || -> u8 { panic!("ring went away") }).is_none());
        assert_eq!(
            c.ended.get().map(String::as_str),
            Some("panicked: ring went away")
        );
        let c = WorkerCounters::default();
        assert_eq!(run_guarded(&c, || 7), Some(7));
        assert_eq!(c.ended.get().map(String::as_str), Some("stopped"));
    }
}
