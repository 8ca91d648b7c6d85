//! Loads strom's XDP programs (bpf/strom.c, compiled by build.rs) with aya, attaches them, and
//! keeps their maps in sync.
//!
//! Fail closed across restarts: with a pin directory (on bpffs), each attachment's link is
//! pinned there as `IFINDEX-MODE`, so the program stays attached while stromd is stopped or
//! killed: a pod's frames for other pods or the outside then find no socket and are dropped,
//! whatever the node's `ip_forward`. A starting stromd takes each pinned link back and swaps
//! its own program in atomically (`bpf_link_update`); [`XdpPrograms::detach`] unpins (the
//! program comes off), and pins of interfaces that are gone are removed at load. Without a pin
//! directory, a link lives as long as stromd's file descriptor.
//!
//! aya is used rather than libbpf-rs: xsk-rs pins an older libbpf-sys, aya is pure Rust and
//! builds without a C toolchain beyond the clang that compiles the program (docs/design.md).
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, PerCpuArray, XskMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::{XdpLink, XdpLinkId};
use aya::programs::{Xdp, XdpMode};
use aya::Ebpf;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/strom.bpf.o"));

/// Which program an interface gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A pod's host-side veth: everything but the node's own traffic goes to stromd.
    Pod,
    /// The node's uplink: only what stromd owns goes to stromd.
    Uplink,
}

impl Role {
    const fn program(self) -> &'static str {
        match self {
            Role::Pod => "strom_pod",
            Role::Uplink => "strom_uplink",
        }
    }
}

/// Errors of the BPF layer.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {0}: {1}")]
    Program(&'static str, #[source] aya::programs::ProgramError),
    #[error("map {0}: {1}")]
    Map(&'static str, aya::maps::MapError),
    #[error("map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("attaching XDP to ifindex {ifindex}: native: {native}; generic: {generic}")]
    Attach {
        ifindex: u32,
        native: String,
        generic: String,
    },
    #[error("pinning the link of ifindex {0} at {1}: {2}")]
    Pin(u32, PathBuf, String),
    #[error("bpffs at {0}: {1}")]
    Bpffs(PathBuf, String),
    #[error("cgroup {0}: {1}")]
    Cgroup(PathBuf, String),
}

/// Drop reasons counted by the XDP programs (`xdp_drops` in strom.c, same order).
pub const XDP_DROP_REASONS: [&str; 2] = [
    // A pod's frame for the node (or an ARP for it) from a MAC or address not the pod's.
    "xdp_spoofed_to_node",
    // A frame for stromd on an interface whose socket stromd has not bound yet.
    "xdp_no_socket",
];

/// Most IPv4 addresses per pod the programs check a pod's node-bound frames against.
pub const POD_SRC_IPS: usize = 4;

/// Value of `pod_src`: `struct pod_src` in strom.c.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct PodSrc {
    mac: [u8; 6],
    n_ips: u16,
    ips: [u32; POD_SRC_IPS],
}

// SAFETY: `PodSrc` is `repr(C)`: 6 bytes, a u16 and four u32s, 24 bytes with no padding,
// valid for any bit pattern.
unsafe impl aya::Pod for PodSrc {}

/// An attachment stromd made: the role, aya's id of the link, the mode, and where it is
/// pinned (if it is).
struct Attached {
    role: Role,
    id: XdpLinkId,
    mode: &'static str,
    pin: Option<PathBuf>,
}

/// The magic number of bpffs (`statfs`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Key of `port_slot`: `struct port_key` in strom.c.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct PortKey {
    ifindex: u32,
    queue: u32,
}

// SAFETY: `PortKey` is `repr(C)`, two `u32`s with no padding, valid for any bit pattern: what
// aya's `Pod` requires to copy it to and from a map.
unsafe impl aya::Pod for PortKey {}

