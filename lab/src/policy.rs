//! The lab's NetworkPolicies: compiled by strom-control (the same code strom-control runs)
//! over the live pods and the manifests' namespaces, and programmed into stromd as one set.
//! A pod's or a namespace's new labels, or a changed policy, take effect at the next apply.

use strom_api::{PolicySet, Request};
use strom_control::k8s_openapi::api::core::v1::Pod;
use strom_control::policy::{compile, Input};

use crate::lab::State;
use crate::manifest::Manifests;

/// What a policy sync did.
#[derive(Debug, Default)]
pub struct PoliciesApplied {
    /// Policies in the manifests.
    pub policies: usize,
    /// Whether stromd was given a new set.
    pub changed: bool,
    /// The node's pods isolated in some direction.
    pub isolated: usize,
    /// Policies rejected (each still isolates what it selects, allowing nothing), with why.
    pub rejected: Vec<String>,
}

impl State {
    /// Makes stromd's policies those of `m` over the pods running now.
    pub fn sync_policies(&mut self, m: &Manifests) -> anyhow::Result<PoliciesApplied> {
        let node = self.node_name();
        let pods: Vec<Pod> = self.pods.values().map(|p| p.as_pod(&node)).collect();
        let c = compile(&Input {
            policies: &m.network_policies,
            pods: &pods,
            namespaces: &m.namespaces,
            node: Some(&node),
        });
        let mut done = PoliciesApplied {
            policies: m.network_policies.len(),
            isolated: c.set.pods.len(),
            rejected: c.rejected.iter().map(ToString::to_string).collect(),
            changed: false,
        };
        if c.set != self.policies {
            self.program_policies(&c.set)?;
            self.policies = c.set;
            self.save()?;
            done.changed = true;
        }
        Ok(done)
    }

    fn program_policies(&self, set: &PolicySet) -> anyhow::Result<()> {
        crate::services::call(
            self,
            &Request::SetPolicies {
                policies: set.clone(),
                delta: None,
            },
        )
        .map_err(|e| anyhow::anyhow!("stromd refused the policies: {e}"))
    }

    /// Gives a restarted stromd the policies it had.
    pub fn reprogram_policies(&self) -> anyhow::Result<()> {
        if self.policies.is_empty() {
            return Ok(());
        }
        self.program_policies(&self.policies)
    }
}
