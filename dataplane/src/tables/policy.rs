//! The policy table: the node's NetworkPolicies, compiled by the control crate into a
//! [`PolicySet`], as lookups whose cost does not grow with the number of policies, rules or
//! pods.
//!
//! A verdict for a packet from `src` to `dst` on (`proto`, `port`) takes at most two isolated
//! pod lookups (the source's egress, the destination's ingress), and for each isolated side:
//! the group's rules for every address (one port-set test), the peer's identity (two hash
//! lookups and a port-set test) and the group's address blocks (a binary search over the
//! group's block boundaries). A port set is a sorted list of ranges per protocol, searched
//! by halves: every rule of every policy selecting the pod that names the same peer is merged
//! into one set when the table is built.
//!
//! The table says nothing about the node's own traffic (always allowed: the pipeline decides
//! that before asking) nor about replies (conntrack's).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use hashbrown::HashMap;
use strom_api::{Direction, Peers, PolicySet, PortRange, Protocol, Rule};

/// No group (the pod is open in that direction).
const OPEN: u32 = u32::MAX;

/// Ports of each protocol: sorted, merged ranges; or everything (a rule without ports, which
/// opens other protocols than TCP, UDP and SCTP too).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PortSet {
    all: bool,
    /// TCP, UDP, SCTP.
    ranges: [Vec<(u16, u16)>; 3],
}

fn proto_index(proto: u8) -> Option<usize> {
    match Protocol::from_number(proto)? {
        Protocol::Tcp => Some(0),
        Protocol::Udp => Some(1),
        Protocol::Sctp => Some(2),
    }
}

impl PortSet {
    /// The ports a rule opens (`None`: all).
    fn of(ports: Option<&[PortRange]>) -> Self {
        let Some(ports) = ports else {
            return PortSet {
                all: true,
                ..Default::default()
            };
        };
        let mut s = PortSet::default();
        for p in ports {
            let i = proto_index(p.protocol.number()).unwrap_or(0);
            s.ranges[i].push((p.first.min(p.last), p.last.max(p.first)));
        }
        s.normalize();
        s
    }

    fn union(&self, other: &PortSet) -> PortSet {
        if self.all || other.all {
            return PortSet {
                all: true,
                ..Default::default()
            };
        }
        let mut s = self.clone();
        for (i, r) in other.ranges.iter().enumerate() {
            s.ranges[i].extend_from_slice(r);
        }
        s.normalize();
        s
    }

    /// Sorts and merges overlapping or adjacent ranges.
    fn normalize(&mut self) {
        for r in &mut self.ranges {
            r.sort_unstable();
            let mut out: Vec<(u16, u16)> = Vec::with_capacity(r.len());
            for &(a, b) in r.iter() {
                match out.last_mut() {
                    Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
                    _ => out.push((a, b)),
                }
            }
            *r = out;
        }
    }

    /// Whether `port` of IP protocol `proto` is in the set.
    #[inline]
    pub fn contains(&self, proto: u8, port: u16) -> bool {
        if self.all {
            return true;
        }
        let Some(i) = proto_index(proto) else {
            return false;
        };
        let r = &self.ranges[i];
        let at = r.partition_point(|&(_, last)| last < port);
        r.get(at).is_some_and(|&(first, _)| first <= port)
    }
}

/// Why a packet is denied: the side whose policies did not allow it, and the packet as it
/// was judged (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    pub direction: Direction,
    /// The group of rules that did not allow it.
    pub group: u32,
    pub src: Ipv4Addr,
    /// The source port: 0 from the table, which does not look at it; the pipeline sets it.
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub port: u16,
}

/// A pod's groups, per direction.
#[derive(Debug, Clone, Copy)]
struct PodGroups {
    ingress: u32,
    egress: u32,
}

/// What the policies selecting a set of pods allow in one direction.
#[derive(Debug, Clone)]
pub struct Group {
    pub direction: Direction,
    /// The selecting policies' counter slots ([`PolicySlots`]).
    pub slots: Box<[u32]>,
    /// Their names.
    pub policies: Vec<String>,
    /// The port set every address gets (rules without peers).
    any: Option<u32>,
    /// Disjoint address ranges (first, last) with the port set they get, sorted.
    blocks: Box<[(u32, u32, u32)]>,
    /// The rules as given, for `stromctl trace`.
    rules: Vec<Rule>,
}

/// A counter slot per policy name, kept for stromd's life so that counts survive changes of
/// the set (a policy's drops are counted under its slot whatever group it is in).
#[derive(Debug, Default)]
pub struct PolicySlots {
    by_name: HashMap<String, u32>,
    names: Vec<String>,
}

