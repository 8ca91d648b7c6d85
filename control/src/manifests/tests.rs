//! Loading, defaulting, allocation and EndpointSlice derivation on YAML fixtures.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::allocate::{allocate, Ranges, DEFAULT_NODE_PORTS};
use super::{defaults, endpointslices, resolve, Allocations, Objects, Settings};
use crate::translate::service_spec;

fn objects(yaml: &str) -> Objects {
    let mut o = Objects::default();
    o.add_text(yaml, "t.yaml");
    o
}

fn services(yaml: &str) -> Vec<Service> {
    let o = objects(yaml);
    assert!(o.invalid.is_empty(), "{:?}", o.invalid);
    o.services
}

fn ranges() -> Ranges {
    Ranges {
        service_cidr: "198.19.0.0/16".parse().unwrap(),
        node_ports: DEFAULT_NODE_PORTS,
    }
}

#[test]
fn reads_every_kind_and_reports_the_bad_objects_alone() {
    let o = objects(
        "
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
---
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: http}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: []
---
kind: ConfigMap
metadata: {name: settings}
---
kind: Pod
metadata: {name: bad, labels: {app: 3}}
---
kind: Service
metadata: {name: web}
spec: {ports: [{port: 81}]}
---
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata: {name: old}
addressType: IPv4
endpoints: []
---
metadata: {name: kindless}
---
",
    );
    assert_eq!(o.namespaces.len(), 1);
    assert_eq!(o.pods.len(), 1);
    assert_eq!(o.services.len(), 1);
    assert_eq!(o.endpoint_slices.len(), 1);
    assert_eq!(
        o.services[0].metadata.namespace.as_deref(),
        Some("default"),
        "no namespace is the default one"
    );
    assert_eq!(
        o.services[0].spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port,
        80,
        "the first of two is kept"
    );
    assert_eq!(o.other, vec!["ConfigMap/settings".to_string()]);
    let invalid: Vec<String> = o.invalid.iter().map(ToString::to_string).collect();
    assert_eq!(invalid.len(), 4, "{invalid:?}");
    assert!(
        invalid[0].starts_with("t.yaml document 6: Pod default/bad: metadata.labels.app: "),
        "{invalid:?}"
    );
    assert!(
        invalid[1].contains("Service default/web: declared twice"),
        "{invalid:?}"
    );
    assert!(
        invalid[2].contains("discovery.k8s.io/v1beta1"),
        "{invalid:?}"
    );
    assert!(invalid[3].ends_with("no kind"), "{invalid:?}");
}

#[test]
fn network_policies_are_read_into_their_namespace_as_written() {
    let o = objects(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: shop}
spec: {podSelector: {}}
---
kind: NetworkPolicy
metadata: {name: web}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{ports: [{port: http}]}]
---
kind: NetworkPolicy
metadata: {name: web}
---
apiVersion: networking.k8s.io/v1beta1
kind: NetworkPolicy
metadata: {name: old}
---
kind: NetworkPolicy
metadata: {name: typo}
spec: {podSelector: {matchLabels: {app: 3}}, policyTypes: Ingress}
",
    );
    let keys: Vec<String> = o
        .network_policies
        .iter()
        .map(|p| crate::object_key(&p.metadata))
        .collect();
    assert_eq!(keys, ["shop/deny", "default/web"]);
    let web = o.network_policies[1].spec.as_ref().unwrap();
    assert_eq!(web.policy_types, None, "not defaulted when read");
    assert_eq!(
        web.ingress.as_ref().unwrap()[0].ports.as_ref().unwrap()[0].port,
        Some(IntOrString::String("http".into()))
    );
    assert!(o.other.is_empty(), "{:?}", o.other);
    let invalid: Vec<String> = o.invalid.iter().map(ToString::to_string).collect();
    assert_eq!(invalid.len(), 3, "{invalid:?}");
    assert!(
        invalid[0].contains("NetworkPolicy default/web: declared twice"),
        "{invalid:?}"
    );
    assert!(
        invalid[1].contains("networking.k8s.io/v1beta1"),
        "{invalid:?}"
    );
    assert!(
        invalid[2].contains("NetworkPolicy default/typo: spec."),
        "{invalid:?}"
    );
}

