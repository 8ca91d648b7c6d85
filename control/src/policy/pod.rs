//! A pod as the policies read it ([`PolicyPod`]): what [`crate::cluster`] holds of every pod
//! of the cluster, since every pod is a peer of some policy, so it is kept to what the
//! compiler reads.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use strom_api::Protocol;

use super::{parse, Labels};

/// A pod's named container ports: (name, protocol, number), sorted, each once.
pub(super) type NamedPorts = Vec<(String, Protocol, u16)>;

/// A pod as the policies read it: its `namespace/name`, labels, node, the addresses it owns
/// and its named container ports; not its containers, conditions or status history, so a
/// kubelet's status update that policies cannot see leaves it equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyPod {
    pub(super) key: String,
    pub(super) labels: Labels,
    pub(super) node: Option<String>,
    /// `status.podIPs`, else `status.podIP`, each once, unreadable ones skipped; none for a
    /// pod policies do not see (Succeeded or Failed, or in the host's network namespace).
    pub(super) ips: Vec<IpAddr>,
    pub(super) named: NamedPorts,
}

impl PolicyPod {
    /// `namespace/name` (namespace "default" when it has none).
    pub fn key(&self) -> &str {
        &self.key
    }

    pub(super) fn namespace(&self) -> &str {
        // The key is `namespace/name`, and a name has no '/'.
        self.key.rsplit_once('/').map_or("", |(ns, _)| ns)
    }
}

impl From<&Pod> for PolicyPod {
    /// A pod policies do not see keeps only its key: a change of its labels (a finished
    /// Job's pod, say) then compiles nothing again.
    fn from(pod: &Pod) -> Self {
        let key = super::key(&pod.metadata);
        if !considered(pod) {
            return PolicyPod {
                key,
                labels: Labels::new(),
                node: None,
                ips: Vec::new(),
                named: Vec::new(),
            };
        }
        PolicyPod {
            key,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            ips: addresses(pod),
            named: named_ports(pod),
        }
    }
}

impl From<Pod> for PolicyPod {
    fn from(mut pod: Pod) -> Self {
        let labels = pod.metadata.labels.take();
        let mut held = PolicyPod::from(&pod);
        if considered(&pod) {
            held.labels = labels.unwrap_or_default();
        }
        held
    }
}

/// The addresses a pod owns: `status.podIPs`, else `status.podIP`; unreadable ones skipped.
fn addresses(pod: &Pod) -> Vec<IpAddr> {
    let status = pod.status.as_ref();
    let listed: Vec<&str> = match status.and_then(|s| s.pod_ips.as_ref()) {
        Some(ips) if !ips.is_empty() => ips.iter().map(|i| i.ip.as_str()).collect(),
        _ => status
            .and_then(|s| s.pod_ip.as_deref())
            .into_iter()
            .collect(),
    };
    let mut out: Vec<IpAddr> = Vec::new();
    for ip in listed.iter().filter_map(|s| s.parse::<IpAddr>().ok()) {
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// Whether policies see the pod at all: running or about to (not Succeeded nor Failed), in
/// the pod network (not hostNetwork).
fn considered(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let host = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    !matches!(phase, Some("Succeeded" | "Failed")) && !host
}

fn named_ports(pod: &Pod) -> NamedPorts {
    let mut out: NamedPorts = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let name = p.name.as_deref().filter(|n| !n.is_empty())?;
            let proto = parse::protocol(p.protocol.as_deref())?;
            let number = u16::try_from(p.container_port).ok().filter(|n| *n > 0)?;
            Some((name.to_string(), proto, number))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Container, ContainerPort, EnvVar, PodCondition, PodIP, PodSpec, PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::collections::BTreeMap;

    fn full() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("a".into()),
                namespace: Some("x".into()),
                labels: Some(BTreeMap::from([("app".into(), "a".into())])),
                annotations: Some(BTreeMap::from([("big".into(), "x".repeat(4096))])),
                resource_version: Some("17".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("n1".into()),
                containers: vec![
                    Container {
                        name: "web".into(),
                        image: Some("img".into()),
                        env: Some(vec![EnvVar {
                            name: "A".into(),
                            ..Default::default()
                        }]),
                        ports: Some(vec![
                            ContainerPort {
                                name: Some("http".into()),
                                container_port: 80,
                                host_port: Some(8080),
                                ..Default::default()
                            },
                            ContainerPort {
                                container_port: 9090,
                                ..Default::default()
                            },
                        ]),
                        ..Default::default()
                    },
                    Container {
                        name: "sidecar".into(),
                        ports: Some(vec![ContainerPort {
                            name: Some("dns".into()),
                            container_port: 53,
                            protocol: Some("UDP".into()),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some("198.18.0.2".into()),
                pod_ips: Some(vec![
                    PodIP {
                        ip: "198.18.0.2".into(),
                    },
                    PodIP {
                        ip: "2001:db8::2".into(),
                    },
                    PodIP {
                        ip: "198.18.0.2".into(),
                    },
                ]),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                host_ip: Some("10.0.0.1".into()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_pod_keeps_what_policies_read() {
        let p = PolicyPod::from(full());
        assert_eq!(p.key(), "x/a");
        assert_eq!(p.namespace(), "x");
        assert_eq!(p.labels, Labels::from([("app".into(), "a".into())]));
        assert_eq!(p.node.as_deref(), Some("n1"));
        assert_eq!(
            p.ips,
            [
                "198.18.0.2".parse::<IpAddr>().unwrap(),
                "2001:db8::2".parse().unwrap()
            ],
            "podIPs, each once"
        );
        assert_eq!(
            p.named,
            [
                ("dns".to_string(), Protocol::Udp, 53),
                ("http".to_string(), Protocol::Tcp, 80)
            ],
            "named ports of every container, sorted; unnamed ones left out"
        );
        assert_eq!(
            p,
            PolicyPod::from(&full()),
            "by value and by reference alike"
        );
    }

    #[test]
    fn what_policies_cannot_see_leaves_the_pod_equal() {
        let mut changed = full();
        changed.metadata.resource_version = Some("18".into());
        let status = changed.status.as_mut().unwrap();
        status.conditions.as_mut().unwrap()[0].status = "False".into();
        status.message = Some("container restarted".into());
        changed.spec.as_mut().unwrap().containers[0].image = Some("img:2".into());
        assert_eq!(PolicyPod::from(full()), PolicyPod::from(changed));
    }

    #[test]
    fn pods_policies_do_not_see_own_no_address() {
        let mut finished = full();
        finished.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let mut relabelled = finished.clone();
        relabelled.metadata.labels = Some(Labels::from([("app".into(), "b".into())]));
        let held = PolicyPod::from(finished);
        assert!(held.ips.is_empty() && held.labels.is_empty() && held.named.is_empty());
        assert_eq!(held.key(), "x/a");
        assert_eq!(
            held,
            PolicyPod::from(relabelled),
            "its labels count for nothing"
        );
        let mut host = full();
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert!(PolicyPod::from(host).ips.is_empty());
        let mut only_pod_ip = full();
        only_pod_ip.status.as_mut().unwrap().pod_ips = Some(vec![]);
        assert_eq!(
            PolicyPod::from(only_pod_ip).ips,
            ["198.18.0.2".parse::<IpAddr>().unwrap()],
            "podIP when podIPs is empty"
        );
        let mut unnamespaced = full();
        unnamespaced.metadata.namespace = None;
        assert_eq!(PolicyPod::from(unnamespaced).namespace(), "default");
    }
}
