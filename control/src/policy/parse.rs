//! A NetworkPolicy checked as the API server validates it (`ValidateNetworkPolicySpec`) and
//! read into the typed form [`super::compile`] works on. A policy that fails is read as what it
//! still isolates (see the module doc of [`super`]) together with the first problem found.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use strom_api::{PortRange, Protocol};

use super::defaults::defaulted;
use super::PolicyError;

/// One requirement of a label selector (`matchLabels` entries are `In` with one value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Requirement {
    In(String, Vec<String>),
    /// Also met when the key is absent.
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A label selector: every requirement must hold; none at all selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Selector {
    pub requirements: Vec<Requirement>,
}

impl Selector {
    /// Whether a set of labels meets every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

/// An `ipBlock`, its prefixes with their host bits cleared.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Block {
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
}

impl Block {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(&ip) && !self.except.iter().any(|x| x.contains(&ip))
    }
}

/// One entry of a rule's `from` or `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Peer {
    /// Pods matching `pods` in the namespaces matching `namespaces` (`None`: the policy's own).
    Pods {
        namespaces: Option<Selector>,
        pods: Selector,
    },
    Block(Block),
}

/// One entry of a rule's `ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Port {
    /// A number, a range (`endPort`), or every port of the protocol (no `port`).
    Numbers(PortRange),
    /// A named container port, resolved against a pod.
    Named { name: String, protocol: Protocol },
}

/// One rule (an entry of `ingress` or `egress`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuleSpec {
    pub index: u32,
    /// `None`: every address (no `from` / `to`, or an empty list).
    pub peers: Option<Vec<Peer>>,
    /// `None`: every port of every protocol (no `ports`, or an empty list).
    pub ports: Option<Vec<Port>>,
}

impl RuleSpec {
    pub fn has_named_ports(&self) -> bool {
        self.ports
            .iter()
            .flatten()
            .any(|p| matches!(p, Port::Named { .. }))
    }
}

/// A policy as compiled: which pods it selects and, per direction it isolates, its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Policy {
    /// `namespace/name`.
    pub key: String,
    pub namespace: String,
    pub selector: Selector,
    /// `Some` when it isolates for ingress: its rules (none for a rejected policy).
    pub ingress: Option<Vec<RuleSpec>>,
    pub egress: Option<Vec<RuleSpec>>,
}

/// Reads one policy (defaulted first): the policy, and why it was rejected if it was.
pub(crate) fn policy(original: &NetworkPolicy) -> (Policy, Option<PolicyError>) {
    let p = defaulted(original);
    let key = super::key(&p.metadata);
    let namespace = super::namespace(&p.metadata).to_string();
    let spec = p.spec.unwrap_or_default();
    let types = policy_types(spec.policy_types.as_deref().unwrap_or_default());
    let selector = selector(
        spec.pod_selector
            .as_ref()
            .unwrap_or(&LabelSelector::default()),
        "spec.podSelector",
    );
    let ingress = rules(
        spec.ingress
            .iter()
            .flatten()
            .map(|r| (r.from.as_deref(), r.ports.as_deref())),
        "spec.ingress",
        "from",
    );
    let egress = rules(
        spec.egress
            .iter()
            .flatten()
            .map(|r| (r.to.as_deref(), r.ports.as_deref())),
        "spec.egress",
        "to",
    );
    let problem = [
        types.as_ref().err(),
        selector.as_ref().err(),
        ingress.as_ref().err(),
        egress.as_ref().err(),
    ]
    .into_iter()
    .flatten()
    .next()
    .cloned();
    match problem {
        None => {
            let (ingress_on, egress_on) = types.unwrap_or((true, true));
            let policy = Policy {
                key,
                namespace,
                selector: selector.unwrap_or_default(),
                ingress: ingress_on.then(|| ingress.unwrap_or_default()),
                egress: egress_on.then(|| egress.unwrap_or_default()),
            };
            (policy, None)
        }
        Some(reason) => {
            // Rejected: it isolates what it would have, and allows nothing.
            let (ingress_on, egress_on) = types.unwrap_or((true, true));
            let policy = Policy {
                key: key.clone(),
                namespace,
                selector: selector.unwrap_or_default(),
                ingress: ingress_on.then(Vec::new),
                egress: egress_on.then(Vec::new),
            };
            (
                policy,
                Some(PolicyError {
                    policy: key,
                    reason,
                }),
            )
        }
    }
}

