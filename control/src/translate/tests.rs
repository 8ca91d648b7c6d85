//! The translation on YAML fixtures, one behaviour a test.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use strom_api::{EndpointSpec, Protocol, ServiceSpec};

use super::{service_spec, ForNode, TranslateError};

const NODE: &str = "node-1";

/// The node the fixtures are translated for, in zone a.
const FOR_NODE: ForNode<'static> = ForNode {
    name: NODE,
    zone: Some("a"),
};

fn service(yaml: &str) -> Service {
    serde_yaml::from_str(yaml).expect("a Service fixture")
}

fn slices(yaml: &str) -> Vec<EndpointSlice> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("an EndpointSlice fixture"))
        .collect()
}

fn translate(svc: &str, eps: &str) -> Result<Option<ServiceSpec>, TranslateError> {
    let eps = slices(eps);
    let refs: Vec<&EndpointSlice> = eps.iter().collect();
    service_spec(&service(svc), &refs, FOR_NODE)
}

fn spec(svc: &str, eps: &str) -> ServiceSpec {
    translate(svc, eps)
        .expect("translates")
        .expect("is programmed")
}

fn ep(ip: &str, port: u16) -> EndpointSpec {
    EndpointSpec {
        ip: ip.parse().unwrap(),
        port,
        ready: true,
        serving: true,
        terminating: false,
        local: false,
        in_topology: true,
        target: String::new(),
    }
}

const WEB: &str = "
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 198.19.0.10
  clusterIPs: [198.19.0.10]
  selector: {app: web}
  ports:
    - {name: http, port: 80, targetPort: web}
";

#[test]
fn a_named_target_port_gives_each_backend_its_own_number() {
    let s = spec(
        WEB,
        "
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - addresses: [10.0.0.1]
---
metadata: {name: web-b, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 9090}]
endpoints:
  - addresses: [10.0.0.2]
---
# Another port only: nothing for http.
metadata: {name: web-c, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: metrics, port: 9100}]
endpoints:
  - addresses: [10.0.0.3]
---
# Not this Service's, not its namespace, not IPv4: none of them count.
metadata: {name: api-a, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{name: http, port: 1}]
endpoints: [{addresses: [10.0.0.4]}]
---
metadata: {name: web-x, namespace: other, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 1}]
endpoints: [{addresses: [10.0.0.5]}]
---
metadata: {name: web-6, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 1}]
endpoints: [{addresses: ['fd00::1']}]
",
    );
    assert_eq!(s.key(), "shop/web");
    assert_eq!(
        s.cluster_ips,
        vec!["198.19.0.10".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(s.ports.len(), 1);
    let p = &s.ports[0];
    assert_eq!(
        (p.name.as_str(), p.protocol, p.port),
        ("http", Protocol::Tcp, 80)
    );
    assert_eq!(p.node_port, None);
    assert_eq!(
        p.endpoints,
        vec![ep("10.0.0.1", 8080), ep("10.0.0.2", 9090)]
    );
}

#[test]
fn a_slice_port_matches_by_protocol_too() {
    let s = spec(
        "
metadata: {name: dns, namespace: kube-system}
spec:
  clusterIP: 198.19.0.53
  ports:
    - {name: dns, port: 53, protocol: UDP}
    - {name: dns-tcp, port: 53, protocol: TCP}
",
        "
metadata: {name: dns-1, namespace: kube-system, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}, {name: dns-tcp, port: 5354, protocol: TCP}, {name: dns, port: 1, protocol: TCP}]
endpoints: [{addresses: [10.0.0.9]}]
",
    );
    assert_eq!(s.ports[0].protocol, Protocol::Udp);
    assert_eq!(s.ports[0].endpoints, vec![ep("10.0.0.9", 5353)]);
    assert_eq!(s.ports[1].endpoints, vec![ep("10.0.0.9", 5354)]);
}

#[test]
fn headless_and_external_name_services_get_nothing() {
    let headless = "metadata: {name: h}\nspec: {clusterIP: None, ports: [{port: 80}]}";
    assert_eq!(translate(headless, ""), Ok(None));
    let unallocated = "metadata: {name: h}\nspec: {ports: [{port: 80}]}";
    assert_eq!(translate(unallocated, ""), Ok(None));
    let v6_only = "metadata: {name: h}\nspec: {clusterIPs: ['fd00::10'], ports: [{port: 80}]}";
    assert_eq!(translate(v6_only, ""), Ok(None));
    let external = "metadata: {name: e}\nspec: {type: ExternalName, externalName: db.example.com}";
    assert_eq!(translate(external, ""), Ok(None));
}

