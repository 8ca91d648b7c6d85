//! Kubernetes Services for traffic from pods, through strom-lab: each test writes Pods and
//! Services (and EndpointSlices) as manifests, lets strom-lab program stromd, and checks what
//! a user sees: who answers a connection to the ClusterIP, the client address the backend
//! saw, how fast a refusal comes, and what `stromctl` reports. The expected values are
//! Kubernetes' semantics (kube-proxy's), written here from the manifests.
//!
//! ```text
//!  pod client ──▶ ClusterIP 198.19.0.x:port ──▶ stromd (conntrack, Maglev, DNAT) ──▶ pod a|b|c
//!                                        ◀── reverse NAT (source back to the ClusterIP) ◀──
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::Value;
use strom_tests::{connect_lines, hold_responder, net_lock, sh, who, Held, Lab, Proc};

/// The pod gateway: what a pod reaching itself through its Service sees as the client.
const GATEWAY: &str = "169.254.1.1";

/// The lab node's address: what a backend sees as the client of the node's own sockets.
const NODE: &str = "198.18.0.1";
/// The lab's outside host.
const EXTERNAL: &str = "198.18.0.2";

/// `Lab::up`, then waits (at most 10 s) until every pod's responder listens on its TCP and
/// UDP ports: strom-lab starts them without waiting (read from each responder's
/// /proc/PID/net, its namespace's sockets).
fn up(manifest: &str, flags: &[&str]) -> Lab {
    let lab = Lab::up(manifest, flags);
    lab.wait_until_serving();
    lab
}

/// A pod in namespace t with labels and container ports (`(name, port, protocol)`), and
/// extra top-level YAML (status, a deletionTimestamp in metadata is given as `meta`).
fn pod(name: &str, labels: &str, ports: &[(&str, u16, &str)], meta: &str, status: &str) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|(n, p, proto)| format!("{{name: {n}, containerPort: {p}, protocol: {proto}}}"))
        .collect();
    format!(
        "---\nkind: Pod\nmetadata: {{name: {name}, namespace: t, labels: {{{labels}}}{meta}}}\nspec: {{containers: [{{name: c, ports: [{}]}}]}}\n{status}",
        ports.join(", ")
    )
}

/// A pod that only connects (no ports, no labels).
fn client() -> String {
    "---\nkind: Pod\nmetadata: {name: client, namespace: t}\n".into()
}

/// A Service in namespace t: `spec` is the YAML of its spec's fields (one per line, indented
/// by two).
fn service(name: &str, spec: &str) -> String {
    format!("---\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec:\n{spec}")
}

/// `count` new connections (or UDP exchanges) from pod `from` to `ip:port`, 16 at a time:
/// each answer, or why there was none.
fn connect_many(
    lab: &Lab,
    from: &str,
    ip: &str,
    port: u16,
    proto: &str,
    count: usize,
) -> Vec<Result<(String, String), String>> {
    let lines: Vec<_> = connect_lines(lab, from, ip, port, proto, 2000, count)
        .into_iter()
        .map(|r| r.map(|a| who(&a)))
        .collect();
    assert_eq!(lines.len(), count, "one line per connection: {lines:?}");
    lines
}

/// The backends that answered `count` connections, with how many each; panics on any failed
/// connection or on a client address other than `client_ip`.
fn answered_by(
    lab: &Lab,
    from: &str,
    ip: &str,
    port: u16,
    proto: &str,
    count: usize,
    client_ip: &str,
) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for r in connect_many(lab, from, ip, port, proto, count) {
        let (name, client) = r.unwrap_or_else(|e| panic!("{proto} to {ip}:{port}: {e}"));
        assert_eq!(
            client, client_ip,
            "{proto} {ip}:{port}: the backend sees the client's own address"
        );
        *by.entry(name).or_insert(0) += 1;
    }
    by
}

