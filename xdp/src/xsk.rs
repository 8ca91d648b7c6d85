//! AF_XDP I/O: one mapped area cut into a slice of frames per worker; each port's socket
//! registers its worker's slice as a UMEM of its own; built on xdpilone.
//!
//! This module and [`crate::bpf`] are the only places with `unsafe`.
//!
//! ```text
//!   SharedUmem: one mmap'd area, a slice of `frames` frames per worker
//!   ├─ WorkerUmem 0: frames [0, F)   free pool, who holds each frame
//!   │    ├─ port A socket (ifindex a, queue 0): UMEM = slice 0, its fill/completion + rx/tx rings
//!   │    └─ port B socket (ifindex b, queue 0): UMEM = slice 0, …
//!   └─ WorkerUmem 1: frames [F, 2F)
//!        └─ port C socket: UMEM = slice 1, …
//! ```
//!
//! Why a registration per socket rather than one UMEM shared (`XDP_SHARED_UMEM`): a socket
//! joins a shared UMEM through a bound socket of it (xsk-rs: only the registering one, so that
//! one must outlive every pod: an anchor on loopback, whose one queue then takes the UMEM);
//! every sharing socket binds in the UMEM's mode, copy on loopback, so the uplink could never
//! bind zero-copy; and the kernel keeps per socket a buffer head for every frame of the UMEM,
//! all workers' frames at once. What it costs: with a hundred destination pods, about a fifth
//! of stromd's rate (BENCHMARKS.md, "110 pods on the node"). Registered per socket over its
//! worker's slice, a socket binds in the mode it asks for (the uplink: zero-copy where the
//! driver has it), and costs the kernel heads for its worker's frames only. Every socket of a worker sees the same frames at the
//! same offsets (UMEM offset 0 is the slice's first frame), so a frame received on one port
//! goes out of another as it is.
//!
//! Frames move between the ports of a worker without a copy: a frame received on port A is
//! put on port B's tx ring as it is. Each frame is in exactly one place at a time: its
//! worker's free pool, held by userspace (taken from the pool or received), or lent to one
//! socket (its fill, rx, tx or completion ring, or queued for its tx ring). `lent` records
//! which, and every call checks it: only a held frame gives bytes, is sent or goes back to the
//! pool, so no frame is ever in two places. The frames of a closed socket come back to the
//! pool only with the proof that it is closed ([`XskPort::close`], [`WorkerUmem::reclaim`]).
#![allow(unsafe_code)]

use std::num::NonZeroU32;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::sys::socket::{getsockopt, sockopt};
use xdpilone::xdp::{XdpDesc, XdpStatisticsV2};
use xdpilone::{DeviceQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem, UmemConfig, User};

/// How a port's socket binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindMode {
    /// Copy mode (what a veth offers anyway).
    Copy,
    /// Zero-copy where the driver supports it, copy mode otherwise (the kernel's own fallback:
    /// neither `XDP_COPY` nor `XDP_ZEROCOPY` is asked for). For the uplink on a NIC.
    Auto,
}

/// Size of one UMEM frame (a page: the largest chunk the kernel takes without huge pages). A
/// socket bound without multi-buffer receives a packet into one frame, less the kernel's
/// headroom ([`RX_ROOM`]); one bound with it ([`XskPort::multi_buffer`]) receives a larger one
/// as a chain of frames.
pub const FRAME_SIZE: u32 = 4096;
/// The kernel's headroom in front of a received frame's data in copy mode
/// (`XDP_PACKET_HEADROOM`).
pub const RX_HEADROOM: u32 = 256;
/// Bytes of a received packet one frame holds.
pub const RX_ROOM: u32 = FRAME_SIZE - RX_HEADROOM;
/// Most descriptors one packet may span: the kernel builds a sent packet in copy mode as one
/// skb of at most `MAX_SKB_FRAGS` (17) fragments plus its head, and drops a longer chain. With
/// [`RX_ROOM`]-byte buffers that is 69 120 bytes, more than any IPv4 packet (65 535) with its
/// Ethernet header.
pub const MAX_CHAIN: usize = 18;
/// A descriptor's `options` bit saying that the packet goes on in the next descriptor.
pub const PKT_CONTD: u32 = libc::XDP_PKT_CONTD;

/// Bytes of transmit metadata (`struct xsk_tx_metadata`: flags, then the checksum request)
/// in front of a frame's data on a socket opened with transmit metadata
/// ([`XskPort::tx_metadata`]). The kernel then checks every descriptor of that socket for this
/// much room in front of its data: a descriptor without it is not queued on such a socket
/// (`fits_frame`); stromd's frames have their data [`RX_HEADROOM`] into their frame (the
/// kernel's receive headroom in copy mode, and where `transmit_copy` writes).
pub const TX_METADATA_LEN: u32 = 16;

/// A request that the kernel complete a transmitted packet's transport checksum, as a device
/// with checksum offload would (`XDP_TXMD_FLAGS_CHECKSUM`): the checksum field at
/// `start + offset` holds the pseudo-header's sum, and the kernel sums from `start` to the end.
/// In copy mode the packet then reaches the peer as `CHECKSUM_PARTIAL`, which a receiving
/// stack takes as verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChecksumOffload {
    /// Where the sum starts, from the packet's first byte (the transport header).
    pub start: u16,
    /// Where the checksum field is, from `start`.
    pub offset: u16,
}

/// Whether the packet `d` belongs to goes on in the next descriptor.
#[inline]
pub fn continues(d: &XdpDesc) -> bool {
    d.options & PKT_CONTD != 0
}

