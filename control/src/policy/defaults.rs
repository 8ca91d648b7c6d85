//! The API server's defaulting of a NetworkPolicy (Kubernetes' `SetDefaults_NetworkPolicy`
//! and `SetDefaults_NetworkPolicyPort`), for policies that never went through one: what
//! `kubectl get -o yaml` would show after `kubectl apply`.

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPort};

/// `p` as the API server would store it:
/// - a `spec` and a `podSelector` (empty: every pod of the namespace) when it has none;
/// - `policyTypes`, when omitted or empty: `Ingress`, and `Egress` too if the policy has at
///   least one egress rule (an empty `egress: []` does not count); given ones are kept as they
///   are, even `[Egress]` alone;
/// - each port's `protocol` TCP.
///
/// Idempotent: a defaulted policy comes out unchanged.
pub fn defaulted(p: &NetworkPolicy) -> NetworkPolicy {
    let mut p = p.clone();
    let spec = p.spec.get_or_insert_with(Default::default);
    spec.pod_selector.get_or_insert_with(Default::default);
    if spec.policy_types.as_ref().is_none_or(Vec::is_empty) {
        let mut types = vec!["Ingress".to_string()];
        if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
            types.push("Egress".into());
        }
        spec.policy_types = Some(types);
    }
    let tcp = |ports: &mut Option<Vec<NetworkPolicyPort>>| {
        for port in ports.iter_mut().flatten() {
            port.protocol.get_or_insert_with(|| "TCP".into());
        }
    };
    for rule in spec.ingress.iter_mut().flatten() {
        tcp(&mut rule.ports);
    }
    for rule in spec.egress.iter_mut().flatten() {
        tcp(&mut rule.ports);
    }
    p
}
