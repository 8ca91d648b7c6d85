//! Loads strom's XDP programs (bpf/strom.c, compiled by build.rs) with aya, attaches them, and
//! keeps their maps in sync. Dropping [`XdpPrograms`] detaches every program it attached.
//!
//! aya is used rather than libbpf-rs: xsk-rs pins an older libbpf-sys, aya is pure Rust and
//! builds without a C toolchain beyond the clang that compiles the program (DESIGN.md).
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::{BorrowedFd, RawFd};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, XskMap};
use aya::programs::xdp::XdpLinkId;
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
    Program(&'static str, aya::programs::ProgramError),
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
}

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

/// The loaded object and the attachments stromd made: ifindex → (link, mode).
pub struct XdpPrograms {
    ebpf: Ebpf,
    links: HashMap<u32, (Role, XdpLinkId, &'static str)>,
}

impl XdpPrograms {
    /// Loads and verifies both programs.
    pub fn load() -> Result<Self, BpfError> {
        let mut ebpf = Ebpf::load(OBJECT)?;
        for role in [Role::Pod, Role::Uplink] {
            Self::program(&mut ebpf, role)?
                .load()
                .map_err(|e| BpfError::Program(role.program(), e))?;
        }
        Ok(XdpPrograms {
            ebpf,
            links: HashMap::new(),
        })
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

    /// Attaches the role's program to `ifindex`: native mode, or generic as a logged fallback.
    /// Returns the mode used.
    pub fn attach(&mut self, ifindex: u32, role: Role) -> Result<&'static str, BpfError> {
        if let Some((_, _, mode)) = self.links.get(&ifindex) {
            return Ok(mode);
        }
        let prog = Self::program(&mut self.ebpf, role)?;
        let (id, mode) = match prog.attach_to_if_index(ifindex, XdpMode::Driver) {
            Ok(id) => (id, "native"),
            Err(native) => match prog.attach_to_if_index(ifindex, XdpMode::Skb) {
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
        self.links.insert(ifindex, (role, id, mode));
        Ok(mode)
    }

    /// Detaches what stromd attached to `ifindex` (nothing if the interface is gone).
    pub fn detach(&mut self, ifindex: u32) {
        if let Some((role, id, _)) = self.links.remove(&ifindex) {
            if let Ok(prog) = Self::program(&mut self.ebpf, role) {
                if let Err(e) = prog.detach(id) {
                    tracing::debug!(ifindex, error = %e, "detach (interface probably gone)");
                }
            }
        }
    }

    /// Points the traffic of `ifindex`'s receive queue `queue` at socket `fd` in XSKMAP slot
    /// `slot`.
    pub fn bind_slot(
        &mut self,
        ifindex: u32,
        queue: u32,
        slot: u32,
        fd: RawFd,
    ) -> Result<(), BpfError> {
        {
            let mut x: XskMap<_> =
                XskMap::try_from(self.map_mut("xsks")?).map_err(|e| BpfError::Map("xsks", e))?;
            // SAFETY: `fd` is the open AF_XDP socket of a live `XskPort`; the kernel takes its
            // own reference when the map update returns, and the borrow ends with this call.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            x.set(slot, borrowed, 0)
                .map_err(|e| BpfError::Map("xsks", e))?;
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
}
