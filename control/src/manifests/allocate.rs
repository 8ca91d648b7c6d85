//! What the API server allocates for a Service: a ClusterIP from the service CIDR, NodePorts
//! for NodePort and LoadBalancer Services, a healthCheckNodePort for a LoadBalancer with
//! `externalTrafficPolicy: Local`.
//!
//! Deterministic, so that the same manifests give the same addresses wherever they are
//! applied: values written in a manifest are taken first (and refused, as the API server
//! refuses them, when outside the range or taken by another Service); then values this
//! Service had before ([`Allocations`], which the caller keeps between runs), so that they
//! stay stable while other Services come and go; the rest from a hash of the Service's name,
//! probing on past values in use.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::ops::RangeInclusive;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::object_key;

/// The NodePort range the API server uses unless configured otherwise.
pub const DEFAULT_NODE_PORTS: RangeInclusive<u16> = 30000..=32767;

/// What was allocated, by Service (`namespace/name`): kept by the caller and handed back at
/// the next run so that each Service keeps its values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocations {
    #[serde(default)]
    pub services: BTreeMap<String, ServiceAllocation>,
}

/// One Service's allocated values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAllocation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<Ipv4Addr>,
    /// NodePort by Service port (`name/PROTOCOL`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_ports: BTreeMap<String, u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
}

/// A Service whose values cannot be allocated (it is left out).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Service {service}: {reason}")]
pub struct AllocateError {
    pub service: String,
    pub reason: String,
}

/// Where values are allocated from.
#[derive(Debug, Clone)]
pub struct Ranges {
    pub service_cidr: Ipv4Net,
    pub node_ports: RangeInclusive<u16>,
}

/// A NodePort in use: the same number may serve a TCP and a UDP port.
type NodePortKey = (u16, String);

/// Values in use.
#[derive(Default)]
struct Used {
    ips: BTreeSet<Ipv4Addr>,
    ports: BTreeSet<NodePortKey>,
}

/// Allocates what `services` (defaulted: [`super::defaults::service`]) lack, in place.
/// Returns what each has now, and the Services that could not be given their values, by
/// index (left as they were).
pub fn allocate(
    services: &mut [Service],
    ranges: &Ranges,
    previous: &Allocations,
) -> (Allocations, BTreeMap<usize, AllocateError>) {
    let mut order: Vec<usize> = (0..services.len()).collect();
    order.sort_by_key(|&i| object_key(&services[i].metadata));
    let mut used = Used::default();
    let mut failed = BTreeMap::new();
    for &i in &order {
        if let Err(reason) = claim_written(&services[i], ranges, &mut used) {
            let service = object_key(&services[i].metadata);
            failed.insert(i, AllocateError { service, reason });
        }
    }
    // Earlier values before fresh ones: a fresh value never takes another Service's.
    for fresh in [false, true] {
        for &i in &order {
            if failed.contains_key(&i) {
                continue;
            }
            let key = object_key(&services[i].metadata);
            let before = previous.services.get(&key).cloned().unwrap_or_default();
            if let Err(reason) = fill(&mut services[i], &key, &before, fresh, ranges, &mut used) {
                failed.insert(
                    i,
                    AllocateError {
                        service: key,
                        reason,
                    },
                );
            }
        }
    }
    let mut now = Allocations::default();
    for (i, svc) in services.iter().enumerate() {
        let values = recorded(svc);
        if !failed.contains_key(&i) && values != ServiceAllocation::default() {
            now.services.insert(object_key(&svc.metadata), values);
        }
    }
    (now, failed)
}

/// The `name/PROTOCOL` a NodePort is remembered under.
fn port_key(name: Option<&str>, protocol: Option<&str>) -> String {
    format!("{}/{}", name.unwrap_or(""), protocol.unwrap_or("TCP"))
}

fn kind(svc: &Service) -> &str {
    svc.spec
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        .unwrap_or("ClusterIP")
}

/// Whether the Service gets NodePorts: NodePort ones, and LoadBalancer ones unless they say
/// `allocateLoadBalancerNodePorts: false`.
fn wants_node_ports(svc: &Service) -> bool {
    match kind(svc) {
        "NodePort" => true,
        "LoadBalancer" => svc
            .spec
            .as_ref()
            .and_then(|s| s.allocate_load_balancer_node_ports)
            .unwrap_or(true),
        _ => false,
    }
}

