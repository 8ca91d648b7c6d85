//! A node's own settings from its Node object, for stromd's and strom-cni's setup on a
//! cluster (`strom-control node-config`, the DaemonSet's first init container): the pod CIDR
//! the cluster gave the node and the node's internal addresses.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;

/// What a Node lacks for strom.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error(
        "Node {0} has no IPv4 pod CIDR (spec.podCIDRs): run the controller manager with \
         --allocate-node-cidrs and --cluster-cidr, or set it when the node is created"
    )]
    NoPodCidr(String),
    #[error("Node {node}: spec.podCIDRs has {value:?}, not a CIDR")]
    BadPodCidr { node: String, value: String },
    #[error("Node {0} has no IPv4 InternalIP address (status.addresses)")]
    NoAddress(String),
}

/// The node's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings {
    pub pod_cidr: Ipv4Net,
    pub addresses: Vec<Ipv4Addr>,
}

impl NodeSettings {
    /// From the Node: its first IPv4 pod CIDR, its IPv4 InternalIP addresses.
    pub fn of(node: &Node) -> Result<Self, NodeError> {
        let name = node.metadata.name.clone().unwrap_or_default();
        let spec = node.spec.as_ref();
        let cidrs = spec
            .and_then(|s| s.pod_cidrs.clone())
            .filter(|c| !c.is_empty())
            .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
            .unwrap_or_default();
        let mut pod_cidr = None;
        for c in &cidrs {
            match c.parse::<ipnet::IpNet>() {
                Ok(ipnet::IpNet::V4(n)) => {
                    pod_cidr = Some(n);
                    break;
                }
                Ok(ipnet::IpNet::V6(_)) => {}
                Err(_) => {
                    return Err(NodeError::BadPodCidr {
                        node: name,
                        value: c.clone(),
                    })
                }
            }
        }
        let pod_cidr = pod_cidr.ok_or_else(|| NodeError::NoPodCidr(name.clone()))?;
        let addresses: Vec<Ipv4Addr> = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        if addresses.is_empty() {
            return Err(NodeError::NoAddress(name));
        }
        Ok(NodeSettings {
            pod_cidr,
            addresses,
        })
    }

    /// As shell variables: `POD_CIDR=...` and `NODE_ADDRS="a b"` (values that need no
    /// quoting beyond that: addresses and a CIDR).
    pub fn env(&self) -> String {
        let addrs: Vec<String> = self.addresses.iter().map(ToString::to_string).collect();
        format!(
            "POD_CIDR={}\nNODE_ADDRS=\"{}\"\n",
            self.pod_cidr,
            addrs.join(" ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(yaml: &str) -> Node {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn the_first_ipv4_cidr_and_the_internal_addresses() {
        let n = node(
            "
metadata: {name: n1}
spec: {podCIDR: 'fd00::/64', podCIDRs: ['fd00::/64', 10.244.3.0/24]}
status:
  addresses:
    - {type: Hostname, address: n1}
    - {type: InternalIP, address: 'fd00::1'}
    - {type: InternalIP, address: 192.168.1.7}
    - {type: ExternalIP, address: 203.0.113.7}
",
        );
        let s = NodeSettings::of(&n).unwrap();
        assert_eq!(s.pod_cidr.to_string(), "10.244.3.0/24");
        assert_eq!(s.addresses, [Ipv4Addr::new(192, 168, 1, 7)]);
        assert_eq!(
            s.env(),
            "POD_CIDR=10.244.3.0/24\nNODE_ADDRS=\"192.168.1.7\"\n"
        );
    }

    #[test]
    fn a_node_without_a_pod_cidr_or_an_address_is_refused_with_why() {
        let n = node(
            "metadata: {name: n1}\nstatus: {addresses: [{type: InternalIP, address: 10.0.0.1}]}",
        );
        assert_eq!(NodeSettings::of(&n), Err(NodeError::NoPodCidr("n1".into())));
        let n = node("metadata: {name: n1}\nspec: {podCIDR: 10.244.0.0/24}");
        assert_eq!(NodeSettings::of(&n), Err(NodeError::NoAddress("n1".into())));
        let n = node("metadata: {name: n1}\nspec: {podCIDRs: [10.244.0.0]}");
        assert!(matches!(
            NodeSettings::of(&n),
            Err(NodeError::BadPodCidr { .. })
        ));
    }
}