/// How many descriptors the packet at the start of `descs` spans, or None when its chain does
/// not end within them (cut short).
#[inline]
pub fn packet_len(descs: &[XdpDesc]) -> Option<usize> {
    descs.iter().position(|d| !continues(d)).map(|i| i + 1)
}
/// How many received frames ahead of the one being processed have their first cache line
/// requested (`recv` starts the first ones, the worker keeps the distance): enough to cover a
/// cross-core miss with the pipeline's per-frame work, few enough not to run out of the
/// core's outstanding-miss slots.
pub const PREFETCH_AHEAD: usize = 8;
/// Most sendto kicks per port per loop.
const MAX_KICKS: u32 = 8;
/// Frames the kernel sends per kick in copy mode (its TX_BATCH_SIZE).
const KERNEL_TX_BATCH: u32 = 32;
/// `lent` value of a frame userspace holds (taken from the pool or received, being processed).
const HELD: u32 = 0;
/// `lent` value of a frame in its worker's free pool. Socket serials start above it.
const FREE: u32 = 1;
/// Frames the fill rings never take from the pool: frames copied in from other workers
/// need free frames even when every port's fill ring is as full as the pool allows.
const RESERVE: usize = 256;
/// Frames drained from a port's fill ring between two refills that deepen it, as a fraction
/// of the floor: a burst that large means the port receives faster than one loop refills it
/// (a TCP stream's burst, or the worker off its core), and the next burst, twice as large in
/// slow start, must fit.
const GROW_AT_FLOOR_DIV: u32 = 4;
/// How many times the burst that deepens a port its new depth holds (rounded up to a power
/// of two, at most `fill_per_port`): slow start at most doubles a burst from one round trip to
/// the next, so the next fits with room to spare, and a ring that keeps draining this far
/// keeps growing. A port that drained to nothing is at least doubled: it may have dropped what
/// did not fit, and the drain then undercounts the burst. A burst of a few connections' SYNs,
/// or the worker off its core for a moment, thus parks tens or hundreds of frames in a ring,
/// not `fill_per_port`, and a TCP stream reaches `fill_per_port` within its first few bursts.
const GROW_MARGIN: u32 = 4;
/// Quiet reviews (about a second each, [`WorkerUmem::review`]) after which a deepened port
/// goes back to the floor: long enough that a TCP stream's pauses keep their depth, short
/// enough that the budget comes back to other ports soon after a stream ends.
const QUIET_REVIEWS: u8 = 10;

/// A received descriptor's address as an offset into the socket's UMEM (its worker's slice). With unaligned chunks the
/// kernel returns the chunk's address in the low 48 bits and the data's offset in it in the
/// top 16; everything past the rx ring (frames, tx, completions) uses the plain offset, which
/// the kernel also accepts on the tx ring.
#[inline]
fn plain_addr(addr: u64) -> u64 {
    (addr & libc::XSK_UNALIGNED_BUF_ADDR_MASK) + (addr >> libc::XSK_UNALIGNED_BUF_OFFSET_SHIFT)
}

/// Errors of the AF_XDP layer.
#[derive(Debug, thiserror::Error)]
pub enum XskError {
    #[error("mmap of {0} bytes for the UMEM failed: {1}")]
    Mmap(usize, std::io::Error),
    #[error("{what} on ifindex {ifindex}: {errno}")]
    Xdp {
        what: &'static str,
        ifindex: u32,
        errno: String,
        raw: i32,
    },
    #[error("worker slice {0} of the UMEM does not exist or was already handed out")]
    Slice(u32),
    #[error("duplicating a socket's fd: {0}")]
    Dup(std::io::Error),
    #[error("eventfd or thread: {0}")]
    EventFd(std::io::Error),
    #[error(
        "the worker serves {ports} ports, as many as its {frames} frames keep {floor}-frame fill \
         rings for: raise dataplane.umem_frames or dataplane.workers, or lower \
         dataplane.fill_min"
    )]
    Full { ports: u32, frames: u32, floor: u32 },
}

impl XskError {
    /// The queue still belongs to a socket the kernel is releasing (it does so in deferred
    /// work after close): the same bind succeeds a few milliseconds later.
    pub fn is_busy(&self) -> bool {
        matches!(self, XskError::Xdp { raw, .. } if *raw == libc::EBUSY)
    }
}

/// Sizes of a worker's UMEM and of each port's rings.
#[derive(Debug, Clone, Copy)]
pub struct XskSizes {
    /// Frames in each worker's UMEM (a power of two).
    pub frames: u32,
    /// Entries in each of a port's fill, completion, rx and tx rings (a power of two).
    pub ring: u32,
    /// The deepest a port's fill ring gets (at most `ring`), once it has shown it receives in
    /// bursts: how many frames a port can receive before stromd reads them.
    pub fill: u32,
    /// The depth every port's fill ring keeps from the moment it opens (the floor): what a
    /// quiet pod needs to be reached at once.
    pub fill_min: u32,
}

impl Default for XskSizes {
    fn default() -> Self {
        XskSizes {
            frames: 8192,
            ring: 2048,
            fill: 2048,
            fill_min: 32,
        }
    }
}

impl XskSizes {
    /// Frames a worker's fill rings may hold together: three quarters of its pool less the
    /// reserve (the rest covers frames in rx and tx rings, hand-offs and being processed).
    pub fn fill_budget(&self) -> u32 {
        (self.frames as usize).saturating_sub(RESERVE) as u32 / 4 * 3
    }

    /// Ports one worker can serve: each keeps its floor within the budget.
    pub fn ports_per_worker(&self) -> u32 {
        self.fill_budget() / self.fill_min.max(1)
    }
}

/// What one `flush` put on the wire.
#[derive(Debug, Default, Clone, Copy)]
pub struct Flushed {
    /// Packets committed to the tx ring, and their bytes.
    pub packets: u64,
    pub bytes: u64,
    /// Packets that did not fit the tx ring (their frames recycled).
    pub dropped: u64,
    /// Of the packets committed, those asking for checksum offload (transmit metadata).
    pub offloaded: u64,
}

/// Anonymous, page-aligned memory for a UMEM. Unmapped on drop.
struct Area {
    ptr: NonNull<u8>,
    len: usize,
}

