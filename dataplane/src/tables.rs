//! Forwarding tables, read by workers without locks.
//!
//! The API thread builds a complete new [`Tables`] and publishes it with one atomic pointer
//! swap ([`TableHandle::publish`]); workers load the current snapshot once per batch, so a
//! change is never seen half-applied.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use hashbrown::{HashMap, HashSet};

use crate::mac::Mac;

/// Where a destination lives: a port on some worker, with the MACs to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Next {
    /// Port id (also its XSKMAP slot).
    pub port: u32,
    /// Worker that owns the port.
    pub worker: u16,
    /// Destination MAC (the pod's).
    pub dst_mac: Mac,
    /// Source MAC (the host side of that pod's veth, i.e. the gateway MAC the pod knows).
    pub src_mac: Mac,
    /// The egress interface's MTU: the largest IP packet it carries.
    pub mtu: u16,
}

/// Everything the pipeline reads.
#[derive(Debug, Clone)]
pub struct Tables {
    /// The pod gateway address every pod routes through (answered by ARP on every pod port).
    pub gateway_v4: Ipv4Addr,
    /// The node's own addresses (traffic to them belongs to the kernel).
    pub node_addrs: HashSet<IpAddr>,
    /// The node's address that ICMP errors to senders beyond the uplink come from (a
    /// link-local gateway address would not be routed back to them).
    pub node_v4: Option<Ipv4Addr>,
    /// Broadcast addresses of the node's own subnets (the uplink's): never routed.
    pub node_broadcasts: HashSet<Ipv4Addr>,
    /// Host routes to local pods, keyed by address (IPv4 and IPv6 alike).
    pub local: HashMap<IpAddr, Next>,
    /// The node's pod CIDR: an address in it that is not a local pod has no route.
    pub pod_cidr: Option<ipnet::Ipv4Net>,
    /// Everything else leaves through the uplink to its gateway, once the gateway's MAC is
    /// known.
    pub uplink: Option<Next>,
    /// Generation, bumped on every publish (for `stromctl tables`).
    pub generation: u64,
}

impl Tables {
    /// Empty tables for a gateway.
    pub fn new(gateway_v4: Ipv4Addr) -> Self {
        Tables {
            gateway_v4,
            node_addrs: HashSet::new(),
            node_v4: None,
            node_broadcasts: HashSet::new(),
            local: HashMap::new(),
            pod_cidr: None,
            uplink: None,
            generation: 0,
        }
    }

    /// Route lookup: a local pod, else nothing inside the pod CIDR, else the uplink's
    /// gateway. (Remote nodes' pod CIDRs join here with multi-node, behind the same call.)
    #[inline]
    pub fn route(&self, dst: IpAddr) -> Option<&Next> {
        if let Some(n) = self.local.get(&dst) {
            return Some(n);
        }
        match dst {
            IpAddr::V4(v4) if self.pod_cidr.is_some_and(|c| c.contains(&v4)) => None,
            _ => self.uplink.as_ref(),
        }
    }
}

/// Shared handle to the current tables.
#[derive(Clone)]
pub struct TableHandle(Arc<ArcSwap<Tables>>);

impl TableHandle {
    /// Starts with `t`.
    pub fn new(t: Tables) -> Self {
        TableHandle(Arc::new(ArcSwap::from_pointee(t)))
    }

    /// The current snapshot (workers call this once per batch).
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<Tables>> {
        self.0.load()
    }

    /// A full copy of the current snapshot (for the API thread to edit).
    pub fn snapshot(&self) -> Arc<Tables> {
        self.0.load_full()
    }

    /// Publishes the next version atomically.
    pub fn publish(&self, mut t: Tables) {
        t.generation = self.0.load().generation + 1;
        self.0.store(Arc::new(t));
    }
}