#[test]
fn a_dual_stack_service_keeps_its_ipv4_addresses() {
    let s = spec(
        "metadata: {name: d}\nspec: {clusterIPs: [198.19.0.7, 'fd00::7'], ports: [{port: 80}]}",
        "",
    );
    assert_eq!(
        s.cluster_ips,
        vec!["198.19.0.7".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(s.namespace, "default");
}

#[test]
fn node_ports_belong_to_node_port_and_load_balancer_services() {
    let np = spec(
        "metadata: {name: n}\nspec: {type: NodePort, clusterIP: 198.19.0.2, ports: [{port: 80, nodePort: 30080}]}",
        "",
    );
    assert_eq!(np.ports[0].node_port, Some(30080));
    assert_eq!(np.ports[0].name, "");
    // A ClusterIP Service that still carries one (a former NodePort) has none.
    let cip = spec(
        "metadata: {name: n}\nspec: {type: ClusterIP, clusterIP: 198.19.0.2, ports: [{port: 80, nodePort: 30080}]}",
        "",
    );
    assert_eq!(cip.ports[0].node_port, None);
}

#[test]
fn load_balancer_ingress_addresses_and_health_check_port() {
    let lb = "
metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIP: 198.19.0.3
  externalTrafficPolicy: Local
  healthCheckNodePort: 31000
  ports: [{port: 443, nodePort: 30443}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.7}, {hostname: lb.example.com}, {ip: 203.0.113.8}]
";
    let s = spec(lb, "");
    assert_eq!(
        s.load_balancer_ips,
        vec![
            "203.0.113.7".parse::<std::net::IpAddr>().unwrap(),
            "203.0.113.8".parse().unwrap()
        ]
    );
    assert!(s.external_local);
    assert_eq!(s.health_check_node_port, Some(31000));
    assert_eq!(s.ports[0].node_port, Some(30443));
    // The same status on a NodePort Service is a leftover: not its addresses.
    let np = spec(&lb.replace("type: LoadBalancer", "type: NodePort"), "");
    assert!(np.load_balancer_ips.is_empty());
    assert_eq!(
        np.health_check_node_port, None,
        "only a LoadBalancer's health is served"
    );
    assert!(np.external_local);
    // Cluster policy: no health check port either.
    let cluster = spec(&lb.replace("Local", "Cluster"), "");
    assert_eq!(cluster.health_check_node_port, None);
    assert!(!cluster.external_local);
}

#[test]
fn client_ip_affinity_has_a_timeout() {
    let base = "metadata: {name: a}\nspec: {clusterIP: 198.19.0.4, ports: [{port: 80}]";
    assert_eq!(spec(&format!("{base}}}"), "").affinity_timeout_s, None);
    assert_eq!(
        spec(&format!("{base}, sessionAffinity: None}}"), "").affinity_timeout_s,
        None
    );
    assert_eq!(
        spec(&format!("{base}, sessionAffinity: ClientIP}}"), "").affinity_timeout_s,
        Some(10800)
    );
    let sixty = format!(
        "{base}, sessionAffinity: ClientIP, sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 60}}}}}}"
    );
    assert_eq!(spec(&sixty, "").affinity_timeout_s, Some(60));
    let e = translate(&sixty.replace("60", "100000"), "").unwrap_err();
    assert!(e.to_string().contains("timeoutSeconds 100000"), "{e}");
    let e = translate(&format!("{base}, sessionAffinity: Cookie}}"), "").unwrap_err();
    assert!(
        e.to_string().contains("spec.sessionAffinity \"Cookie\""),
        "{e}"
    );
}

#[test]
fn traffic_policies_as_kube_proxy_reads_them() {
    let base = "metadata: {name: p}\nspec: {clusterIP: 198.19.0.5, ports: [{port: 80}]";
    // The external policy means nothing without external traffic.
    let s = spec(&format!("{base}, externalTrafficPolicy: Local}}"), "");
    assert!(!s.external_local);
    let s = spec(
        &format!("{base}, externalTrafficPolicy: Local, externalIPs: [192.0.2.9]}}"),
        "",
    );
    assert!(s.external_local);
    assert_eq!(
        s.external_ips,
        vec!["192.0.2.9".parse::<std::net::IpAddr>().unwrap()]
    );
    let s = spec(
        &format!("{base}, type: NodePort, externalTrafficPolicy: Local}}"),
        "",
    );
    assert!(s.external_local && !s.internal_local);
    let s = spec(&format!("{base}, internalTrafficPolicy: Local}}"), "");
    assert!(s.internal_local && !s.external_local);
    let e = translate(&format!("{base}, internalTrafficPolicy: Nearby}}"), "").unwrap_err();
    assert!(e.to_string().contains("spec.internalTrafficPolicy"), "{e}");
}

#[test]
fn endpoint_conditions_default_as_the_api_says() {
    let s = spec(
        WEB,
        "
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - addresses: [10.0.0.1]
    nodeName: node-1
    targetRef: {kind: Pod, namespace: shop, name: web-1}
  - addresses: [10.0.0.2]
    conditions: {ready: false}
    nodeName: node-2
    targetRef: {kind: Pod, name: web-2}
  - addresses: [10.0.0.3]
    conditions: {ready: false, serving: true, terminating: true}
    targetRef: {kind: Node, name: node-1}
",
    );
    let e = &s.ports[0].endpoints;
    assert_eq!(e.len(), 3);
    assert!(e[0].ready && e[0].serving && !e[0].terminating && e[0].local);
    assert_eq!(e[0].target, "shop/web-1");
    assert!(!e[1].ready && !e[1].serving && !e[1].terminating && !e[1].local);
    assert_eq!(
        e[1].target, "shop/web-2",
        "the slice's namespace when the ref has none"
    );
    assert!(!e[2].ready && e[2].serving && e[2].terminating);
    assert_eq!(e[2].target, "", "only pods are named");
}

#[test]
fn an_endpoint_in_two_slices_counts_once_ready_if_either_is() {
    let s = spec(
        WEB,
        "
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1], conditions: {ready: false}}]
---
metadata: {name: web-b, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
",
    );
    assert_eq!(s.ports[0].endpoints, vec![ep("10.0.0.1", 8080)]);
}