/// Entries of `slot0` in strom.c: queue 0 of interfaces with a smaller ifindex finds its slot
/// there without a hash lookup.
const SLOT0_ENTRIES: u32 = 65536;

/// Value of `pod_net`: `struct v4_net` in strom.c (network byte order).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct V4Net {
    addr: u32,
    mask: u32,
}

// SAFETY: `V4Net` is `repr(C)`, two `u32`s with no padding, valid for any bit pattern.
unsafe impl aya::Pod for V4Net {}

/// Key of `node_ports`: `struct l4_port` in strom.c (port in network byte order).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct L4Port {
    port: u16,
    proto: u8,
    pad: u8,
}

// SAFETY: `L4Port` is `repr(C)`, a `u16` and two `u8`s with no padding, valid for any bit
// pattern.
unsafe impl aya::Pod for L4Port {}

/// Value of `snat_ports`: `struct port_range` in strom.c (host byte order).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct PortRange {
    lo: u16,
    hi: u16,
}

// SAFETY: `PortRange` is `repr(C)`, two `u16`s with no padding, valid for any bit pattern.
unsafe impl aya::Pod for PortRange {}

/// Words of `echo_ids` in strom.c: a bit for every ICMP echo identifier.
const ECHO_ID_WORDS: usize = 1024;

/// The ICMP echo identifiers stromd masquerades pods' pings to (`echo_ids` in strom.c), a bit
/// each, written by the workers through a shared mapping of the map (no syscall): the uplink
/// program hands stromd the echo replies to the node that carry one.
pub struct EchoIds {
    words: NonNull<AtomicU64>,
}

// SAFETY: `EchoIds` only hands out atomic operations on memory it maps for its whole life;
// any thread may do them.
unsafe impl Send for EchoIds {}
// SAFETY: as for `Send`: every access is atomic.
unsafe impl Sync for EchoIds {}

impl EchoIds {
    fn word(&self, id: u16) -> (&AtomicU64, u64) {
        let i = usize::from(id) / 64;
        // SAFETY: `i` < 65536 / 64 = ECHO_ID_WORDS, so the pointer stays inside the mapping
        // of ECHO_ID_WORDS u64s made in `XdpPrograms::echo_ids`, which lives as long as
        // `self`; AtomicU64 has u64's size and alignment (the mapping is page-aligned), and
        // the memory is only ever accessed atomically (the BPF program reads whole aligned
        // words, which x86-64 and arm64 load in one access).
        let w = unsafe { &*self.words.as_ptr().add(i) };
        (w, 1 << (id % 64))
    }

    /// Marks `id` as stromd's.
    pub fn set(&self, id: u16) {
        let (w, bit) = self.word(id);
        w.fetch_or(bit, Ordering::Relaxed);
    }

    /// Gives `id` back to the kernel.
    pub fn clear(&self, id: u16) {
        let (w, bit) = self.word(id);
        w.fetch_and(!bit, Ordering::Relaxed);
    }

    pub fn is_set(&self, id: u16) -> bool {
        let (w, bit) = self.word(id);
        w.load(Ordering::Relaxed) & bit != 0
    }
}

impl Drop for EchoIds {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `XdpPrograms::echo_ids`, of this length, unmapped once
        // (no reference into it outlives `self`).
        unsafe {
            libc::munmap(
                self.words.as_ptr().cast(),
                ECHO_ID_WORDS * std::mem::size_of::<u64>(),
            );
        }
    }
}

/// The loaded object and the attachments stromd made, by ifindex.
pub struct XdpPrograms {
    ebpf: Ebpf,
    links: HashMap<u32, Attached>,
    pin_dir: Option<PathBuf>,
    /// Attach the pods' program in generic mode rather than native (`set_pod_generic`).
    pod_generic: bool,
}

