//! Flows as ranges of addresses and ports: flow i is one combination, in mixed radix.

use std::net::Ipv4Addr;
use std::str::FromStr;

/// `A` or `A-B` of any parseable type, as the pair (A, B) with B >= A.
fn bounds<T: FromStr + Ord>(s: &str) -> Result<(T, T), String>
where
    T::Err: std::fmt::Display,
{
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let parse = |x: &str| x.trim().parse::<T>().map_err(|e| format!("{x:?}: {e}"));
    let (a, b) = (parse(a)?, parse(b)?);
    if b < a {
        return Err(format!("{s}: the range ends before it starts"));
    }
    Ok((a, b))
}

/// An inclusive range of IPv4 addresses: `A` or `A-B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    pub first: u32,
    pub count: u32,
}

impl FromStr for IpRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = bounds::<Ipv4Addr>(s)?;
        let (a, b) = (u32::from(a), u32::from(b));
        Ok(IpRange {
            first: a,
            count: b - a + 1,
        })
    }
}

/// An inclusive range of ports: `P` or `P-Q`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub count: u32,
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = bounds::<u16>(s)?;
        Ok(PortRange {
            first: a,
            count: u32::from(b - a) + 1,
        })
    }
}

/// Every combination of source/destination address and port.
#[derive(Debug, Clone, Copy)]
pub struct Flows {
    pub src: IpRange,
    pub dst: IpRange,
    pub sport: PortRange,
    pub dport: PortRange,
}

/// Most flows a run may have (the sink keeps a record per flow).
pub const MAX_FLOWS: u64 = 1 << 20;

/// One flow's addresses and ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
}

impl Flows {
    /// Number of flows, refused above `MAX_FLOWS`.
    pub fn count(&self) -> Result<u32, String> {
        let n = u64::from(self.src.count)
            * u64::from(self.dst.count)
            * u64::from(self.sport.count)
            * u64::from(self.dport.count);
        if n > MAX_FLOWS {
            return Err(format!("{n} flows (at most {MAX_FLOWS})"));
        }
        Ok(n as u32)
    }

    /// Flow `i` (< count): destination port varies fastest, then source port, destination
    /// address, source address.
    pub fn get(&self, i: u32) -> Flow {
        let mut i = i;
        let dport = self.dport.first as u32 + i % self.dport.count;
        i /= self.dport.count;
        let sport = self.sport.first as u32 + i % self.sport.count;
        i /= self.sport.count;
        let dst = self.dst.first + i % self.dst.count;
        i /= self.dst.count;
        let src = self.src.first + i % self.src.count;
        Flow {
            src: Ipv4Addr::from(src),
            dst: Ipv4Addr::from(dst),
            sport: sport as u16,
            dport: dport as u16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ranges_parse_and_refuse_backwards_ones() {
        assert_eq!("198.18.1.2-198.18.1.5".parse::<IpRange>().unwrap().count, 4);
        assert_eq!("198.18.1.2".parse::<IpRange>().unwrap().count, 1);
        assert!("198.18.1.5-198.18.1.2".parse::<IpRange>().is_err());
        assert_eq!("1024-65535".parse::<PortRange>().unwrap().count, 64512);
        assert!("9-8".parse::<PortRange>().is_err());
        assert!("70000".parse::<PortRange>().is_err());
    }

    #[test]
    fn every_flow_index_is_a_distinct_combination() {
        let f = Flows {
            src: "198.18.1.2-198.18.1.3".parse().unwrap(),
            dst: "198.18.2.2".parse().unwrap(),
            sport: "1000-1003".parse().unwrap(),
            dport: "9-10".parse().unwrap(),
        };
        let n = f.count().unwrap();
        assert_eq!(n, 16);
        let all: HashSet<_> = (0..n).map(|i| f.get(i)).collect();
        assert_eq!(all.len(), 16);
        assert!(all.iter().all(|x| (1000..=1003).contains(&x.sport)));
    }

    #[test]
    fn too_many_flows_are_refused() {
        let f = Flows {
            src: "198.18.0.0-198.19.255.255".parse().unwrap(),
            dst: "198.18.2.2".parse().unwrap(),
            sport: "1-65535".parse().unwrap(),
            dport: "9".parse().unwrap(),
        };
        assert!(f.count().is_err());
    }
}
