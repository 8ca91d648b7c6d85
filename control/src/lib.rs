//! strom-control: Kubernetes objects to stromd's contract.
//!
//! - [`translate`]: the one translation of a Service and its EndpointSlices into a
//!   [`strom_api::ServiceSpec`]. Whatever feeds stromd (the Kubernetes API, a manifests
//!   directory, strom-lab) goes through it, so kube-proxy's reading of the objects lives in
//!   one place.
//! - [`manifests`]: reading objects from YAML or JSON files, and doing for them what the
//!   cluster's controllers would do when there is no API server: defaulting, ClusterIP and
//!   NodePort allocation, EndpointSlices derived from pods.
//! - [`policy`]: NetworkPolicies, with the Pods and Namespaces they select, compiled into a
//!   node's [`strom_api::PolicySet`] (the API's semantics; a malformed policy rejected alone,
//!   still isolating its pods), and a reference evaluator to check it against.
//!
//! The objects are k8s-openapi's, so the same code serves objects from an API server later.

pub mod cluster;
pub mod manifests;
pub mod metrics;
pub mod node;
pub mod policy;
pub mod program;
pub mod source;
pub mod translate;

pub use k8s_openapi;
pub use translate::{service_spec, ForNode, TranslateError};

/// `namespace/name` of an object (namespace "default" when it has none).
pub fn object_key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or("default"),
        meta.name.as_deref().unwrap_or("")
    )
}
