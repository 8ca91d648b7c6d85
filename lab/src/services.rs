//! The lab's Services: what the cluster's controllers and kube-proxy would do for the
//! manifests' Services, through strom-control (defaulting, ClusterIPs from [`SERVICE_CIDR`]
//! and NodePorts allocated and kept in the lab's state, EndpointSlices derived from the live
//! pods when the manifests give none, the translation), programmed into stromd.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use strom_api::{Protocol, Request, ServicePortSpec, ServiceSpec};
use strom_control::k8s_openapi::api::core::v1::{
    Container, ContainerPort, Pod, PodCondition, PodIP, PodSpec, PodStatus,
};
use strom_control::k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use strom_control::manifests::{resolve, Settings};

use crate::lab::{PodState, State};
use crate::manifest::Manifests;

/// Where the lab's ClusterIPs come from: beside the lab's addresses (198.18.0.0/15 is the
/// tests'), never routed anywhere but to stromd.
pub const SERVICE_CIDR: &str = "198.19.0.0/16";

/// What a sync did, by `namespace/name`.
#[derive(Debug, Default)]
pub struct ServicesApplied {
    pub programmed: Vec<String>,
    pub removed: Vec<String>,
    /// Services left out, each with the reason (malformed, or refused by stromd).
    pub refused: Vec<String>,
}

