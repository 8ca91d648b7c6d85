//! AF_XDP I/O: one UMEM and one socket per port (interface, queue 0), built on xdpilone.
//!
//! This module and [`crate::bpf`] are the only places with `unsafe`.
//!
//! Why one UMEM per port rather than one per worker: pod veths come and go under traffic, and
//! a shared UMEM must stay bound to a device for the life of the worker (the kernel refuses a
//! shared bind once the owning socket's device is gone). With a UMEM per port, removing a port
//! frees exactly its memory and no frame can be stranded in another port's rings. veth only
//! supports copy mode, so the kernel copies every frame in and out anyway; forwarding between
//! two ports costs one extra `memcpy` of the frame in userspace (measured in BENCHMARKS.md).
#![allow(unsafe_code)]

use std::num::NonZeroU32;
use std::os::fd::RawFd;
use std::ptr::NonNull;

use xdpilone::xdp::XdpDesc;
use xdpilone::{DeviceQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem, UmemConfig, User};

/// Size of one UMEM frame. A frame holds one packet (no multi-buffer): MTU + 14 must fit.
pub const FRAME_SIZE: u32 = 2048;
/// Most sendto kicks per port per loop.
const MAX_KICKS: u32 = 8;

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
    #[error("eventfd or thread: {0}")]
    EventFd(std::io::Error),
}

impl XskError {
    /// The queue still belongs to a socket the kernel is releasing (it does so in deferred
    /// work after close): the same bind succeeds a few milliseconds later.
    pub fn is_busy(&self) -> bool {
        matches!(self, XskError::Xdp { raw, .. } if *raw == libc::EBUSY)
    }
}

/// Sizes of a port's UMEM and rings.
#[derive(Debug, Clone, Copy)]
pub struct XskSizes {
    /// Frames in the UMEM (a power of two).
    pub frames: u32,
    /// Entries in each of the fill, completion, rx and tx rings (a power of two).
    pub ring: u32,
}

impl Default for XskSizes {
    fn default() -> Self {
        XskSizes {
            frames: 2048,
            ring: 512,
        }
    }
}

/// What one `flush` put on the wire.
#[derive(Debug, Default, Clone, Copy)]
pub struct Flushed {
    /// Frames committed to the tx ring, and their bytes.
    pub packets: u64,
    pub bytes: u64,
    /// Frames that did not fit the tx ring (recycled).
    pub dropped: u64,
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
        // SAFETY: `ptr`/`len` are exactly the mapping made in `Area::new`; every socket that
        // registered it as UMEM has been closed before (see field order of `XskPort`).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

// SAFETY: the area is plain memory owned by one `XskPort`; the port is moved to its worker
// thread once and only that thread touches it afterwards.
unsafe impl Send for Area {}

/// One AF_XDP socket with its own UMEM, bound to queue 0 of an interface.
///
/// Frame ownership: a frame address is in exactly one place at a time: `free`, the fill ring,
/// the rx ring, the tx ring or the completion ring. Userspace may touch a frame's bytes only
/// while it holds the address (taken from `free`, rx or completion, not yet given back).
pub struct XskPort {
    // Field order is drop order: rings and sockets close before the UMEM area is unmapped.
    rx: RingRx,
    tx: RingTx,
    dev: DeviceQueue,
    _user: User,
    _sock: Socket,
    umem: Umem,
    area: Area,
    free: Vec<u64>,
    ring: u32,
    fd: RawFd,
    tx_batch: Vec<XdpDesc>,
}

// SAFETY: xdpilone's `Umem` is !Send only because it holds a raw pointer to the area; the port
// owns that area and is used by one thread at a time (built on its worker thread and never
// shared).
unsafe impl Send for XskPort {}

impl XskPort {
    /// Creates the UMEM and socket and binds it to `ifindex` queue 0 (copy mode, need_wakeup).
    pub fn open(ifindex: u32, sizes: XskSizes) -> Result<Self, XskError> {
        let err = |what: &'static str| {
            move |e: xdpilone::Errno| XskError::Xdp {
                what,
                ifindex,
                errno: e.to_string(),
                raw: e.get_raw(),
            }
        };
        let len = (sizes.frames * FRAME_SIZE) as usize;
        let area = Area::new(len)?;
        let cfg = UmemConfig {
            fill_size: sizes.ring,
            complete_size: sizes.ring,
            frame_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
        };
        let slice = NonNull::slice_from_raw_parts(area.ptr, area.len);
        // SAFETY: `slice` is a page-aligned private mapping that lives in `self.area`, which is
        // dropped after every socket using it (field order), so the kernel never writes to
        // unmapped memory.
        let umem = unsafe { Umem::new(cfg, slice) }.map_err(err("UMEM registration"))?;
        let mut info = IfInfo::invalid();
        info.from_ifindex(ifindex)
            .map_err(err("interface lookup"))?;
        info.set_queue(0);
        let sock = Socket::with_shared(&info, &umem).map_err(err("socket"))?;
        let dev = umem.fq_cq(&sock).map_err(err("fill/completion rings"))?;
        let user = umem
            .rx_tx(
                &sock,
                &SocketConfig {
                    rx_size: NonZeroU32::new(sizes.ring),
                    tx_size: NonZeroU32::new(sizes.ring),
                    bind_flags: SocketConfig::XDP_BIND_NEED_WAKEUP | SocketConfig::XDP_BIND_COPY,
                },
            )
            .map_err(err("rx/tx rings"))?;
        let rx = user.map_rx().map_err(err("rx ring mmap"))?;
        let tx = user.map_tx().map_err(err("tx ring mmap"))?;
        umem.bind(&user).map_err(err("bind"))?;
        let fd = user.as_raw_fd();
        let free = (0..u64::from(sizes.frames))
            .map(|i| i * u64::from(FRAME_SIZE))
            .collect();
        let mut port = XskPort {
            rx,
            tx,
            dev,
            _user: user,
            _sock: sock,
            umem,
            area,
            free,
            ring: sizes.ring,
            fd,
            tx_batch: Vec::with_capacity(sizes.ring as usize),
        };
        port.refill();
        Ok(port)
    }

