//! The route table: where each destination goes. The reconciler keeps the desired routes
//! (each pod port's addresses, the uplink's default route) and has this module build the
//! next version from them whole; routing is decided here and nowhere else
//! ([`RouteTable::route`]).

use std::collections::BTreeMap;
use std::net::IpAddr;

use hashbrown::HashMap;

use crate::mac::Mac;

/// Where a destination lives: a port on some worker, with the MACs to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Next {
    /// Port id (also its XSKMAP slot).
    pub port: u32,
    /// Worker that owns the port.
    pub worker: u16,
    /// Destination MAC (the pod's, or the uplink gateway's).
    pub dst_mac: Mac,
    /// Source MAC (the host side of that pod's veth, i.e. the gateway MAC the pod knows).
    pub src_mac: Mac,
    /// The egress interface's MTU: the largest IP packet it carries.
    pub mtu: u16,
}

/// The desired routes, as the reconciler keeps them: each port's host routes, and the
/// default route through the uplink once its gateway's MAC is known.
#[derive(Debug, Clone, Default)]
pub struct DesiredRoutes {
    pub ports: BTreeMap<u32, Vec<(IpAddr, Next)>>,
    pub uplink: Option<Next>,
}

/// Routes as the workers read them.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// Host routes to local pods, keyed by address.
    pub local: HashMap<IpAddr, Next>,
    /// Everything outside the pod CIDR leaves through the uplink to its gateway.
    pub uplink: Option<Next>,
}

impl RouteTable {
    /// The next version, built from the desired routes.
    pub fn build(d: &DesiredRoutes) -> Self {
        let n = d.ports.values().map(Vec::len).sum();
        let mut local = HashMap::with_capacity(n);
        for routes in d.ports.values() {
            for (ip, next) in routes {
                local.insert(*ip, *next);
            }
        }
        RouteTable {
            local,
            uplink: d.uplink,
        }
    }

    /// Route lookup: a local pod, else nothing inside the pod CIDR, else the uplink's
    /// gateway. (Remote nodes' pod CIDRs join here with multi-node, behind the same call.)
    #[inline]
    pub fn route(&self, dst: IpAddr, pod_cidr: Option<ipnet::Ipv4Net>) -> Option<&Next> {
        if let Some(n) = self.local.get(&dst) {
            return Some(n);
        }
        match dst {
            IpAddr::V4(v4) if pod_cidr.is_some_and(|c| c.contains(&v4)) => None,
            _ => self.uplink.as_ref(),
        }
    }

    /// Whether `next` is the uplink's route.
    #[inline]
    pub fn is_uplink(&self, next: &Next) -> bool {
        self.uplink.is_some_and(|u| u.port == next.port)
    }
}

/// Host routes of a port: each of its addresses to it.
pub fn port_routes(ips: &[IpAddr], next: Next) -> Vec<(IpAddr, Next)> {
    ips.iter().map(|ip| (*ip, next)).collect()
}

/// A /32 prefix for display.
pub fn host_prefix(ip: &IpAddr) -> String {
    format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn next(port: u32) -> Next {
        Next {
            port,
            worker: 0,
            dst_mac: [2, 0, 0, 0, 0, port as u8],
            src_mac: [2, 0, 0, 0, 1, port as u8],
            mtu: 1500,
        }
    }

    #[test]
    fn the_table_is_built_from_the_desired_routes_and_routes_in_one_place() {
        let mut d = DesiredRoutes::default();
        let a: IpAddr = "198.18.16.2".parse().unwrap();
        d.ports.insert(1, port_routes(&[a], next(1)));
        let cidr = Some("198.18.16.0/20".parse().unwrap());
        let t = RouteTable::build(&d);
        assert_eq!(t.route(a, cidr), Some(&next(1)));
        assert_eq!(t.route("198.18.16.9".parse().unwrap(), cidr), None);
        assert_eq!(
            t.route("1.1.1.1".parse().unwrap(), cidr),
            None,
            "no uplink yet"
        );
        d.uplink = Some(next(9));
        d.ports.remove(&1);
        let t = RouteTable::build(&d);
        assert_eq!(
            t.route(a, cidr),
            None,
            "inside the pod CIDR: never the uplink"
        );
        assert_eq!(t.route("1.1.1.1".parse().unwrap(), cidr), Some(&next(9)));
        assert!(t.is_uplink(&next(9)));
    }
}