impl PolicySlots {
    fn slot(&mut self, name: &str) -> u32 {
        if let Some(s) = self.by_name.get(name) {
            return *s;
        }
        let s = self.names.len() as u32;
        self.names.push(name.to_owned());
        self.by_name.insert(name.to_owned(), s);
        s
    }

    /// The slot of a policy that has had one.
    pub fn get(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// Slots handed out so far.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The compiled policies, as workers read them.
#[derive(Debug, Clone, Default)]
pub struct PolicyTable {
    generation: u64,
    identities: HashMap<Ipv4Addr, u32>,
    pods: HashMap<Ipv4Addr, PodGroups>,
    /// `namespace/name` of each isolated pod address, for display.
    names: HashMap<Ipv4Addr, String>,
    groups: Vec<Group>,
    by_identity: HashMap<(u32, u32), u32>,
    port_sets: Vec<PortSet>,
    /// Counter slots handed out when it was built (workers size their counters to it).
    slots: usize,
}

/// A malformed [`PolicySet`]: refused whole, the table in force stays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("pod {pod}: group {group} does not exist ({groups} groups)")]
    NoGroup {
        pod: String,
        group: u32,
        groups: usize,
    },
    #[error("pod {pod}: group {group} is not for {direction}")]
    WrongDirection {
        pod: String,
        group: u32,
        direction: &'static str,
    },
    #[error("{policy}: bad address block {cidr:?}")]
    BadBlock { policy: String, cidr: String },
}

/// An IPv4 block as an inclusive range (None: not IPv4).
fn v4_range(cidr: &str) -> Result<Option<(u32, u32)>, ()> {
    let (addr, len) = cidr.split_once('/').ok_or(())?;
    let len: u32 = len.parse().map_err(|_| ())?;
    match addr.parse::<IpAddr>().map_err(|_| ())? {
        IpAddr::V6(_) if len <= 128 => Ok(None),
        IpAddr::V4(a) if len <= 32 => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            let first = u32::from(a) & mask;
            Ok(Some((first, first | !mask)))
        }
        _ => Err(()),
    }
}

/// `[first, last]` less the `holes`, as disjoint ranges.
fn subtract(first: u32, last: u32, holes: &mut [(u32, u32)]) -> Vec<(u32, u32)> {
    holes.sort_unstable();
    let mut out = Vec::new();
    let mut at = u64::from(first);
    for &(a, b) in holes.iter() {
        if u64::from(b) < at || a > last {
            continue;
        }
        if u64::from(a) > at {
            out.push((at as u32, a - 1));
        }
        at = at.max(u64::from(b) + 1);
    }
    if at <= u64::from(last) {
        out.push((at as u32, last));
    }
    out
}

/// Builds port sets, one copy of each.
#[derive(Default)]
struct Interner {
    sets: Vec<PortSet>,
    index: HashMap<PortSet, u32>,
}

impl Interner {
    fn add(&mut self, s: PortSet) -> u32 {
        if let Some(i) = self.index.get(&s) {
            return *i;
        }
        let i = self.sets.len() as u32;
        self.sets.push(s.clone());
        self.index.insert(s, i);
        i
    }

    fn union(&mut self, a: Option<u32>, b: &PortSet) -> u32 {
        match a {
            None => self.add(b.clone()),
            Some(a) => {
                let u = self.sets[a as usize].union(b);
                self.add(u)
            }
        }
    }
}

/// Disjoint ranges with the union of the port sets of the blocks covering each.
fn flatten(blocks: &[(u32, u32, PortSet)], interner: &mut Interner) -> Vec<(u32, u32, u32)> {
    let mut cuts: Vec<u64> = blocks
        .iter()
        .flat_map(|&(a, b, _)| [u64::from(a), u64::from(b) + 1])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    // A sweep over the cuts: the blocks covering a piece are those started at or before it
    // and not yet ended (no cut falls inside a piece), kept in block order so that the union
    // is built as a loop over every block would build it, without one (that is quadratic:
    // 2 s for 10k policies naming ports toward blocks that cover pods).
    let mut starts: Vec<(u64, usize)> = blocks
        .iter()
        .enumerate()
        .map(|(i, &(a, _, _))| (u64::from(a), i))
        .collect();
    let mut ends: Vec<(u64, usize)> = blocks
        .iter()
        .enumerate()
        .map(|(i, &(_, b, _))| (u64::from(b) + 1, i))
        .collect();
    starts.sort_unstable();
    ends.sort_unstable();
    let (mut si, mut ei) = (0, 0);
    let mut active = std::collections::BTreeSet::new();
    let mut out: Vec<(u32, u32, u32)> = Vec::new();
    for w in cuts.windows(2) {
        let (a, b) = (w[0], w[1] - 1);
        while ei < ends.len() && ends[ei].0 <= a {
            active.remove(&ends[ei].1);
            ei += 1;
        }
        while si < starts.len() && starts[si].0 <= a {
            active.insert(starts[si].1);
            si += 1;
        }
        let mut set: Option<u32> = None;
        for &i in &active {
            set = Some(interner.union(set, &blocks[i].2));
        }
        let Some(set) = set else { continue };
        let (a, b) = (a as u32, b as u32);
        match out.last_mut() {
            Some(last) if last.2 == set && u64::from(last.1) + 1 == u64::from(a) => last.1 = b,
            _ => out.push((a, b, set)),
        }
    }
    out
}