impl PodState {
    /// The pod as the EndpointSlice controller would see it: its labels, its live address,
    /// its named container ports, on the lab's node.
    pub(crate) fn as_pod(&self, node: &str) -> Pod {
        let d = &self.decl;
        Pod {
            metadata: ObjectMeta {
                name: Some(d.name.clone()),
                namespace: Some(d.namespace.clone()),
                labels: Some(d.labels.clone()),
                // Only whether it is set matters (the lab's pods terminate when removed).
                deletion_timestamp: d.terminating.then(|| Time(Default::default())),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                containers: vec![Container {
                    name: "c".into(),
                    ports: Some(
                        d.ports
                            .iter()
                            .map(|p| ContainerPort {
                                container_port: p.port.into(),
                                name: p.name.clone(),
                                protocol: Some(p.protocol.to_ascii_uppercase()),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: self.ip.clone(),
                pod_ips: self.ip.clone().map(|ip| vec![PodIP { ip }]),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if d.ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }
}

/// One request to stromd on a connection of its own: a refusal of one Service must not
/// cost the next its connection.
pub(crate) fn call(st: &State, req: &Request) -> Result<(), String> {
    strom_api::Client::connect(st.settings.socket(), Duration::from_secs(5))
        .and_then(|mut c| c.call(req))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

impl State {
    /// The lab's node as Kubernetes names it: every lab pod runs on it.
    pub fn node_name(&self) -> String {
        self.settings.node_ns()
    }

    /// Makes stromd's Services those of `m`, over the pods running now: each translated and
    /// set, those gone from the manifests (or now headless or ExternalName) removed. A
    /// Service that is malformed or that stromd refuses is reported and left as it was; the
    /// rest is applied.
    pub fn sync_services(&mut self, m: &Manifests) -> anyhow::Result<ServicesApplied> {
        let node = self.node_name();
        let pods: Vec<Pod> = self.pods.values().map(|p| p.as_pod(&node)).collect();
        let settings = Settings::new(SERVICE_CIDR.parse().context("the lab's service CIDR")?);
        let r = resolve(
            &m.services,
            &m.endpoint_slices,
            &pods,
            &settings,
            &self.allocations,
        );
        let mut done = ServicesApplied {
            refused: r.skipped.iter().map(ToString::to_string).collect(),
            ..Default::default()
        };
        let slices: Vec<_> = r.endpoint_slices.iter().collect();
        let mut keep = std::collections::BTreeSet::new();
        for svc in &r.services {
            let key = strom_control::object_key(&svc.metadata);
            match strom_control::service_spec(svc, &slices, lab_node(&node)) {
                Ok(Some(spec)) => {
                    keep.insert(key.clone());
                    if self.services.get(&key) == Some(&spec) {
                        continue;
                    }
                    match call(
                        self,
                        &Request::SetService {
                            service: spec.clone(),
                        },
                    ) {
                        Ok(()) => {
                            self.services.insert(key.clone(), spec);
                            done.programmed.push(key);
                        }
                        Err(e) => done.refused.push(format!("Service {key}: {e}")),
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    // What stromd had stays, as an API server keeps a Service whose update
                    // it refused.
                    keep.insert(key);
                    done.refused.push(e.to_string());
                }
            }
        }
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            let (namespace, name) = key.split_once('/').unwrap_or(("default", &key));
            let req = Request::RemoveService {
                namespace: namespace.into(),
                name: name.into(),
            };
            match call(self, &req) {
                Ok(()) => {
                    self.services.remove(&key);
                    done.removed.push(key);
                }
                Err(e) => done.refused.push(format!("removing Service {key}: {e}")),
            }
        }
        self.allocations = r.allocations;
        self.save()?;
        Ok(done)
    }

    /// Gives a restarted stromd the Services it had. Returns what it refused.
    pub fn reprogram_services(&self) -> Vec<String> {
        self.services
            .iter()
            .filter_map(|(key, spec)| {
                call(
                    self,
                    &Request::SetService {
                        service: spec.clone(),
                    },
                )
                .err()
                .map(|e| format!("Service {key}: {e}"))
            })
            .collect()
    }

    /// Where a probe of Service `key` goes: the ClusterIP and the Service port from inside
    /// (a pod or the node), the NodePort on the node's address from `external`, or with
    /// `lb` the first load-balancer address. The port is the one named `port_name`, or
    /// numbered `port`, or of `protocol`, or else the first.
    pub fn service_target(
        &self,
        key: &str,
        external: bool,
        lb: bool,
        choice: &PortChoice,
    ) -> anyhow::Result<(IpAddr, u16, Protocol)> {
        let spec = self
            .services
            .get(key)
            .with_context(|| format!("no pod or Service {key} (or node, external)"))?;
        let p = choice.pick(spec)?;
        if lb {
            let ip = spec
                .load_balancer_ips
                .first()
                .with_context(|| format!("Service {key} has no load-balancer address"))?;
            return Ok((*ip, p.port, p.protocol));
        }
        if external {
            let np = p.node_port.with_context(|| {
                format!(
                    "Service {key} has no NodePort: from external use --lb, or a NodePort Service"
                )
            })?;
            return Ok((crate::lab::NODE_ADDR.parse()?, np, p.protocol));
        }
        let ip = spec
            .cluster_ips
            .first()
            .with_context(|| format!("Service {key} has no ClusterIP"))?;
        Ok((*ip, p.port, p.protocol))
    }
}

/// Which port of a Service a probe goes to.
#[derive(Debug, Default)]
pub struct PortChoice {
    pub name: Option<String>,
    pub port: Option<u16>,
    pub protocol: Option<Protocol>,
}

impl PortChoice {
    fn pick<'a>(&self, spec: &'a ServiceSpec) -> anyhow::Result<&'a ServicePortSpec> {
        let found = spec.ports.iter().find(|p| {
            self.name.as_ref().is_none_or(|n| *n == p.name)
                && self.port.is_none_or(|n| n == p.port)
                && self.protocol.is_none_or(|x| x == p.protocol)
        });
        match found {
            Some(p) => Ok(p),
            None => bail!(
                "Service {} has no such port (it has {})",
                spec.key(),
                ports_text(spec)
            ),
        }
    }
}

/// `name:port/protocol(->nodePort)` for each port.
pub fn ports_text(spec: &ServiceSpec) -> String {
    spec.ports
        .iter()
        .map(|p| {
            let name = if p.name.is_empty() {
                String::new()
            } else {
                format!("{}:", p.name)
            };
            let np = p.node_port.map(|n| format!("->{n}")).unwrap_or_default();
            format!("{name}{}/{}{np}", p.port, p.protocol.name())
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The Services for `strom-lab status`: addresses and ports, then each port's endpoints.
pub fn status_lines(services: &BTreeMap<String, ServiceSpec>) -> Vec<String> {
    let mut out = Vec::new();
    for (key, s) in services {
        let mut extra = Vec::new();
        if !s.external_ips.is_empty() {
            extra.push(format!("external {}", strom_api::ips_text(&s.external_ips)));
        }
        if !s.load_balancer_ips.is_empty() {
            extra.push(format!("lb {}", strom_api::ips_text(&s.load_balancer_ips)));
        }
        if let Some(t) = s.affinity_timeout_s {
            extra.push(format!("affinity {t}s"));
        }
        if s.external_local {
            extra.push("external local".into());
        }
        if s.internal_local {
            extra.push("internal local".into());
        }
        let line = format!(
            "{key:<24} {:<16} {} {}",
            strom_api::ips_text(&s.cluster_ips),
            ports_text(s),
            extra.join(", ")
        );
        out.push(line.trim_end().to_string());
        for p in &s.ports {
            let eps: Vec<String> = p
                .endpoints
                .iter()
                .map(|e| {
                    let mut flags = String::new();
                    if !e.ready {
                        flags.push_str(if e.serving { " serving" } else { " not-ready" });
                    }
                    if e.terminating {
                        flags.push_str(" terminating");
                    }
                    let who = if e.target.is_empty() {
                        String::new()
                    } else {
                        format!(" ({}{flags})", e.target)
                    };
                    format!("{}:{}{who}", e.ip, e.port)
                })
                .collect();
            out.push(format!(
                "  {}/{} -> {}",
                if p.name.is_empty() {
                    p.port.to_string()
                } else {
                    p.name.clone()
                },
                p.protocol.name(),
                if eps.is_empty() {
                    "no endpoints".into()
                } else {
                    eps.join(", ")
                }
            ));
        }
    }
    out
}

/// The lab's node for the translation: its name; no zone (the lab is one node, so zone hints
/// never apply, as on a node without the label).
fn lab_node(name: &str) -> strom_control::ForNode<'_> {
    strom_control::ForNode { name, zone: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::Settings as LabSettings;
    use crate::manifest::Manifests;

    fn state(pods: &str) -> State {
        let m = Manifests::from_text(pods, "pods");
        let mut st = State {
            settings: LabSettings {
                dir: "/nonexistent".into(),
                prefix: "sl".into(),
                bin_dir: "/nonexistent".into(),
                pod_cidr: "198.18.16.0/20".into(),
                workers: 1,
                poll_mode: "adaptive".into(),
                uplink_queues: 1,
                cores: Vec::new(),
                conntrack_max: None,
                local_mtu: None,
                pod_xdp: None,
            },
            stromd: None,
            pods: BTreeMap::new(),
            services: BTreeMap::new(),
            allocations: Default::default(),
            policies: Default::default(),
        };
        for (i, d) in m.pods.into_iter().enumerate() {
            st.pods.insert(
                d.key(),
                PodState {
                    ip: Some(format!("198.18.16.{}", i + 2)),
                    decl: d,
                    netns: String::new(),
                    container_id: String::new(),
                    responder: None,
                },
            );
        }
        st
    }

    const PODS: &str = "
kind: Pod
metadata: {name: a, namespace: t, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
---
kind: Pod
metadata: {name: b, namespace: t, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]}
status: {conditions: [{type: Ready, status: 'False'}]}
---
kind: Pod
metadata: {name: c, namespace: t, labels: {app: other}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}
";

    /// The translation the lab sends for a Service over its live pods (what sync_services
    /// does before it calls stromd).
    fn translated(st: &State, svc: &str) -> ServiceSpec {
        let m = Manifests::from_text(svc, "svc");
        let node = st.node_name();
        let pods: Vec<Pod> = st.pods.values().map(|p| p.as_pod(&node)).collect();
        let r = resolve(
            &m.services,
            &m.endpoint_slices,
            &pods,
            &Settings::new(SERVICE_CIDR.parse().unwrap()),
            &st.allocations,
        );
        let slices: Vec<_> = r.endpoint_slices.iter().collect();
        strom_control::service_spec(&r.services[0], &slices, lab_node(&node))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn live_pods_give_the_endpoints_with_their_addresses_and_named_ports() {
        let st = state(PODS);
        let s = translated(
            &st,
            "kind: Service\nmetadata: {name: web, namespace: t}\nspec: {type: NodePort, selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}\n",
        );
        let cidr: ipnet::Ipv4Net = SERVICE_CIDR.parse().unwrap();
        assert!(matches!(s.cluster_ips[0], IpAddr::V4(v4) if cidr.contains(&v4)));
        let p = &s.ports[0];
        assert!(p.node_port.is_some());
        let got: Vec<(String, u16, bool, bool, String)> = p
            .endpoints
            .iter()
            .map(|e| (e.ip.to_string(), e.port, e.ready, e.local, e.target.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("198.18.16.2".into(), 8080, true, true, "t/a".into()),
                ("198.18.16.3".into(), 9090, false, true, "t/b".into()),
            ]
        );
        let to = |choice: PortChoice, external, lb| {
            let mut st = state(PODS);
            st.services.insert(s.key(), s.clone());
            st.service_target("t/web", external, lb, &choice)
        };
        let (ip, port, proto) = to(PortChoice::default(), false, false).unwrap();
        assert_eq!((ip, port, proto), (s.cluster_ips[0], 80, Protocol::Tcp));
        let (ip, port, _) = to(PortChoice::default(), true, false).unwrap();
        assert_eq!(
            (ip.to_string().as_str(), Some(port)),
            ("198.18.0.1", p.node_port)
        );
        assert!(
            to(PortChoice::default(), true, true).is_err(),
            "no load balancer"
        );
        let named = PortChoice {
            name: Some("nope".into()),
            ..Default::default()
        };
        assert!(to(named, false, false).is_err());
    }

    #[test]
    fn status_shows_addresses_ports_and_endpoints() {
        let st = state(PODS);
        let s = translated(
            &st,
            "kind: Service\nmetadata: {name: web, namespace: t}\nspec: {clusterIP: 198.19.0.9, selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}\n",
        );
        let lines = status_lines(&BTreeMap::from([(s.key(), s)]));
        assert!(
            lines[0].starts_with("t/web") && lines[0].ends_with("198.19.0.9       http:80/tcp"),
            "{lines:?}"
        );
        assert_eq!(
            lines[1],
            "  http/tcp -> 198.18.16.2:8080 (t/a), 198.18.16.3:9090 (t/b not-ready)"
        );
    }

    #[test]
    fn the_demo_services_translate_over_the_demo_pods() {
        let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/demo"));
        let m = Manifests::load(dir).unwrap();
        assert!(
            m.invalid.is_empty() && m.ignored.is_empty(),
            "{:?} {:?}",
            m.invalid,
            m.ignored
        );
        let text = std::fs::read_to_string(dir.join("pods.yaml")).unwrap();
        let st = state(&text);
        let node = st.node_name();
        let pods: Vec<Pod> = st.pods.values().map(|p| p.as_pod(&node)).collect();
        let settings = Settings::new(SERVICE_CIDR.parse().unwrap());
        let r = resolve(
            &m.services,
            &m.endpoint_slices,
            &pods,
            &settings,
            &Default::default(),
        );
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
        let slices: Vec<_> = r.endpoint_slices.iter().collect();
        let specs: Vec<ServiceSpec> = r
            .services
            .iter()
            .map(|s| {
                strom_control::service_spec(s, &slices, lab_node(&node))
                    .unwrap()
                    .unwrap()
            })
            .collect();
        let endpoints = |s: &ServiceSpec| -> Vec<(String, u16, String)> {
            s.ports
                .iter()
                .flat_map(|p| &p.endpoints)
                .map(|e| (p_name(s, e), e.port, e.target.clone()))
                .collect()
        };
        fn p_name(s: &ServiceSpec, e: &strom_api::EndpointSpec) -> String {
            s.ports
                .iter()
                .find(|p| p.endpoints.contains(e))
                .map(|p| p.name.clone())
                .unwrap_or_default()
        }
        let frontend = specs.iter().find(|s| s.name == "frontend").unwrap();
        assert!(frontend.ports[0].node_port.is_some());
        assert_eq!(
            endpoints(frontend),
            vec![("http".into(), 80, "shop/web".into())]
        );
        let database = specs.iter().find(|s| s.name == "database").unwrap();
        assert_eq!(
            endpoints(database),
            vec![
                ("sql".into(), 5432, "shop/db".into()),
                ("dns".into(), 53, "shop/db".into())
            ]
        );
    }
}
