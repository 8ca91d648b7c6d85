//! The node table: what the node is (its addresses, pod CIDR and gateway). Built once from
//! the configuration and the node's interfaces; changes only with them.

use std::net::{IpAddr, Ipv4Addr};

use hashbrown::HashSet;

/// The node as the pipeline sees it.
#[derive(Debug, Clone)]
pub struct NodeTable {
    /// The pod gateway address every pod routes through (answered by ARP on every pod port).
    pub gateway_v4: Ipv4Addr,
    /// The node's own addresses (traffic to them belongs to the kernel).
    pub addrs: HashSet<IpAddr>,
    /// The node's address that ICMP errors to senders beyond the uplink come from (a
    /// link-local gateway address would not be routed back to them).
    pub v4: Option<Ipv4Addr>,
    /// Directed broadcast addresses of the node's own subnets: never routed.
    pub broadcasts: HashSet<Ipv4Addr>,
    /// The node's pod CIDR: an address in it that is not a local pod has no route.
    pub pod_cidr: Option<ipnet::Ipv4Net>,
    /// Source ports stromd translates to on the node's address, and how they are shared.
    pub snat: SnatPorts,
    /// Whether pods' connections leaving the cluster are masqueraded, and where not.
    pub masquerade: bool,
    pub no_masquerade: Vec<ipnet::Ipv4Net>,
}

/// The SNAT port range, split evenly between the workers: the owner of a port is found from
/// the port alone, so an answer reaching another worker is handed to the one that tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnatPorts {
    pub lo: u16,
    pub hi: u16,
    pub workers: u16,
}

impl Default for SnatPorts {
    fn default() -> Self {
        SnatPorts {
            lo: 61000,
            hi: 65535,
            workers: 1,
        }
    }
}

impl SnatPorts {
    fn span(&self) -> u32 {
        (u32::from(self.hi - self.lo) + 1) / u32::from(self.workers.max(1))
    }

    /// The worker that owns `port`, if it is one of the range's.
    #[inline]
    pub fn owner(&self, port: u16) -> Option<u16> {
        if port < self.lo || port > self.hi {
            return None;
        }
        let w = u32::from(port - self.lo) / self.span().max(1);
        (w < u32::from(self.workers)).then_some(w as u16)
    }

    /// Worker `w`'s ports, first and last.
    pub fn share(&self, w: u16) -> (u16, u16) {
        let lo = u32::from(self.lo) + u32::from(w) * self.span();
        (lo as u16, (lo + self.span() - 1) as u16)
    }
}

impl NodeTable {
    /// Whether a pod's connection to `dst` is masqueraded: it leaves the cluster.
    #[inline]
    pub fn masquerades(&self, dst: Ipv4Addr) -> bool {
        self.masquerade
            && !self.pod_cidr.is_some_and(|c| c.contains(&dst))
            && !self.no_masquerade.iter().any(|n| n.contains(&dst))
            && !self.addrs.contains(&IpAddr::V4(dst))
    }
}

impl NodeTable {
    /// A node with a gateway and nothing else yet.
    pub fn new(gateway_v4: Ipv4Addr) -> Self {
        NodeTable {
            gateway_v4,
            addrs: HashSet::new(),
            v4: None,
            broadcasts: HashSet::new(),
            pod_cidr: None,
            snat: SnatPorts::default(),
            masquerade: false,
            no_masquerade: Vec::new(),
        }
    }
}