/// Whether the Service gets a healthCheckNodePort.
fn wants_health_check(svc: &Service) -> bool {
    kind(svc) == "LoadBalancer"
        && svc
            .spec
            .as_ref()
            .and_then(|s| s.external_traffic_policy.as_deref())
            == Some("Local")
}

/// The ClusterIP written in the Service (`clusterIP`, or the first of `clusterIPs`):
/// `None` when there is none to keep (unset, or "None": headless).
fn written_cluster_ip(svc: &Service) -> Option<&str> {
    let spec = svc.spec.as_ref()?;
    spec.cluster_ip
        .as_deref()
        .filter(|s| !s.is_empty())
        .or_else(|| spec.cluster_ips.as_ref()?.first().map(String::as_str))
}

/// Usable addresses of the CIDR: all but the network and broadcast addresses.
fn hosts(cidr: &Ipv4Net) -> (u32, u32) {
    let first = u32::from(cidr.network()) + 1;
    let last = u32::from(cidr.broadcast()).saturating_sub(1);
    (first, last)
}

fn in_cidr(ip: Ipv4Addr, cidr: &Ipv4Net) -> bool {
    let (first, last) = hosts(cidr);
    (first..=last).contains(&u32::from(ip))
}

/// Takes the values written in the Service, as the API server checks them: in range and not
/// another Service's. Nothing is taken when one of them fails.
fn claim_written(svc: &Service, ranges: &Ranges, used: &mut Used) -> Result<(), String> {
    let mut ip = None;
    match written_cluster_ip(svc) {
        None | Some("None") => {}
        Some(w) if kind(svc) == "ExternalName" => {
            return Err(format!(
                "spec.clusterIP {w:?}: an ExternalName Service has none"
            ))
        }
        Some(w) => match w.parse::<IpAddr>() {
            // IPv6 ClusterIPs are not this allocator's (stromd is IPv4); kept as written.
            Ok(IpAddr::V6(_)) => {}
            Ok(IpAddr::V4(v4)) if !in_cidr(v4, &ranges.service_cidr) => {
                return Err(format!(
                    "spec.clusterIP {v4} is not in the service CIDR {}",
                    ranges.service_cidr
                ))
            }
            Ok(IpAddr::V4(v4)) if used.ips.contains(&v4) => {
                return Err(format!("spec.clusterIP {v4} is already allocated"))
            }
            Ok(IpAddr::V4(v4)) => ip = Some(v4),
            Err(_) => return Err(format!("spec.clusterIP {w:?} is not an IP address")),
        },
    }
    let mut ports = BTreeSet::new();
    let spec = svc.spec.as_ref();
    if wants_node_ports(svc) {
        for p in spec.and_then(|s| s.ports.as_ref()).into_iter().flatten() {
            if let Some(n) = p.node_port.filter(|n| *n != 0) {
                let key = (
                    node_port(n, "nodePort", ranges)?,
                    p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                );
                if used.ports.contains(&key) || !ports.insert(key) {
                    return Err(format!(
                        "nodePort {n}/{} is already allocated",
                        p.protocol.as_deref().unwrap_or("TCP")
                    ));
                }
            }
        }
    }
    if wants_health_check(svc) {
        if let Some(n) = spec
            .and_then(|s| s.health_check_node_port)
            .filter(|n| *n != 0)
        {
            let key = (node_port(n, "healthCheckNodePort", ranges)?, "TCP".into());
            if used.ports.contains(&key) || !ports.insert(key) {
                return Err(format!("healthCheckNodePort {n} is already allocated"));
            }
        }
    }
    used.ips.extend(ip);
    used.ports.extend(ports);
    Ok(())
}

fn node_port(n: i32, field: &str, ranges: &Ranges) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|p| ranges.node_ports.contains(p))
        .ok_or_else(|| {
            format!(
                "{field} {n} is not in the NodePort range {}-{}",
                ranges.node_ports.start(),
                ranges.node_ports.end()
            )
        })
}

