//! strom-control against a real Kubernetes API server (etcd, kube-apiserver and
//! kube-controller-manager built from source, `strom_tests::k8s`), programming a strom-lab
//! node's stromd: objects are created through the API as a user would (Pods with their status
//! written as the kubelet would, the EndpointSlice controller deriving the slices), and the
//! test checks real traffic through stromd.
//!
//! The lab's pods are real network namespaces; their Pod objects in the API carry the lab's
//! addresses, so that what the API says and what the pods are agree.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use strom_tests::k8s::{free_port, ControlPlane};
use strom_tests::{bin_dir, connect_lines, net_lock, pod, sh, who, Daemon, Lab};

/// The lab: x/a and x/b serve (the Service's backends), x/d and y/c are clients.
fn manifest() -> String {
    [
        pod("x", "a", &[80], &[]),
        pod("x", "b", &[80], &[]),
        pod("x", "d", &[80], &[]),
        pod("y", "c", &[80], &[]),
    ]
    .concat()
}

/// The lab's node and pods as the API holds them: each Pod on the node, with the lab's
/// address and ready (its status written through the status subresource).
fn register_pods(cp: &ControlPlane, lab: &Lab, node: &str) {
    cp.apply(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {node}}}\n"
    ));
    for ns in ["x", "y"] {
        cp.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"
        ));
    }
    for (ns, name, app) in [
        ("x", "a", "web"),
        ("x", "b", "web"),
        ("x", "d", "client"),
        ("y", "c", "client"),
    ] {
        cp.apply(&format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}
spec:
  nodeName: {node}
  containers: [{{name: c, image: strom-test, ports: [{{name: http, containerPort: 80}}]}}]
"
        ));
        cp.pod_status(ns, name, &lab.pod_ip(&format!("{ns}/{name}")), true);
    }
}

const WEB: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
";

/// strom-control for the lab's node, its metrics on a port of its own.
struct Control {
    daemon: Daemon,
    metrics: u16,
    log: std::path::PathBuf,
}

impl Control {
    fn start(cp: &ControlPlane, lab: &Lab) -> Control {
        let metrics = free_port();
        let log = lab.dir.join("strom-control.log");
        let mut cmd = Command::new(bin_dir().join("strom-control"));
        cmd.arg("--kubeconfig")
            .arg(cp.kubeconfig())
            .args(["--node-name", &lab.node_ns(), "--socket"])
            .arg(lab.socket())
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
            .env("RUST_LOG", "info,strom_control=debug");
        Control {
            daemon: Daemon::start(cmd, &log),
            metrics,
            log,
        }
    }

    /// SIGKILL, as a crash or an eviction would.
    fn kill(&mut self) {
        self.daemon.kill();
    }

    fn spawn(&mut self) {
        self.daemon.spawn();
    }

