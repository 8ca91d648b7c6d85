//! A Service to a [`ServiceSpec`]: its addresses, ports, affinity and traffic policies, each
//! port with its endpoints from the Service's EndpointSlices.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use strom_api::{ServicePortSpec, ServiceSpec};

use super::endpoints::{port_endpoints, ForNode};
use super::{address, port, protocol, TranslateError};

/// The session-affinity timeout the API server defaults to (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10800;

/// `spec.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
}

/// Translates `svc` with the EndpointSlices given (only those labelled
/// `kubernetes.io/service-name: <its name>` in its namespace with addressType IPv4 count, so
/// every slice known may be passed), as seen from `node`.
///
/// `None` for what stromd programs nothing for: ExternalName Services (DNS only), headless
/// ones (clusterIP `None` or none at all), and those with IPv6 ClusterIPs only (stromd is
/// IPv4: the IPv6 addresses of a dual-stack Service are left out likewise).
pub fn service_spec(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: ForNode<'_>,
) -> Result<Option<ServiceSpec>, TranslateError> {
    let namespace = svc.metadata.namespace.as_deref().unwrap_or("default");
    let name = svc.metadata.name.as_deref().unwrap_or("");
    let object = format!("Service {namespace}/{name}");
    let spec = svc.spec.as_ref().ok_or_else(|| TranslateError::NoSpec {
        object: object.clone(),
    })?;
    let kind = match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "ClusterIP" => Type::ClusterIp,
        "NodePort" => Type::NodePort,
        "LoadBalancer" => Type::LoadBalancer,
        "ExternalName" => Type::ExternalName,
        other => {
            return Err(TranslateError::UnknownValue {
                object,
                field: "spec.type".into(),
                value: other.into(),
                allowed: "ClusterIP, NodePort, LoadBalancer, ExternalName",
            })
        }
    };
    if kind == Type::ExternalName {
        return Ok(None);
    }
    // clusterIPs holds clusterIP first; older objects may carry clusterIP alone.
    let written: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.as_str()],
        _ => Vec::new(),
    };
    if written.contains(&"None") {
        return Ok(None);
    }
    let cluster_ips = ipv4s(&written, &object, "spec.clusterIPs")?;
    if cluster_ips.is_empty() {
        return Ok(None);
    }
    let external_ips = ipv4s(
        &spec
            .external_ips
            .iter()
            .flatten()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &object,
        "spec.externalIPs",
    )?;
    // A load balancer's ingress addresses are the Service's only while it is of that type
    // (kube-proxy ignores what a former LoadBalancer left in its status).
    let load_balancer_ips = if kind == Type::LoadBalancer {
        let ingress: Vec<&str> = svc
            .status
            .iter()
            .filter_map(|s| s.load_balancer.as_ref())
            .flat_map(|lb| lb.ingress.iter().flatten())
            .filter_map(|i| i.ip.as_deref())
            .collect();
        ipv4s(&ingress, &object, "status.loadBalancer.ingress[].ip")?
    } else {
        Vec::new()
    };
    let node_ports = matches!(kind, Type::NodePort | Type::LoadBalancer);
    let mut ports = Vec::new();
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{i}]");
        let port_name = p.name.clone().unwrap_or_default();
        let proto = protocol(p.protocol.as_deref(), &object, &format!("{field}.protocol"))?;
        let number = port(p.port, &object, &format!("{field}.port"))?;
        if !names.insert(port_name.clone()) {
            return Err(TranslateError::Duplicate {
                object,
                what: format!("port name {port_name:?}"),
            });
        }
        if !numbers.insert((proto, number)) {
            return Err(TranslateError::Duplicate {
                object,
                what: format!("port {number}/{}", proto.name()),
            });
        }
        let node_port = match p.node_port {
            Some(n) if node_ports && n != 0 => {
                Some(port(n, &object, &format!("{field}.nodePort"))?)
            }
            _ => None,
        };
        ports.push(ServicePortSpec {
            endpoints: port_endpoints(namespace, name, &port_name, proto, slices, node)?,
            name: port_name,
            protocol: proto,
            port: number,
            node_port,
        });
    }
    let affinity_timeout_s = match spec.session_affinity.as_deref().unwrap_or("None") {
        "None" => None,
        "ClientIP" => Some(affinity_timeout(svc, &object)?),
        other => {
            return Err(TranslateError::UnknownValue {
                object,
                field: "spec.sessionAffinity".into(),
                value: other.into(),
                allowed: "None, ClientIP",
            })
        }
    };
    let local = |field: &str, value: Option<&str>| match value.unwrap_or("Cluster") {
        "Cluster" => Ok(false),
        "Local" => Ok(true),
        other => Err(TranslateError::UnknownValue {
            object: object.clone(),
            field: field.into(),
            value: other.into(),
            allowed: "Cluster, Local",
        }),
    };
    // As kube-proxy: the external policy applies only where there is external traffic
    // (NodePorts, load balancers, external IPs); a ClusterIP Service keeps it for nothing.
    let external_local = local(
        "spec.externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
    )? && (node_ports || !external_ips.is_empty());
    let internal_local = local(
        "spec.internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
    )?;
    // Only a LoadBalancer with the Local policy has its health served (kube-proxy's
    // NeedsHealthCheck): the load balancer asks each node whether it has local endpoints.
    let health_check_node_port = match spec.health_check_node_port {
        Some(n) if kind == Type::LoadBalancer && external_local && n != 0 => {
            Some(port(n, &object, "spec.healthCheckNodePort")?)
        }
        _ => None,
    };
    let out = ServiceSpec {
        namespace: namespace.into(),
        name: name.into(),
        cluster_ips,
        external_ips,
        load_balancer_ips,
        ports,
        affinity_timeout_s,
        external_local,
        internal_local,
        health_check_node_port,
    };
    out.validate()
        .map_err(|reason| TranslateError::Invalid { object, reason })?;
    Ok(Some(out))
}

/// Parses every address; keeps the IPv4 ones (stromd's family).
fn ipv4s(written: &[&str], object: &str, field: &str) -> Result<Vec<IpAddr>, TranslateError> {
    let mut out = Vec::new();
    for w in written {
        let ip = address(w, object, field)?;
        if ip.is_ipv4() && !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// `sessionAffinityConfig.clientIP.timeoutSeconds`: 1 to 86400 (a day), as the API
/// validates; unset is the API server's default.
fn affinity_timeout(svc: &Service, object: &str) -> Result<u32, TranslateError> {
    let written = svc
        .spec
        .as_ref()
        .and_then(|s| s.session_affinity_config.as_ref())
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match written {
        None => Ok(DEFAULT_AFFINITY_TIMEOUT_S),
        Some(t) if (1..=86400).contains(&t) => Ok(t.unsigned_abs()),
        Some(t) => Err(TranslateError::Invalid {
            object: object.into(),
            reason: format!(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds {t} is out of range (1-86400)"
            ),
        }),
    }
}