impl Area {
    fn new(len: usize) -> Result<Self, XskError> {
        // SAFETY: an anonymous private mapping with no address hint has no preconditions; the
        // result is checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(XskError::Mmap(len, std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| XskError::Mmap(len, std::io::Error::last_os_error()))?;
        Ok(Area { ptr, len })
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `Area::new`. The area is the last
        // field of `SharedUmem`, which every socket registered on it and every `WorkerUmem`
        // hold through an `Arc`: the last socket has been closed when this runs.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// The process's frames: one mapped area, a slice per worker, each port's socket registering
/// its worker's slice as its UMEM.
pub struct SharedUmem {
    sizes: XskSizes,
    /// Per worker slice: whether it was handed out (each is, once, for the area's life).
    taken: Vec<AtomicBool>,
    area: Area,
}

// SAFETY: `Area` is !Send/!Sync only because it holds the mapping's raw pointer. Through
// `&SharedUmem` threads only read the pointer to build slices: the area's bytes are reached
// only through a `WorkerUmem`, each inside its own slice on its own thread (a slice has one
// owner, `SharedUmem::worker`), and by the kernel through the sockets registered on them.
unsafe impl Send for SharedUmem {}
// SAFETY: see `Send` above.
unsafe impl Sync for SharedUmem {}

fn xdp_err(what: &'static str, ifindex: u32) -> impl Fn(xdpilone::Errno) -> XskError {
    move |e: xdpilone::Errno| XskError::Xdp {
        what,
        ifindex,
        errno: e.to_string(),
        raw: e.get_raw(),
    }
}

impl SharedUmem {
    /// Maps `slices × sizes.frames` frames (populated: they are registered with the kernel as
    /// each port opens). No socket yet.
    pub fn new(sizes: XskSizes, slices: u32) -> Result<Arc<Self>, XskError> {
        let len = (u64::from(sizes.frames) * u64::from(slices) * u64::from(FRAME_SIZE)) as usize;
        let area = Area::new(len)?;
        Ok(Arc::new(SharedUmem {
            sizes,
            taken: (0..slices).map(|_| AtomicBool::new(false)).collect(),
            area,
        }))
    }

    /// Worker `index`'s slice of the frames: handed out once for the life of the UMEM (a
    /// second owner of a slice could give the kernel a frame the first is writing, and a
    /// slice given back could not tell which of its frames sockets still hold).
    pub fn worker(self: &Arc<Self>, index: u32) -> Result<WorkerUmem, XskError> {
        let taken = self
            .taken
            .get(index as usize)
            .ok_or(XskError::Slice(index))?;
        if taken.swap(true, Ordering::AcqRel) {
            return Err(XskError::Slice(index));
        }
        let frames = u64::from(self.sizes.frames);
        let first = u64::from(index) * frames;
        let base = first * u64::from(FRAME_SIZE);
        let free = (first..first + frames)
            .rev()
            .map(|i| i * u64::from(FRAME_SIZE))
            .collect();
        Ok(WorkerUmem {
            shared: self.clone(),
            base,
            end: base + frames * u64::from(FRAME_SIZE),
            free,
            lent: vec![FREE; self.sizes.frames as usize],
            next_serial: FREE + 1,
            sockets: 0,
            fill_reserved: 0,
        })
    }
}

/// A worker's slice of the UMEM: its frames, free pool and who holds each frame.
pub struct WorkerUmem {
    shared: Arc<SharedUmem>,
    /// Byte offsets of the slice in the area.
    base: u64,
    end: u64,
    free: Vec<u64>,
    /// Per frame of the slice: `HELD`, `FREE`, or the serial of the socket it is lent to.
    lent: Vec<u32>,
    next_serial: u32,
    /// Open sockets of this worker.
    sockets: u32,
    /// Frames its open sockets' fill rings may hold together: the sum of their depths (or of
    /// what they still hold, where that is more). Never above the budget except by the
    /// floors of ports opened while deepened ports held it (see [`XskPort::refill`]).
    fill_reserved: u32,
}

impl WorkerUmem {
    /// Asks the CPU to start loading the cache line at `addr` (a received frame's first bytes),
    /// so that the pipeline, which reads every frame's headers, does not stall on each one in
    /// turn: the kernel wrote the frame on the sending pod's core, so the line is never in this
    /// core's cache. A hint only: it neither reads nor writes memory as far as the program can
    /// tell.
    #[inline(always)]
    pub fn prefetch(&self, addr: u64) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let offset = addr.clamp(self.base, self.end.saturating_sub(1));
            // SAFETY: PREFETCHT0 never faults and has no architectural effect; the pointer
            // stays inside the UMEM mapping (clamped to this worker's slice) all the same,
            // and SSE, which the instruction belongs to, is part of the x86_64 baseline.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(
                    self.shared
                        .area
                        .ptr
                        .as_ptr()
                        .add(offset as usize)
                        .cast::<i8>(),
                );
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = addr;
    }