/// Each malformed field alone is refused, naming the object and the field.
#[test]
fn malformed_services_are_refused_with_the_reason() {
    let good = "metadata: {name: m, namespace: x}\nspec: {clusterIP: 198.19.0.6, ports: [{name: a, port: 80}, {name: b, port: 81, protocol: UDP}]}";
    assert!(translate(good, "").is_ok());
    for (bad, want) in [
        (
            good.replace("198.19.0.6", "198.19.0.600"),
            "spec.clusterIPs \"198.19.0.600\" is not an IP address",
        ),
        (
            good.replace("port: 80", "port: 70000"),
            "spec.ports[0].port 70000 is out of range",
        ),
        (
            good.replace("port: 80", "port: 0"),
            "spec.ports[0].port 0 is out of range",
        ),
        (
            good.replace("UDP", "ICMP"),
            "spec.ports[1].protocol \"ICMP\" is not TCP, UDP or SCTP",
        ),
        (
            good.replace("port: 81", "port: 80").replace("UDP", "TCP"),
            "port 80/tcp appears twice",
        ),
        (
            good.replace("name: b", "name: a"),
            "port name \"a\" appears twice",
        ),
        (
            good.replace("spec: {", "spec: {type: Magic, "),
            "spec.type \"Magic\"",
        ),
        (
            good.replace("spec: {", "spec: {externalIPs: [nope], "),
            "spec.externalIPs \"nope\"",
        ),
        (
            good.replace("spec: {", "spec: {externalIPs: [224.0.0.1], "),
            "not IPv4 unicast",
        ),
        (
            good.replace("spec: {", "spec: {type: NodePort, ")
                .replace("port: 80}", "port: 80, nodePort: 99999}"),
            "spec.ports[0].nodePort 99999",
        ),
    ] {
        let e = translate(&bad, "").expect_err(&bad);
        let text = e.to_string();
        assert!(text.starts_with("Service x/m: "), "{text}");
        assert!(text.contains(want), "{bad}: {text} (wanted {want})");
    }
    assert_eq!(
        translate("metadata: {name: m}", ""),
        Err(TranslateError::NoSpec {
            object: "Service default/m".into()
        })
    );
}