/// `policyTypes` (already defaulted): whether it isolates ingress, egress.
fn policy_types(types: &[String]) -> Result<(bool, bool), String> {
    if types.len() > 2 {
        return Err(format!(
            "spec.policyTypes: {} entries, at most two (Ingress, Egress)",
            types.len()
        ));
    }
    let mut out = (false, false);
    for (i, t) in types.iter().enumerate() {
        match t.as_str() {
            "Ingress" => out.0 = true,
            "Egress" => out.1 = true,
            other => {
                return Err(format!(
                    "spec.policyTypes[{i}]: {other:?} is not Ingress or Egress"
                ))
            }
        }
    }
    Ok(out)
}

/// A label selector, checked as `ValidateLabelSelector` does its operators and values.
pub(crate) fn selector(s: &LabelSelector, field: &str) -> Result<Selector, String> {
    let mut requirements: Vec<Requirement> = s
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| Requirement::In(k.clone(), vec![v.clone()]))
        .collect();
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let at = format!("{field}.matchExpressions[{i}]");
        let values = e.values.clone().unwrap_or_default();
        let key = e.key.clone();
        let r = match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(format!(
                    "{at}: operator {} needs at least one value",
                    e.operator
                ))
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(format!(
                    "{at}: operator {} takes no values (has {values:?})",
                    e.operator
                ))
            }
            "In" => Requirement::In(key, values),
            "NotIn" => Requirement::NotIn(key, values),
            "Exists" => Requirement::Exists(key),
            "DoesNotExist" => Requirement::DoesNotExist(key),
            other => {
                return Err(format!(
                    "{at}: operator {other:?} is not In, NotIn, Exists or DoesNotExist"
                ))
            }
        };
        requirements.push(r);
    }
    Ok(Selector { requirements })
}

type RuleFields<'a> = (
    Option<&'a [NetworkPolicyPeer]>,
    Option<&'a [NetworkPolicyPort]>,
);