    fn http(&self, path: &str) -> (u16, String) {
        let out = sh(Command::new("curl").args([
            "-sS",
            "--max-time",
            "2",
            "-w",
            "\n%{http_code}",
            &format!("http://127.0.0.1:{}{path}", self.metrics),
        ]));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// A metric's value (the sum over its series whose labels contain `labels`).
    fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, body) = self.http("/metrics");
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(k, _)| {
                (k == &name || k.starts_with(&format!("{name}{{"))) && k.contains(labels)
            })
            .filter_map(|(_, v)| v.parse::<f64>().ok())
            .sum()
    }

    fn wait_ready(&self, within: Duration) {
        let t = Instant::now();
        while self.http("/readyz").0 != 200 {
            assert!(
                t.elapsed() < within,
                "strom-control not ready in {within:?}:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        self.daemon.tail(40)
    }
}

/// `count` TCP connections from pod `from` to `ip:port`: who answered each, or why none did.
fn connect(
    lab: &Lab,
    from: &str,
    ip: &str,
    port: u16,
    count: usize,
) -> Vec<Result<String, String>> {
    connect_lines(lab, from, ip, port, "tcp", 1000, count)
        .into_iter()
        .map(|r| r.map(|a| who(&a).0))
        .collect()
}

/// Waits until `count` connections from `from` to `ip:port` are all answered by one of
/// `backends` (and, with `all`, by every one of them); returns how long it took.
fn wait_served(
    lab: &Lab,
    control: &Control,
    from: &str,
    ip: &str,
    backends: &[&str],
    all: bool,
    within: Duration,
) -> Duration {
    let t = Instant::now();
    loop {
        let r = connect(lab, from, ip, 80, 16);
        let ok = r.len() == 16
            && r.iter()
                .all(|a| a.as_ref().is_ok_and(|b| backends.contains(&b.as_str())))
            && (!all
                || backends
                    .iter()
                    .all(|b| r.iter().any(|a| a.as_ref().ok() == Some(&b.to_string()))));
        if ok {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < within,
            "{from} -> {ip}:80 not served by {backends:?} within {within:?}: {r:?}\n--- strom-control\n{}",
            control.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Policy x/web-from-x: x's web pods take traffic from `peers` only.
fn web_from(peers: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-from-x, namespace: x}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress: [{{from: [{peers}]}}]
"
    )
}

/// Waits until y/c's connections to `ip` reach both x/a and x/b, and only them.
fn wait_both(lab: &Lab, control: &Control, ip: &str, within: Duration) -> Duration {
    wait_served(lab, control, "y/c", ip, &["x/a", "x/b"], true, within)
}

fn cluster_ip(cp: &ControlPlane, ns: &str, name: &str) -> String {
    let svc = cp
        .get("v1", "Service", Some(ns), name)
        .expect("the Service");
    svc["spec"]["clusterIP"].as_str().unwrap().to_string()
}

/// Everything at once: the lab, the control plane, strom-control ready over the lab's
/// pods, Service x/web created and served by x/a and x/b.
struct Setup {
    control: Control,
    lab: Lab,
    cp: ControlPlane,
    web: String,
}

fn setup() -> Setup {
    let cp = ControlPlane::start();
    let lab = Lab::up(&manifest(), &[]);
    lab.wait_until_serving();
    cp.grant_strom_control();
    let node = lab.node_ns();
    register_pods(&cp, &lab, &node);
    let control = Control::start(&cp, &lab);
    control.wait_ready(Duration::from_secs(30));
    cp.apply(WEB);
    let web = cluster_ip(&cp, "x", "web");
    Setup {
        control,
        lab,
        cp,
        web,
    }
}

#[test]
fn services_and_policies_from_a_real_api_server() {
    let _g = net_lock();
    let Setup {
        control,
        lab,
        cp,
        web,
    } = setup();

    // A Service created through the API: the EndpointSlice controller derives its slice
    // from the ready pods, strom-control programs stromd.
    let took = wait_both(&lab, &control, &web, Duration::from_secs(20));
    eprintln!("Service created through the API served from a pod after {took:?}");
    assert!(
        control.metric(
            "strom_control_network_programming_duration_seconds_count",
            ""
        ) >= 1.0,
        "the programming latency is measured"
    );
    assert_eq!(control.http("/healthz").0, 200);
    // A peer of another contract version is refused with both versions named.
    let mut peer = strom_api::Client::connect(lab.socket(), Duration::from_secs(5)).unwrap();
    match peer.call(&strom_api::Request::Hello {
        contract: strom_api::CONTRACT + 1,
        writer: None,
    }) {
        Err(strom_api::ClientError::Refused(m)) => assert!(
            m.contains(&format!("contract version {}", strom_api::CONTRACT + 1))
                && m.contains(&format!("speaks {}", strom_api::CONTRACT)),
            "{m}"
        ),
        other => panic!("a peer of another contract version was not refused: {other:?}"),
    }
    assert_eq!(control.http("/readyz").0, 200);

    // A pod turning not ready leaves the Service.
    cp.pod_status("x", "a", &lab.pod_ip("x/a"), false);
    wait_served(
        &lab,
        &control,
        "y/c",
        &web,
        &["x/b"],
        false,
        Duration::from_secs(20),
    );
    cp.pod_status("x", "a", &lab.pod_ip("x/a"), true);
    wait_both(&lab, &control, &web, Duration::from_secs(20));

    // A NetworkPolicy through the API: x's web pods take traffic from x only.
    cp.apply(&web_from("{podSelector: {}}"));
    let t = Instant::now();
    loop {
        let from_y = connect(&lab, "y/c", &web, 80, 4);
        if from_y.iter().all(Result::is_err) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the policy did not take effect: {from_y:?}\n{}",
            control.log_tail()
        );
    }
    let from_x = connect(&lab, "x/d", &web, 80, 8);
    assert!(
        from_x.iter().all(Result::is_ok),
        "x/d is allowed: {from_x:?}"
    );
    // stromd's own metrics (Prometheus, in the node's namespace): the Service's flows, the
    // policy's drops, conntrack.
    let m = lab.exec(
        "node",
        &[
            "curl",
            "-sS",
            "--max-time",
            "2",
            "http://127.0.0.1:9101/metrics",
        ],
    );
    let text = String::from_utf8_lossy(&m.stdout);
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} missing in stromd's metrics:\n{text}"))
    };
    assert!(value("strom_service_flows_total{service=\"x/web:http\"}") > 0.0);
    assert!(value("strom_policy_drops_total{policy=\"x/web-from-x\",direction=\"ingress\"}") > 0.0);
    assert!(value("strom_conntrack_entries") > 0.0);
    assert_eq!(value("strom_ready"), 1.0);
    let ready = lab.exec(
        "node",
        &[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://127.0.0.1:9101/readyz",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&ready.stdout), "200");

    // A label change on the client re-selects at once: y/c is not in x, so only a
    // namespace label can let it in.
    cp.apply(&web_from(
        "{podSelector: {}}, {namespaceSelector: {matchLabels: {trusted: \"yes\"}}}",
    ));
    cp.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: y, labels: {trusted: \"yes\"}}\n");
    wait_both(&lab, &control, &web, Duration::from_secs(20));
    cp.delete(
        "networking.k8s.io/v1",
        "NetworkPolicy",
        Some("x"),
        "web-from-x",
    );

    // Topology-aware routing: the node in zone a, another node in zone b with a web pod of
    // its own (an address no lab pod has). A Service asking for close endpoints
    // (`trafficDistribution: PreferClose`) gets zone hints from the EndpointSlice
    // controller; strom-control, watching its own Node for the zone, leaves the far pod
    // out of the pool for traffic from the node's pods. Without the zone on the node the
    // hints no longer apply and the far pod is back.
    let node = lab.node_ns();
    let zoned = |zone: &str| {
        format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {node}, labels: {{topology.kubernetes.io/zone: {zone}}}}}\n")
    };
    cp.apply(&zoned("a"));
    cp.apply("apiVersion: v1\nkind: Node\nmetadata: {name: far-node, labels: {topology.kubernetes.io/zone: b}}\n");
    cp.apply(
        "apiVersion: v1
kind: Pod
metadata: {name: far, namespace: x, labels: {app: web}}
spec:
  nodeName: far-node
  containers: [{name: c, image: strom-test, ports: [{name: http, containerPort: 80}]}]
",
    );
    cp.pod_status("x", "far", "198.18.99.9", true);
    cp.apply(
        "apiVersion: v1
kind: Service
metadata: {name: near, namespace: x}
spec:
  selector: {app: web}
  trafficDistribution: PreferClose
  ports: [{name: http, port: 80, targetPort: http}]
",
    );
    let internal = |want: &[(&str, bool)]| {
        let t = Instant::now();
        loop {
            let s = lab.stromctl(&["services"]);
            let mut got: Vec<(String, bool)> = s["services"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["key"] == "x/near:http")
                .flat_map(|p| p["backends"].as_array().cloned().unwrap_or_default())
                .map(|b| {
                    (
                        b["target"].as_str().unwrap_or("").to_string(),
                        b["internal"].as_bool().unwrap_or(false),
                    )
                })
                .collect();
            got.sort();
            let want: Vec<(String, bool)> = want.iter().map(|(t, i)| (t.to_string(), *i)).collect();
            if got == want {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "x/near's backends {got:?}, wanted {want:?}\n{}",
                control.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    internal(&[("x/a", true), ("x/b", true), ("x/far", false)]);
    let near = cluster_ip(&cp, "x", "near");
    wait_both(&lab, &control, &near, Duration::from_secs(20));
    cp.apply(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {node}}}\n"
    ));
    internal(&[("x/a", true), ("x/b", true), ("x/far", true)]);
    cp.delete("v1", "Service", Some("x"), "near");
    cp.delete("v1", "Pod", Some("x"), "far");

    // Deleted through the API: gone from stromd.
    cp.delete("v1", "Service", Some("x"), "web");
    let t = Instant::now();
    loop {
        let s = lab.stromctl(&["services"]);
        if !s.to_string().contains("x/web") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "x/web still in stromd: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        control.metric("strom_control_rejected_objects_total", ""),
        0.0
    );
}