    /// The socket fd (for the XSKMAP).
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// The bytes of the frame holding `addr`, from `addr` to the end of its frame.
    /// The caller must hold `addr` (see the ownership rule on [`XskPort`]).
    #[inline]
    pub fn frame_mut(&mut self, addr: u64) -> &mut [u8] {
        let base = addr & !u64::from(FRAME_SIZE - 1);
        let end = (base + u64::from(FRAME_SIZE)).min(self.area.len as u64);
        let start = addr.min(end);
        // SAFETY: start..end lies within the mapping (clamped to its length) and inside one
        // frame that userspace currently holds, so the kernel does not write it concurrently;
        // `&mut self` makes this the only live reference into the area.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.area.ptr.as_ptr().add(start as usize),
                (end - start) as usize,
            )
        }
    }

    /// Receives up to `out.len()` descriptors. Returns how many were written.
    #[inline]
    pub fn recv(&mut self, out: &mut [XdpDesc]) -> usize {
        let mut rx = self.rx.receive(out.len() as u32);
        let mut n = 0;
        while n < out.len() {
            match rx.read() {
                Some(d) => {
                    out[n] = d;
                    n += 1;
                }
                None => break,
            }
        }
        rx.release();
        n
    }

    /// Gives a frame back to the free pool.
    #[inline]
    pub fn recycle(&mut self, addr: u64) {
        self.free.push(addr & !u64::from(FRAME_SIZE - 1));
    }

    /// Takes a free frame for transmission, if any.
    #[inline]
    pub fn take_free(&mut self) -> Option<u64> {
        self.free.pop()
    }

    /// Queues one frame for transmission in this loop's batch (committed by `flush`). When the
    /// batch is as large as the ring the frame is recycled and false returned.
    #[inline]
    pub fn send(&mut self, addr: u64, len: usize) -> bool {
        if self.tx_batch.len() >= self.ring as usize {
            self.recycle(addr);
            return false;
        }
        self.tx_batch.push(XdpDesc {
            addr,
            len: len as u32,
            options: 0,
        });
        true
    }

    /// Commits the batch to the tx ring in one go and kicks the kernel (copy mode needs a
    /// sendto; one sends at most 32 frames, the kernel's TX_BATCH_SIZE), reaps completions
    /// into the free pool and tops up the fill ring.
    #[inline]
    pub fn flush(&mut self) -> Flushed {
        let mut out = Flushed::default();
        if !self.tx_batch.is_empty() {
            let n = self.tx_batch.len() as u32;
            let sent = {
                let mut w = self.tx.transmit(n);
                let sent = w.insert(self.tx_batch.iter().copied());
                w.commit();
                sent
            };
            out.packets = u64::from(sent);
            out.bytes = self.tx_batch[..sent as usize]
                .iter()
                .map(|d| u64::from(d.len))
                .sum();
            out.dropped = u64::from(n - sent);
            for d in self.tx_batch.drain(sent as usize..) {
                self.free.push(d.addr & !u64::from(FRAME_SIZE - 1));
            }
            self.tx_batch.clear();
        }
        let mut kicks = 0;
        while kicks < MAX_KICKS && self.tx.pending() > 0 && self.tx.needs_wakeup() {
            self.tx.wake();
            kicks += 1;
        }
        {
            let mut c = self.dev.complete(self.ring);
            while let Some(addr) = c.read() {
                self.free.push(addr & !u64::from(FRAME_SIZE - 1));
            }
            c.release();
        }
        self.refill();
        out
    }

    fn refill(&mut self) {
        let want = (self.ring - self.dev.pending().min(self.ring)).min(self.free.len() as u32);
        if want == 0 {
            return;
        }
        {
            let mut w = self.dev.fill(want);
            while let Some(&addr) = self.free.last() {
                if !w.insert_once(addr) {
                    break;
                }
                self.free.pop();
            }
            w.commit();
        }
        if self.dev.needs_wakeup() {
            self.dev.wake();
        }
    }

    /// Frames held by userspace right now (free pool); the rest are in the rings.
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    /// Number of frames the UMEM has.
    pub fn total_frames(&self) -> u32 {
        self.umem.len_frames()
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