/// Makes sure `dir` is a directory on bpffs: mounts bpffs on `/sys/fs/bpf` when `dir` lies
/// under it and nothing is mounted there yet (as systemd does on most distributions).
fn ensure_bpffs(dir: &Path) -> Result<(), BpfError> {
    let err = |e: String| BpfError::Bpffs(dir.to_path_buf(), e);
    // The magic's C type (`__fsword_t`) differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    let is_bpffs = |p: &Path| {
        nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC)
    };
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && !is_bpffs(root) {
        std::fs::create_dir_all(root).map_err(|e| err(e.to_string()))?;
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| err(format!("mounting bpffs on {}: {e}", root.display())))?;
        tracing::info!("mounted bpffs on /sys/fs/bpf");
    }
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    if !is_bpffs(dir) {
        return Err(err("not on a bpf filesystem".into()));
    }
    Ok(())
}

/// The pin of ifindex `ifindex`'s link in `dir` for `mode`.
fn pin_path(dir: &Path, ifindex: u32, mode: &str) -> PathBuf {
    dir.join(format!("{ifindex}-{mode}"))
}

/// The interface index of a link pin's name ("<ifindex>-native" or "<ifindex>-generic"), or
/// None for a name stromd does not give its pins.
fn pin_ifindex(name: &str) -> Option<u32> {
    let (index, mode) = name.split_once('-')?;
    if mode != "native" && mode != "generic" || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    index.parse().ok()
}

/// Whether an interface with this index exists in stromd's network namespace.
fn ifindex_exists(ifindex: u32) -> bool {
    std::fs::read_dir("/sys/class/net").is_ok_and(|d| {
        d.flatten().any(|e| {
            std::fs::read_to_string(e.path().join("ifindex"))
                .is_ok_and(|s| s.trim().parse::<u32>() == Ok(ifindex))
        })
    })
}