#[test]
fn a_syntax_error_ends_the_file_but_not_what_came_before() {
    let o = objects(
        "kind: Service\nmetadata: {name: a}\n---\n: : :\n---\nkind: Service\nmetadata: {name: b}\n",
    );
    assert_eq!(o.services.len(), 1);
    assert_eq!(o.invalid.len(), 1);
    assert!(
        o.invalid[0].origin.ends_with("document 2"),
        "{:?}",
        o.invalid
    );
}

#[test]
fn a_directory_is_read_file_by_file_in_name_order() {
    let dir = std::env::temp_dir().join(format!("strom-control-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("b.yaml"), "kind: Service\nmetadata: {name: b}\n").unwrap();
    std::fs::write(
        dir.join("a.json"),
        r#"{"kind": "Service", "metadata": {"name": "a"}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("notes.txt"),
        "kind: Service\nmetadata: {name: c}\n",
    )
    .unwrap();
    let o = Objects::load(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    let names: Vec<_> = o
        .unwrap()
        .services
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, vec!["a", "b"]);
    assert!(Objects::load(std::path::Path::new("/nonexistent/strom")).is_err());
}

#[test]
fn services_are_defaulted_as_the_api_server_does() {
    let mut s = services(
        "
kind: Service
metadata: {name: a}
spec: {ports: [{port: 80}, {port: 53, protocol: UDP, targetPort: dns}], sessionAffinity: ClientIP}
---
kind: Service
metadata: {name: b}
spec: {type: LoadBalancer, ports: [{port: 443, targetPort: 0}]}
---
kind: Service
metadata: {name: c}
spec: {type: ExternalName, externalName: example.com}
",
    );
    s.iter_mut().for_each(defaults::service);
    let a = s[0].spec.as_ref().unwrap();
    assert_eq!(a.type_.as_deref(), Some("ClusterIP"));
    let ports = a.ports.as_ref().unwrap();
    assert_eq!(ports[0].protocol.as_deref(), Some("TCP"));
    assert_eq!(ports[0].target_port, Some(IntOrString::Int(80)));
    assert_eq!(
        ports[1].target_port,
        Some(IntOrString::String("dns".into()))
    );
    assert_eq!(
        a.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds),
        Some(10800)
    );
    assert_eq!(
        a.external_traffic_policy, None,
        "only NodePort and LoadBalancer get one"
    );
    assert_eq!(a.internal_traffic_policy.as_deref(), Some("Cluster"));
    let b = s[1].spec.as_ref().unwrap();
    assert_eq!(b.session_affinity.as_deref(), Some("None"));
    assert_eq!(b.external_traffic_policy.as_deref(), Some("Cluster"));
    assert_eq!(b.allocate_load_balancer_node_ports, Some(true));
    assert_eq!(
        b.ports.as_ref().unwrap()[0].target_port,
        Some(IntOrString::Int(443))
    );
    let c = s[2].spec.as_ref().unwrap();
    assert_eq!(c.internal_traffic_policy, None);
}

fn cluster_ip(s: &Service) -> Option<&str> {
    s.spec.as_ref()?.cluster_ip.as_deref()
}

fn node_ports(s: &Service) -> Vec<Option<i32>> {
    s.spec
        .as_ref()
        .unwrap()
        .ports
        .iter()
        .flatten()
        .map(|p| p.node_port)
        .collect()
}

const THREE: &str = "
kind: Service
metadata: {name: a}
spec: {ports: [{port: 80}]}
---
kind: Service
metadata: {name: b}
spec: {type: NodePort, ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP, nodePort: 30053}]}
---
kind: Service
metadata: {name: c}
spec: {type: LoadBalancer, externalTrafficPolicy: Local, ports: [{port: 443}]}
---
kind: Service
metadata: {name: h}
spec: {clusterIP: None, ports: [{port: 80}]}
---
kind: Service
metadata: {name: x}
spec: {type: ExternalName, externalName: example.com}
";