impl PolicyTable {
    /// Builds the table for `set`, counters under `slots`.
    pub fn build(
        set: &PolicySet,
        generation: u64,
        slots: &mut PolicySlots,
    ) -> Result<Self, PolicyError> {
        let mut interner = Interner::default();
        let mut t = PolicyTable {
            generation,
            ..Default::default()
        };
        for p in &set.peers {
            if let IpAddr::V4(ip) = p.ip {
                t.identities.insert(ip, p.identity);
            }
        }
        for (gi, g) in set.groups.iter().enumerate() {
            let gi = gi as u32;
            let mut any: Option<u32> = None;
            let mut by_identity: BTreeMap<u32, PortSet> = BTreeMap::new();
            let mut blocks: Vec<(u32, u32, PortSet)> = Vec::new();
            for r in &g.rules {
                let ports = PortSet::of(r.ports.as_deref());
                match &r.peers {
                    Peers::Any => any = Some(interner.union(any, &ports)),
                    Peers::Some {
                        identities,
                        blocks: bs,
                    } => {
                        for id in identities {
                            let e = by_identity.entry(*id).or_default();
                            *e = e.union(&ports);
                        }
                        for b in bs {
                            let bad = || PolicyError::BadBlock {
                                policy: r.policy.clone(),
                                cidr: b.cidr.clone(),
                            };
                            let Some((first, last)) = v4_range(&b.cidr).map_err(|_| bad())? else {
                                continue;
                            };
                            let mut holes = Vec::new();
                            for x in &b.except {
                                if let Some(h) = v4_range(x).map_err(|_| PolicyError::BadBlock {
                                    policy: r.policy.clone(),
                                    cidr: x.clone(),
                                })? {
                                    holes.push(h);
                                }
                            }
                            for (a, z) in subtract(first, last, &mut holes) {
                                blocks.push((a, z, ports.clone()));
                            }
                        }
                    }
                }
            }
            for (id, ps) in by_identity {
                let i = interner.add(ps);
                t.by_identity.insert((gi, id), i);
            }
            let blocks = flatten(&blocks, &mut interner);
            t.groups.push(Group {
                direction: g.direction,
                slots: g.policies.iter().map(|p| slots.slot(p)).collect(),
                policies: g.policies.clone(),
                any,
                blocks: blocks.into(),
                rules: g.rules.clone(),
            });
        }
        let groups = set.groups.len();
        for p in &set.pods {
            let check = |g: Option<u32>, d: Direction| -> Result<u32, PolicyError> {
                let Some(g) = g else { return Ok(OPEN) };
                match set.groups.get(g as usize) {
                    None => Err(PolicyError::NoGroup {
                        pod: p.pod.clone(),
                        group: g,
                        groups,
                    }),
                    Some(x) if x.direction != d => Err(PolicyError::WrongDirection {
                        pod: p.pod.clone(),
                        group: g,
                        direction: d.name(),
                    }),
                    Some(_) => Ok(g),
                }
            };
            let pg = PodGroups {
                ingress: check(p.ingress, Direction::Ingress)?,
                egress: check(p.egress, Direction::Egress)?,
            };
            if pg.ingress == OPEN && pg.egress == OPEN {
                continue;
            }
            for ip in &p.ips {
                if let IpAddr::V4(ip) = ip {
                    t.pods.insert(*ip, pg);
                    t.names.insert(*ip, p.pod.clone());
                }
            }
        }
        t.port_sets = interner.sets;
        t.slots = slots.len();
        Ok(t)
    }

    /// No pod is isolated: every packet is allowed.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Bumped on every change of the policies (conntrack entries check their flow again).
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Counter slots workers keep ([`PolicySlots`]).
    #[inline]
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Whether `ip` is a pod of the node isolated in some direction.
    #[inline]
    pub fn isolated(&self, ip: Ipv4Addr) -> bool {
        self.pods.contains_key(&ip)
    }