impl XdpPrograms {
    /// Loads and verifies both programs. With `pin_dir`, links are pinned there (see the
    /// module's doc); pins of interfaces that no longer exist are removed.
    pub fn load(pin_dir: Option<&Path>) -> Result<Self, BpfError> {
        let mut ebpf = Ebpf::load(OBJECT)?;
        for role in [Role::Pod, Role::Uplink] {
            Self::program(&mut ebpf, role)?
                .load()
                .map_err(|e| BpfError::Program(role.program(), e))?;
        }
        if let Some(dir) = pin_dir {
            ensure_bpffs(dir)?;
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                // Only stromd's own pins ("<ifindex>-native", "<ifindex>-generic"): anything
                // else in the directory is not stromd's to remove.
                let Some(ifindex) = pin_ifindex(&name) else {
                    continue;
                };
                if !ifindex_exists(ifindex) {
                    tracing::info!(pin = %e.path().display(), "removing the pin of a gone interface");
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(XdpPrograms {
            ebpf,
            links: HashMap::new(),
            pin_dir: pin_dir.map(Path::to_path_buf),
            pod_generic: false,
        })
    }

    /// Attaches the pods' program in generic (skb) mode from now on, instead of native. The
    /// kernel then leaves the pod side's TSO and GSO alone (native XDP on a veth clears them
    /// on its peer), and the program sees what the pod sent as the stack hands it on:
    /// segments up to 64 KB when the pod's TSO is on. A link already pinned keeps its mode.
    pub fn set_pod_generic(&mut self, generic: bool) {
        self.pod_generic = generic;
    }

    /// The program's drop counts by reason (`XDP_DROP_REASONS`), summed over CPUs.
    pub fn drops(&mut self) -> Vec<(String, u64)> {
        let Ok(m) = self.map_mut("xdp_drops") else {
            return Vec::new();
        };
        let Ok(a) = PerCpuArray::<_, u64>::try_from(m) else {
            return Vec::new();
        };
        XDP_DROP_REASONS
            .iter()
            .enumerate()
            .filter_map(|(i, name)| {
                let v: u64 = a.get(&(i as u32), 0).ok()?.iter().sum();
                (v > 0).then(|| (name.to_string(), v))
            })
            .collect()
    }

    /// Records what the pod behind `ifindex` may send from (its MAC and IPv4 addresses, at
    /// most `POD_SRC_IPS`): the pod program passes node-bound frames only from those.
    pub fn set_pod_src(
        &mut self,
        ifindex: u32,
        mac: [u8; 6],
        ips: &[Ipv4Addr],
    ) -> Result<(), BpfError> {
        let mut v = PodSrc {
            mac,
            n_ips: ips.len().min(POD_SRC_IPS) as u16,
            ips: [0; POD_SRC_IPS],
        };
        for (slot, ip) in v.ips.iter_mut().zip(ips) {
            *slot = u32::from_ne_bytes(ip.octets());
        }
        let mut m: BpfHashMap<_, u32, PodSrc> = BpfHashMap::try_from(self.map_mut("pod_src")?)
            .map_err(|e| BpfError::Map("pod_src", e))?;
        m.insert(ifindex, v, 0)
            .map_err(|e| BpfError::Map("pod_src", e))
    }

    /// Forgets the pod behind `ifindex`.
    pub fn remove_pod_src(&mut self, ifindex: u32) {
        if let Ok(m) = self.map_mut("pod_src") {
            if let Ok(mut m) = BpfHashMap::<_, u32, PodSrc>::try_from(m) {
                let _ = m.remove(&ifindex);
            }
        }
    }

    fn program(ebpf: &mut Ebpf, role: Role) -> Result<&mut Xdp, BpfError> {
        let name = role.program();
        ebpf.program_mut(name)
            .ok_or(BpfError::Program(
                name,
                aya::programs::ProgramError::NotLoaded,
            ))?
            .try_into()
            .map_err(|e| BpfError::Program(name, e))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, BpfError> {
        self.ebpf.map_mut(name).ok_or(BpfError::MissingMap(name))
    }

    /// Maps `echo_ids` (a `BPF_F_MMAPABLE` array) for the workers to write.
    pub fn echo_ids(&mut self) -> Result<EchoIds, BpfError> {
        let fd = match self.map_mut("echo_ids")? {
            aya::maps::Map::Array(data) => data.fd().as_fd().as_raw_fd(),
            _ => return Err(BpfError::MissingMap("echo_ids")),
        };
        let len = ECHO_ID_WORDS * std::mem::size_of::<u64>();
        // SAFETY: a new shared mapping of `len` bytes of the map behind `fd` (open for the
        // call; the mapping keeps the map alive after it closes), at an address the kernel
        // picks: no existing memory is touched. The result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(BpfError::Map(
                "echo_ids",
                aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "mmap",
                    io_error: std::io::Error::last_os_error(),
                }),
            ));
        }
        let words = NonNull::new(p.cast::<AtomicU64>()).ok_or(BpfError::MissingMap("echo_ids"))?;
        Ok(EchoIds { words })
    }

    /// Sets the pod gateway address the pod program lets through to stromd's ARP stage.
    pub fn set_gateway(&mut self, gw: Ipv4Addr) -> Result<(), BpfError> {
        let mut a: Array<_, u32> =
            Array::try_from(self.map_mut("gateway")?).map_err(|e| BpfError::Map("gateway", e))?;
        a.set(0, u32::from_ne_bytes(gw.octets()), 0)
            .map_err(|e| BpfError::Map("gateway", e))
    }

    /// Sets the pod CIDR: the pod program skips the node-address lookup for destinations
    /// inside it (the configuration keeps node addresses out of it).
    pub fn set_pod_net(&mut self, net: Ipv4Addr, len: u8) -> Result<(), BpfError> {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(len.min(32)))
            .unwrap_or(0);
        let value = V4Net {
            addr: (u32::from(net) & mask).to_be(),
            mask: mask.to_be(),
        };
        let mut a: Array<_, V4Net> =
            Array::try_from(self.map_mut("pod_net")?).map_err(|e| BpfError::Map("pod_net", e))?;
        a.set(0, value, 0).map_err(|e| BpfError::Map("pod_net", e))
    }

    /// Adds one of the node's own addresses (passed to the kernel from pod ports).
    pub fn add_node_addr(&mut self, a: Ipv4Addr) -> Result<(), BpfError> {
        let mut m: BpfHashMap<_, u32, u8> = BpfHashMap::try_from(self.map_mut("node_addrs")?)
            .map_err(|e| BpfError::Map("node_addrs", e))?;
        m.insert(u32::from_ne_bytes(a.octets()), 1, 0)
            .map_err(|e| BpfError::Map("node_addrs", e))
    }

    /// Adds a prefix stromd owns on the uplink.
    pub fn add_owned(&mut self, net: Ipv4Addr, len: u8) -> Result<(), BpfError> {
        let mut m: LpmTrie<_, u32, u8> =
            LpmTrie::try_from(self.map_mut("owned")?).map_err(|e| BpfError::Map("owned", e))?;
        m.insert(
            &Key::new(u32::from(len), u32::from_ne_bytes(net.octets())),
            1,
            0,
        )
        .map_err(|e| BpfError::Map("owned", e))
    }

    /// Removes a prefix stromd owned on the uplink (nothing if it was not there).
    pub fn remove_owned(&mut self, net: Ipv4Addr, len: u8) -> Result<(), BpfError> {
        let mut m: LpmTrie<_, u32, u8> =
            LpmTrie::try_from(self.map_mut("owned")?).map_err(|e| BpfError::Map("owned", e))?;
        match m.remove(&Key::new(u32::from(len), u32::from_ne_bytes(net.octets()))) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(BpfError::Map("owned", e)),
        }
    }

    /// Makes `port` over IP protocol `proto` on the node's addresses stromd's (a NodePort),
    /// or the kernel's again (`on` false).
    pub fn set_node_port(&mut self, proto: u8, port: u16, on: bool) -> Result<(), BpfError> {
        let mut m: BpfHashMap<_, L4Port, u8> = BpfHashMap::try_from(self.map_mut("node_ports")?)
            .map_err(|e| BpfError::Map("node_ports", e))?;
        let key = L4Port {
            port: port.to_be(),
            proto,
            pad: 0,
        };
        let r = if on {
            m.insert(key, 1, 0)
        } else {
            m.remove(&key)
        };
        match r {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(BpfError::Map("node_ports", e)),
        }
    }

    /// Sets the source ports stromd translates to on the node's addresses: answers to them
    /// are stromd's.
    pub fn set_snat_ports(&mut self, lo: u16, hi: u16) -> Result<(), BpfError> {
        let mut a: Array<_, PortRange> = Array::try_from(self.map_mut("snat_ports")?)
            .map_err(|e| BpfError::Map("snat_ports", e))?;
        a.set(0, PortRange { lo, hi }, 0)
            .map_err(|e| BpfError::Map("snat_ports", e))
    }

    /// Attaches the role's program to `ifindex`: the pinned link a previous stromd left, with
    /// this program swapped in; or a new link, native mode, or generic as a logged fallback
    /// (generic only, for pods, after `set_pod_generic`)
    /// (pinned where there is a pin directory). Returns the mode used.
    pub fn attach(&mut self, ifindex: u32, role: Role) -> Result<&'static str, BpfError> {
        if let Some(a) = self.links.get(&ifindex) {
            return Ok(a.mode);
        }
        if let Some(dir) = self.pin_dir.clone() {
            for mode in ["native", "generic"] {
                let path = pin_path(&dir, ifindex, mode);
                if !path.exists() {
                    continue;
                }
                match self.take_over(ifindex, role, &path) {
                    Ok(id) => {
                        tracing::debug!(ifindex, mode, "took over the pinned XDP link");
                        let configured = if self.pod_generic {
                            "generic"
                        } else {
                            "native"
                        };
                        if role == Role::Pod && mode != configured {
                            tracing::warn!(
                                ifindex,
                                mode,
                                configured,
                                "a pod's XDP link keeps the mode it was pinned in; the \
                                 configured mode applies to pods wired from now on"
                            );
                        }
                        return Ok(self.record(ifindex, role, id, mode, Some(path)));
                    }
                    Err(e) => {
                        // A link whose interface went (and whose index came back) is defunct.
                        tracing::info!(ifindex, error = %e, "stale XDP link pin removed");
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        let generic = role == Role::Pod && self.pod_generic;
        let prog = Self::program(&mut self.ebpf, role)?;
        let native = if generic {
            None
        } else {
            Some(prog.attach_to_if_index(ifindex, XdpMode::Driver))
        };
        let (id, mode) = match native {
            None => match prog.attach_to_if_index(ifindex, XdpMode::Skb) {
                Ok(id) => (id, "generic"),
                Err(e) => {
                    return Err(BpfError::Attach {
                        ifindex,
                        native: "not asked for (generic mode configured)".into(),
                        generic: e.to_string(),
                    })
                }
            },
            Some(Ok(id)) => (id, "native"),
            Some(Err(native)) => match prog.attach_to_if_index(ifindex, XdpMode::Skb) {
                Ok(id) => {
                    tracing::warn!(ifindex, error = %native, "native XDP refused; using generic XDP");
                    (id, "generic")
                }
                Err(generic) => {
                    return Err(BpfError::Attach {
                        ifindex,
                        native: native.to_string(),
                        generic: generic.to_string(),
                    })
                }
            },
        };
        Ok(match self.pin_dir.clone() {
            Some(dir) => {
                let path = pin_path(&dir, ifindex, mode);
                let id = self.pin(ifindex, role, id, &path)?;
                self.record(ifindex, role, id, mode, Some(path))
            }
            None => self.record(ifindex, role, id, mode, None),
        })
    }

    /// Records an attachment; returns its mode.
    fn record(
        &mut self,
        ifindex: u32,
        role: Role,
        id: XdpLinkId,
        mode: &'static str,
        pin: Option<PathBuf>,
    ) -> &'static str {
        self.links.insert(
            ifindex,
            Attached {
                role,
                id,
                mode,
                pin,
            },
        );
        mode
    }

    /// Swaps the role's program into the link pinned at `path`. The pin stays: the link is
    /// never without a holder.
    fn take_over(&mut self, ifindex: u32, role: Role, path: &Path) -> Result<XdpLinkId, BpfError> {
        let perr = |e: String| BpfError::Pin(ifindex, path.to_path_buf(), e);
        let pinned = PinnedLink::from_pin(path).map_err(|e| perr(e.to_string()))?;
        let fd: FdLink = pinned.into();
        let link = XdpLink::try_from(fd).map_err(|e| perr(e.to_string()))?;
        Self::program(&mut self.ebpf, role)?
            .attach_to_link(link)
            .map_err(|e| perr(e.to_string()))
    }

    /// Pins the new link `id` at `path`. On failure the link is detached.
    fn pin(
        &mut self,
        ifindex: u32,
        role: Role,
        id: XdpLinkId,
        path: &Path,
    ) -> Result<XdpLinkId, BpfError> {
        let perr = |e: String| BpfError::Pin(ifindex, path.to_path_buf(), e);
        let prog = Self::program(&mut self.ebpf, role)?;
        let link = prog.take_link(id).map_err(|e| perr(e.to_string()))?;
        let fd = FdLink::try_from(link).map_err(|e| perr(e.to_string()))?;
        let _ = std::fs::remove_file(path);
        let pinned = fd.pin(path).map_err(|e| perr(e.to_string()))?;
        // The program keeps the link's fd (its id is what `detach` gives back); the pin keeps
        // the link itself.
        let fd: FdLink = pinned.into();
        let link = XdpLink::try_from(fd).map_err(|e| perr(e.to_string()))?;
        let prog = Self::program(&mut self.ebpf, role)?;
        prog.attach_to_link(link).map_err(|e| perr(e.to_string()))
    }

    /// Takes the program off `ifindex` (nothing if the interface is gone): unpins its link
    /// and closes it.
    pub fn detach(&mut self, ifindex: u32) {
        if let Some(a) = self.links.remove(&ifindex) {
            if let Some(pin) = &a.pin {
                let _ = std::fs::remove_file(pin);
            }
            if let Ok(prog) = Self::program(&mut self.ebpf, a.role) {
                if let Err(e) = prog.detach(a.id) {
                    tracing::debug!(ifindex, error = %e, "detach (interface probably gone)");
                }
            }
        }
        self.remove_pod_src(ifindex);
    }

    /// Points the traffic of `ifindex`'s receive queue `queue` at socket `fd` in XSKMAP slot
    /// `slot`.
    pub fn bind_slot(
        &mut self,
        ifindex: u32,
        queue: u32,
        slot: u32,
        fd: BorrowedFd<'_>,
    ) -> Result<(), BpfError> {
        {
            let mut x: XskMap<_> =
                XskMap::try_from(self.map_mut("xsks")?).map_err(|e| BpfError::Map("xsks", e))?;
            // The kernel refuses anything but an AF_XDP socket, and takes its own reference.
            x.set(slot, fd, 0).map_err(|e| BpfError::Map("xsks", e))?;
        }
        if queue == 0 && ifindex < SLOT0_ENTRIES {
            let mut a: Array<_, u32> =
                Array::try_from(self.map_mut("slot0")?).map_err(|e| BpfError::Map("slot0", e))?;
            return a
                .set(ifindex, slot + 1, 0)
                .map_err(|e| BpfError::Map("slot0", e));
        }
        let mut m: BpfHashMap<_, PortKey, u32> = BpfHashMap::try_from(self.map_mut("port_slot")?)
            .map_err(|e| BpfError::Map("port_slot", e))?;
        m.insert(PortKey { ifindex, queue }, slot, 0)
            .map_err(|e| BpfError::Map("port_slot", e))
    }

    /// Removes the slot of `ifindex`'s queue `queue`: the pod program then drops its frames
    /// (fail closed), the uplink program hands them to the kernel.
    pub fn unbind_slot(&mut self, ifindex: u32, queue: u32, slot: u32) {
        if queue == 0 && ifindex < SLOT0_ENTRIES {
            if let Ok(m) = self.map_mut("slot0") {
                if let Ok(mut a) = Array::<_, u32>::try_from(m) {
                    let _ = a.set(ifindex, 0, 0);
                }
            }
        }
        if let Ok(m) = self.map_mut("port_slot") {
            if let Ok(mut m) = BpfHashMap::<_, PortKey, u32>::try_from(m) {
                let _ = m.remove(&PortKey { ifindex, queue });
            }
        }
        if let Ok(m) = self.map_mut("xsks") {
            if let Ok(mut x) = XskMap::try_from(m) {
                let _ = x.unset(slot);
            }
        }
    }

    /// Interfaces with the program attached.
    pub fn attached(&self) -> Vec<u32> {
        self.links.keys().copied().collect()
    }

    /// Whether links are pinned (and so outlive stromd).
    pub fn pinned(&self) -> bool {
        self.pin_dir.is_some()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_stromds_own_pin_names_give_an_interface() {
        assert_eq!(super::pin_ifindex("12-native"), Some(12));
        assert_eq!(super::pin_ifindex("3-generic"), Some(3));
        for other in [
            "12",
            "12-other",
            "x-native",
            "-native",
            "+1-native",
            "notes.txt",
            "a-b-c",
        ] {
            assert_eq!(super::pin_ifindex(other), None, "{other}");
        }
    }
}
