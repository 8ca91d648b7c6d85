//! Services for the node's own sockets: the cgroup programs of `bpf/socklb.c` (compiled by
//! build.rs), loaded with aya and attached to a cgroup v2 directory, and their maps.
//!
//! A socket of the node's network namespace that connects (or sends an unconnected UDP
//! datagram) to a Service frontend is given a backend's address instead; receiving and
//! `getpeername` give the frontend back. stromd writes a frontend's backends under a fresh id
//! before it points the frontend at them ([`SocketLb::set_front`]), so a program sees the old
//! set or the new one, never half of each. The links live as long as this value: the node's
//! connections to Services stop being balanced when stromd stops (docs/design.md).
#![allow(unsafe_code)]

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap as BpfHashMap};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::Ebpf;

use crate::bpf::BpfError;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/socklb.bpf.o"));

/// The programs, each attached to its hook of the cgroup.
const PROGRAMS: [&str; 4] = [
    "sock_connect4",
    "sock_sendmsg4",
    "sock_recvmsg4",
    "sock_getpeername4",
];

/// Key of `sock_fronts`: `struct front_key` in socklb.c (network byte order).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct FrontKey {
    ip: u32,
    port: u16,
    proto: u8,
    pad: u8,
}

// SAFETY: `FrontKey` is `repr(C)`: a u32, a u16 and two u8s, 8 bytes with no padding, valid for
// any bit pattern.
unsafe impl aya::Pod for FrontKey {}

/// Value of `sock_fronts`: `struct front` in socklb.c.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Front {
    id: u32,
    count: u32,
    affinity_s: u32,
    pad: u32,
}

// SAFETY: `Front` is `repr(C)`, four u32s with no padding, valid for any bit pattern.
unsafe impl aya::Pod for Front {}

/// Key of `sock_backends`: `struct backend_key` in socklb.c.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct BackendKey {
    id: u32,
    index: u32,
}

// SAFETY: `BackendKey` is `repr(C)`, two u32s with no padding, valid for any bit pattern.
unsafe impl aya::Pod for BackendKey {}

/// Value of `sock_backends`: `struct backend` in socklb.c (network byte order).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Backend {
    ip: u32,
    port: u16,
    pad: u16,
}

// SAFETY: `Backend` is `repr(C)`: a u32 and two u16s, 8 bytes with no padding, valid for any
// bit pattern.
unsafe impl aya::Pod for Backend {}

/// Key of `sock_members`: `struct member_key` in socklb.c (network byte order).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct MemberKey {
    id: u32,
    ip: u32,
    port: u16,
    pad: u16,
}

// SAFETY: `MemberKey` is `repr(C)`: two u32s and two u16s, 12 bytes with no padding, valid for
// any bit pattern.
unsafe impl aya::Pod for MemberKey {}

/// A Service frontend as the programs key it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SockFront {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// IP protocol (6 TCP, 17 UDP; the hooks see no other).
    pub proto: u8,
}

impl SockFront {
    fn key(self) -> FrontKey {
        FrontKey {
            ip: u32::from_ne_bytes(self.ip.octets()),
            port: self.port.to_be(),
            proto: self.proto,
            pad: 0,
        }
    }
}

/// The loaded programs, attached to one cgroup.
pub struct SocketLb {
    ebpf: Ebpf,
    cgroup: PathBuf,
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, Linux 5.14), what
/// `bpf_get_netns_cookie` gives a program for a socket of that namespace.
pub fn netns_cookie() -> std::io::Result<u64> {
    // libc 0.2 does not export SO_NETNS_COOKIE for every target; its value is 71 on every
    // architecture but alpha, mips, parisc and sparc (asm-generic/socket.h).
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `sock` is an open socket for the whole call; `cookie` and `len` are live locals
    // that outlive it, `len` giving the size of `cookie` exactly, so the kernel writes at most
    // 8 bytes into a u64.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The root of the cgroup v2 hierarchy: `/sys/fs/cgroup` on a unified system,
/// `/sys/fs/cgroup/unified` on a hybrid one.
pub fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| is_cgroup2(p))
}

/// Whether `p` is on a cgroup v2 filesystem.
pub fn is_cgroup2(p: &Path) -> bool {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    // The magic's C type (`__fsword_t`) differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 as i64 == CGROUP2_SUPER_MAGIC)
}