/// `strom-lab probe` with its arguments: the answer or the reason, how long it took, and its
/// exit code (2: cannot be probed here).
fn probe(lab: &Lab, args: &[&str]) -> (Result<String, String>, Duration, i32) {
    let t = Instant::now();
    let o = sh(lab.cmd().arg("probe").args(args));
    let took = t.elapsed();
    let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let code = o.status.code().unwrap_or(-1);
    let r = match out.strip_prefix("allow: answered by ") {
        Some(a) if o.status.success() => Ok(a.to_string()),
        _ => Err(format!(
            "{out}{}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
    };
    (r, took, code)
}

/// stromd's Service ports (`stromctl services`), by key (`ns/name:port`).
fn service_ports(lab: &Lab) -> BTreeMap<String, Value> {
    lab.stromctl(&["services"])["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| (s["key"].as_str().unwrap().to_string(), s.clone()))
        .collect()
}

/// The backends stromd lists for a Service port, as `ip:port`.
fn backends(lab: &Lab, key: &str) -> BTreeSet<String> {
    let ports = service_ports(lab);
    let p = ports
        .get(key)
        .unwrap_or_else(|| panic!("no Service port {key}: {ports:?}"));
    p["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["addr"].as_str().unwrap().to_string())
        .collect()
}

/// The backend `stromctl trace` says Maglev picks for a first packet (None: rejected).
fn traced_backend(lab: &Lab, proto: &str, src: &str, dst: &str) -> Option<String> {
    let o = sh(lab
        .ctl()
        .args(["trace", "--protocol", proto, "--src", src, "--dst", dst]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Maglev picks "))
        .map(|b| b.trim().to_string())
}

#[test]
fn cluster_ip_balances_tcp_udp_and_sctp_ports_with_named_target_ports_resolved_per_pod() {
    let _g = net_lock();
    // a and b serve the same named ports on different numbers: each is reached on its own.
    let m = pod(
        "a",
        "app: web",
        &[
            ("http", 8080, "TCP"),
            ("dns", 5353, "UDP"),
            ("assoc", 9898, "SCTP"),
        ],
        "",
        "",
    ) + &pod(
        "b",
        "app: web",
        &[
            ("http", 9090, "TCP"),
            ("dns", 5354, "UDP"),
            ("assoc", 9899, "SCTP"),
        ],
        "",
        "",
    ) + &client()
        + &service(
            "web",
            "  clusterIP: 198.19.0.10\n  selector: {app: web}\n  ports:\n    - {name: http, port: 80, targetPort: http}\n    - {name: alt, port: 8000, targetPort: http}\n    - {name: dns, port: 53, protocol: UDP, targetPort: dns}\n    - {name: assoc, port: 99, protocol: SCTP, targetPort: assoc}\n",
        );
    let lab = up(&m, &[]);
    let (a, b, c) = (lab.pod_ip("t/a"), lab.pod_ip("t/b"), lab.pod_ip("t/client"));
    let both: BTreeSet<String> = ["t/a".to_string(), "t/b".to_string()].into();
    for (port, proto) in [(80, "tcp"), (8000, "tcp"), (53, "udp")] {
        let by = answered_by(&lab, "t/client", "198.19.0.10", port, proto, 24, &c);
        assert_eq!(
            by.keys().cloned().collect::<BTreeSet<_>>(),
            both,
            "{port}/{proto}: both backends answer: {by:?}"
        );
    }
    assert_eq!(
        backends(&lab, "t/web:http"),
        [format!("{a}:8080"), format!("{b}:9090")].into()
    );
    assert_eq!(
        backends(&lab, "t/web:dns"),
        [format!("{a}:5353"), format!("{b}:5354")].into()
    );
    let (r, _, code) = probe(
        &lab,
        &[
            "--from",
            "t/client",
            "--to",
            "t/web",
            "--port-name",
            "assoc",
        ],
    );
    if code == 2 {
        eprintln!("SCTP not checked: {}", r.unwrap_err());
    } else {
        let by = answered_by(&lab, "t/client", "198.19.0.10", 99, "sctp", 24, &c);
        assert_eq!(
            by.keys().cloned().collect::<BTreeSet<_>>(),
            both,
            "SCTP: {by:?}"
        );
    }
}

#[test]
fn a_thousand_new_connections_spread_evenly_over_three_backends() {
    let _g = net_lock();
    let m = pod("a", "app: web", &[("http", 80, "TCP")], "", "")
        + &pod("b", "app: web", &[("http", 80, "TCP")], "", "")
        + &pod("c", "app: web", &[("http", 80, "TCP")], "", "")
        + &client()
        + &service(
            "web",
            "  clusterIP: 198.19.0.10\n  selector: {app: web}\n  ports: [{port: 80}]\n",
        );
    let lab = up(&m, &[]);
    let c = lab.pod_ip("t/client");
    let by = answered_by(&lab, "t/client", "198.19.0.10", 80, "tcp", 1000, &c);
    assert_eq!(by.len(), 3, "{by:?}");
    eprintln!("1000 connections: {by:?}");
    for (who, n) in &by {
        assert!(
            (283..=383).contains(n),
            "{who} got {n} of 1000 (even: 333 ± 15%): {by:?}"
        );
    }
}

/// Pods a, b and c (c labelled `c_label`), a client, and Service t/web (198.19.0.10) over
/// the pods labelled `app: web`, on port 80 and on port 9000 for held connections.
fn three_backends(c_label: &str) -> String {
    pod("a", "app: web", &[("http", 80, "TCP")], "", "")
        + &pod("b", "app: web", &[("http", 80, "TCP")], "", "")
        + &pod("c", c_label, &[("http", 80, "TCP")], "", "")
        + &client()
        + &service(
            "web",
            "  clusterIP: 198.19.0.10\n  selector: {app: web}\n  ports:\n    - {name: http, port: 80}\n    - {name: held, port: 9000}\n",
        )
}

/// Responders holding connections on port 9000 in pods a, b and c, listening.
fn hold_responders(lab: &Lab) -> Vec<Proc> {
    let r = ["t/a", "t/b", "t/c"]
        .iter()
        .map(|p| hold_responder(lab, p, 9000))
        .collect();
    for p in ["t/a", "t/b", "t/c"] {
        lab.wait_listening(p, 9000);
    }
    r
}

/// 24 connections from the client held to t/web's port 9000, and who answered each: every
/// backend holds some.
fn hold_on_every_backend(lab: &Lab) -> (Held, Vec<String>) {
    let held = Held::open(lab, "t/client", "198.19.0.10", 9000, 24);
    let first: Vec<String> = held
        .first
        .iter()
        .map(|f| f.clone().expect("every held connection opens"))
        .collect();
    let on: BTreeSet<&str> = first.iter().map(String::as_str).collect();
    assert_eq!(on.len(), 3, "held connections on every backend: {first:?}");
    (held, first)
}

#[test]
fn removing_a_backend_resets_its_flows_and_moves_no_other() {
    let _g = net_lock();
    let lab = up(&three_backends("app: web"), &[]);
    let ip = |k: &str| lab.pod_ip(k);
    let (client_ip, c_ip) = (ip("t/client"), ip("t/c"));
    let _responders = hold_responders(&lab);
    // Where 300 new flows would go, before.
    let tuples: Vec<String> = (0..300)
        .map(|i| format!("{client_ip}:{}", 20000 + i))
        .collect();
    let picks = |lab: &Lab| -> Vec<String> {
        tuples
            .iter()
            .map(|s| traced_backend(lab, "tcp", s, "198.19.0.10:80").expect("a backend"))
            .collect()
    };
    let before = picks(&lab);
    let (held, first) = hold_on_every_backend(&lab);

    // c leaves the Service (its pod still runs: its label no longer matches).
    lab.apply(&three_backends("app: gone"));
    let again = held.again();
    for (f, (r, took)) in first.iter().zip(&again) {
        eprintln!("held on {f}: then {r:?} after {took:?}");
        if f == "t/c" {
            let e = r
                .as_ref()
                .expect_err("a flow to the removed backend is not served");
            assert!(
                *took < Duration::from_millis(1000),
                "reset at once, not after a timeout: {e} after {took:?}"
            );
            assert!(
                e.contains("reset") || e.contains("EOF"),
                "reset, not timed out: {e}"
            );
        } else {
            assert_eq!(
                r.as_deref(),
                Ok(f.as_str()),
                "an established flow to {f} stays on it"
            );
        }
    }

    // New flows: only those that went to c move (Maglev), about a third.
    let after = picks(&lab);
    let c_port = format!("{c_ip}:80");
    let mut moved_from_c = 0;
    let mut moved_others = 0;
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(*a, c_port, "no new flow goes to the removed backend");
        if *b == c_port {
            moved_from_c += 1;
        } else if b != a {
            moved_others += 1;
        }
    }
    eprintln!("of 300 traced flows: {moved_from_c} were c's, {moved_others} others moved");
    assert!(
        (60..=140).contains(&moved_from_c),
        "about a third of 300 flows were c's: {moved_from_c}"
    );
    assert!(
        moved_others <= 9,
        "flows of the other backends stay (Maglev: at most a few %): {moved_others} of {} moved",
        300 - moved_from_c
    );
    // Real new connections agree: a and b only.
    let by = answered_by(&lab, "t/client", "198.19.0.10", 80, "tcp", 30, &client_ip);
    assert_eq!(
        by.keys().cloned().collect::<BTreeSet<_>>(),
        ["t/a".to_string(), "t/b".to_string()].into(),
        "{by:?}"
    );
}

#[test]
fn a_stromd_restart_keeps_service_and_masqueraded_flows_and_client_affinity() {
    // A stopping stromd saves its Services, policies and every worker's flows and clients;
    // the next start takes them up before it serves (docs/design.md, "Across a restart of
    // stromd").
    let _g = net_lock();
    let sticky = service(
        "sticky",
        "  clusterIP: 198.19.0.12\n  selector: {app: web}\n  ports: [{port: 80}]\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n",
    );
    // A policy that isolates the backends and lets everything in: kept too, changing nothing.
    let policy = "---\nkind: NetworkPolicy\nmetadata: {name: open, namespace: t}\nspec: {podSelector: {matchLabels: {app: web}}, ingress: [{}]}\n";
    let lab = up(&(three_backends("app: web") + &sticky + policy), &[]);
    let mut responders = hold_responders(&lab);
    responders.push(hold_responder(&lab, "ext", 9100));
    lab.wait_listening("external", 9100);
    let (held, first) = hold_on_every_backend(&lab);
    // Masqueraded connections to the outside, on SNAT ports a new start would not pick in
    // the same order: three others took the first ports and have closed.
    drop(Held::open(&lab, "t/client", EXTERNAL, 9100, 3));
    let outside = Held::open(&lab, "t/client", EXTERNAL, 9100, 4);
    for f in &outside.first {
        assert_eq!(f.as_deref(), Some("ext"), "masqueraded connections open");
    }
    let c = lab.pod_ip("t/client");
    let by = answered_by(&lab, "t/client", "198.19.0.12", 80, "tcp", 10, &c);
    assert_eq!(by.len(), 1, "affinity: one backend: {by:?}");
    let tracked =
        |lab: &Lab| lab.stromctl(&["conntrack", "--service", "t/web", "--count"])["total"].as_u64();
    let established_outside = |lab: &Lab| {
        lab.stromctl(&["conntrack", "--addr", EXTERNAL])["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["state"] == "established")
            .count()
    };
    assert_eq!(tracked(&lab), Some(24), "the held flows are tracked");
    assert_eq!(established_outside(&lab), 4);

    let pid = lab.stromd_pid();
    let out = sh(lab.cmd().args(["stromd", "restart"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("not set again"),
        "the Services set again after the restart: {err}"
    );
    lab.wait_until_serving();
    assert_ne!(lab.stromd_pid(), pid, "another stromd");
    // Taken up from what the last one saved, before strom-lab set them again, and before
    // any packet of theirs came.
    let log = std::fs::read_to_string(lab.dir.join("stromd.log")).unwrap();
    let line = |what: &str| {
        log.lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("{what}:\n{log}"))
            .to_string()
    };
    let set = line("saved services and policies set again");
    assert!(
        set.contains("services=2") && set.contains("policies=true"),
        "{set}"
    );
    let taken = line("saved flows taken up");
    assert!(
        taken.contains("expired=0") && taken.contains("clients=1"),
        "{taken}"
    );
    assert_eq!(tracked(&lab), Some(24), "the Service's flows taken up");
    assert_eq!(
        established_outside(&lab),
        4,
        "the masqueraded flows taken up"
    );
    for (f, (r, took)) in first.iter().zip(held.again()) {
        assert_eq!(
            r.as_deref(),
            Ok(f.as_str()),
            "the flow held on {f} answered by the same pod after the restart ({took:?})"
        );
    }
    for (r, took) in outside.again() {
        assert_eq!(
            r.as_deref(),
            Ok("ext"),
            "a masqueraded connection keeps its port across the restart ({took:?})"
        );
    }
    let again = answered_by(&lab, "t/client", "198.19.0.12", 80, "tcp", 20, &c);
    assert_eq!(
        again.keys().collect::<Vec<_>>(),
        by.keys().collect::<Vec<_>>(),
        "the client keeps its backend across the restart"
    );
    drop(responders);
}

#[test]
fn a_service_without_endpoints_refuses_tcp_and_udp_at_once() {
    let _g = net_lock();
    let m = client()
        + &service(
            "none",
            "  clusterIP: 198.19.0.11\n  selector: {app: nothing}\n  ports:\n    - {name: http, port: 80}\n    - {name: dns, port: 53, protocol: UDP}\n",
        );
    let lab = up(&m, &[]);
    for (name, proto) in [("http", "TCP"), ("dns", "UDP")] {
        let (r, took, _) = probe(
            &lab,
            &[
                "--from",
                "t/client",
                "--to",
                "t/none",
                "--port-name",
                name,
                "--timeout-ms",
                "3000",
            ],
        );
        let e = r.expect_err("no endpoints: refused");
        assert!(e.contains("refused"), "{proto}: refused: {e}");
        assert!(
            took < Duration::from_millis(500),
            "{proto}: refused at once, not after the timeout: {took:?}"
        );
    }
    let ports = service_ports(&lab);
    for key in ["t/none:http", "t/none:dns"] {
        let p = &ports[key];
        assert!(p["backends"].as_array().unwrap().is_empty(), "{p}");
        assert!(p["rejected"].as_u64().unwrap() >= 1, "counted: {p}");
        assert_eq!(p["flows"], 0, "{p}");
    }
}

#[test]
fn a_pod_reaching_itself_through_its_service_gets_its_own_answer_from_the_gateway() {
    let _g = net_lock();
    let m = pod(
        "a",
        "app: web",
        &[("http", 80, "TCP"), ("dns", 53, "UDP")],
        "",
        "",
    ) + &client()
        + &service(
            "web",
            "  clusterIP: 198.19.0.10\n  selector: {app: web}\n  ports:\n    - {name: http, port: 80}\n    - {name: dns, port: 53, protocol: UDP}\n",
        );
    let lab = up(&m, &[]);
    for proto in ["tcp", "udp"] {
        let port = if proto == "tcp" { 80 } else { 53 };
        let by = answered_by(&lab, "t/a", "198.19.0.10", port, proto, 5, GATEWAY);
        assert_eq!(by.keys().collect::<Vec<_>>(), ["t/a"], "hairpin {proto}");
        // From another pod, no SNAT.
        let c = lab.pod_ip("t/client");
        let by = answered_by(&lab, "t/client", "198.19.0.10", port, proto, 3, &c);
        assert_eq!(by.keys().collect::<Vec<_>>(), ["t/a"], "{proto}");
    }
}

#[test]
fn client_ip_affinity_sticks_until_its_timeout_passes() {
    let _g = net_lock();
    let m = pod("a", "app: web", &[("http", 80, "TCP")], "", "")
        + &pod("b", "app: web", &[("http", 80, "TCP")], "", "")
        + &client()
        + &service(
            "web",
            "  clusterIP: 198.19.0.10\n  selector: {app: web}\n  ports: [{port: 80}]\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n",
        );
    let lab = up(&m, &[]);
    let c = lab.pod_ip("t/client");
    let by = answered_by(&lab, "t/client", "198.19.0.10", 80, "tcp", 100, &c);
    assert_eq!(by.len(), 1, "100 connections, one backend: {by:?}");
    // Past the timeout a client is balanced anew (then sticks again): over rounds, both.
    let mut seen: BTreeSet<String> = by.keys().cloned().collect();
    for _ in 0..12 {
        if seen.len() == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1600));
        let by = answered_by(&lab, "t/client", "198.19.0.10", 80, "tcp", 4, &c);
        assert_eq!(by.len(), 1, "sticks again within the timeout: {by:?}");
        seen.extend(by.into_keys());
    }
    assert_eq!(seen.len(), 2, "after the timeout both backends appear");
}

#[test]
fn not_ready_pods_do_not_serve_and_terminating_ones_only_when_no_ready_one_is_left() {
    let _g = net_lock();
    const NOT_READY: &str = "status: {conditions: [{type: Ready, status: 'False'}]}\n";
    const DELETING: &str = ", deletionTimestamp: '2026-01-01T00:00:00Z'";
    let m = |a_ready: bool, c_ready: bool| {
        let st = |r| if r { "" } else { NOT_READY };
        pod("a", "app: web", &[("http", 80, "TCP")], "", st(a_ready))
            + &pod("b", "app: web", &[("http", 80, "TCP")], "", NOT_READY)
            + &pod(
                "c",
                "app: web",
                &[("http", 80, "TCP")],
                DELETING,
                st(c_ready),
            )
            + &client()
            + &service(
                "web",
                "  clusterIP: 198.19.0.10\n  selector: {app: web}\n  ports: [{port: 80}]\n",
            )
    };
    let lab = up(&m(true, true), &[]);
    let cl = lab.pod_ip("t/client");
    let by = answered_by(&lab, "t/client", "198.19.0.10", 80, "tcp", 20, &cl);
    assert_eq!(
        by.keys().collect::<Vec<_>>(),
        ["t/a"],
        "only the ready pod serves (b not ready, c terminating)"
    );
    // a not ready: the terminating but still serving c takes over; b never.
    lab.apply(&m(false, true));
    let by = answered_by(&lab, "t/client", "198.19.0.10", 80, "tcp", 20, &cl);
    assert_eq!(by.keys().collect::<Vec<_>>(), ["t/c"], "{by:?}");
    // c no longer serving either: nothing is left, connections are refused.
    lab.apply(&m(false, false));
    let (r, took, _) = probe(&lab, &["--from", "t/client", "--to", "t/web"]);
    assert!(
        r.as_ref().is_err_and(|e| e.contains("refused")) && took < Duration::from_millis(500),
        "{r:?} after {took:?}"
    );
}

#[test]
fn internal_traffic_policy_local_rejects_without_local_endpoints_and_headless_and_external_name_get_no_entries(
) {
    let _g = net_lock();
    // a's address is fixed so that hand-written EndpointSlices can name it, on another node.
    let slice = |svc: &str| {
        format!(
            "---\nkind: EndpointSlice\napiVersion: discovery.k8s.io/v1\nmetadata: {{name: {svc}-1, namespace: t, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nendpoints: [{{addresses: [198.18.16.50], nodeName: other-node, conditions: {{ready: true}}}}]\nports: [{{name: http, port: 80, protocol: TCP}}]\n"
        )
    };
    let m = pod(
        "a",
        "app: web",
        &[("http", 80, "TCP")],
        "",
        "status: {podIP: 198.18.16.50}\n",
    ) + &client()
        + &service(
            "local",
            "  clusterIP: 198.19.0.20\n  internalTrafficPolicy: Local\n  ports: [{name: http, port: 80}]\n",
        )
        + &slice("local")
        + &service(
            "cluster",
            "  clusterIP: 198.19.0.21\n  ports: [{name: http, port: 80}]\n",
        )
        + &slice("cluster")
        + &service(
            "headless",
            "  clusterIP: None\n  selector: {app: web}\n  ports: [{name: http, port: 80}]\n",
        )
        + &service(
            "elsewhere",
            "  type: ExternalName\n  externalName: example.com\n",
        );
    let lab = up(&m, &[]);
    assert_eq!(lab.pod_ip("t/a"), "198.18.16.50");
    let c = lab.pod_ip("t/client");
    // The same endpoint serves the Cluster-policy Service from this node...
    let by = answered_by(&lab, "t/client", "198.19.0.21", 80, "tcp", 3, &c);
    assert_eq!(by.keys().collect::<Vec<_>>(), ["t/a"]);
    // ...but not the Local one: no endpoint on this node, refused.
    let (r, took, _) = probe(&lab, &["--from", "t/client", "--to", "t/local"]);
    assert!(
        r.as_ref().is_err_and(|e| e.contains("refused")) && took < Duration::from_millis(500),
        "{r:?} after {took:?}"
    );
    let keys: Vec<String> = service_ports(&lab).into_keys().collect();
    assert!(keys.iter().any(|k| k.starts_with("t/cluster:")), "{keys:?}");
    assert!(keys.iter().any(|k| k.starts_with("t/local:")), "{keys:?}");
    assert!(
        !keys
            .iter()
            .any(|k| k.starts_with("t/headless") || k.starts_with("t/elsewhere")),
        "headless and ExternalName Services have no entries: {keys:?}"
    );
}

#[test]
fn a_full_conntrack_refuses_new_service_flows_but_not_pod_to_pod_traffic() {
    let _g = net_lock();
    let m = pod("a", "app: web", &[("http", 80, "TCP")], "", "")
        + &client()
        + &service(
            "web",
            "  clusterIP: 198.19.0.10\n  selector: {app: web}\n  ports: [{name: held, port: 9000}]\n",
        );
    let lab = up(&m, &["--conntrack-max", "4"]);
    let _r = hold_responder(&lab, "t/a", 9000);
    lab.wait_listening("t/a", 9000);
    let held = Held::open(&lab, "t/client", "198.19.0.10", 9000, 4);
    assert!(
        held.first.iter().all(|f| f.as_deref() == Some("t/a")),
        "4 flows fit: {:?}",
        held.first
    );
    let (r, _, _) = probe(
        &lab,
        &[
            "--from",
            "t/client",
            "--to",
            "t/web",
            "--timeout-ms",
            "1000",
        ],
    );
    assert!(r.is_err(), "a fifth flow does not fit: {r:?}");
    assert!(
        lab.drops("conntrack_full") >= 1,
        "counted as conntrack_full"
    );
    assert!(
        lab.probe("t/client", "t/a", 80, "tcp"),
        "pod to pod without a Service is not tracked"
    );
    drop(held);
}

#[test]
fn a_malformed_service_is_refused_alone_with_its_reason() {
    let _g = net_lock();
    let good = pod("a", "app: web", &[("http", 80, "TCP")], "", "")
        + &client()
        + &service(
            "good",
            "  clusterIP: 198.19.0.10\n  selector: {app: web}\n  ports: [{port: 80}]\n",
        );
    let lab = up(&good, &[]);
    let bad = service(
        "badport",
        "  selector: {app: web}\n  ports: [{port: 70000}]\n",
    ) + &service(
        "badproto",
        "  selector: {app: web}\n  ports: [{port: 80, protocol: QUIC}]\n",
    ) + &service(
        "badip",
        "  clusterIP: 300.1.2.3\n  selector: {app: web}\n  ports: [{port: 80}]\n",
    ) + &service(
        "good2",
        "  clusterIP: 198.19.0.12\n  selector: {app: web}\n  ports: [{port: 81, targetPort: 80}]\n",
    );
    let (out, err) = lab.apply(&(good + &bad));
    for name in ["badport", "badproto", "badip"] {
        let line = err
            .lines()
            .find(|l| l.contains(&format!("t/{name}")))
            .unwrap_or_else(|| panic!("{name} refused with a reason: {out}{err}"));
        assert!(
            line.len() > format!("t/{name}").len() + 20,
            "a reason: {line}"
        );
    }
    let keys: Vec<String> = service_ports(&lab).into_keys().collect();
    assert!(
        !keys.iter().any(|k| k.starts_with("t/bad")),
        "refused ones are not programmed: {keys:?}"
    );
    let c = lab.pod_ip("t/client");
    for (ip, port) in [("198.19.0.10", 80), ("198.19.0.12", 81)] {
        let by = answered_by(&lab, "t/client", ip, port, "tcp", 2, &c);
        assert_eq!(by.keys().collect::<Vec<_>>(), ["t/a"], "{ip}:{port}");
    }
}

#[test]
fn conntrack_lists_and_flushes_one_services_flows_and_trace_names_frontend_and_backend() {
    let _g = net_lock();
    let m = pod("a", "app: web", &[("http", 8080, "TCP")], "", "")
        + &pod("b", "app: db", &[("sql", 5432, "TCP")], "", "")
        + &client()
        + &service(
            "web",
            "  clusterIP: 198.19.0.10\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: http}]\n",
        )
        + &service(
            "db",
            "  clusterIP: 198.19.0.11\n  selector: {app: db}\n  ports: [{name: sql, port: 5432, targetPort: sql}]\n",
        );
    let lab = up(&m, &[]);
    let (a, b, c) = (lab.pod_ip("t/a"), lab.pod_ip("t/b"), lab.pod_ip("t/client"));
    answered_by(&lab, "t/client", "198.19.0.10", 80, "tcp", 5, &c);
    answered_by(&lab, "t/client", "198.19.0.11", 5432, "tcp", 3, &c);
    let flows = |svc: &str| -> Vec<Value> {
        let v = lab.stromctl(&["conntrack", "--service", svc]);
        let e = v["entries"].as_array().unwrap().clone();
        assert_eq!(v["total"].as_u64(), Some(e.len() as u64), "{v}");
        e
    };
    let web = flows("t/web");
    assert_eq!(web.len(), 5, "the 5 connections to t/web: {web:?}");
    for e in &web {
        assert_eq!(e["service"], "t/web", "{e}");
        let t = e["translated"].as_str().unwrap();
        assert!(
            e["original"]
                .as_str()
                .unwrap()
                .ends_with("-> 198.19.0.10:80")
                && t.ends_with(&format!("-> {a}:8080"))
                && t.starts_with(&c),
            "{e}"
        );
    }
    assert_eq!(flows("t/db").len(), 3);
    let f = lab.stromctl(&["conntrack", "--service", "t/web", "--flush"]);
    assert_eq!(f["entries"], 5, "{f}");
    assert!(flows("t/web").is_empty(), "flushed");
    assert_eq!(flows("t/db").len(), 3, "the other Service keeps its flows");

    let o = sh(lab.ctl().args([
        "trace",
        "--src",
        &format!("{c}:40000"),
        "--dst",
        "198.19.0.11:5432",
    ]));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("t/db"), "names the Service: {text}");
    assert!(
        text.contains("198.19.0.11:5432") && text.contains(&format!("{b}:5432")),
        "names the frontend and the backend: {text}"
    );
    assert!(
        !text.contains(&format!("{a}:")),
        "not the other Service's backend: {text}"
    );
}

/// A Python script run in the node: `sock` connects or sends to `ip:port` and prints the
/// peer address the kernel reports and the answer.
fn node_python(lab: &Lab, script: &str) -> String {
    let o = lab.exec("node", &["python3", "-c", script]);
    assert!(
        o.status.success(),
        "python in the node: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn the_nodes_own_sockets_reach_cluster_ips_and_node_ports_and_see_the_service_address() {
    let _g = net_lock();
    let ports = [("http", 80, "TCP"), ("dns", 53, "UDP")];
    let m = pod("a", "app: web", &ports, "", "")
        + &pod("b", "app: web", &ports, "", "")
        + &service(
            "web",
            "  type: NodePort\n  clusterIP: 198.19.0.10\n  selector: {app: web}\n  ports: [{name: http, port: 80, nodePort: 30080}, {name: dns, port: 53, protocol: UDP}]\n",
        )
        + &service(
            "sticky",
            "  clusterIP: 198.19.0.11\n  selector: {app: web}\n  ports: [{port: 80}]\n  sessionAffinity: ClientIP\n",
        )
        + &service(
            "empty",
            "  clusterIP: 198.19.0.12\n  selector: {app: none}\n  ports: [{port: 80}]\n",
        );
    let lab = up(&m, &[]);
    // TCP to the ClusterIP: both backends, and they see the node's own address (no SNAT:
    // the socket was given the backend, nothing is translated).
    let by = answered_by(&lab, "node", "198.19.0.10", 80, "tcp", 40, NODE);
    assert_eq!(
        by.len(),
        2,
        "40 connections from the node, both backends: {by:?}"
    );
    // Connected UDP to the ClusterIP's UDP port.
    let by = answered_by(&lab, "node", "198.19.0.10", 53, "udp", 20, NODE);
    assert!(!by.is_empty(), "{by:?}");
    // The NodePort on the node's own address, from the node itself.
    let by = answered_by(&lab, "node", NODE, 30080, "tcp", 10, NODE);
    assert!(by.keys().all(|k| k == "t/a" || k == "t/b"), "{by:?}");
    // An unconnected UDP socket gets its answer from the Service address it sent to, and a
    // connected TCP socket's peer is the Service address.
    let out = node_python(
        &lab,
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.settimeout(2)\nfor _ in range(3):\n    s.sendto(b'x', ('198.19.0.10', 53))\n    data, peer = s.recvfrom(1500)\n    print(peer[0], peer[1], data.decode().split()[0])\nt = socket.create_connection(('198.19.0.10', 80), timeout=2)\nprint(*t.getpeername())\n",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    let first = lines[0].rsplit_once(' ').unwrap().1;
    for l in &lines[..3] {
        assert_eq!(
            *l,
            format!("198.19.0.10 53 {first}"),
            "answers from the Service address, one backend for the socket: {out}"
        );
    }
    assert_eq!(lines[3], "198.19.0.10 80", "getpeername: {out}");
    // ClientIP affinity holds for the node too.
    let by = answered_by(&lab, "node", "198.19.0.11", 80, "tcp", 20, NODE);
    assert_eq!(
        by.len(),
        1,
        "affinity: one backend for 20 connections: {by:?}"
    );
    // No endpoints: refused at once.
    let (r, took, _) = probe(&lab, &["--from", "node", "--to", "t/empty"]);
    assert!(
        r.as_ref().is_err_and(|e| e.contains("refused")) && took < Duration::from_millis(500),
        "{r:?} after {took:?}"
    );
    // A Service removed: its address is no longer given a backend (the node's sockets reach
    // it as any other address: nothing answers there).
    lab.apply(&(pod("a", "app: web", &ports, "", "") + &pod("b", "app: web", &ports, "", "")));
    let (r, _, _) = probe(
        &lab,
        &[
            "--from",
            "node",
            "--to",
            "198.19.0.10",
            "--port",
            "80",
            "--timeout-ms",
            "300",
        ],
    );
    assert!(
        r.is_err(),
        "the removed Service's address no longer answers: {r:?}"
    );
}

#[test]
fn a_fragmented_udp_datagram_reaches_a_service_backend() {
    let _g = net_lock();
    let m = pod("a", "app: web", &[("dns", 53, "UDP")], "", "")
        + &client()
        + &service(
            "web",
            "  clusterIP: 198.19.0.10\n  selector: {app: web}\n  ports: [{name: dns, port: 53, protocol: UDP}]\n",
        );
    let lab = up(&m, &[]);
    // 3000 bytes: the client's kernel sends the datagram in three fragments, which stromd
    // translates one by one (the first with its flow, the others by the first's addresses).
    let script = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.settimeout(2)\ns.connect(('198.19.0.10', 53))\ns.send(b'x' * 3000)\nprint(s.recv(1500).decode())\n";
    let o = lab.exec("t/client", &["python3", "-c", script]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.starts_with("t/a "),
        "the backend answered the reassembled datagram: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