    /// The verdict on a packet from `src` to `dst`, to `port` of IP protocol `proto` (the
    /// port is not looked at for protocols without ports): the source's egress rules, then
    /// the destination's ingress rules, each only if that side is isolated.
    #[inline]
    pub fn verdict(
        &self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: u8,
        port: u16,
    ) -> Result<(), Denied> {
        if let Some(p) = self.pods.get(&src) {
            if p.egress != OPEN && !self.allows(p.egress, dst, proto, port) {
                return Err(Denied {
                    direction: Direction::Egress,
                    group: p.egress,
                    src,
                    sport: 0,
                    dst,
                    proto,
                    port,
                });
            }
        }
        if let Some(p) = self.pods.get(&dst) {
            if p.ingress != OPEN && !self.allows(p.ingress, src, proto, port) {
                return Err(Denied {
                    direction: Direction::Ingress,
                    group: p.ingress,
                    src,
                    sport: 0,
                    dst,
                    proto,
                    port,
                });
            }
        }
        Ok(())
    }

    /// Whether group `g` lets `peer` through on (`proto`, `port`).
    #[inline]
    fn allows(&self, g: u32, peer: Ipv4Addr, proto: u8, port: u16) -> bool {
        let Some(group) = self.groups.get(g as usize) else {
            return false;
        };
        let ok = |ps: u32| {
            self.port_sets
                .get(ps as usize)
                .is_some_and(|s| s.contains(proto, port))
        };
        if group.any.is_some_and(ok) {
            return true;
        }
        if let Some(id) = self.identities.get(&peer) {
            if self.by_identity.get(&(g, *id)).is_some_and(|ps| ok(*ps)) {
                return true;
            }
        }
        let a = u32::from(peer);
        let at = group.blocks.partition_point(|&(_, last, _)| last < a);
        group
            .blocks
            .get(at)
            .is_some_and(|&(first, _, ps)| first <= a && ok(ps))
    }

    /// The `namespace/name` of the isolated pod at `ip`.
    pub fn name(&self, ip: Ipv4Addr) -> Option<&str> {
        self.names.get(&ip).map(String::as_str)
    }

    /// Group `g`.
    pub fn group(&self, g: u32) -> Option<&Group> {
        self.groups.get(g as usize)
    }

    /// Every group.
    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// The isolated pods: address, name, ingress and egress groups.
    pub fn pods(&self) -> impl Iterator<Item = (Ipv4Addr, &str, Option<u32>, Option<u32>)> {
        self.pods.iter().map(|(ip, g)| {
            let name = self.names.get(ip).map(String::as_str).unwrap_or("");
            let opt = |g: u32| (g != OPEN).then_some(g);
            (*ip, name, opt(g.ingress), opt(g.egress))
        })
    }

    /// What the policies say about a packet, in words (`stromctl trace`): for each isolated
    /// side, the policies isolating it and the first rule that allows the packet, if any.
    pub fn trace(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, port: u16) -> Vec<String> {
        let mut steps = Vec::new();
        let sides = [
            (
                Direction::Egress,
                src,
                dst,
                self.pods.get(&src).map(|p| p.egress),
            ),
            (
                Direction::Ingress,
                dst,
                src,
                self.pods.get(&dst).map(|p| p.ingress),
            ),
        ];
        for (dir, pod, peer, g) in sides {
            let name = self.names.get(&pod).map(String::as_str).unwrap_or("");
            let Some(g) = g.filter(|g| *g != OPEN) else {
                steps.push(format!("policy: {pod} is not isolated for {}", dir.name()));
                continue;
            };
            let Some(group) = self.group(g) else { continue };
            steps.push(format!(
                "policy: {pod} ({name}) isolated for {} by {}",
                dir.name(),
                group.policies.join(", ")
            ));
            if !self.allows(g, peer, proto, port) {
                steps.push(format!(
                    "policy: no rule allows it: dropped (policy_denied, {})",
                    dir.name()
                ));
                return steps;
            }
            if let Some(r) = group
                .rules
                .iter()
                .find(|r| self.rule_allows(r, peer, proto, port))
            {
                steps.push(format!(
                    "policy: allowed by {} {} rule {}",
                    r.policy,
                    dir.name(),
                    r.index
                ));
            }
        }
        steps
    }

    /// Whether one rule matches (slow; for `trace`).
    fn rule_allows(&self, r: &Rule, peer: Ipv4Addr, proto: u8, port: u16) -> bool {
        if !PortSet::of(r.ports.as_deref()).contains(proto, port) {
            return false;
        }
        match &r.peers {
            Peers::Any => true,
            Peers::Some { identities, blocks } => {
                self.identities
                    .get(&peer)
                    .is_some_and(|id| identities.contains(id))
                    || blocks.iter().any(|b| {
                        let inside = |c: &str| {
                            v4_range(c)
                                .ok()
                                .flatten()
                                .is_some_and(|(a, z)| (a..=z).contains(&u32::from(peer)))
                        };
                        inside(&b.cidr) && !b.except.iter().any(|x| inside(x))
                    })
            }
        }
    }
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