/// The rules of one direction.
fn rules<'a>(
    list: impl Iterator<Item = RuleFields<'a>>,
    field: &str,
    peers_field: &str,
) -> Result<Vec<RuleSpec>, String> {
    list.enumerate()
        .map(|(i, (peers, ports))| {
            let at = format!("{field}[{i}]");
            let peers = match peers {
                None | Some([]) => None,
                Some(list) => Some(
                    list.iter()
                        .enumerate()
                        .map(|(j, p)| peer(p, &format!("{at}.{peers_field}[{j}]")))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            let ports = match ports {
                None | Some([]) => None,
                Some(list) => Some(
                    list.iter()
                        .enumerate()
                        .map(|(j, p)| port(p, &format!("{at}.ports[{j}]")))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            Ok(RuleSpec {
                index: i as u32,
                peers,
                ports,
            })
        })
        .collect()
}

/// One peer: selectors, or an ipBlock, never both nor neither (`ValidateNetworkPolicyPeer`).
fn peer(p: &NetworkPolicyPeer, at: &str) -> Result<Peer, String> {
    match (&p.pod_selector, &p.namespace_selector, &p.ip_block) {
        (None, None, None) => Err(format!(
            "{at}: must specify a peer (podSelector, namespaceSelector or ipBlock)"
        )),
        (_, _, Some(_)) if p.pod_selector.is_some() || p.namespace_selector.is_some() => Err(
            format!("{at}: may not specify both ipBlock and another peer"),
        ),
        (_, _, Some(b)) => block(b, &format!("{at}.ipBlock")).map(Peer::Block),
        (pods, namespaces, None) => Ok(Peer::Pods {
            namespaces: namespaces
                .as_ref()
                .map(|s| selector(s, &format!("{at}.namespaceSelector")))
                .transpose()?,
            pods: pods
                .as_ref()
                .map(|s| selector(s, &format!("{at}.podSelector")))
                .transpose()?
                .unwrap_or_default(),
        }),
    }
}

/// A prefix as `ParseCIDR` takes it (host bits allowed, then cleared).
pub(crate) fn prefix(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>().ok().map(|n| n.trunc())
}

/// An ipBlock (`ValidateIPBlock`): a valid CIDR, each `except` a strict subset of it.
fn block(b: &IPBlock, at: &str) -> Result<Block, String> {
    if b.cidr.is_empty() {
        return Err(format!("{at}.cidr: required"));
    }
    let cidr = prefix(&b.cidr).ok_or_else(|| format!("{at}.cidr: {:?} is not a CIDR", b.cidr))?;
    let mut except = Vec::new();
    for (i, x) in b.except.iter().flatten().enumerate() {
        let net = prefix(x).ok_or_else(|| format!("{at}.except[{i}]: {x:?} is not a CIDR"))?;
        if !cidr.contains(&net) || net.prefix_len() <= cidr.prefix_len() {
            return Err(format!(
                "{at}.except[{i}]: {x:?} is not a strict subset of cidr {:?}",
                b.cidr
            ));
        }
        except.push(net);
    }
    Ok(Block { cidr, except })
}

/// `protocol` (defaulted to TCP).
pub(crate) fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

/// A port number: 1-65535.
fn number(n: i32, at: &str) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{at}: {n} is out of range (1-65535)"))
}

/// One port entry (`ValidateNetworkPolicyPort`).
fn port(p: &NetworkPolicyPort, at: &str) -> Result<Port, String> {
    let proto = protocol(p.protocol.as_deref()).ok_or_else(|| {
        format!(
            "{at}.protocol: {:?} is not TCP, UDP or SCTP",
            p.protocol.as_deref().unwrap_or_default()
        )
    })?;
    match (&p.port, p.end_port) {
        (None, None) => Ok(Port::Numbers(PortRange {
            protocol: proto,
            first: 0,
            last: u16::MAX,
        })),
        (None, Some(_)) => Err(format!(
            "{at}.endPort: may not be specified when port is not"
        )),
        (Some(IntOrString::Int(n)), end) => {
            let first = number(*n, &format!("{at}.port"))?;
            let last = match end {
                None => first,
                Some(e) => {
                    let last = number(e, &format!("{at}.endPort"))?;
                    if last < first {
                        return Err(format!("{at}.endPort: {last} is less than port {first}"));
                    }
                    last
                }
            };
            Ok(Port::Numbers(PortRange {
                protocol: proto,
                first,
                last,
            }))
        }
        (Some(IntOrString::String(_)), Some(_)) => Err(format!(
            "{at}.endPort: may not be specified with a named port"
        )),
        (Some(IntOrString::String(name)), None) => {
            port_name(name).map_err(|why| format!("{at}.port: {name:?} {why}"))?;
            Ok(Port::Named {
                name: name.clone(),
                protocol: proto,
            })
        }
    }
}

/// Whether `name` is an IANA_SVC_NAME (`IsValidPortName`): 1-15 characters of a-z, 0-9 and
/// '-', at least one letter, no leading, trailing or doubled '-'.
pub(crate) fn port_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 15 {
        return Err("is not a port name (1-15 characters)");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("is not a port name (only a-z, 0-9 and '-')");
    }
    if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err("is not a port name (needs a letter a-z)");
    }
    if name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return Err("is not a port name (no leading, trailing or doubled '-')");
    }
    Ok(())
}