    /// The bytes of the frame holding `addr`, from `addr` to the end of its frame: a frame
    /// userspace holds (taken from the pool or from an rx ring). A frame lent to a socket
    /// (its fill, rx, tx or completion ring), which the kernel may be writing or reading, a
    /// frame in the free pool and an address outside this worker's slice give an empty slice.
    #[inline]
    pub fn frame_mut(&mut self, addr: u64) -> &mut [u8] {
        if addr < self.base || addr >= self.end || self.lent_to(addr) != HELD {
            return &mut [];
        }
        let frame = addr & !u64::from(FRAME_SIZE - 1);
        let end = (frame + u64::from(FRAME_SIZE)).min(self.end);
        let start = addr;
        // SAFETY: base <= start < end <= self.end: the range lies within this worker's slice,
        // which lies within the mapping, and inside one frame that userspace holds (`lent` is
        // HELD, checked above), so neither the kernel (a held frame is in no ring: every move
        // into a ring checks and changes `lent`) nor another worker (a slice has one owner,
        // `SharedUmem::worker`) writes it concurrently; `&mut self` makes this the only live
        // reference into the slice.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.shared.area.ptr.as_ptr().add(start as usize),
                (end - start) as usize,
            )
        }
    }

    /// Gives a held frame back to the pool. Anything else (a frame already free or lent to
    /// a socket, an address outside the slice) is left where it is, and false returned.
    #[inline]
    pub fn recycle(&mut self, addr: u64) -> bool {
        if !self.is_held(addr) {
            return false;
        }
        self.lend(addr, FREE);
        self.free.push(addr & !u64::from(FRAME_SIZE - 1));
        true
    }

    /// Takes a free frame, if any: userspace holds it from now on.
    #[inline]
    pub fn take_free(&mut self) -> Option<u64> {
        let addr = self.free.pop()?;
        self.lend(addr, HELD);
        Some(addr)
    }

    /// Whether `addr` lies in a frame of this slice that userspace holds.
    #[inline]
    fn is_held(&self, addr: u64) -> bool {
        addr >= self.base && addr < self.end && self.lent_to(addr) == HELD
    }

    /// Who holds the frame at `addr` (`HELD`: userspace, `FREE`: the pool). The caller
    /// checks the range.
    #[inline]
    fn lent_to(&self, addr: u64) -> u32 {
        let i = ((addr - self.base) / u64::from(FRAME_SIZE)) as usize;
        self.lent.get(i).copied().unwrap_or(u32::MAX)
    }

    #[inline]
    fn lend(&mut self, addr: u64, serial: u32) {
        let i = (addr.wrapping_sub(self.base) / u64::from(FRAME_SIZE)) as usize;
        if let Some(l) = self.lent.get_mut(i) {
            *l = serial;
        }
    }

    /// Returns to the pool every frame lent to the socket `closed` was, which is closed (so
    /// the kernel no longer writes them). Not per packet: a scan of the frame table. A socket
    /// of another worker's slice (or of another UMEM) reclaims nothing.
    pub fn reclaim(&mut self, closed: Closed) -> usize {
        if !Arc::ptr_eq(&closed.umem, &self.shared) || closed.base != self.base {
            return 0;
        }
        let mut n = 0;
        for (i, l) in self.lent.iter_mut().enumerate() {
            if *l == closed.serial {
                *l = FREE;
                self.free.push(self.base + i as u64 * u64::from(FRAME_SIZE));
                n += 1;
            }
        }
        n
    }

    /// The depth every port's fill ring keeps at least.
    pub fn fill_floor(&self) -> u32 {
        self.shared.sizes.fill_min
    }

    /// Frames this worker's fill rings may hold together now (the sum of their depths).
    pub fn fill_reserved(&self) -> u32 {
        self.fill_reserved
    }

    /// The most its fill rings may hold together.
    pub fn fill_budget(&self) -> u32 {
        self.shared.sizes.fill_budget()
    }

    /// Frames in the free pool right now.
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    /// Frames of this worker's slice.
    pub fn total_frames(&self) -> usize {
        self.lent.len()
    }

    /// Opens a socket on `ifindex`'s queue `queue` with this worker's slice as its UMEM and its
    /// own fill/completion and rx/tx rings, bound in `mode` (and for multi-buffer packets with
    /// `multi_buffer`: kernel 6.6 or later, and an `xdp.frags` program on the interface), and
    /// tops up its fill ring. With `tx_metadata` the registration asks for transmit metadata
    /// ([`TX_METADATA_LEN`], Linux 6.11 or later); a kernel that refuses it gets a socket
    /// without ([`XskPort::tx_metadata`] says which).
    pub fn open(
        &mut self,
        ifindex: u32,
        queue: u32,
        mode: BindMode,
        multi_buffer: bool,
        tx_metadata: bool,
    ) -> Result<XskPort, XskError> {
        let sizes = self.shared.sizes;
        if self.sockets >= sizes.ports_per_worker() {
            return Err(XskError::Full {
                ports: self.sockets,
                frames: sizes.frames,
                floor: sizes.fill_min,
            });
        }
        let err = |what| xdp_err(what, ifindex);
        let mut info = IfInfo::invalid();
        info.from_ifindex(ifindex)
            .map_err(err("interface lookup"))?;
        info.set_queue(queue);
        let cfg = UmemConfig {
            fill_size: sizes.ring,
            complete_size: sizes.ring,
            frame_size: FRAME_SIZE,
            headroom: 0,
            // Unaligned chunks: the kernel then keeps its per-frame buffer heads on a stack and
            // reuses the hottest, instead of one per frame indexed by address (a fill ring
            // 1300 frames deep walked through 1300 of them, about 128 bytes each, on the
            // sending pod's core). Frames stay FRAME_SIZE apart; received descriptors carry
            // the data's offset in their top bits (`plain_addr`).
            flags: libc::XDP_UMEM_UNALIGNED_CHUNK_FLAG,
            tx_metadata_len: 0,
        };
        let start = NonNull::new(
            self.shared
                .area
                .ptr
                .as_ptr()
                .wrapping_add(self.base as usize),
        )
        .ok_or(XskError::Slice(u32::MAX))?;
        let slice = NonNull::slice_from_raw_parts(start, (self.end - self.base) as usize);
        // SAFETY: `slice` is this worker's slice of the area, page-aligned (slices are whole
        // multiples of FRAME_SIZE frames, a multiple of the page size, from a page-aligned
        // mapping) and inside the mapping; the mapping is unmapped only when the last
        // `Arc<SharedUmem>` goes, and the port built below holds one, dropped after its socket
        // (field order), so the kernel never writes to unmapped memory.
        let register = |cfg: UmemConfig| unsafe { Umem::new(cfg, slice) };
        let (umem, tx_metadata) = if tx_metadata {
            let with = UmemConfig {
                flags: cfg.flags | libc::XDP_UMEM_TX_METADATA_LEN,
                tx_metadata_len: TX_METADATA_LEN,
                ..cfg.clone()
            };
            match register(with) {
                Ok(u) => (u, true),
                // A kernel before 6.11 knows no XDP_UMEM_TX_METADATA_LEN flag.
                Err(e) if e.get_raw() == libc::EINVAL => {
                    (register(cfg).map_err(err("UMEM registration"))?, false)
                }
                Err(e) => return Err(err("UMEM registration")(e)),
            }
        } else {
            (register(cfg).map_err(err("UMEM registration"))?, false)
        };
        let sock = Socket::with_shared(&info, &umem).map_err(err("socket"))?;
        let dev = umem.fq_cq(&sock).map_err(err("fill/completion rings"))?;
        let flags = match mode {
            BindMode::Copy => SocketConfig::XDP_BIND_COPY,
            BindMode::Auto => 0,
        };
        let user = umem
            .rx_tx(
                &sock,
                &SocketConfig {
                    rx_size: NonZeroU32::new(sizes.ring),
                    tx_size: NonZeroU32::new(sizes.ring),
                    bind_flags: SocketConfig::XDP_BIND_NEED_WAKEUP
                        | flags
                        | if multi_buffer { libc::XDP_USE_SG } else { 0 },
                },
            )
            .map_err(err("rx/tx rings"))?;
        let rx = user.map_rx().map_err(err("rx ring mmap"))?;
        let tx = user.map_tx().map_err(err("tx ring mmap"))?;
        // EBUSY while the queue's previous socket is still being released (`is_busy`);
        // EINVAL with `XDP_USE_SG` on a kernel before 6.6, which has no multi-buffer AF_XDP.
        umem.bind(&user).map_err(|e| {
            let what = if multi_buffer && e.get_raw() == libc::EINVAL {
                "bind (multi-buffer AF_XDP needs Linux 6.6 or later)"
            } else {
                "bind"
            };
            err(what)(e)
        })?;
        let fd = user.as_raw_fd();
        let serial = self.next_serial;
        self.next_serial = self.next_serial.wrapping_add(1).max(FREE + 1);
        self.sockets += 1;
        self.fill_reserved += sizes.fill_min;
        let mut port = XskPort {
            rx,
            tx,
            dev,
            _user: user,
            _sock: sock,
            _reg: umem,
            _umem: self.shared.clone(),
            serial,
            base: self.base,
            fd,
            ring: sizes.ring,
            multi_buffer,
            tx_metadata,
            tx_batch: Vec::with_capacity(sizes.ring as usize),
            carried: 0,
            kernel: XdpStatisticsV2::default(),
            depth: sizes.fill_min,
            reserved: sizes.fill_min,
            level: 0,
            drained: false,
            quiet: 0,
        };
        port.refill(self, 0);
        Ok(port)
    }
}

/// Frames the kernel dropped on a socket (from `XDP_STATISTICS`), since the last look.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KernelDrops {
    /// No frame in the fill ring for a received packet.
    pub no_fill_frame: u64,
    /// Dropped for another reason the kernel counts as `rx_dropped`: a frame larger than
    /// the room a UMEM frame has for it (`FRAME_SIZE` less the kernel's 256-byte headroom).
    pub too_large: u64,
    /// The rx ring was full.
    pub rx_ring_full: u64,
    /// Descriptors the kernel refused (invalid address or length): a bug if ever non-zero.
    pub invalid_desc: u64,
}

