//! The controller's NetworkPolicy requests: the compiled set through the reconciler, and the
//! policies with the pods they isolate and the drops the workers counted.

use std::collections::BTreeMap;

use strom_api::{Direction, PolicySet, PolicyStatus, Response};

use super::Controller;
use crate::worker::{wait_reply, Command};

impl Controller {
    /// `SetPolicies`: the whole set at once; a malformed one is refused whole (the set in
    /// force stays), named in the answer and logged.
    pub(super) fn set_policies(&mut self, set: PolicySet) -> Response {
        match self.desired.set_policies(&set) {
            Ok(()) => {
                tracing::info!(
                    pods = set.pods.len(),
                    groups = set.groups.len(),
                    "policies programmed"
                );
                self.policies = Some(set);
                Response::Ok
            }
            Err(e) => {
                tracing::warn!(error = %e, "policies refused");
                Response::Error {
                    message: format!("policies refused: {e}"),
                }
            }
        }
    }

    /// Every worker's policy drops per counter slot, summed.
    fn policy_drops(&self) -> Vec<[u64; 2]> {
        let mut sum: Vec<[u64; 2]> = Vec::new();
        for w in &self.workers {
            let (tx, rx) = crossbeam_channel::bounded(1);
            if !w.command(Command::PolicyCounts(tx)) {
                continue;
            }
            let Some(counts) = wait_reply(&rx) else {
                continue;
            };
            if sum.len() < counts.len() {
                sum.resize(counts.len(), [0; 2]);
            }
            for (s, c) in sum.iter_mut().zip(&counts) {
                s[0] += c[0];
                s[1] += c[1];
            }
        }
        sum
    }

    /// `Policies`: each policy selecting a pod of the node, the pods per direction, and the
    /// packets dropped because no policy isolating the pod allowed them.
    pub(super) fn policies(&self) -> Response {
        let table = self.desired.tables().policy();
        let drops = self.policy_drops();
        let mut out: BTreeMap<&str, PolicyStatus> = BTreeMap::new();
        for group in table.groups() {
            for (name, slot) in group.policies.iter().zip(group.slots.iter()) {
                let d = drops.get(*slot as usize).copied().unwrap_or_default();
                out.entry(name).or_insert_with(|| PolicyStatus {
                    policy: name.clone(),
                    ingress_drops: d[0],
                    egress_drops: d[1],
                    ingress_pods: Vec::new(),
                    egress_pods: Vec::new(),
                });
            }
        }
        for (_, pod, ingress, egress) in table.pods() {
            for (g, dir) in [(ingress, Direction::Ingress), (egress, Direction::Egress)] {
                let Some(group) = g.and_then(|g| table.group(g)) else {
                    continue;
                };
                for name in &group.policies {
                    if let Some(s) = out.get_mut(name.as_str()) {
                        let pods = match dir {
                            Direction::Ingress => &mut s.ingress_pods,
                            Direction::Egress => &mut s.egress_pods,
                        };
                        if !pods.iter().any(|p| p == pod) {
                            pods.push(pod.to_owned());
                        }
                    }
                }
            }
        }
        let mut policies: Vec<PolicyStatus> = out.into_values().collect();
        for p in &mut policies {
            p.ingress_pods.sort();
            p.egress_pods.sort();
        }
        Response::Policies { policies }
    }
}
