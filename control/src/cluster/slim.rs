//! What of an object the node's tables read, and nothing else: the rest of a Pod (images,
//! volumes, environment, container statuses), and every object's managed fields and
//! annotations, would cost memory and wake the translation for changes it cannot see (a
//! kubelet's status heartbeat on a container changes nothing here).
//!
//! What is kept, by kind: a Pod's name, namespace, labels, deletion mark, node,
//! `hostNetwork`, containers' ports, phase, addresses and `Ready` condition; a Namespace's
//! name and labels; a Node's name and labels (its zone); Services, EndpointSlices and
//! NetworkPolicies whole but for managed fields and annotations.

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Node, Pod, PodCondition, PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::Object;

/// The object as held.
pub fn object(o: Object) -> Object {
    match o {
        Object::Pod(p) => Object::Pod(pod(p)),
        Object::Namespace(n) => Object::Namespace(namespace(n)),
        Object::Service(mut s) => {
            s.metadata = meta(s.metadata, true);
            Object::Service(s)
        }
        Object::EndpointSlice(mut s) => {
            s.metadata = meta(s.metadata, true);
            Object::EndpointSlice(s)
        }
        Object::NetworkPolicy(mut p) => {
            p.metadata = meta(p.metadata, true);
            Object::NetworkPolicy(p)
        }
        Object::Node(n) => Object::Node(Node {
            metadata: meta(n.metadata, false),
            ..Default::default()
        }),
    }
}

/// Name, namespace, labels and deletion mark (with `uid` when `uid`).
fn meta(m: ObjectMeta, uid: bool) -> ObjectMeta {
    ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        labels: m.labels,
        deletion_timestamp: m.deletion_timestamp,
        uid: if uid { m.uid } else { None },
        ..Default::default()
    }
}

/// A pod as the policies and the EndpointSlice derivation read it.
pub fn pod(p: Pod) -> Pod {
    let spec = p.spec.map(|s| PodSpec {
        node_name: s.node_name,
        host_network: s.host_network,
        containers: s
            .containers
            .into_iter()
            .filter(|c| c.ports.as_ref().is_some_and(|p| !p.is_empty()))
            .map(|c| Container {
                name: c.name,
                ports: c.ports.map(|ports| {
                    ports
                        .into_iter()
                        .map(|p| ContainerPort {
                            name: p.name,
                            container_port: p.container_port,
                            protocol: p.protocol,
                            ..Default::default()
                        })
                        .collect()
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    });
    let status = p.status.map(|s| PodStatus {
        phase: s.phase,
        pod_ip: s.pod_ip,
        pod_ips: s.pod_ips,
        conditions: s.conditions.map(|c| {
            c.into_iter()
                .filter(|c| c.type_ == "Ready")
                .map(|c| PodCondition {
                    type_: c.type_,
                    status: c.status,
                    ..Default::default()
                })
                .collect()
        }),
        ..Default::default()
    });
    Pod {
        metadata: meta(p.metadata, true),
        spec,
        status,
    }
}

/// A namespace as the policies read it.
pub fn namespace(n: Namespace) -> Namespace {
    Namespace {
        metadata: meta(n.metadata, false),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EnvVar, PodIP};
    use std::collections::BTreeMap;

    #[test]
    fn a_pod_keeps_what_policies_and_slices_read_and_nothing_else() {
        let full = Pod {
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
                        ports: Some(vec![ContainerPort {
                            name: Some("http".into()),
                            container_port: 80,
                            host_port: Some(8080),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    },
                    Container {
                        name: "sidecar".into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some("198.18.0.2".into()),
                pod_ips: Some(vec![PodIP {
                    ip: "198.18.0.2".into(),
                }]),
                conditions: Some(vec![
                    PodCondition {
                        type_: "Ready".into(),
                        status: "True".into(),
                        message: Some("m".into()),
                        ..Default::default()
                    },
                    PodCondition {
                        type_: "PodScheduled".into(),
                        status: "True".into(),
                        ..Default::default()
                    },
                ]),
                host_ip: Some("10.0.0.1".into()),
                ..Default::default()
            }),
        };
        let p = pod(full);
        assert_eq!(p.metadata.annotations, None);
        assert_eq!(p.metadata.resource_version, None);
        assert_eq!(p.metadata.labels.as_ref().unwrap()["app"], "a");
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert_eq!(
            spec.containers.len(),
            1,
            "a container without ports adds nothing"
        );
        assert_eq!(spec.containers[0].image, None);
        assert_eq!(spec.containers[0].env, None);
        let port = &spec.containers[0].ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("http"), 80)
        );
        assert_eq!(port.host_port, None);
        let status = p.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("198.18.0.2"));
        assert_eq!(status.host_ip, None);
        let conds = status.conditions.as_ref().unwrap();
        assert_eq!(conds.len(), 1);
        assert_eq!(
            (conds[0].type_.as_str(), conds[0].message.as_deref()),
            ("Ready", None)
        );
    }

    #[test]
    fn a_status_heartbeat_leaves_the_held_pod_equal() {
        let mut a = Pod::default();
        a.metadata.name = Some("a".into());
        let mut b = a.clone();
        b.metadata.resource_version = Some("2".into());
        b.status = Some(PodStatus {
            start_time: None,
            message: Some("container restarted".into()),
            ..Default::default()
        });
        a.status = Some(PodStatus::default());
        assert_eq!(pod(a), pod(b));
    }
}