impl KernelDrops {
    pub fn total(&self) -> u64 {
        self.no_fill_frame + self.too_large + self.rx_ring_full + self.invalid_desc
    }
}

/// One AF_XDP socket bound to one queue of an interface, sharing its worker's UMEM.
pub struct XskPort {
    // Field order is drop order: rings and socket close before the UMEM reference goes.
    rx: RingRx,
    tx: RingTx,
    dev: DeviceQueue,
    _user: User,
    _sock: Socket,
    /// The socket's registration of its worker's slice.
    _reg: Umem,
    _umem: Arc<SharedUmem>,
    serial: u32,
    /// Its worker's slice (`WorkerUmem::base`).
    base: u64,
    fd: RawFd,
    ring: u32,
    /// Bound with `XDP_USE_SG`.
    multi_buffer: bool,
    /// Registered with transmit metadata ([`TX_METADATA_LEN`]).
    tx_metadata: bool,
    tx_batch: Vec<XdpDesc>,
    /// How many descriptors at the front of `tx_batch` are the rest of a packet whose first
    /// descriptors the kernel has (`flush`): they go next, whatever else waits.
    carried: usize,
    /// The kernel's statistics of this socket at the last look.
    kernel: XdpStatisticsV2,
    /// How deep the fill ring is kept: the floor, or `fill_per_port` (as far as the budget
    /// allows) once a burst drained it (see `refill`).
    depth: u32,
    /// What this port counts against its worker's fill budget: its depth, or the frames its
    /// fill ring still holds where that is more (after it went back to the floor).
    reserved: u32,
    /// Frames in the fill ring right after the last refill.
    level: u32,
    /// Whether a burst drained the ring since the last review, and how many reviews in a row
    /// found none.
    drained: bool,
    quiet: u8,
}

/// Proof that a socket is closed: what [`WorkerUmem::reclaim`] needs to take its frames back.
#[must_use = "the closed socket's frames come back only through WorkerUmem::reclaim"]
pub struct Closed {
    umem: Arc<SharedUmem>,
    serial: u32,
    base: u64,
}

impl std::fmt::Debug for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Closed(socket {})", self.serial)
    }
}

impl AsFd for XskPort {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: `self.fd` is the socket `_user` owns, open for as long as `self` lives; the
        // borrow cannot outlive `self`.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }
}

// SAFETY: the rings are !Send only because they hold raw pointers to their own mmap'd
// regions, and the registration because it holds the slice's pointer (which this module never
// reads through it); a port is used by its worker thread, and handed once to the reaper thread
// only to be dropped (closed) there.
unsafe impl Send for XskPort {}

