//! The API server's defaulting of a Service (Kubernetes' `SetDefaults_Service`), for
//! Services that never went through one: what `kubectl get -o yaml` would show after
//! `kubectl apply`, less the allocations ([`super::allocate`]).

use k8s_openapi::api::core::v1::{ClientIPConfig, Service, SessionAffinityConfig};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::translate::DEFAULT_AFFINITY_TIMEOUT_S;

/// Fills in what the API server would:
/// - `type` ClusterIP;
/// - each port's `protocol` TCP and `targetPort` its `port`;
/// - `sessionAffinity` None, and with ClientIP a timeout of 10800 s;
/// - `externalTrafficPolicy` Cluster on NodePort and LoadBalancer Services (the only ones
///   the API server gives one);
/// - `internalTrafficPolicy` Cluster on all but ExternalName ones;
/// - `allocateLoadBalancerNodePorts` true on LoadBalancer ones.
pub fn service(svc: &mut Service) {
    let spec = svc.spec.get_or_insert_with(Default::default);
    let kind = spec.type_.get_or_insert_with(|| "ClusterIP".into()).clone();
    for p in spec.ports.iter_mut().flatten() {
        p.protocol.get_or_insert_with(|| "TCP".into());
        let unset = match &p.target_port {
            None => true,
            Some(IntOrString::Int(n)) => *n == 0,
            Some(IntOrString::String(s)) => s.is_empty(),
        };
        if unset {
            p.target_port = Some(IntOrString::Int(p.port));
        }
    }
    let affinity = spec.session_affinity.get_or_insert_with(|| "None".into());
    if affinity == "ClientIP" {
        let config = spec
            .session_affinity_config
            .get_or_insert_with(SessionAffinityConfig::default)
            .client_ip
            .get_or_insert_with(ClientIPConfig::default);
        config
            .timeout_seconds
            .get_or_insert(DEFAULT_AFFINITY_TIMEOUT_S as i32);
    }
    let external = matches!(kind.as_str(), "NodePort" | "LoadBalancer");
    if external {
        spec.external_traffic_policy
            .get_or_insert_with(|| "Cluster".into());
    }
    if kind != "ExternalName" {
        spec.internal_traffic_policy
            .get_or_insert_with(|| "Cluster".into());
    }
    if kind == "LoadBalancer" {
        spec.allocate_load_balancer_node_ports.get_or_insert(true);
    }
}
