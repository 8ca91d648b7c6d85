//! What of an object the node's tables read, and nothing else: every object's managed
//! fields and annotations would cost memory and wake the translation for changes it cannot
//! see. A pod is read into a [`crate::policy::PolicyPod`] as it arrives and has nothing
//! more to lose.
//!
//! What is kept, by kind: a Namespace's name and labels; a Node's name and labels (its
//! zone); Services, EndpointSlices and NetworkPolicies whole but for managed fields and
//! annotations.

use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::Object;

/// The object as held.
pub fn object(o: Object) -> Object {
    match o {
        Object::Pod(p) => Object::Pod(p),
        Object::Namespace(n) => Object::Namespace(Box::new(namespace(*n))),
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
        Object::Node(n) => Object::Node(Box::new(Node {
            metadata: meta(n.metadata, false),
            ..Default::default()
        })),
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

/// A namespace as the policies read it.
pub fn namespace(n: Namespace) -> Namespace {
    Namespace {
        metadata: meta(n.metadata, false),
        ..Default::default()
    }
}