impl XskPort {
    /// The socket fd (for the XSKMAP).
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Whether the socket is bound in zero-copy mode (the kernel's `XDP_OPTIONS`; one
    /// getsockopt, not per packet).
    pub fn zero_copy(&self) -> bool {
        let mut opts = libc::xdp_options { flags: 0 };
        let mut len = std::mem::size_of::<libc::xdp_options>() as libc::socklen_t;
        // SAFETY: `self.fd` is the socket `_user` owns, open for as long as `self` lives;
        // `opts` and `len` are valid for writes of the size passed, which is the option's.
        let r = unsafe {
            libc::getsockopt(
                self.fd,
                libc::SOL_XDP,
                libc::XDP_OPTIONS,
                (&raw mut opts).cast(),
                &mut len,
            )
        };
        r == 0 && opts.flags & libc::XDP_OPTIONS_ZEROCOPY != 0
    }

    /// Whether the kernel has unbound the socket from its interface (the interface was
    /// deleted: the kernel then reports `ENETDOWN` on the socket). One getsockopt.
    pub fn unbound(&self) -> bool {
        matches!(getsockopt(&self.as_fd(), sockopt::SocketError), Ok(e) if e != 0)
    }

    /// Closes the socket (the kernel unbinds it and stops using its rings before `close`
    /// returns; it may wait for an RCU grace period, so not on a forwarding thread). The
    /// frames still lent to it come back with [`WorkerUmem::reclaim`] of what this returns.
    pub fn close(self) -> Closed {
        let XskPort {
            rx,
            tx,
            dev,
            _user,
            _sock,
            _reg,
            _umem,
            serial,
            base,
            ..
        } = self;
        drop((rx, tx, dev, _user, _sock, _reg));
        Closed {
            umem: _umem,
            serial,
            base,
        }
    }

    /// Receives descriptors into `out`: at least `out.len() - MAX_CHAIN` when that many are
    /// there, and then on to the end of the packet the last one belongs to (the kernel
    /// publishes a packet's chain in one go), so that `out` ends on a whole packet. Returns how
    /// many were written; their frames are now held by the caller.
    #[inline]
    pub fn recv(&mut self, umem: &mut WorkerUmem, out: &mut [XdpDesc]) -> usize {
        let want = out.len().saturating_sub(MAX_CHAIN).max(1);
        let mut rx = self.rx.receive(out.len() as u32);
        let mut n = 0;
        while n < out.len() && (n < want || continues(&out[n - 1])) {
            match rx.read() {
                Some(d) => {
                    let d = XdpDesc {
                        addr: plain_addr(d.addr) + self.base,
                        ..d
                    };
                    if n < PREFETCH_AHEAD {
                        umem.prefetch(d.addr);
                    }
                    umem.lend(d.addr, HELD);
                    out[n] = d;
                    n += 1;
                }
                None => break,
            }
        }
        rx.release();
        n
    }

    /// Descriptors the tx ring can take now, this loop's batch included (what a generator
    /// may build without its frames being turned away).
    #[inline]
    pub fn tx_room(&self) -> u32 {
        self.ring
            .saturating_sub(self.tx.pending())
            .saturating_sub(self.tx_batch.len() as u32)
    }

    /// Queues one held frame for transmission in this loop's batch (committed by `flush`);
    /// the frame is the socket's from now on. When the batch is as large as the ring the
    /// frame goes back to the pool and false is returned; a frame userspace does not hold
    /// (free, lent to a socket, outside the slice) is not sent either.
    #[inline]
    pub fn send(&mut self, umem: &mut WorkerUmem, addr: u64, len: usize) -> bool {
        let Ok(len) = u32::try_from(len) else {
            umem.recycle(addr);
            return false;
        };
        self.queue(
            umem,
            &[XdpDesc {
                addr,
                len,
                options: 0,
            }],
            0,
        )
    }

    /// Queues one packet spanning the held frames of `chain` (each descriptor's address and
    /// length; the options are set here) for transmission in this loop's batch, all or
    /// nothing. A chain of more than one descriptor needs a multi-buffer socket, and at most
    /// [`MAX_CHAIN`] descriptors; when it cannot go (too long, no room left in the batch, a
    /// frame userspace does not hold) every frame of it that userspace holds goes back to the
    /// pool and false is returned.
    #[inline]
    pub fn send_chain(&mut self, umem: &mut WorkerUmem, chain: &[XdpDesc]) -> bool {
        self.queue(umem, chain, 0)
    }

    /// As [`XskPort::send_chain`], asking the kernel to complete the packet's transport
    /// checksum (`csum`), written into the metadata in front of the first buffer's data.
    /// Only for a socket with transmit metadata ([`XskPort::tx_metadata`]); on another, or when
    /// the request lies outside the first buffer, nothing is queued and false is returned, as
    /// for a chain that cannot go.
    #[inline]
    pub fn send_offloaded(
        &mut self,
        umem: &mut WorkerUmem,
        chain: &[XdpDesc],
        csum: ChecksumOffload,
    ) -> bool {
        let Some(head) = chain.first() else {
            return false;
        };
        // The kernel refuses a request reaching past the first buffer with EINVAL, leaving
        // the descriptor in the ring ("retry"): the socket's transmit would stall behind it.
        let inside = usize::from(csum.start) + usize::from(csum.offset) + 2 <= head.len as usize;
        let meta = head.addr.wrapping_sub(u64::from(TX_METADATA_LEN));
        // The metadata lies in the head's own frame (`fits_frame` keeps the room in front).
        let written = self.tx_metadata
            && inside
            && self.fits_frame(head.addr, u64::from(head.len))
            && match umem.frame_mut(meta).get_mut(..TX_METADATA_LEN as usize) {
                Some(m) => {
                    m[..8].copy_from_slice(&u64::from(libc::XDP_TXMD_FLAGS_CHECKSUM).to_ne_bytes());
                    m[8..10].copy_from_slice(&csum.start.to_ne_bytes());
                    m[10..12].copy_from_slice(&csum.offset.to_ne_bytes());
                    m[12..].fill(0);
                    true
                }
                None => false,
            };
        if !written {
            for d in chain {
                umem.recycle(d.addr);
            }
            return false;
        }
        self.queue(umem, chain, libc::XDP_TX_METADATA)
    }

    /// Whether `len` bytes at `addr` lie in one frame, behind the room the socket's transmit
    /// metadata takes in front of every descriptor's data (the kernel refuses a descriptor
    /// without it once the UMEM has metadata).
    #[inline]
    fn fits_frame(&self, addr: u64, len: u64) -> bool {
        let at = addr % u64::from(FRAME_SIZE);
        let front = if self.tx_metadata {
            u64::from(TX_METADATA_LEN)
        } else {
            0
        };
        at >= front && len <= u64::from(FRAME_SIZE) - at
    }

    /// Queues the packet in `chain` all or nothing, `first` among its first descriptor's
    /// options (see [`XskPort::send_chain`]).
    #[inline]
    fn queue(&mut self, umem: &mut WorkerUmem, chain: &[XdpDesc], first: u32) -> bool {
        let fits = !chain.is_empty()
            && (chain.len() == 1 || self.multi_buffer)
            && chain.len() <= MAX_CHAIN
            && self.tx_batch.len() + chain.len() <= self.ring as usize
            && chain
                .iter()
                .all(|d| umem.is_held(d.addr) && self.fits_frame(d.addr, u64::from(d.len)));
        if !fits {
            for d in chain {
                umem.recycle(d.addr);
            }
            return false;
        }
        let last = chain.len() - 1;
        for (i, d) in chain.iter().enumerate() {
            umem.lend(d.addr, self.serial);
            self.tx_batch.push(XdpDesc {
                addr: d.addr,
                len: d.len,
                options: if i < last { PKT_CONTD } else { 0 } | if i == 0 { first } else { 0 },
            });
        }
        true
    }

    /// Whether the socket was registered with transmit metadata, so that
    /// [`XskPort::send_offloaded`] can ask for checksum offload (Linux 6.11 or later).
    pub fn tx_metadata(&self) -> bool {
        self.tx_metadata
    }

    /// Whether the socket was bound for multi-buffer packets (`XDP_USE_SG`): it receives a
    /// packet larger than a frame as a chain, and sends chains.
    pub fn multi_buffer(&self) -> bool {
        self.multi_buffer
    }

    /// Commits the batch to the tx ring in one go and kicks the kernel (copy mode needs a
    /// sendto; one sends at most 32 frames, the kernel's TX_BATCH_SIZE), reaps completions
    /// into the pool and tops up the fill ring.
    #[inline]
    pub fn flush(&mut self, umem: &mut WorkerUmem) -> Flushed {
        let mut out = Flushed::default();
        if !self.tx_batch.is_empty() {
            let n = self.tx_batch.len() as u32;
            // xdpilone's reservation serves a request from its cached view of the kernel's
            // consumer head whenever that shows at least one free slot, so one call may get
            // fewer slots than the ring has; a call after one that took every slot it got
            // refreshes the view. So the first takes all it gets, even part of a packet.
            let mut sent = 0;
            for _ in 0..2 {
                let mut w = self.tx.transmit(n - sent);
                let base = self.base;
                let k = w.insert(self.tx_batch[sent as usize..].iter().map(|d| XdpDesc {
                    addr: d.addr - base,
                    ..*d
                }));
                w.commit();
                sent += k;
                if sent == n || k == 0 {
                    break;
                }
            }
            // A packet whose first descriptors went in must follow whole: the kernel joins
            // the next descriptors it gets to them. Its rest stays for the next flush, ahead
            // of anything else; whole packets that did not fit are dropped.
            // The rest an earlier flush kept is the kernel's to finish even when nothing
            // went in this time.
            let mut keep = (sent as usize).max(self.carried);
            if keep > 0 && continues(&self.tx_batch[keep - 1]) {
                while keep < n as usize && continues(&self.tx_batch[keep]) {
                    keep += 1;
                }
                keep = (keep + 1).min(n as usize);
            }
            for d in &self.tx_batch[..sent as usize] {
                out.bytes += u64::from(d.len);
                out.packets += u64::from(!continues(d));
                out.offloaded += u64::from(d.options & libc::XDP_TX_METADATA != 0);
            }
            for d in &self.tx_batch[keep..] {
                out.dropped += u64::from(!continues(d));
                umem.lend(d.addr, HELD);
                umem.recycle(d.addr);
            }
            self.tx_batch.truncate(keep);
            self.tx_batch.drain(..sent as usize);
            self.carried = self.tx_batch.len();
        }
        // The pod answers what this kick delivers inside the kick itself (veth runs the
        // receiver inline): ACKs for data, or the segments that ACKs release. Room for twice
        // what goes out is put in the fill ring first, as far as the budget allows.
        let out_now = self.tx.pending().min(MAX_KICKS * KERNEL_TX_BATCH);
        if out_now > 0 {
            self.refill(umem, 2 * out_now);
        }
        let mut kicks = 0;
        while kicks < MAX_KICKS && self.tx.pending() > 0 && self.tx.needs_wakeup() {
            self.tx.wake();
            kicks += 1;
        }
        {
            let mut c = self.dev.complete(self.ring);
            while let Some(addr) = c.read() {
                let addr = addr + self.base;
                umem.lend(addr, HELD);
                umem.recycle(addr);
            }
            c.release();
        }
        self.refill(umem, 0);
        out
    }

    /// Tops the fill ring up to its depth. Every port keeps the floor however little it
    /// receives, and no more until it shows that it receives in bursts: a pod's TCP stack
    /// answers the ACKs stromd delivers at once, inside stromd's own transmit call (veth runs
    /// the receiver inline), so a burst of segments lands before stromd can refill. When a
    /// quarter of the floor or more drained since the last refill, the port is deepened at once
    /// to [`GROW_MARGIN`] times that burst, at least twice as deep if it drained to nothing
    /// (at most `fill_per_port`, and what the budget has left): slow start's next burst, twice
    /// as large, then fits. It goes back to the floor after `QUIET_REVIEWS` reviews without such a
    /// burst ([`XskPort::review`]); the frames above the floor then come back as it receives.
    ///
    /// Frames in an idle port's fill ring stay there until the pod sends, so the depths are
    /// what keeps frames for every port: the floor is counted for every open port, the budget
    /// bounds the deepened ones, and a port opened while the budget is taken still gets its
    /// floor from the part of the pool the budget leaves out.
    fn refill(&mut self, umem: &mut WorkerUmem, ahead: u32) {
        let queued = self.dev.pending();
        let drained = self.level.saturating_sub(queued);
        let floor = umem.shared.sizes.fill_min;
        let max = umem.shared.sizes.fill;
        if drained >= (floor / GROW_AT_FLOOR_DIV).max(1) {
            self.drained = true;
            // Four times the burst; a ring that drained to nothing may have dropped what did
            // not fit (the drain undercounts the burst): at least twice its depth.
            let mut want = drained
                .saturating_mul(GROW_MARGIN)
                .checked_next_power_of_two()
                .unwrap_or(max);
            if queued == 0 {
                want = want.max(self.depth.saturating_mul(2));
            }
            let want = want.min(max);
            if want > self.depth {
                let depth = want.min(self.room(umem)).max(self.depth);
                self.set_reserved(umem, depth.max(queued));
                self.depth = depth;
            }
        } else if self.reserved > self.depth && queued < self.reserved {
            // Back at the floor, or past a kick's room: what was drained no longer counts
            // against the budget.
            self.set_reserved(umem, self.depth.max(queued));
        }
        let mut target = self.depth;
        if ahead > 0 {
            // Room for `ahead` frames in all, not on top of what the ring holds: a port that
            // only receives (its frames stay in the ring until its pod sends) must not grow
            // its ring by every kick.
            let want = ahead.min(max).max(self.depth);
            if want > self.reserved {
                let r = want.min(self.room(umem)).max(self.reserved);
                self.set_reserved(umem, r);
            }
            target = want.min(self.reserved);
        }
        let spare = umem.free.len().saturating_sub(RESERVE) as u32;
        let want = target.saturating_sub(queued).min(spare);
        if want == 0 {
            self.level = queued;
            return;
        }
        // Two reservations at most, for the same reason as in `flush`.
        let mut given = 0;
        for _ in 0..2 {
            let mut w = self.dev.fill(want - given);
            let before = given;
            while let Some(&addr) = umem.free.last() {
                if !w.insert_once(addr - self.base) {
                    break;
                }
                umem.free.pop();
                umem.lend(addr, self.serial);
                given += 1;
            }
            w.commit();
            if given == want || given == before {
                break;
            }
        }
        self.level = queued + given;
        if self.dev.needs_wakeup() {
            self.dev.wake();
        }
    }

    /// The most this port may count against the budget, the others' share left as it is.
    fn room(&self, umem: &WorkerUmem) -> u32 {
        let others = umem.fill_reserved - self.reserved;
        umem.fill_budget().saturating_sub(others)
    }

    fn set_reserved(&mut self, umem: &mut WorkerUmem, reserved: u32) {
        umem.fill_reserved = umem.fill_reserved - self.reserved + reserved;
        self.reserved = reserved;
    }

    /// Called about once a second: a port deepened for bursts that has seen none for
    /// `QUIET_REVIEWS` reviews goes back to the floor.
    pub fn review(&mut self, umem: &mut WorkerUmem) {
        if std::mem::take(&mut self.drained) {
            self.quiet = 0;
            return;
        }
        self.quiet = self.quiet.saturating_add(1);
        let floor = umem.shared.sizes.fill_min;
        if self.quiet >= QUIET_REVIEWS && self.depth > floor {
            self.depth = floor;
            let queued = self.dev.pending();
            self.set_reserved(umem, floor.max(queued));
        }
    }

    /// How deep the fill ring is kept now.
    pub fn fill_depth(&self) -> u32 {
        self.depth
    }

    /// Frames in the fill ring the kernel has not used yet.
    pub fn fill_queued(&self) -> u32 {
        self.dev.pending()
    }

    /// What the kernel dropped on this socket since the last call (one getsockopt; called
    /// every so many loops and before the port closes, not per packet).
    pub fn kernel_drops(&mut self) -> KernelDrops {
        let Ok(now) = self._user.statistics_v2() else {
            return KernelDrops::default();
        };
        let was = self.kernel;
        self.kernel = now;
        // rx_dropped counts both a frame with no fill frame to take it and one too large for
        // a frame; the fill ring's own count of empty looks tells the first apart.
        let dropped = now.rx_dropped.saturating_sub(was.rx_dropped);
        let no_fill = now
            .rx_fill_ring_empty_descs
            .saturating_sub(was.rx_fill_ring_empty_descs)
            .min(dropped);
        KernelDrops {
            no_fill_frame: no_fill,
            too_large: dropped - no_fill,
            rx_ring_full: now.rx_ring_full.saturating_sub(was.rx_ring_full),
            invalid_desc: (now.rx_invalid_descs + now.tx_invalid_descs)
                .saturating_sub(was.rx_invalid_descs + was.tx_invalid_descs),
        }
    }

    /// Before the port is closed: hands the frames of this loop's unsent batch back to the
    /// pool (they are held by userspace, not lent to the socket) and the port's share of the
    /// fill budget back to the worker (the frames lent to the socket come back once the kernel
    /// has closed it, [`WorkerUmem::reclaim`]).
    pub fn retire(&mut self, umem: &mut WorkerUmem) {
        for d in self.tx_batch.drain(..) {
            umem.lend(d.addr, HELD);
            umem.recycle(d.addr);
        }
        self.carried = 0;
        self.set_reserved(umem, 0);
        umem.sockets = umem.sockets.saturating_sub(1);
    }
}

/// An eventfd that wakes a sleeping worker (hand-offs and commands).
pub struct Waker {
    fd: RawFd,
}

impl Waker {
    /// Creates a non-blocking eventfd.
    pub fn new() -> Result<Self, XskError> {
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(XskError::EventFd(std::io::Error::last_os_error()));
        }
        Ok(Waker { fd })
    }

