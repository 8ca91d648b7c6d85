//! The driver and the manifests directory, without stromd: publications are read from a
//! detached handle.

use super::{dir, Change, Driver, Report};
use crate::cluster::{Cluster, Kind};
use crate::manifests::Settings;
use crate::program::{detached, Publication};

#[derive(Default)]
struct Seen {
    rejected: Vec<String>,
}

impl Report for Seen {
    fn rejected(&mut self, kind: Kind, reason: &str) {
        self.rejected.push(format!("{}: {reason}", kind.name()));
    }
    fn held(&mut self, _: Kind, _: usize) {}
    fn unreadable(&mut self, error: &str) {
        self.rejected.push(format!("unreadable: {error}"));
    }
}

const NODE: &str = "node-1";

fn pod(name: &str, app: &str, ip: &str) -> String {
    format!(
        "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: shop, labels: {{app: {app}}}}}
spec: {{nodeName: {NODE}, containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}
status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}], conditions: [{{type: Ready, status: 'True'}}]}}
"
    )
}

const SERVICES: &str = "---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  selector: {app: db}
  ports: [{port: 5432}]
";

fn endpoints(p: &Publication, key: &str) -> Vec<String> {
    p.desired.services[key].ports[0]
        .endpoints
        .iter()
        .map(|e| format!("{}:{}", e.ip, e.port))
        .collect()
}

#[test]
fn nothing_is_published_before_every_kind_is_listed() {
    let (handle, rx) = detached();
    let mut d = Driver::new(Cluster::new(NODE), handle, Seen::default());
    for kind in &Kind::REQUIRED[..4] {
        d.change(Change::Listed(*kind, Vec::new()));
        assert!(!d.flush());
    }
    assert!(rx.try_recv().is_err());
    // The node's Node is not waited for (a source may not be allowed to read it).
    d.change(Change::Listed(Kind::REQUIRED[4], Vec::new()));
    assert!(
        d.flush(),
        "an empty cluster is a view too: stromd is to have nothing"
    );
    let p = rx.try_recv().unwrap();
    assert!(p.desired.services.is_empty() && p.desired.policies.is_empty());
    assert!(!d.flush(), "nothing changed since");
}

