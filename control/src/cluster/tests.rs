//! The node's view: what a change touches, and what a relist leaves alone.

use std::sync::Arc;

use serde::de::DeserializeOwned;

use super::{Cluster, Kind, Object};

const NODE: &str = "node-1";

fn yaml<T: DeserializeOwned>(text: &str) -> T {
    serde_yaml::from_str(text).expect("a fixture")
}

fn web() -> Object {
    Object::Service(yaml(
        "
metadata: {name: web, namespace: shop, annotations: {note: x}}
spec:
  clusterIP: 198.19.0.10
  clusterIPs: [198.19.0.10]
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
",
    ))
}

fn slice(name: &str, service: &str, ip: &str) -> Object {
    Object::EndpointSlice(yaml(&format!(
        "
metadata: {{name: {name}, namespace: shop, labels: {{kubernetes.io/service-name: {service}}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints: [{{addresses: [{ip}], conditions: {{ready: true}}}}]
"
    )))
}

fn pod(name: &str, app: &str, ip: &str) -> Object {
    Object::Pod(
        yaml::<k8s_openapi::api::core::v1::Pod>(&format!(
            "
metadata: {{name: {name}, namespace: shop, labels: {{app: {app}}}}}
spec: {{nodeName: {NODE}, containers: [{{name: c, image: img}}]}}
status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}
"
        ))
        .into(),
    )
}

fn deny_all() -> Object {
    Object::NetworkPolicy(yaml(
        "
metadata: {name: deny, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress]}
",
    ))
}

fn backends(c: &mut Cluster, key: &str) -> Vec<String> {
    let (d, p) = c.desired();
    assert!(p.services.is_empty(), "{:?}", p.services);
    d.services
        .get(key)
        .map(|s| {
            s.ports[0]
                .endpoints
                .iter()
                .map(|e| format!("{}:{}", e.ip, e.port))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_service_is_translated_with_the_slices_labelled_for_it() {
    let mut c = Cluster::new(NODE);
    c.apply(web());
    c.apply(slice("web-1", "web", "198.18.0.2"));
    c.apply(slice("api-1", "api", "198.18.0.9"));
    assert_eq!(backends(&mut c, "shop/web"), ["198.18.0.2:8080"]);
    assert!(!c.pending());

    // A second slice, then the first relabelled to another Service.
    c.apply(slice("web-2", "web", "198.18.0.3"));
    assert_eq!(
        backends(&mut c, "shop/web"),
        ["198.18.0.2:8080", "198.18.0.3:8080"]
    );
    c.apply(slice("web-1", "api", "198.18.0.2"));
    assert_eq!(backends(&mut c, "shop/web"), ["198.18.0.3:8080"]);
    c.delete(Kind::EndpointSlice, "shop/web-2");
    assert_eq!(backends(&mut c, "shop/web"), Vec::<String>::new());
    c.delete(Kind::Service, "shop/web");
    assert!(c.desired().0.services.is_empty());
}

#[test]
fn a_relist_of_unchanged_objects_touches_nothing() {
    let mut c = Cluster::new(NODE);
    c.apply(web());
    c.apply(slice("web-1", "web", "198.18.0.2"));
    c.apply(deny_all());
    c.apply(pod("a", "web", "198.18.0.2"));
    let before = c.desired().0.clone();

    assert_eq!(c.replace(Kind::Service, vec![web()]), 0);
    assert_eq!(
        c.replace(
            Kind::EndpointSlice,
            vec![slice("web-1", "web", "198.18.0.2")]
        ),
        0
    );
    assert_eq!(c.replace(Kind::NetworkPolicy, vec![deny_all()]), 0);
    assert_eq!(c.replace(Kind::Pod, vec![pod("a", "web", "198.18.0.2")]), 0);
    assert!(!c.pending(), "nothing is to be translated again");
    let after = c.desired().0.clone();
    assert!(Arc::ptr_eq(
        &before.services["shop/web"],
        &after.services["shop/web"]
    ));
    assert!(Arc::ptr_eq(&before.policies, &after.policies));

    // A relist that misses an object deletes it.
    assert_eq!(c.replace(Kind::EndpointSlice, vec![]), 1);
    assert_eq!(backends(&mut c, "shop/web"), Vec::<String>::new());
}

#[test]
fn pods_and_namespaces_touch_the_policies_only_while_there_are_policies() {
    let mut c = Cluster::new(NODE);
    c.apply(pod("a", "web", "198.18.0.2"));
    assert!(!c.pending(), "no policy: a pod changes no table");
    c.apply(deny_all());
    assert!(c.pending());
    let (d, _) = c.desired();
    assert_eq!(d.policies.pods.len(), 1, "pod a is isolated");
    c.apply(pod("b", "db", "198.18.0.3"));
    assert!(c.pending());
    assert_eq!(c.desired().0.policies.pods.len(), 2);
    c.delete(Kind::NetworkPolicy, "shop/deny");
    assert!(c.desired().0.policies.pods.is_empty());
    c.apply(pod("c", "db", "198.18.0.4"));
    assert!(!c.pending());
}

#[test]
fn a_malformed_service_keeps_what_was_wanted_and_is_reported() {
    let mut c = Cluster::new(NODE);
    c.apply(web());
    c.apply(slice("web-1", "web", "198.18.0.2"));
    assert_eq!(backends(&mut c, "shop/web"), ["198.18.0.2:8080"]);
    let Object::Service(mut bad) = web() else {
        unreachable!()
    };
    bad.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].protocol = Some("QUIC".into());
    c.apply(Object::Service(bad));
    let (d, p) = c.desired();
    assert_eq!(p.services.len(), 1, "{:?}", p.services);
    assert!(p.services[0].to_string().contains("QUIC"));
    assert_eq!(d.services["shop/web"].ports[0].endpoints.len(), 1);
}

#[test]
fn annotations_and_status_noise_change_nothing_held() {
    let mut c = Cluster::new(NODE);
    c.apply(web());
    c.desired();
    let Object::Service(mut s) = web() else {
        unreachable!()
    };
    s.metadata.annotations = Some([("note".to_string(), "y".to_string())].into());
    s.metadata.resource_version = Some("99".into());
    assert!(!c.apply(Object::Service(s)));
    assert!(!c.pending());

    // A pod's readiness, restarts and images are not what policies read: with a policy in
    // force, the kubelet's status updates compile nothing again.
    c.apply(deny_all());
    let status = |ready: &str, restarts: u32| {
        Object::Pod(
            yaml::<k8s_openapi::api::core::v1::Pod>(&format!(
                "
metadata: {{name: a, namespace: shop, labels: {{app: web}}, resourceVersion: '{restarts}'}}
spec: {{nodeName: {NODE}, containers: [{{name: c, image: img:{restarts}}}]}}
status:
  phase: Running
  podIP: 198.18.0.2
  conditions: [{{type: Ready, status: '{ready}'}}]
  containerStatuses: [{{name: c, image: img, imageID: x, ready: true, restartCount: {restarts}}}]
"
            ))
            .into(),
        )
    };
    assert!(c.apply(status("True", 0)));
    c.desired();
    assert!(!c.apply(status("False", 1)));
    assert!(!c.apply(status("True", 2)));
    assert!(!c.pending());
}

fn node(name: &str, zone: Option<&str>) -> Object {
    let labels = zone
        .map(|z| format!(", labels: {{topology.kubernetes.io/zone: {z}}}"))
        .unwrap_or_default();
    Object::Node(yaml(&format!(
        "metadata: {{name: {name}{labels}, annotations: {{note: x}}}}\nspec: {{podCIDR: 10.0.0.0/24}}"
    )))
}

/// Web's endpoints in zones a and b, each hinted for its own zone.
fn zoned_slice() -> Object {
    Object::EndpointSlice(yaml(
        "
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - {addresses: [198.18.0.2], conditions: {ready: true}, hints: {forZones: [{name: a}]}}
  - {addresses: [198.18.0.3], conditions: {ready: true}, hints: {forZones: [{name: b}]}}
",
    ))
}

/// The endpoints of web's port that topology leaves to the node.
fn close(c: &mut Cluster) -> Vec<String> {
    let (d, _) = c.desired();
    d.services["shop/web"].ports[0]
        .endpoints
        .iter()
        .filter(|e| e.in_topology)
        .map(|e| e.ip.to_string())
        .collect()
}

#[test]
fn the_nodes_zone_comes_from_its_own_node_and_a_change_translates_services_again() {
    let mut c = Cluster::new(NODE);
    c.apply(web());
    c.apply(zoned_slice());
    // No Node yet: no zone, every endpoint.
    assert_eq!(close(&mut c), ["198.18.0.2", "198.18.0.3"]);
    // Another node's object is not held and changes nothing.
    assert!(!c.apply(node("node-2", Some("a"))));
    assert_eq!(c.counts()[&Kind::Node], 0);
    assert!(!c.pending());
    assert!(c.apply(node(NODE, Some("b"))));
    assert_eq!(c.zone(), Some("b"));
    assert!(c.pending(), "the Services are translated again");
    assert_eq!(close(&mut c), ["198.18.0.3"]);
    // The same Node again (a relist) touches nothing; a change elsewhere in it neither.
    assert!(!c.apply(node(NODE, Some("b"))));
    assert!(c.apply(Object::Node(yaml(
        "metadata: {name: node-1, labels: {topology.kubernetes.io/zone: b, other: x}}"
    ))));
    assert!(!c.pending(), "the zone did not change");
    // A move to zone a, then the Node gone (a relist without it): back to every endpoint.
    c.apply(node(NODE, Some("a")));
    assert_eq!(close(&mut c), ["198.18.0.2"]);
    assert_eq!(c.replace(Kind::Node, vec![]), 1);
    assert_eq!(c.zone(), None);
    assert_eq!(close(&mut c), ["198.18.0.2", "198.18.0.3"]);
}

#[test]
fn a_node_is_held_as_its_name_and_labels() {
    let mut c = Cluster::new(NODE);
    c.apply(node(NODE, Some("a")));
    let held = &c.nodes[NODE];
    assert!(held.spec.is_none() && held.status.is_none());
    assert!(held.metadata.annotations.is_none());
    assert_eq!(held.metadata.name.as_deref(), Some(NODE));
}
