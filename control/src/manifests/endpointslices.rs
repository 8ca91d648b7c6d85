//! EndpointSlices as the EndpointSlice controller derives them for a Service with a selector
//! (kube-controller-manager's endpointslice reconciler), for pods given without one.
//!
//! - The endpoints are the pods of the Service's namespace whose labels match its selector,
//!   that have an IPv4 address and have not finished (phase Succeeded or Failed); terminating
//!   pods stay, marked so.
//! - Each Service port's targetPort is resolved per pod: a number is that number; a name is
//!   the pod's containerPort of that name and protocol, and a pod without one has no endpoint
//!   for that Service port.
//! - Pods are grouped into slices by the ports they resolve to (at most 100 endpoints a
//!   slice), so the pods of one slice share port numbers: what lets two sets of backends
//!   serve one Service port on different numbers.
//! - Conditions: `serving` is the pod's readiness, `terminating` its deletion (a
//!   `deletionTimestamp`), `ready` is serving and not terminating (or true whatever the pod,
//!   with `publishNotReadyAddresses`).
//!
//! Readiness comes from the pod's `Ready` condition. Pods given in manifests have no kubelet
//! to report it, so a pod without a `Ready` condition counts as ready: it is running as far
//! as anything here knows. A manifest marks a pod not ready with `status.conditions: [{type:
//! Ready, status: "False"}]`, and terminating with `metadata.deletionTimestamp`.
//!
//! Left out: the controller's placeholder slice for a Service without endpoints (it carries
//! nothing to program), and slice names from `generateName` (names here are
//! `<service>-<n>`, stable for the same pods).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::translate::SERVICE_NAME_LABEL;

/// Endpoints a slice holds at most (the controller's default `--max-endpoints-per-slice`).
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// The `endpointslice.kubernetes.io/managed-by` value the controller writes.
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";

/// The slices the controller would keep for `svc` given `pods`; none for a Service without a
/// selector (its slices are someone else's to write).
pub fn derive(svc: &Service, pods: &[Pod]) -> Vec<EndpointSlice> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
        return Vec::new();
    };
    let namespace = svc.metadata.namespace.as_deref().unwrap_or("default");
    let name = svc.metadata.name.as_deref().unwrap_or("");
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    // Endpoints by the ports they resolve to (name, protocol, number), in the pods' order.
    let mut groups: BTreeMap<Vec<(String, String, i32)>, Vec<Endpoint>> = BTreeMap::new();
    for pod in pods {
        if pod.metadata.namespace.as_deref().unwrap_or("default") != namespace
            || !matches(selector, pod)
        {
            continue;
        }
        let Some(ip) = ipv4(pod) else { continue };
        if matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ) {
            continue;
        }
        let ports: Vec<(String, String, i32)> = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let number = target_port(p, pod)?;
                Some((
                    p.name.clone().unwrap_or_default(),
                    p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    number,
                ))
            })
            .collect();
        let serving = ready(pod);
        let terminating = pod.metadata.deletion_timestamp.is_some();
        groups.entry(ports).or_default().push(Endpoint {
            addresses: vec![ip.to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(publish_not_ready || (serving && !terminating)),
                serving: Some(serving),
                terminating: Some(terminating),
            }),
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                namespace: Some(namespace.into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let mut slices = Vec::new();
    for (ports, endpoints) in groups {
        for chunk in endpoints.chunks(MAX_ENDPOINTS_PER_SLICE) {
            slices.push(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(format!("{name}-{}", slices.len())),
                    namespace: Some(namespace.into()),
                    labels: Some(BTreeMap::from([
                        (SERVICE_NAME_LABEL.to_string(), name.to_string()),
                        (
                            "endpointslice.kubernetes.io/managed-by".to_string(),
                            MANAGED_BY.to_string(),
                        ),
                    ])),
                    ..Default::default()
                },
                address_type: "IPv4".into(),
                endpoints: chunk.to_vec(),
                ports: Some(
                    ports
                        .iter()
                        .map(|(name, protocol, port)| EndpointPort {
                            name: Some(name.clone()),
                            protocol: Some(protocol.clone()),
                            port: Some(*port),
                            app_protocol: None,
                        })
                        .collect(),
                ),
            });
        }
    }
    slices
}

/// Whether the pod's labels include every pair of the selector.
fn matches(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.as_ref();
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// The pod's IPv4 address (`status.podIPs`, or `status.podIP`).
fn ipv4(pod: &Pod) -> Option<Ipv4Addr> {
    let status = pod.status.as_ref()?;
    status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .chain(status.pod_ip.as_deref())
        .find_map(|ip| ip.parse().ok())
}

/// The pod's readiness: its `Ready` condition, or ready when it has none (module doc).
pub fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_none_or(|c| c.status == "True")
}

/// The Service port's targetPort on this pod (Kubernetes' `FindPort`): a number as it is, a
/// name looked up among the pod's containerPorts with the Service port's protocol.
fn target_port(p: &ServicePort, pod: &Pod) -> Option<i32> {
    match p.target_port.as_ref() {
        None => Some(p.port),
        Some(IntOrString::Int(0)) => Some(p.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) if name.is_empty() => Some(p.port),
        Some(IntOrString::String(name)) => {
            let protocol = p.protocol.as_deref().unwrap_or("TCP");
            pod.spec
                .as_ref()?
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|c| {
                    c.name.as_deref() == Some(name.as_str())
                        && c.protocol.as_deref().unwrap_or("TCP") == protocol
                })
                .map(|c| c.container_port)
        }
    }
}