#[test]
fn malformed_slices_are_refused_naming_the_slice() {
    let slice = "
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
";
    assert!(translate(WEB, slice).is_ok());
    for (bad, want) in [
        (
            slice.replace("10.0.0.1", "10.0.0.x"),
            "endpoints[0].addresses[0] \"10.0.0.x\"",
        ),
        (
            slice.replace("8080", "0"),
            "ports[0].port 0 is out of range",
        ),
        (
            slice.replace("port: 8080", "port: 8080, protocol: GRE"),
            "ports[0].protocol \"GRE\"",
        ),
        (
            slice.replace("[10.0.0.1]", "[]"),
            "endpoints[0] has no address",
        ),
    ] {
        let e = translate(WEB, &bad).expect_err(&bad).to_string();
        assert!(e.starts_with("EndpointSlice shop/web-a: "), "{e}");
        assert!(e.contains(want), "{e} (wanted {want})");
    }
}

/// A slice of three ready endpoints with the hints given (`""`: none), in order.
fn hinted(hints: [&str; 3]) -> String {
    let mut s = String::from(
        "
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
",
    );
    for (i, h) in hints.iter().enumerate() {
        let hints = if h.is_empty() {
            String::new()
        } else {
            format!(", hints: {h}")
        };
        s += &format!(
            "  - {{addresses: [10.0.0.{}], conditions: {{ready: true}}{hints}}}\n",
            i + 1
        );
    }
    s
}

/// Which endpoints (last octet) topology leaves to the node, as translated for `node`.
fn in_topology(slice: &str, node: ForNode<'_>) -> Vec<String> {
    let eps = slices(slice);
    let refs: Vec<&EndpointSlice> = eps.iter().collect();
    service_spec(&service(WEB), &refs, node)
        .unwrap()
        .unwrap()
        .ports[0]
        .endpoints
        .iter()
        .filter(|e| e.in_topology)
        .map(|e| e.ip.to_string().rsplit('.').next().unwrap().to_string())
        .collect()
}

#[test]
fn topology_hints_as_kube_proxy_reads_them() {
    let zone = |z: &str| format!("{{forZones: [{{name: {z}}}]}}");
    let both =
        |z: &str, n: &str| format!("{{forZones: [{{name: {z}}}], forNodes: [{{name: {n}}}]}}");
    let (a, b) = (zone("a"), zone("b"));
    let all = ["1", "2", "3"];
    // Every ready endpoint hinted, one for the node's zone: those of its zone.
    assert_eq!(in_topology(&hinted([&a, &b, &a]), FOR_NODE), ["1", "3"]);
    // One without hints: no topology at all.
    assert_eq!(in_topology(&hinted([&a, &b, ""]), FOR_NODE), all);
    // None for the node's zone: every endpoint, so the node is never cut off.
    assert_eq!(in_topology(&hinted([&b, &b, &b]), FOR_NODE), all);
    // A node without a zone label ignores zone hints.
    let unzoned = ForNode {
        name: NODE,
        zone: None,
    };
    assert_eq!(in_topology(&hinted([&a, &b, &a]), unzoned), all);
    // Node hints (PreferSameNode) come first when every endpoint has them and one names
    // the node, whatever the zone; otherwise the zone hints decide.
    let (n1, n2) = (both("b", NODE), both("a", "node-2"));
    assert_eq!(in_topology(&hinted([&n1, &n2, &n2]), FOR_NODE), ["1"]);
    assert_eq!(in_topology(&hinted([&n1, &n2, &n2]), unzoned), ["1"]);
    assert_eq!(in_topology(&hinted([&n2, &n2, &b]), FOR_NODE), ["1", "2"]);
    // Only ready endpoints count: an unhinted one that is not ready leaves the hints in force.
    let not_ready = hinted([&a, &b, ""]).replace(
        "10.0.0.3], conditions: {ready: true}",
        "10.0.0.3], conditions: {ready: false}",
    );
    assert_eq!(in_topology(&not_ready, FOR_NODE), ["1"]);
    // Without any hint the field stays at its default and is not written.
    let plain = spec(WEB, &hinted(["", "", ""]));
    assert!(plain.ports[0].endpoints.iter().all(|e| e.in_topology));
    let json = serde_json::to_string(&plain).unwrap();
    assert!(!json.contains("in_topology"), "{json}");
}
