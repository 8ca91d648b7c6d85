//! The route table: where each destination goes. The reconciler keeps the desired routes
//! (each pod port's addresses, the uplink's default route) and has this module build the
//! next version from them whole; routing is decided here and nowhere else
//! ([`RouteTable::route`]).

use std::collections::BTreeMap;
use std::net::IpAddr;

use hashbrown::HashMap;

use crate::conntrack::FlowKey;
use crate::mac::Mac;
use crate::tables::maglev::mix64;

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
    /// Workers serving the uplink's receive queues (workers 0..n).
    pub uplink_workers: u16,
}

/// Routes as the workers read them.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// Host routes to local pods, keyed by address.
    pub local: HashMap<IpAddr, Next>,
    /// Everything outside the pod CIDR leaves through the uplink to its gateway.
    pub uplink: Option<Next>,
    /// Workers serving the uplink's receive queues: workers 0..n, queue q on worker q mod
    /// workers. More than one, and a client's frames may come in on any of them.
    pub uplink_workers: u16,
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
            uplink_workers: d.uplink_workers,
        }
    }

    /// The worker that owns flow `key` (as it comes) from beyond the uplink to a Service
    /// frontend, when the uplink's queues are spread over several workers: each worker
    /// receives what the NIC's hash gives its queue, but a flow is translated in one place,
    /// whichever queue each of its packets and fragments comes on (docs/design.md, "A
    /// multi-queue uplink"). Picked by the whole 5-tuple, so a client's flows spread over the
    /// workers as the NIC spreads them; by the client's address alone when `per_client` (a
    /// Service port with ClientIP affinity: one affinity per client). `None`: one worker
    /// serves the uplink.
    #[inline]
    pub fn inbound_owner(&self, key: &FlowKey, per_client: bool) -> Option<u16> {
        if self.uplink_workers <= 1 {
            return None;
        }
        let client = u64::from(u32::from(key.src));
        let h = if per_client {
            mix64(client)
        } else {
            let ports = (u64::from(key.sport) << 24) | (u64::from(key.dport) << 8);
            mix64(
                client
                    ^ mix64((u64::from(u32::from(key.dst)) << 32) ^ ports ^ u64::from(key.proto)),
            )
        };
        Some((h % u64::from(self.uplink_workers)) as u16)
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

    fn flow(src: u32, sport: u16) -> FlowKey {
        FlowKey {
            src: std::net::Ipv4Addr::from(src),
            dst: std::net::Ipv4Addr::new(198, 18, 0, 1),
            sport,
            dport: 30080,
            proto: 6,
        }
    }

    #[test]
    fn a_flow_from_beyond_the_uplink_has_one_owner_among_the_uplinks_workers() {
        let mut d = DesiredRoutes {
            uplink_workers: 1,
            ..Default::default()
        };
        assert_eq!(
            RouteTable::build(&d).inbound_owner(&flow(1, 1), false),
            None,
            "one worker"
        );
        d.uplink_workers = 3;
        let t = RouteTable::build(&d);
        // Flows spread over every worker: those of many clients, and those of one client.
        for per_client in [false, true] {
            let mut seen = [0; 3];
            for i in 0..300u32 {
                let o = t.inbound_owner(&flow(0xc612_0000 + i, 5000), per_client);
                seen[usize::from(o.unwrap())] += 1;
            }
            assert!(seen.iter().all(|&n| n > 50), "clients: {seen:?}");
        }
        let mut seen = [0; 3];
        for p in 0..300u16 {
            seen[usize::from(t.inbound_owner(&flow(7, 5000 + p), false).unwrap())] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "one client's flows: {seen:?}");
        // With ClientIP affinity, all of a client's flows have one owner.
        let o = t.inbound_owner(&flow(7, 5000), true);
        assert!((1..300).all(|p| t.inbound_owner(&flow(7, 5000 + p), true) == o));
    }
}
