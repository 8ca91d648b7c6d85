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
        }
    }
}