/// Gives the Service what it lacks: in the first round only the values it had before (when
/// still free), in the `fresh` round new ones.
fn fill(
    svc: &mut Service,
    key: &str,
    before: &ServiceAllocation,
    fresh: bool,
    ranges: &Ranges,
    used: &mut Used,
) -> Result<(), String> {
    let needs_ip = kind(svc) != "ExternalName" && written_cluster_ip(svc).is_none();
    let node_ports = wants_node_ports(svc);
    let health = wants_health_check(svc);
    let Some(spec) = svc.spec.as_mut() else {
        return Ok(());
    };
    if needs_ip {
        let earlier = before
            .cluster_ip
            .filter(|ip| in_cidr(*ip, &ranges.service_cidr) && !used.ips.contains(ip));
        let ip = match (earlier, fresh) {
            (Some(ip), _) => Some(ip),
            (None, true) => Some(fresh_ip(key, ranges, &used.ips)?),
            (None, false) => None,
        };
        if let Some(ip) = ip {
            used.ips.insert(ip);
            spec.cluster_ip = Some(ip.to_string());
        }
    }
    // clusterIPs[0] is clusterIP: keep the two in step, as the API server does.
    match (&spec.cluster_ip, &spec.cluster_ips) {
        (Some(ip), None) if !ip.is_empty() => spec.cluster_ips = Some(vec![ip.clone()]),
        (None, Some(ips)) if !ips.is_empty() => spec.cluster_ip = Some(ips[0].clone()),
        _ => {}
    }
    if node_ports {
        for p in spec.ports.iter_mut().flatten() {
            if p.node_port.is_some_and(|n| n != 0) {
                continue;
            }
            let pk = port_key(p.name.as_deref(), p.protocol.as_deref());
            let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            if let Some(n) = take_port(
                before.node_ports.get(&pk).copied(),
                &format!("{key}:{pk}"),
                &protocol,
                fresh,
                ranges,
                used,
            )? {
                p.node_port = Some(n.into());
            }
        }
    }
    if health && spec.health_check_node_port.is_none_or(|n| n == 0) {
        if let Some(n) = take_port(
            before.health_check_node_port,
            &format!("{key}:health"),
            "TCP",
            fresh,
            ranges,
            used,
        )? {
            spec.health_check_node_port = Some(n.into());
        }
    }
    Ok(())
}

/// A NodePort: the earlier one when still free, else (in the fresh round) a new one.
fn take_port(
    earlier: Option<u16>,
    seed: &str,
    protocol: &str,
    fresh: bool,
    ranges: &Ranges,
    used: &mut Used,
) -> Result<Option<u16>, String> {
    let free = |n: u16, used: &Used| {
        ranges.node_ports.contains(&n) && !used.ports.contains(&(n, protocol.to_string()))
    };
    let n = match earlier.filter(|n| free(*n, used)) {
        Some(n) => n,
        None if fresh => {
            let (first, last) = (*ranges.node_ports.start(), *ranges.node_ports.end());
            let size = u64::from(last - first) + 1;
            let start = hash(seed) % size;
            (0..size)
                .map(|k| first + ((start + k) % size) as u16)
                .find(|n| free(*n, used))
                .ok_or("no NodePort left in the range")?
        }
        None => return Ok(None),
    };
    used.ports.insert((n, protocol.to_string()));
    Ok(Some(n))
}

/// A free address of the service CIDR, from the hash of the Service's key on.
fn fresh_ip(key: &str, ranges: &Ranges, used: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr, String> {
    let (first, last) = hosts(&ranges.service_cidr);
    if last < first {
        return Err(format!(
            "the service CIDR {} has no address to give",
            ranges.service_cidr
        ));
    }
    let size = u64::from(last - first) + 1;
    let start = hash(key) % size;
    (0..size)
        .map(|k| Ipv4Addr::from(first + ((start + k) % size) as u32))
        .find(|ip| !used.contains(ip))
        .ok_or_else(|| {
            format!(
                "no address left in the service CIDR {}",
                ranges.service_cidr
            )
        })
}

fn hash(seed: &str) -> u64 {
    let d = Sha256::digest(seed.as_bytes());
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// What the Service holds now, to be handed back next time.
fn recorded(svc: &Service) -> ServiceAllocation {
    let mut out = ServiceAllocation {
        cluster_ip: written_cluster_ip(svc).and_then(|w| w.parse().ok()),
        ..Default::default()
    };
    let Some(spec) = svc.spec.as_ref() else {
        return out;
    };
    for p in spec.ports.iter().flatten() {
        if let Some(n) = p
            .node_port
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0)
        {
            out.node_ports
                .insert(port_key(p.name.as_deref(), p.protocol.as_deref()), n);
        }
    }
    out.health_check_node_port = spec
        .health_check_node_port
        .and_then(|n| u16::try_from(n).ok())
        .filter(|n| *n != 0);
    out
}