#[test]
fn a_manifests_directory_becomes_tables_and_a_change_touches_only_its_service() {
    let dir = std::env::temp_dir().join(format!("strom-control-dir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("services.yaml"), SERVICES).unwrap();
    std::fs::write(
        dir.join("pods.yaml"),
        [
            pod("a", "web", "198.18.16.2"),
            pod("b", "db", "198.18.16.3"),
        ]
        .concat(),
    )
    .unwrap();
    // A malformed object is reported and the rest is used.
    std::fs::write(
        dir.join("bad.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop}\nspec: {ports: 7}\n",
    )
    .unwrap();
    let settings = Settings::new("198.19.0.0/16".parse().unwrap());
    let mut carried = dir::Carried::default();
    let (handle, rx) = detached();
    let mut d = Driver::new(Cluster::new(NODE), handle, Seen::default());

    for c in dir::read(&dir, &settings, &mut carried, d.report()).unwrap() {
        d.change(c);
    }
    assert!(d.flush());
    let first = rx.try_recv().unwrap();
    assert_eq!(endpoints(&first, "shop/web"), ["198.18.16.2:8080"]);
    assert_eq!(endpoints(&first, "shop/db"), ["198.18.16.3:5432"]);
    let web_ip = first.desired.services["shop/web"].cluster_ips[0];
    assert!(
        "198.19.0.0/16"
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(&web_ip),
        "a ClusterIP allocated from the range: {web_ip}"
    );
    assert!(
        d.report().rejected.iter().any(|r| r.contains("shop/bad")),
        "{:?}",
        d.report().rejected
    );

    // Pod a now serves db as well: web loses it, db gains it; ClusterIPs stay.
    std::fs::write(
        dir.join("pods.yaml"),
        [pod("a", "db", "198.18.16.2"), pod("b", "db", "198.18.16.3")].concat(),
    )
    .unwrap();
    for c in dir::read(&dir, &settings, &mut carried, d.report()).unwrap() {
        d.change(c);
    }
    assert!(d.flush());
    let second = rx.try_recv().unwrap();
    assert_eq!(endpoints(&second, "shop/web"), Vec::<String>::new());
    assert_eq!(
        endpoints(&second, "shop/db"),
        ["198.18.16.2:5432", "198.18.16.3:5432"]
    );
    assert_eq!(second.desired.services["shop/web"].cluster_ips[0], web_ip);

    // The node's own Node in the directory gives the node its zone; another node's Node is
    // not held.
    std::fs::write(
        dir.join("nodes.yaml"),
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE}, labels: {{topology.kubernetes.io/zone: a}}}}\n---\napiVersion: v1\nkind: Node\nmetadata: {{name: other}}\n"
        ),
    )
    .unwrap();
    for c in dir::read(&dir, &settings, &mut carried, d.report()).unwrap() {
        d.change(c);
    }
    assert_eq!(d.cluster().zone(), Some("a"));
    assert_eq!(d.cluster().counts()[&Kind::Node], 1);
    // (What a zone does to the endpoints is the cluster's test; here: read, held, published.)
    assert!(d.flush());
    let _ = rx.try_recv();

    // Read again unchanged: nothing to publish.
    for c in dir::read(&dir, &settings, &mut carried, d.report()).unwrap() {
        d.change(c);
    }
    assert!(!d.flush());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_document_keeps_the_last_good_state_of_what_it_hid() {
    // A file edited into a YAML syntax error hides every document after the error, and a
    // Service edited into an invalid one is unreadable: neither removes anything from the
    // tables; what the file had when it last read cleanly stays until it reads cleanly again.
    let dir = std::env::temp_dir().join(format!("strom-control-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pods.yaml"), pod("a", "web", "198.18.16.2")).unwrap();
    std::fs::write(dir.join("services.yaml"), SERVICES).unwrap();
    let settings = Settings::new("198.19.0.0/16".parse().unwrap());
    let mut carried = dir::Carried::default();
    let (handle, rx) = detached();
    let mut d = Driver::new(Cluster::new(NODE), handle, Seen::default());
    let mut reading = |d: &mut Driver<Seen>| {
        for c in dir::read(&dir, &settings, &mut carried, d.report()).unwrap() {
            d.change(c);
        }
        d.flush()
    };
    assert!(reading(&mut d));
    let first = rx.try_recv().unwrap();
    let keys = |p: &Publication| p.desired.services.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&first), ["shop/db", "shop/web"]);

    // web's document broken by an unclosed bracket: db, after it, is hidden too.
    let broken = SERVICES.replace("selector: {app: web}", "selector: {app: web");
    std::fs::write(dir.join("services.yaml"), &broken).unwrap();
    assert!(!reading(&mut d), "nothing changes in the tables");
    assert!(
        d.report().rejected.iter().any(|r| r.contains("YAML")),
        "{:?}",
        d.report().rejected
    );

    // db made unreadable (a port that is not a number), web fine and changed: web's change is taken,
    // db keeps its last good state.
    let bad_db = SERVICES
        .replace("port: 5432", "port: many")
        .replace("port: 80,", "port: 81,");
    std::fs::write(dir.join("services.yaml"), &bad_db).unwrap();
    assert!(reading(&mut d));
    let second = rx.try_recv().unwrap();
    assert_eq!(keys(&second), ["shop/db", "shop/web"]);
    assert_eq!(second.desired.services["shop/web"].ports[0].port, 81);
    assert_eq!(
        second.desired.services["shop/db"],
        first.desired.services["shop/db"]
    );

    // Removed from a file that reads cleanly: gone.
    let only_web = SERVICES
        .split("---")
        .take(2)
        .collect::<Vec<_>>()
        .join("---");
    std::fs::write(dir.join("services.yaml"), only_web).unwrap();
    assert!(reading(&mut d));
    assert_eq!(keys(&rx.try_recv().unwrap()), ["shop/web"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_newer_publication_replaces_one_not_taken_and_keeps_its_age() {
    let (handle, rx) = detached();
    let old = std::time::Instant::now();
    handle.publish(Publication {
        desired: Default::default(),
        since: old,
    });
    handle.publish(Publication {
        desired: Default::default(),
        since: old + std::time::Duration::from_millis(5),
    });
    let p = rx.try_recv().unwrap();
    assert_eq!(p.since, old, "the latency counts from the oldest change");
    assert!(rx.try_recv().is_err(), "one publication waits at most");
}
