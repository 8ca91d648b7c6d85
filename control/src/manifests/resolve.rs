//! All that the cluster would do for a set of Services before kube-proxy reads them:
//! defaulting, allocation, EndpointSlices for those that have none.

use std::ops::RangeInclusive;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::allocate::{self, AllocateError, Allocations, Ranges, DEFAULT_NODE_PORTS};
use super::{defaults, endpointslices};
use crate::translate::labelled_for;

/// The cluster's settings that matter here.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where ClusterIPs come from (the API server's `--service-cluster-ip-range`).
    pub service_cidr: Ipv4Net,
    /// Where NodePorts come from (`--service-node-port-range`).
    pub node_ports: RangeInclusive<u16>,
}

impl Settings {
    /// A service CIDR with the default NodePort range.
    pub fn new(service_cidr: Ipv4Net) -> Self {
        Settings {
            service_cidr,
            node_ports: DEFAULT_NODE_PORTS,
        }
    }
}

/// Services as the API server would hold them, with the EndpointSlices to read them with.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    /// Defaulted and allocated, in the order given.
    pub services: Vec<Service>,
    /// The slices given, and those derived for Services with a selector and no slice given.
    pub endpoint_slices: Vec<EndpointSlice>,
    /// What each Service was given: hand it back next time to keep the values.
    pub allocations: Allocations,
    /// Services left out, with the reason.
    pub skipped: Vec<AllocateError>,
}

/// Defaults and allocates `services` (values they had in `previous` kept where still free),
/// and derives EndpointSlices from `pods` for each Service with a selector that has no slice
/// among `slices`.
pub fn resolve(
    services: &[Service],
    slices: &[EndpointSlice],
    pods: &[Pod],
    settings: &Settings,
    previous: &Allocations,
) -> Resolved {
    let mut services = services.to_vec();
    services.iter_mut().for_each(defaults::service);
    let ranges = Ranges {
        service_cidr: settings.service_cidr,
        node_ports: settings.node_ports.clone(),
    };
    let (allocations, mut failed) = allocate::allocate(&mut services, &ranges, previous);
    let mut out = Resolved {
        allocations,
        endpoint_slices: slices.to_vec(),
        ..Default::default()
    };
    for (i, svc) in services.into_iter().enumerate() {
        if let Some(e) = failed.remove(&i) {
            out.skipped.push(e);
            continue;
        }
        let namespace = svc.metadata.namespace.as_deref().unwrap_or("default");
        let name = svc.metadata.name.as_deref().unwrap_or("");
        if !slices.iter().any(|s| labelled_for(s, namespace, name)) {
            out.endpoint_slices
                .extend(endpointslices::derive(&svc, pods));
        }
        out.services.push(svc);
    }
    out
}
