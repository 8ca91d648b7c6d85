//! Objects given without an API server (strom-lab's manifests, strom-control's manifests
//! directory), and what the cluster's controllers would make of them:
//! - [`load`]: reading YAML or JSON documents into k8s-openapi objects, a malformed object
//!   reported with the reason and skipped;
//! - [`defaults`]: the API server's defaulting of Services (of NetworkPolicies:
//!   [`crate::policy::defaulted`]);
//! - [`allocate`]: ClusterIPs and NodePorts the API server would allocate;
//! - [`endpointslices`]: EndpointSlices as the EndpointSlice controller derives them from pods;
//! - [`resolve`]: all of it for a set of Services, ready for [`crate::translate`].

pub mod allocate;
pub mod defaults;
pub mod endpointslices;
pub mod load;
mod resolve;

pub use allocate::{Allocations, ServiceAllocation};
pub use load::{ManifestError, Objects};
pub use resolve::{resolve, Resolved, Settings};

#[cfg(test)]
mod tests;
