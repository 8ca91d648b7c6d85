//! Reading Kubernetes manifests (YAML, several documents per file, or a directory of files)
//! through strom-control's reader, the one the control plane uses: Pods become the lab's
//! [`PodDecl`]s, Services and EndpointSlices are kept as objects for the translation. A
//! malformed object is reported and skipped; the rest is used.

use std::collections::BTreeMap;
use std::path::Path;

use strom_control::k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use strom_control::k8s_openapi::api::discovery::v1::EndpointSlice;
use strom_control::k8s_openapi::api::networking::v1::NetworkPolicy;
use strom_control::manifests::Objects;

/// A declared container port.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortDecl {
    pub port: u16,
    pub protocol: String,
    /// The containerPort's name, which a Service's named targetPort refers to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

fn yes() -> bool {
    true
}

/// The parts of a Pod the lab uses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodDecl {
    pub namespace: String,
    pub name: String,
    pub ports: Vec<PortDecl>,
    pub ip: Option<String>,
    /// `metadata.labels`: changed live by `apply` (the pod is not rewired for them).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The lab has no kubelet: a pod is ready unless its manifest has a `Ready` condition
    /// other than "True". Changed live, like the labels.
    #[serde(default = "yes")]
    pub ready: bool,
    /// `metadata.deletionTimestamp` is set: the pod is terminating (its endpoints say so).
    #[serde(default)]
    pub terminating: bool,
}

impl PodDecl {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The same wiring (namespace, name, ports, address): what differs otherwise (labels,
    /// readiness) changes on the running pod.
    pub fn same_wiring(&self, other: &PodDecl) -> bool {
        self.namespace == other.namespace
            && self.name == other.name
            && self.ports == other.ports
            && self.ip == other.ip
    }
}

/// What a set of manifests declares.
#[derive(Debug, Default)]
pub struct Manifests {
    pub pods: Vec<PodDecl>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub namespaces: Vec<Namespace>,
    pub network_policies: Vec<NetworkPolicy>,
    /// Objects the lab does not act on yet (kind/name), reported to the user.
    pub ignored: Vec<String>,
    /// Objects that could not be read, with the reason.
    pub invalid: Vec<String>,
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The lab's reading of a Pod: names must be DNS labels (they name network namespaces),
/// ports in range, the address (if given) IPv4.
fn pod(p: &Pod) -> Result<PodDecl, String> {
    let name = p.metadata.name.as_deref().ok_or("no metadata.name")?;
    let namespace = p.metadata.namespace.as_deref().unwrap_or("default");
    if !dns_label(name) || !dns_label(namespace) {
        return Err(format!("{namespace}/{name}: names must be DNS labels"));
    }
    let mut ports = Vec::new();
    for c in p.spec.iter().flat_map(|s| &s.containers) {
        for cp in c.ports.iter().flatten() {
            let port = u16::try_from(cp.container_port)
                .ok()
                .filter(|p| *p > 0)
                .ok_or(format!("containerPort {} out of range", cp.container_port))?;
            let protocol = cp.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase();
            if !matches!(protocol.as_str(), "tcp" | "udp" | "sctp") {
                return Err(format!("protocol {protocol}"));
            }
            ports.push(PortDecl {
                port,
                protocol,
                name: cp.name.clone(),
            });
        }
    }
    let status = p.status.as_ref();
    let ip = status.and_then(|s| s.pod_ip.clone());
    if let Some(ip) = &ip {
        ip.parse::<std::net::Ipv4Addr>()
            .map_err(|e| format!("status.podIP {ip}: {e}"))?;
    }
    Ok(PodDecl {
        namespace: namespace.into(),
        name: name.into(),
        ports,
        ip,
        labels: p.metadata.labels.clone().unwrap_or_default(),
        ready: strom_control::manifests::endpointslices::ready(p),
        terminating: p.metadata.deletion_timestamp.is_some(),
    })
}

impl Manifests {
    /// Reads a file or every *.yaml/*.yml/*.json file of a directory (sorted by name).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        Ok(Self::from_objects(Objects::load(path)?))
    }