#[test]
fn allocation_fills_what_is_missing_deterministically() {
    let mut first = services(THREE);
    first.iter_mut().for_each(defaults::service);
    let mut second = first.clone();
    let (alloc, failed) = allocate(&mut first, &ranges(), &Allocations::default());
    assert!(failed.is_empty(), "{failed:?}");
    let (again, _) = allocate(&mut second, &ranges(), &Allocations::default());
    assert_eq!(alloc, again, "the same manifests, the same values");
    let cidr: ipnet::Ipv4Net = "198.19.0.0/16".parse().unwrap();
    let ips: Vec<_> = first[..3]
        .iter()
        .map(|s| {
            cluster_ip(s)
                .unwrap()
                .parse::<std::net::Ipv4Addr>()
                .unwrap()
        })
        .collect();
    assert!(ips.iter().all(|ip| cidr.contains(ip)), "{ips:?}");
    assert!(ips[0] != ips[1] && ips[1] != ips[2] && ips[0] != ips[2]);
    assert_eq!(
        first[0].spec.as_ref().unwrap().cluster_ips,
        Some(vec![ips[0].to_string()])
    );
    assert_eq!(
        cluster_ip(&first[3]),
        Some("None"),
        "headless stays headless"
    );
    assert_eq!(cluster_ip(&first[4]), None, "ExternalName gets no address");
    assert_eq!(node_ports(&first[0]), vec![None], "ClusterIP: no NodePort");
    let b = node_ports(&first[1]);
    assert!(b[0].is_some_and(|n| DEFAULT_NODE_PORTS.contains(&(n as u16))));
    assert_eq!(b[1], Some(30053), "a written NodePort is kept");
    let c = first[2].spec.as_ref().unwrap();
    assert!(c.ports.as_ref().unwrap()[0].node_port.is_some());
    assert!(
        c.health_check_node_port.is_some(),
        "LoadBalancer + Local: a health check port"
    );
    assert_eq!(
        alloc.services.len(),
        3,
        "headless and ExternalName hold nothing: {alloc:?}"
    );
    assert_eq!(
        alloc.services["default/b"].node_ports.get("dns/UDP"),
        Some(&30053)
    );
}

#[test]
fn earlier_values_are_kept_and_written_ones_are_avoided() {
    let mut s = services(THREE);
    s.iter_mut().for_each(defaults::service);
    let (before, _) = allocate(&mut s.clone(), &ranges(), &Allocations::default());
    // Another Service writes b's ClusterIP: b moves, a keeps its own.
    let b_ip = before.services["default/b"].cluster_ip.unwrap();
    let taker = format!(
        "kind: Service\nmetadata: {{name: aa}}\nspec: {{clusterIP: {b_ip}, ports: [{{port: 1}}]}}\n"
    );
    let mut more = services(&format!("{THREE}---\n{taker}"));
    more.iter_mut().for_each(defaults::service);
    let (after, failed) = allocate(&mut more, &ranges(), &before);
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(after.services["default/aa"].cluster_ip, Some(b_ip));
    assert_ne!(after.services["default/b"].cluster_ip, Some(b_ip));
    assert_eq!(after.services["default/a"], before.services["default/a"]);
    assert_eq!(after.services["default/c"], before.services["default/c"]);
    // Values remembered from an earlier run are given back even if the hash would differ.
    let mut remembered = before.clone();
    let a = remembered.services.get_mut("default/a").unwrap();
    a.cluster_ip = Some("198.19.7.7".parse().unwrap());
    let mut again = services(THREE);
    again.iter_mut().for_each(defaults::service);
    let (kept, _) = allocate(&mut again, &ranges(), &remembered);
    assert_eq!(cluster_ip(&again[0]), Some("198.19.7.7"));
    assert_eq!(
        kept.services["default/a"].cluster_ip,
        Some("198.19.7.7".parse().unwrap())
    );
}

#[test]
fn written_values_out_of_range_or_taken_are_refused_alone() {
    let mut s = services(
        "
kind: Service
metadata: {name: a}
spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}
---
kind: Service
metadata: {name: b}
spec: {type: NodePort, ports: [{port: 80, nodePort: 8080}]}
---
kind: Service
metadata: {name: c}
spec: {type: NodePort, ports: [{port: 80, nodePort: 30001}]}
---
kind: Service
metadata: {name: d}
spec: {type: NodePort, ports: [{port: 81, nodePort: 30001}]}
---
kind: Service
metadata: {name: e}
spec: {ports: [{port: 80}]}
",
    );
    s.iter_mut().for_each(defaults::service);
    let (alloc, failed) = allocate(&mut s, &ranges(), &Allocations::default());
    let reasons: BTreeMap<usize, String> =
        failed.iter().map(|(i, e)| (*i, e.to_string())).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons[&0].contains("10.0.0.1 is not in the service CIDR"),
        "{reasons:?}"
    );
    assert!(
        reasons[&1].contains("nodePort 8080 is not in the NodePort range"),
        "{reasons:?}"
    );
    assert!(
        reasons[&3].contains("Service default/d: nodePort 30001/TCP is already allocated"),
        "{reasons:?}"
    );
    assert!(alloc.services.contains_key("default/c") && alloc.services.contains_key("default/e"));
}