#[test]
fn restarts_of_strom_control_stromd_and_the_api_server() {
    let _g = net_lock();
    let Setup {
        mut control,
        lab,
        mut cp,
        web,
    } = setup();
    wait_both(&lab, &control, &web, Duration::from_secs(20));

    // strom-control killed and started again under traffic: stromd keeps forwarding, and
    // the new strom-control converges without a lost connection.
    let traffic = Traffic::start(&lab, "y/c", &web);
    std::thread::sleep(Duration::from_millis(300));
    let killed = traffic.since();
    control.kill();
    std::thread::sleep(Duration::from_millis(500));
    let spawned = traffic.since();
    control.spawn();
    control.wait_ready(Duration::from_secs(30));
    let ready = traffic.since();
    std::thread::sleep(Duration::from_millis(300));
    let (answered, failed) = traffic.stop();
    // What each pod's TCP saw (SYNs retransmitted, listen queues dropped), for a failure
    // that stromd counts nothing for.
    let tcp = |pod: &str| {
        let o = lab.exec(
            pod,
            &[
                "nstat",
                "-az",
                "TcpExtTCPSynRetrans",
                "TcpExtListenDrops",
                "TcpExtListenOverflows",
                "TcpRetransSegs",
            ],
        );
        format!(
            "{pod}: {}",
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        )
    };
    // Each pod's interface counters (a drop past stromd's transmit shows there).
    let link = |pod: &str| {
        let o = lab.exec(pod, &["ip", "-s", "-s", "link", "show", "eth0"]);
        format!("{pod}: {}", String::from_utf8_lossy(&o.stdout))
    };
    // Flows stromd saw that did not end as answered connections do (the server closes
    // first: time_wait): a SYN stromd passed on without an answer shows as syn_sent.
    let unfinished = || -> Vec<Value> {
        let ct = lab.stromctl(&["conntrack"]);
        ct["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["state"] != "time_wait")
            .cloned()
            .collect()
    };
    assert!(
        answered > 0 && failed.is_empty(),
        "{answered} answered, failed across the strom-control restart (kill at {killed:?}, \
         start at {spawned:?}, ready at {ready:?}; each failure with its batch's start): \
         {failed:#?}\n\
         stromd's flows not in time_wait: {:#?}\n\
         node's interfaces: {}\n\
         stromd's stats: {}\nports: {}\n{}\n{}\n{}\n{}{}{}--- strom-control\n{}",
        unfinished(),
        String::from_utf8_lossy(&lab.exec("node", &["ip", "-s", "link"]).stdout),
        lab.stromctl(&["stats"]),
        lab.stromctl(&["ports"]),
        tcp("y/c"),
        tcp("x/a"),
        tcp("x/b"),
        link("y/c"),
        link("x/a"),
        link("x/b"),
        control.log_tail()
    );

    // stromd restarted: it takes up the tables it saved as it stopped; strom-control notices
    // the new start and sets everything again.
    let syncs = control.metric("strom_control_stromd_syncs_total", "");
    let out = sh(lab.cmd().args(["stromd", "restart"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took = wait_both(&lab, &control, &web, Duration::from_secs(20));
    eprintln!("stromd restarted: Service served again after {took:?}");
    // Served from what stromd took up or from strom-control's resync (it greets stromd
    // once a second), whichever comes first; the resync comes all the same.
    let t = Instant::now();
    while control.metric("strom_control_stromd_syncs_total", "") <= syncs {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "strom-control resynced the new stromd:\n{}",
            control.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_both(&lab, &control, &web, Duration::from_secs(5));

    // The API server stopped: stromd keeps its tables and the Service keeps working. Then
    // etcd's history is compacted past what strom-control's watches have seen, so that they
    // get 410 Gone and list again when the API server is back: nothing unchanged is
    // rewritten, and a change made afterwards is programmed.
    let log_before = std::fs::read_to_string(&control.log).unwrap().len();
    let errors_before = control.metric("strom_control_watch_errors_total", "");
    cp.stop_apiserver();
    wait_both(&lab, &control, &web, Duration::from_secs(5));
    cp.compact_etcd();
    std::thread::sleep(Duration::from_secs(2));
    cp.start_apiserver();
    cp.apply(&WEB.replace("name: web,", "name: web2,"));
    let web2 = cluster_ip(&cp, "x", "web2");
    wait_both(&lab, &control, &web2, Duration::from_secs(60));
    wait_both(&lab, &control, &web, Duration::from_secs(5));
    assert!(
        control.metric("strom_control_watch_errors_total", "") > errors_before,
        "the watches noticed the outage"
    );
    // What was programmed since the outage began: x/web2, never x/web (unchanged), and
    // nothing removed from x (the API server's own `default/kubernetes` endpoints do change:
    // it takes itself out when it stops).
    let log = std::fs::read_to_string(&control.log).unwrap();
    let rounds: Vec<&str> = log[log_before..]
        .lines()
        .filter(|l| l.contains("programmed stromd"))
        .collect();
    assert!(
        log[log_before..].contains("too old resource version"),
        "the watches resumed from a compacted version and got 410 Gone:\n{}",
        &log[log_before..]
    );
    let web_rewritten = rounds.iter().any(|l| l.contains("\"x/web\""));
    assert!(
        rounds.iter().any(|l| l.contains("\"x/web2\"")) && !web_rewritten,
        "after the relist only what changed is programmed: {rounds:#?}"
    );
}

/// Connections from a pod, one after another, until stopped.
struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Vec<String>)>,
    started: Instant,
}

impl Traffic {
    fn start(lab: &Lab, from: &str, ip: &str) -> Traffic {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ns = lab.pod_ns(from);
        let ip = ip.to_string();
        let s = stop.clone();
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            let mut answered = 0;
            let mut failed = Vec::new();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let batch = started.elapsed();
                let o = sh(Command::new("ip")
                    .args(["netns", "exec", &ns])
                    .arg(bin_dir().join("strom-lab"))
                    .args(["connect", "--lines", "--ip", &ip, "--port", "80"])
                    .args(["--protocol", "tcp", "--timeout-ms", "1000", "--count", "8"]));
                for l in String::from_utf8_lossy(&o.stdout).lines() {
                    if l.starts_with("allow ") {
                        answered += 1;
                    } else {
                        failed.push(format!("{batch:?}: {l}"));
                    }
                }
            }
            (answered, failed)
        });
        Traffic {
            stop,
            thread,
            started,
        }
    }

    /// Time since the traffic started.
    fn since(&self) -> Duration {
        self.started.elapsed()
    }

    fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

#[test]
fn the_deployment_objects_are_valid() {
    // configs/k8s: the DaemonSet, RBAC and ConfigMap, created against the real API server
    // (its validation and defaulting), then read back.
    let cp = ControlPlane::start();
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/k8s/strom.yaml"),
    )
    .unwrap();
    cp.apply(&text);
    let ds = cp
        .get("apps/v1", "DaemonSet", Some("kube-system"), "strom")
        .expect("the DaemonSet");
    let containers: Vec<&str> = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(containers, ["stromd", "strom-control"]);
    assert_eq!(
        ds["spec"]["template"]["spec"]["hostNetwork"],
        Value::Bool(true)
    );
    assert!(cp
        .get("v1", "ConfigMap", Some("kube-system"), "strom")
        .is_some());
    assert!(cp
        .get(
            "rbac.authorization.k8s.io/v1",
            "ClusterRoleBinding",
            None,
            "strom-control"
        )
        .is_some());

    // The init container's node-config: the node's pod CIDR and addresses from its Node,
    // read with strom-control's own (RBAC-limited) access.
    cp.grant_strom_control();
    cp.apply(
        "apiVersion: v1
kind: Node
metadata: {name: n1}
spec: {podCIDR: 198.18.32.0/24, podCIDRs: [198.18.32.0/24]}
",
    );
    cp.apply_status(
        "v1",
        "Node",
        None,
        "n1",
        serde_json::json!({"status": {"addresses": [
            {"type": "Hostname", "address": "n1"},
            {"type": "InternalIP", "address": "198.18.0.7"},
        ]}}),
    );
    let out_file = cp.dir.join("node.env");
    let o = sh(Command::new(bin_dir().join("strom-control"))
        .args(["--node-name", "n1", "--kubeconfig"])
        .arg(cp.kubeconfig())
        .args(["node-config", "--out"])
        .arg(&out_file));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(&out_file).unwrap(),
        "POD_CIDR=198.18.32.0/24\nNODE_ADDRS=\"198.18.0.7\"\n"
    );
    // A node the cluster gave no pod CIDR: a clear error, nothing written.
    cp.apply("apiVersion: v1\nkind: Node\nmetadata: {name: n2}\n");
    let o = sh(Command::new(bin_dir().join("strom-control"))
        .args(["--node-name", "n2", "--kubeconfig"])
        .arg(cp.kubeconfig())
        .args(["node-config", "--out"])
        .arg(cp.dir.join("n2.env")));
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no IPv4 pod CIDR"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!cp.dir.join("n2.env").exists());
}