impl SocketLb {
    /// Loads the programs and attaches them to `cgroup` (a cgroup v2 directory), serving
    /// the sockets of the network namespace whose cookie is `netns`. Other programs of the
    /// cgroup stay (links run alongside them).
    pub fn attach(cgroup: &Path, netns: u64) -> Result<Self, BpfError> {
        if !is_cgroup2(cgroup) {
            return Err(BpfError::Cgroup(
                cgroup.to_path_buf(),
                "not a cgroup v2 directory".into(),
            ));
        }
        let mut ebpf = Ebpf::load(OBJECT)?;
        let dir = std::fs::File::open(cgroup)
            .map_err(|e| BpfError::Cgroup(cgroup.to_path_buf(), e.to_string()))?;
        for name in PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(BpfError::Program(
                    name,
                    aya::programs::ProgramError::NotLoaded,
                ))?
                .try_into()
                .map_err(|e| BpfError::Program(name, e))?;
            prog.load().map_err(|e| BpfError::Program(name, e))?;
            // aya attaches with a BPF link (Linux 5.7+), which always coexists with the
            // cgroup's other programs and takes no attach flags (the kernel refuses any).
            prog.attach(&dir, CgroupAttachMode::Single)
                .map_err(|e| BpfError::Program(name, e))?;
        }
        let mut lb = SocketLb {
            ebpf,
            cgroup: cgroup.to_path_buf(),
        };
        let mut a: Array<_, u64> = Array::try_from(lb.map_mut("node_netns")?)
            .map_err(|e| BpfError::Map("node_netns", e))?;
        a.set(0, netns, 0)
            .map_err(|e| BpfError::Map("node_netns", e))?;
        Ok(lb)
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, BpfError> {
        self.ebpf.map_mut(name).ok_or(BpfError::MissingMap(name))
    }

    /// Writes `backends` under `id` (a fresh id: one no frontend points at yet).
    pub fn set_backends(&mut self, id: u32, backends: &[(Ipv4Addr, u16)]) -> Result<(), BpfError> {
        let mut m: BpfHashMap<_, BackendKey, Backend> =
            BpfHashMap::try_from(self.map_mut("sock_backends")?)
                .map_err(|e| BpfError::Map("sock_backends", e))?;
        for (index, &(ip, port)) in (0u32..).zip(backends) {
            let be = Backend {
                ip: u32::from_ne_bytes(ip.octets()),
                port: port.to_be(),
                pad: 0,
            };
            m.insert(BackendKey { id, index }, be, 0)
                .map_err(|e| BpfError::Map("sock_backends", e))?;
        }
        let mut m: BpfHashMap<_, MemberKey, u8> =
            BpfHashMap::try_from(self.map_mut("sock_members")?)
                .map_err(|e| BpfError::Map("sock_members", e))?;
        for &(ip, port) in backends {
            m.insert(member(id, ip, port), 1, 0)
                .map_err(|e| BpfError::Map("sock_members", e))?;
        }
        Ok(())
    }

    /// Removes what `set_backends` wrote under `id` (no frontend points at it any more).
    pub fn remove_backends(&mut self, id: u32, backends: &[(Ipv4Addr, u16)]) {
        if let Ok(m) = self.map_mut("sock_backends") {
            if let Ok(mut m) = BpfHashMap::<_, BackendKey, Backend>::try_from(m) {
                for index in (0u32..).take(backends.len()) {
                    let _ = m.remove(&BackendKey { id, index });
                }
            }
        }
        if let Ok(m) = self.map_mut("sock_members") {
            if let Ok(mut m) = BpfHashMap::<_, MemberKey, u8>::try_from(m) {
                for &(ip, port) in backends {
                    let _ = m.remove(&member(id, ip, port));
                }
            }
        }
    }

    /// Points `front` at the `count` backends under `id` (0: the frontend rejects), with
    /// ClientIP affinity for `affinity_s` seconds (0: none).
    pub fn set_front(
        &mut self,
        front: SockFront,
        id: u32,
        count: u32,
        affinity_s: u32,
    ) -> Result<(), BpfError> {
        let mut m: BpfHashMap<_, FrontKey, Front> =
            BpfHashMap::try_from(self.map_mut("sock_fronts")?)
                .map_err(|e| BpfError::Map("sock_fronts", e))?;
        let value = Front {
            id,
            count,
            affinity_s,
            pad: 0,
        };
        m.insert(front.key(), value, 0)
            .map_err(|e| BpfError::Map("sock_fronts", e))
    }

    /// Stops balancing `front` (the node's sockets reach its address as it is).
    pub fn remove_front(&mut self, front: SockFront) -> Result<(), BpfError> {
        let mut m: BpfHashMap<_, FrontKey, Front> =
            BpfHashMap::try_from(self.map_mut("sock_fronts")?)
                .map_err(|e| BpfError::Map("sock_fronts", e))?;
        match m.remove(&front.key()) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(BpfError::Map("sock_fronts", e)),
        }
    }
}

fn member(id: u32, ip: Ipv4Addr, port: u16) -> MemberKey {
    MemberKey {
        id,
        ip: u32::from_ne_bytes(ip.octets()),
        port: port.to_be(),
        pad: 0,
    }
}
