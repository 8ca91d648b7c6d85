//! The endpoints of one Service port, from the Service's EndpointSlices.
//!
//! The EndpointSlice controller resolves each Service port's targetPort per pod (a named
//! targetPort can be a different number on each pod) and writes, in each slice, the ports its
//! endpoints have: the endpoints of a slice serve the Service port whose name and protocol
//! match one of the slice's ports, on that slice port's number. A slice without such a port
//! has nothing for that Service port (its pods lack the named port).

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use strom_api::{EndpointSpec, Protocol};

use super::{address, port, protocol, TranslateError};

/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Whether `slice` is one of Service `namespace/name`'s, of any address type.
pub fn labelled_for(slice: &EndpointSlice, namespace: &str, name: &str) -> bool {
    slice.metadata.namespace.as_deref().unwrap_or("default") == namespace
        && slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .is_some_and(|n| n == name)
}

/// Whether `slice` is one of Service `namespace/name`'s IPv4 slices: the ones that count.
pub fn belongs(slice: &EndpointSlice, namespace: &str, name: &str) -> bool {
    labelled_for(slice, namespace, name) && slice.address_type == "IPv4"
}

/// The endpoints of the Service port `port_name`/`proto` of Service `namespace/service`,
/// ordered by address and port. An endpoint listed in several slices (as happens while the
/// controller moves it between slices) counts once, ready if any copy is.
pub(crate) fn port_endpoints(
    namespace: &str,
    service: &str,
    port_name: &str,
    proto: Protocol,
    slices: &[&EndpointSlice],
    node: ForNode<'_>,
) -> Result<Vec<EndpointSpec>, TranslateError> {
    let mut found: BTreeMap<(IpAddr, u16), (EndpointSpec, Hints)> = BTreeMap::new();
    for slice in slices.iter().filter(|s| belongs(s, namespace, service)) {
        let object = format!(
            "EndpointSlice {namespace}/{}",
            slice.metadata.name.as_deref().unwrap_or("")
        );
        let mut number = None;
        for (i, p) in slice.ports.iter().flatten().enumerate() {
            let field = format!("ports[{i}]");
            let p_proto = protocol(p.protocol.as_deref(), &object, &format!("{field}.protocol"))?;
            if p.name.as_deref().unwrap_or("") == port_name && p_proto == proto {
                // No number: the slice does not restrict ports, which kube-proxy cannot
                // program (it skips such ports too).
                number = match p.port {
                    Some(n) => Some(port(n, &object, &format!("{field}.port"))?),
                    None => None,
                };
                break;
            }
        }
        let Some(number) = number else { continue };
        for (i, e) in slice.endpoints.iter().enumerate() {
            // Only the first address counts (the API says consumers use it; kube-proxy does).
            let Some(first) = e.addresses.first() else {
                return Err(TranslateError::Invalid {
                    object,
                    reason: format!("endpoints[{i}] has no address"),
                });
            };
            let ip = address(first, &object, &format!("endpoints[{i}].addresses[0]"))?;
            if !ip.is_ipv4() {
                return Err(TranslateError::BadAddress {
                    object,
                    field: format!("endpoints[{i}].addresses[0] (an IPv4 slice)"),
                    value: first.clone(),
                });
            }
            let c = e.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let endpoint = EndpointSpec {
                ip,
                port: number,
                ready,
                serving: c.and_then(|c| c.serving).unwrap_or(ready),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                local: e.node_name.as_deref() == Some(node.name),
                in_topology: true,
                target: e
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .map(|r| {
                        format!(
                            "{}/{}",
                            r.namespace.as_deref().unwrap_or(namespace),
                            r.name.as_deref().unwrap_or("")
                        )
                    })
                    .unwrap_or_default(),
            };
            let hints = e.hints.as_ref();
            let hints = Hints {
                zones: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .map(|z| z.iter().map(|z| z.name.clone()).collect())
                    .unwrap_or_default(),
                nodes: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .map(|n| n.iter().map(|n| n.name.clone()).collect())
                    .unwrap_or_default(),
            };
            match found.get(&(ip, number)) {
                Some((have, _)) if have.ready || !endpoint.ready => {}
                _ => {
                    found.insert((ip, number), (endpoint, hints));
                }
            }
        }
    }
    let mode = topology_mode(found.values().map(|(e, h)| (e.ready, h)), node);
    Ok(found
        .into_values()
        .map(|(mut e, h)| {
            e.in_topology = match mode {
                Topology::All => true,
                Topology::SameNode => h.nodes.iter().any(|n| n == node.name),
                Topology::SameZone => node.zone.is_some_and(|z| h.zones.iter().any(|h| h == z)),
            };
            e
        })
        .collect())
}

/// The node a translation is for.
#[derive(Debug, Clone, Copy)]
pub struct ForNode<'a> {
    /// Its name: endpoints with this `nodeName` are local, and node hints name it.
    pub name: &'a str,
    /// Its zone (the Node's `topology.kubernetes.io/zone` label), for zone hints.
    pub zone: Option<&'a str>,
}

/// An endpoint's topology hints: the zones and nodes it is meant for.
#[derive(Debug, Default)]
struct Hints {
    zones: Vec<String>,
    nodes: Vec<String>,
}

/// Which endpoints traffic under a Cluster policy may use from this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topology {
    /// Every one (no topology-aware routing here).
    All,
    /// Those hinted for this node (`trafficDistribution: PreferSameNode`).
    SameNode,
    /// Those hinted for this node's zone (`PreferSameZone`, `PreferClose`, or the
    /// `service.kubernetes.io/topology-mode: Auto` annotation).
    SameZone,
}

/// kube-proxy's choice (`topologyModeFromHints` in `pkg/proxy/topology.go`), over the ready
/// endpoints: node hints when every one has some and one names this node; failing that,
/// zone hints when every one has some and one names this node's zone; otherwise none, so
/// that a Service is never cut off by hints that leave this node nothing. The EndpointSlice
/// controller writes hints only when the Service asks for them, so their presence is the
/// whole signal (as for kube-proxy).
fn topology_mode<'h>(
    endpoints: impl Iterator<Item = (bool, &'h Hints)> + Clone,
    node: ForNode<'_>,
) -> Topology {
    let ready = endpoints.filter(|(ready, _)| *ready).map(|(_, h)| h);
    if ready.clone().next().is_none() {
        return Topology::All;
    }
    if ready.clone().all(|h| !h.nodes.is_empty())
        && ready
            .clone()
            .any(|h| h.nodes.iter().any(|n| n == node.name))
    {
        return Topology::SameNode;
    }
    if let Some(zone) = node.zone.filter(|z| !z.is_empty()) {
        if ready.clone().all(|h| !h.zones.is_empty())
            && ready.clone().any(|h| h.zones.iter().any(|z| z == zone))
        {
            return Topology::SameZone;
        }
    }
    Topology::All
}