    /// The lab's view of the objects read.
    fn from_objects(o: Objects) -> Self {
        // Namespaces need no wiring in the lab (a pod's namespace is part of its name); their
        // labels count for NetworkPolicies.
        let mut m = Manifests {
            services: o.services,
            endpoint_slices: o.endpoint_slices,
            namespaces: o.namespaces,
            network_policies: o.network_policies,
            ignored: o.other,
            invalid: o.invalid.iter().map(ToString::to_string).collect(),
            ..Default::default()
        };
        for p in &o.pods {
            match pod(p) {
                Ok(d) => m.pods.push(d),
                Err(e) => m.invalid.push(format!(
                    "Pod {}: {e}",
                    strom_control::object_key(&p.metadata)
                )),
            }
        }
        m
    }

    /// The documents of one file.
    #[cfg(test)]
    pub fn from_text(text: &str, origin: &str) -> Self {
        let mut o = Objects::default();
        o.add_text(text, origin);
        Self::from_objects(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pods_and_skips_bad_ones() {
        let m = Manifests::from_text(
            "kind: Pod\nmetadata: {name: a, namespace: x}\nspec: {containers: [{name: c, ports: [{containerPort: 80, name: http}, {containerPort: 53, protocol: UDP}]}]}\nstatus: {podIP: 198.18.16.9}\n---\nkind: Pod\nmetadata: {name: Bad_Name}\n---\nkind: Service\nmetadata: {name: s}\n---\nkind: NetworkPolicy\nmetadata: {name: n}\n---\n: : :\n",
            "t",
        );
        assert_eq!(m.pods.len(), 1);
        assert_eq!(
            m.pods[0].ports,
            vec![
                PortDecl {
                    port: 80,
                    protocol: "tcp".into(),
                    name: Some("http".into()),
                },
                PortDecl {
                    port: 53,
                    protocol: "udp".into(),
                    name: None,
                }
            ]
        );
        assert_eq!(m.pods[0].ip.as_deref(), Some("198.18.16.9"));
        assert!(m.pods[0].ready && !m.pods[0].terminating);
        assert_eq!(m.services.len(), 1);
        assert!(m.ignored.is_empty(), "{:?}", m.ignored);
        assert_eq!(m.network_policies.len(), 1);
        assert_eq!(m.invalid.len(), 2, "{:?}", m.invalid);
        assert!(m.invalid.iter().any(|i| i.contains("DNS labels")));
    }

    #[test]
    fn labels_are_read_and_a_label_change_needs_no_rewiring() {
        let m = Manifests::from_text(
            "kind: Pod\nmetadata: {name: a, labels: {app: web, tier: front}}\n---\nkind: Pod\nmetadata: {name: b, labels: {app: 3}}\n---\nkind: Pod\nmetadata: {name: c, labels: [x]}\n",
            "t",
        );
        assert_eq!(m.pods.len(), 1, "{:?}", m.invalid);
        let a = &m.pods[0];
        assert_eq!(a.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(a.labels.len(), 2);
        assert_eq!(m.invalid.len(), 2, "{:?}", m.invalid);
        assert!(
            m.invalid[0].contains("metadata.labels.app"),
            "{:?}",
            m.invalid
        );
        let mut relabelled = a.clone();
        relabelled.labels.insert("app".into(), "api".into());
        relabelled.ready = false;
        assert!(a.same_wiring(&relabelled) && *a != relabelled);
        let mut moved = a.clone();
        moved.ip = Some("198.18.16.9".into());
        assert!(!a.same_wiring(&moved));
    }

    #[test]
    fn readiness_and_termination_come_from_the_manifest() {
        let m = Manifests::from_text(
            "kind: Pod\nmetadata: {name: a, deletionTimestamp: '2026-01-01T00:00:00Z'}\nstatus: {conditions: [{type: Ready, status: 'False'}]}\n",
            "t",
        );
        assert!(!m.pods[0].ready && m.pods[0].terminating, "{:?}", m.invalid);
    }
}