fn pods(yaml: &str) -> Vec<Pod> {
    let o = objects(yaml);
    assert!(o.invalid.is_empty(), "{:?}", o.invalid);
    o.pods
}

const BACKENDS: &str = "
kind: Pod
metadata: {name: v1, namespace: shop, labels: {app: web, v: '1'}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 5353, protocol: UDP}]}]}
status: {podIP: 10.0.0.1}
---
kind: Pod
metadata: {name: v2, namespace: shop, labels: {app: web, v: '2'}}
spec: {nodeName: n2, containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]}
status: {podIPs: [{ip: 10.0.0.2}]}
---
kind: Pod
metadata: {name: v3, namespace: shop, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]}
status: {podIP: 10.0.0.3, conditions: [{type: Ready, status: 'False'}]}
---
kind: Pod
metadata: {name: v4, namespace: shop, labels: {app: web}, deletionTimestamp: '2026-01-01T00:00:00Z'}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]}
status: {podIP: 10.0.0.4}
---
kind: Pod
metadata: {name: no-ip, namespace: shop, labels: {app: web}}
spec: {containers: [{name: c}]}
---
kind: Pod
metadata: {name: done, namespace: shop, labels: {app: web}}
spec: {containers: [{name: c}]}
status: {podIP: 10.0.0.5, phase: Succeeded}
---
kind: Pod
metadata: {name: elsewhere, namespace: other, labels: {app: web}}
spec: {containers: [{name: c}]}
status: {podIP: 10.0.0.6}
---
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {containers: [{name: c}]}
status: {podIP: 10.0.0.7}
";

const WEB: &str = "
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 198.19.0.80
  selector: {app: web}
  ports:
    - {name: http, port: 80, targetPort: http}
    - {name: dns, port: 53, protocol: UDP, targetPort: dns}
    - {name: admin, port: 81, targetPort: 7000}
";

#[test]
fn slices_are_derived_as_the_endpointslice_controller_does() {
    let mut svc = services(WEB).remove(0);
    defaults::service(&mut svc);
    let slices = endpointslices::derive(&svc, &pods(BACKENDS));
    // v1 resolves all three ports; v2, v3 and v4 only http (9090) and admin.
    assert_eq!(slices.len(), 2, "{slices:#?}");
    let ports = |i: usize| -> Vec<(String, i32)> {
        slices[i]
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone().unwrap(), p.port.unwrap()))
            .collect()
    };
    let addresses = |i: usize| -> Vec<String> {
        slices[i]
            .endpoints
            .iter()
            .map(|e| e.addresses[0].clone())
            .collect()
    };
    let (full, partial) = if ports(0).len() == 3 { (0, 1) } else { (1, 0) };
    assert_eq!(
        ports(full),
        vec![
            ("http".into(), 8080),
            ("dns".into(), 5353),
            ("admin".into(), 7000)
        ]
    );
    assert_eq!(addresses(full), vec!["10.0.0.1"]);
    assert_eq!(
        ports(partial),
        vec![("http".into(), 9090), ("admin".into(), 7000)]
    );
    assert_eq!(addresses(partial), vec!["10.0.0.2", "10.0.0.3", "10.0.0.4"]);
    for s in &slices {
        assert_eq!(s.address_type, "IPv4");
        assert_eq!(s.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(
            s.metadata.labels.as_ref().unwrap()["kubernetes.io/service-name"],
            "web"
        );
    }
    let e = &slices[partial].endpoints;
    let c = |i: usize| e[i].conditions.clone().unwrap();
    assert_eq!(
        (c(0).ready, c(0).serving, c(0).terminating),
        (Some(true), Some(true), Some(false))
    );
    assert_eq!(
        (c(1).ready, c(1).serving, c(1).terminating),
        (Some(false), Some(false), Some(false))
    );
    assert_eq!(
        (c(2).ready, c(2).serving, c(2).terminating),
        (Some(false), Some(true), Some(true))
    );
    assert_eq!(e[0].node_name.as_deref(), Some("n2"));
    let r = e[0].target_ref.as_ref().unwrap();
    assert_eq!(
        (r.kind.as_deref(), r.namespace.as_deref(), r.name.as_deref()),
        (Some("Pod"), Some("shop"), Some("v2"))
    );
}