    /// Wakes the worker (one write; cheap when it is already awake: the caller checks first).
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        let _ = unsafe { libc::write(self.fd, (&one as *const u64).cast(), 8) };
    }

    /// Consumes pending wake-ups.
    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our own non-blocking eventfd.
        let _ = unsafe { libc::read(self.fd, (&mut v as *mut u64).cast(), 8) };
    }

    /// The fd, for polling.
    pub fn fd(&self) -> RawFd {
        self.fd
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        // SAFETY: closes the eventfd this value owns, exactly once.
        unsafe {
            libc::close(self.fd);
        }
    }
}

/// The fds a sleeping worker waits on (its sockets and its waker), rebuilt when ports change.
#[derive(Default)]
pub struct PollSet(Vec<libc::pollfd>);

impl PollSet {
    /// Replaces the set (allocates: call on port changes, never per packet).
    pub fn set(&mut self, fds: impl IntoIterator<Item = RawFd>) {
        self.0.clear();
        self.0.extend(fds.into_iter().map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }));
    }

    /// Sleeps until one fd is readable or `timeout_ms` passes (adaptive poll mode).
    pub fn wait(&mut self, timeout_ms: i32) {
        // SAFETY: the pointer and length describe our own initialized Vec for the whole call.
        let _ = unsafe {
            libc::poll(
                self.0.as_mut_ptr(),
                self.0.len() as libc::nfds_t,
                timeout_ms,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::{SharedUmem, XskSizes, FRAME_SIZE};

    /// `frame_mut` gives the bytes of a frame userspace holds, and nothing for a frame lent to
    /// a socket (the kernel may be writing it), a free one, or an address outside the worker's
    /// slice; a frame goes back to the pool once, and a slice has one owner.
    #[test]
    fn only_a_held_frame_gives_bytes_and_each_frame_is_in_one_place() {
        let sizes = XskSizes {
            frames: 1024,
            ring: 256,
            fill: 256,
            fill_min: 32,
        };
        let shared = SharedUmem::new(sizes, 2).expect("the frames mapped");
        let mut w0 = shared.worker(0).expect("slice 0");
        let mut w1 = shared.worker(1).expect("slice 1");
        assert!(shared.worker(0).is_err(), "slice 0 handed out twice");
        assert!(shared.worker(2).is_err(), "a slice beyond the UMEM");
        let a = w0.take_free().expect("a free frame");
        assert_eq!(w0.frame_mut(a).len(), FRAME_SIZE as usize);
        assert_eq!(w0.frame_mut(a + 100).len(), FRAME_SIZE as usize - 100);
        // Lent to a socket (as the fill and tx rings do): no bytes, and not recycled.
        w0.lend(a, 7);
        assert!(w0.frame_mut(a).is_empty());
        assert!(!w0.recycle(a));
        w0.lend(a, super::HELD);
        assert!(!w0.frame_mut(a).is_empty());
        // Back in the pool: no bytes, and a second recycle is refused.
        let free = w0.free_frames();
        assert!(w0.recycle(a));
        assert!(w0.frame_mut(a).is_empty());
        assert!(!w0.recycle(a));
        assert_eq!(w0.free_frames(), free + 1);
        // Another worker's frame, or beyond the UMEM: no bytes, not recycled.
        let b = w1.take_free().expect("a free frame of worker 1");
        assert!(w0.frame_mut(b).is_empty());
        assert!(!w0.recycle(b));
        assert!(w1.frame_mut(a).is_empty());
        assert!(w0.frame_mut(u64::MAX).is_empty());
        assert!(!w0.recycle(u64::MAX));
    }

    #[test]
    fn a_packet_is_the_chain_up_to_its_first_descriptor_not_continued() {
        use super::{packet_len, XdpDesc, MAX_CHAIN, PKT_CONTD};
        let d = |contd: bool| XdpDesc {
            addr: 0,
            len: 3840,
            options: if contd { PKT_CONTD } else { 0 },
        };
        assert_eq!(packet_len(&[d(false), d(true), d(false)]), Some(1));
        assert_eq!(packet_len(&[d(true), d(true), d(false), d(false)]), Some(3));
        // Cut short: the caller drops it whole (`chain_broken`), never forwards a part.
        assert_eq!(packet_len(&[d(true), d(true)]), None);
        assert_eq!(packet_len(&[]), None);
        // Longer than the kernel sends as one packet: the caller drops it by name.
        let mut long = vec![d(true); MAX_CHAIN];
        long.push(d(false));
        assert_eq!(packet_len(&long), Some(MAX_CHAIN + 1));
    }

    #[test]
    fn a_received_address_becomes_a_plain_umem_offset() {
        // Chunk at 0x2800 (frame 5), data 256 bytes in: as the kernel writes it, and as is.
        assert_eq!(super::plain_addr((256 << 48) | 0x2800), 0x2900);
        assert_eq!(super::plain_addr(0x2900), 0x2900);
    }

    #[test]
    fn the_default_pool_keeps_a_floor_for_110_pods_and_deepens_one_to_the_ring() {
        let s = XskSizes::default();
        // (8192 - 256) / 4 * 3 = 5952 frames for the fill rings together.
        assert_eq!(s.fill_budget(), 5952);
        assert!(s.ports_per_worker() >= 110, "{}", s.ports_per_worker());
        // 110 floors leave room for one port deepened to fill_per_port.
        assert!(110 * s.fill_min + (s.fill - s.fill_min) <= s.fill_budget());
        // A pool too small for even one floor serves no port.
        let tiny = XskSizes { frames: 256, ..s };
        assert_eq!(tiny.ports_per_worker(), 0);
    }
}