#[test]
fn publish_not_ready_addresses_makes_every_endpoint_ready() {
    let mut svc = services(&format!("{WEB}  publishNotReadyAddresses: true\n")).remove(0);
    defaults::service(&mut svc);
    let slices = endpointslices::derive(&svc, &pods(BACKENDS));
    assert!(slices
        .iter()
        .flat_map(|s| &s.endpoints)
        .all(|e| e.conditions.as_ref().unwrap().ready == Some(true)));
}

#[test]
fn no_selector_no_derived_slices_and_at_most_a_hundred_a_slice() {
    let mut svc = services(&WEB.replace("  selector: {app: web}\n", "")).remove(0);
    defaults::service(&mut svc);
    assert!(endpointslices::derive(&svc, &pods(BACKENDS)).is_empty());
    let many: String = (0..150)
        .map(|i| {
            format!(
                "---\nkind: Pod\nmetadata: {{name: p{i}, namespace: shop, labels: {{app: web}}}}\nspec: {{containers: [{{name: c}}]}}\nstatus: {{podIP: 10.1.{}.{}}}\n",
                i / 200,
                i % 200 + 1
            )
        })
        .collect();
    let mut svc = services(WEB).remove(0);
    defaults::service(&mut svc);
    let slices = endpointslices::derive(&svc, &pods(&many));
    let sizes: Vec<usize> = slices.iter().map(|s| s.endpoints.len()).collect();
    assert_eq!(sizes, vec![100, 50]);
    let names: Vec<_> = slices
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, vec!["web-0", "web-1"]);
}

/// The whole path: manifests resolved, then translated, as strom-lab does.
#[test]
fn resolved_services_translate_with_their_derived_slices() {
    let mut o = objects(BACKENDS);
    o.add_text(
        &format!(
            "{}---\n{}",
            WEB.replace("  clusterIP: 198.19.0.80\n", "  type: NodePort\n"),
            "
kind: Service
metadata: {name: given, namespace: shop}
spec: {selector: {app: web}, ports: [{port: 80}]}
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: {name: given-x, namespace: shop, labels: {kubernetes.io/service-name: given}}
addressType: IPv4
ports: [{name: '', port: 7777}]
endpoints: [{addresses: [10.9.9.9], nodeName: n1}]
---
kind: Service
metadata: {name: wrong, namespace: shop}
spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}
"
        ),
        "more.yaml",
    );
    assert!(o.invalid.is_empty(), "{:?}", o.invalid);
    let settings = Settings::new("198.19.0.0/16".parse().unwrap());
    let r = resolve(
        &o.services,
        &o.endpoint_slices,
        &o.pods,
        &settings,
        &Allocations::default(),
    );
    assert_eq!(r.skipped.len(), 1, "{:?}", r.skipped);
    assert!(r.skipped[0].to_string().starts_with("Service shop/wrong: "));
    assert_eq!(r.services.len(), 2);
    let slices: Vec<_> = r.endpoint_slices.iter().collect();
    let web = service_spec(&r.services[0], &slices, N1).unwrap().unwrap();
    let http = &web.ports[0];
    assert!(http.node_port.is_some());
    let got: Vec<(IpAddr, u16, bool)> = http
        .endpoints
        .iter()
        .map(|e| (e.ip, e.port, e.local))
        .collect();
    assert_eq!(
        got,
        vec![
            ("10.0.0.1".parse().unwrap(), 8080, true),
            ("10.0.0.2".parse().unwrap(), 9090, false),
            ("10.0.0.3".parse().unwrap(), 9090, false),
            ("10.0.0.4".parse().unwrap(), 9090, false),
        ]
    );
    assert_eq!(web.ports[1].endpoints.len(), 1, "only v1 names dns");
    assert_eq!(web.ports[1].endpoints[0].target, "shop/v1");
    // A Service with a slice given is not derived from its pods.
    let given = service_spec(&r.services[1], &slices, N1).unwrap().unwrap();
    let got: Vec<(IpAddr, u16)> = given.ports[0]
        .endpoints
        .iter()
        .map(|e| (e.ip, e.port))
        .collect();
    assert_eq!(got, vec![("10.9.9.9".parse().unwrap(), 7777)]);
    assert_eq!(r.allocations.services.len(), 2);
}

const N1: crate::ForNode<'static> = crate::ForNode {
    name: "n1",
    zone: None,
};
