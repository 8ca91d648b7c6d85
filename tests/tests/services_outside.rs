//! Services reached from outside the node, and pods reaching the outside, through strom-lab:
//! NodePorts under both external traffic policies (the client address the backend sees), a
//! load-balancer IP and its `healthCheckNodePort`, PMTU discovery through a NodePort,
//! masquerade of a pod's connection to the outside (the address `external` sees), fragments
//! from outside, and NodePorts over a multi-queue uplink.
//!
//! ```text
//!  external 198.18.0.2 ──uplink──▶ node 198.18.0.1:NodePort ──▶ stromd (DNAT, SNAT) ──▶ pod
//!  pod ──▶ stromd (masquerade to 198.18.0.1:61000+) ──uplink──▶ external
//! ```

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strom_tests::{bin_dir, drops_in, net_lock, sh, Lab, Proc};

const NODE: &str = "198.18.0.1";
const EXTERNAL: &str = "198.18.0.2";
const LB_IP: &str = "198.19.255.1";

/// Pods a (app=web, TCP 80 and UDP 53) and c (a client), and the Services given.
fn manifest(services: &str) -> String {
    format!(
        "---
kind: Pod
metadata: {{name: a, namespace: t, labels: {{app: web}}}}
spec: {{containers: [{{name: c, ports: [{{containerPort: 80}}, {{containerPort: 53, protocol: UDP}}]}}]}}
---
kind: Pod
metadata: {{name: c, namespace: t}}
{services}"
    )
}

/// A Service of pod a's: type `ty`, NodePort `np` on port 80 (and UDP 53 on `np + 1`), and
/// more spec fields.
fn web(name: &str, ty: &str, np: u16, more: &str) -> String {
    format!(
        "---
kind: Service
metadata: {{name: {name}, namespace: t}}
spec:
  type: {ty}
  selector: {{app: web}}
  ports:
    - {{name: http, port: 80, nodePort: {np}}}
    - {{name: dns, port: 53, protocol: UDP, nodePort: {}}}
{more}",
        np + 1
    )
}

/// Waits until pod `key`'s responder listens on TCP 80.
fn wait_serving(lab: &Lab, key: &str) {
    let t = Instant::now();
    while !lab.probe("t/c", key, 80, "tcp") {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{key} does not serve"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `strom-lab probe` with its arguments: (who answered, the client address it saw).
fn probe(lab: &Lab, args: &[&str]) -> Result<(String, String), String> {
    let o = sh(lab.cmd().arg("probe").args(args));
    let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
    match out.strip_prefix("allow: answered by ") {
        Some(a) if o.status.success() => {
            let mut w = a.split_whitespace();
            let who = w.next().unwrap_or("").to_string();
            let client = w
                .next()
                .and_then(|c| c.rsplit_once(':'))
                .map(|(ip, _)| ip.to_string())
                .unwrap_or_default();
            Ok((who, client))
        }
        _ => Err(format!("{out}{}", String::from_utf8_lossy(&o.stderr))),
    }
}

#[test]
fn node_ports_from_outside_come_from_the_node_under_cluster_and_keep_the_client_under_local() {
    let _g = net_lock();
    let lab = Lab::up(
        &manifest(&format!(
            "{}{}",
            web("cluster", "NodePort", 30080, ""),
            web(
                "local",
                "NodePort",
                30090,
                "  externalTrafficPolicy: Local\n"
            )
        )),
        &[],
    );
    wait_serving(&lab, "t/a");
    for proto in ["tcp", "udp"] {
        let port = if proto == "tcp" { "http" } else { "dns" };
        assert_eq!(
            probe(
                &lab,
                &[
                    "--from",
                    "external",
                    "--to",
                    "t/cluster",
                    "--port-name",
                    port
                ]
            ),
            Ok(("t/a".to_string(), NODE.to_string())),
            "{proto}, externalTrafficPolicy Cluster: from the node's address"
        );
        assert_eq!(
            probe(
                &lab,
                &["--from", "external", "--to", "t/local", "--port-name", port]
            ),
            Ok(("t/a".to_string(), EXTERNAL.to_string())),
            "{proto}, externalTrafficPolicy Local: the client's own address"
        );
    }
    // From a pod, the NodePort on the node's address leads to the Service too, and the
    // backend sees the pod.
    let o = lab.exec(
        "t/c",
        &[
            bin_dir().join("strom-lab").to_str().unwrap(),
            "connect",
            "--ip",
            NODE,
            "--port",
            "30080",
            "--protocol",
            "tcp",
            "--timeout-ms",
            "2000",
        ],
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.starts_with("t/a ") && text.contains(&lab.pod_ip("t/c")),
        "pod -> NodePort: {text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A node port no Service has stays the kernel's: nothing listens there, so it refuses.
    let o = sh(lab.cmd().args([
        "probe", "--from", "external", "--to", "node", "--port", "30085",
    ]));
    assert!(!o.status.success());
}

/// An HTTP GET from `external` to `NODE:port`: the whole answer.
fn http_get(lab: &Lab, port: u16) -> String {
    let script = format!(
        "exec 3<>/dev/tcp/{NODE}/{port} && printf 'GET / HTTP/1.1\\r\\nHost: n\\r\\n\\r\\n' >&3 && timeout 2 cat <&3"
    );
    let o = lab.exec("external", &["bash", "-c", &script]);
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn a_load_balancer_ip_leads_to_the_service_and_its_health_check_counts_local_endpoints() {
    let _g = net_lock();
    let lb = format!(
        "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32100\nstatus: {{loadBalancer: {{ingress: [{{ip: {LB_IP}}}]}}}}\n"
    );
    let m = manifest(&web("lb", "LoadBalancer", 30100, &lb));
    let lab = Lab::up(&m, &[]);
    wait_serving(&lab, "t/a");
    // The outside routes the load balancer's address to the node, as a load balancer does.
    let ext = format!("{}-ext", lab.prefix);
    let o = sh(Command::new("ip").args(["-n", &ext, "route", "add", LB_IP, "via", NODE]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        probe(&lab, &["--from", "external", "--to", "t/lb", "--lb"]),
        Ok(("t/a".to_string(), EXTERNAL.to_string())),
        "LB IP, Local: the client's own address"
    );
    let r = http_get(&lab, 32100);
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains(r#""localEndpoints":1"#),
        "one local endpoint: {r}"
    );
    // Without the pod, no local endpoint: 503, and connections are refused.
    let without = m.replace("labels: {app: web}", "labels: {app: gone}");
    let path = std::env::temp_dir().join(format!("{}-lb.yaml", lab.prefix));
    std::fs::write(&path, without).unwrap();
    let o = sh(lab.cmd().arg("apply").arg(&path));
    let _ = std::fs::remove_file(&path);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = http_get(&lab, 32100);
    assert!(
        r.starts_with("HTTP/1.1 503") && r.contains(r#""localEndpoints":0"#),
        "no local endpoint: {r}"
    );
    let e = probe(&lab, &["--from", "external", "--to", "t/lb", "--lb"]).unwrap_err();
    assert!(e.contains("refused"), "rejected, not black-holed: {e}");
}

#[test]
fn a_pods_connection_to_the_outside_comes_from_the_node() {
    let _g = net_lock();
    let lab = Lab::up(&manifest(""), &[]);
    wait_serving(&lab, "t/a");
    let ext = format!("{}-ext", lab.prefix);
    let mut responder = Command::new("ip")
        .args(["netns", "exec", &ext])
        .arg(bin_dir().join("strom-lab"))
        .args([
            "responder",
            "--name",
            "ext",
            "--tcp",
            "7000",
            "--udp",
            "7001",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let tcp = probe(
        &lab,
        &["--from", "t/c", "--to", "external", "--port", "7000"],
    );
    let udp = probe(
        &lab,
        &[
            "--from",
            "t/c",
            "--to",
            "external",
            "--port",
            "7001",
            "--protocol",
            "udp",
        ],
    );
    // Connections from outside to a pod keep their addresses, and so do the pod's answers.
    let inbound = probe(&lab, &["--from", "external", "--to", "t/a", "--port", "80"]);
    let _ = responder.kill();
    let _ = responder.wait();
    for (what, r) in [("tcp", tcp), ("udp", udp)] {
        assert_eq!(
            r,
            Ok(("ext".to_string(), NODE.to_string())),
            "{what}: masqueraded to the node's address"
        );
    }
    assert_eq!(inbound, Ok(("t/a".to_string(), EXTERNAL.to_string())));
    let flows = lab.stromctl(&["conntrack", "--addr", EXTERNAL]);
    assert!(
        flows["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["translated"].as_str().unwrap().starts_with(NODE)),
        "{flows}"
    );
}

#[test]
fn pmtu_discovery_works_through_a_node_port() {
    let _g = net_lock();
    // The pods' one MTU is 1450 (no larger one between pods).
    let lab = Lab::up(
        &manifest(&web("big", "NodePort", 30200, "")),
        &["--local-mtu", "1450"],
    );
    wait_serving(&lab, "t/a");
    let before = drops_in(&lab.stromctl(&["stats"]), &["fragmentation_needed"]);
    // 1472 bytes of UDP with DF: a 1500-byte packet, 50 more than the pods' MTU. The sender
    // gets fragmentation-needed about the packet it sent (to the NodePort) and lowers its
    // path MTU to the node.
    let send = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.setsockopt(socket.IPPROTO_IP, 10, 2)\ns.connect(('{NODE}', 30201))\ntry:\n    s.send(b'x' * 1472)\nexcept OSError:\n    pass\n"
    );
    // Sent again until the error is in (a sender retransmits what was not answered; the
    // first datagram may wait for the neighbours to be resolved).
    let t = Instant::now();
    let route = loop {
        let o = lab.exec("external", &["python3", "-c", &send]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::thread::sleep(Duration::from_millis(200));
        let o = lab.exec("external", &["ip", "route", "get", NODE]);
        let r = String::from_utf8_lossy(&o.stdout).to_string();
        if r.contains("mtu 1450") || t.elapsed() > Duration::from_secs(5) {
            break r;
        }
    };
    assert!(
        route.contains("mtu 1450"),
        "the sender learnt the path's MTU: {route}"
    );
    let after = drops_in(&lab.stromctl(&["stats"]), &["fragmentation_needed"]);
    assert!(after > before, "{before} -> {after}");
}

#[test]
fn a_routers_fragmentation_needed_about_a_masqueraded_flow_reaches_the_pod() {
    let _g = net_lock();
    let lab = Lab::up(&manifest(""), &[]);
    wait_serving(&lab, "t/a");
    // external plays a router beyond the uplink: it answers the masqueraded datagram (from
    // the node's address and an SNAT port) with fragmentation-needed, MTU 1280, quoting it.
    let router = format!(
        "import socket, struct
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff)
    s += s >> 16
    return ~s & 0xffff
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(('0.0.0.0', 9999))
u.settimeout(5)
data, (ip, port) = u.recvfrom(100)
q = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 29, 0, 0x4000, 64, 17, 0, socket.inet_aton(ip), socket.inet_aton('{EXTERNAL}'))
q += struct.pack('!HHHH', port, 9999, 9, 0)
h = struct.pack('!BBHHH', 3, 4, 0, 0, 1280) + q
h = h[:2] + struct.pack('!H', csum(h)) + h[4:]
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
r.sendto(h, (ip, 0))
print(ip, port)
"
    );
    let router = Command::new("ip")
        .args(["netns", "exec", &format!("{}-ext", lab.prefix)])
        .args(["python3", "-c", &router])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Pod c's connected UDP socket stays open while the error comes back (the kernel takes
    // a path MTU from an error only for a socket it finds).
    let send = format!(
        "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.connect(('{EXTERNAL}', 9999))\ns.send(b'x')\ntime.sleep(1.5)\n"
    );
    let o = lab.exec("t/c", &["python3", "-c", &send]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = router.wait_with_output().unwrap();
    let seen = String::from_utf8_lossy(&r.stdout).trim().to_string();
    assert!(
        seen.starts_with(&format!("{NODE} ")),
        "the router saw the node's address: {seen}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let o = lab.exec("t/c", &["ip", "route", "get", EXTERNAL]);
    let route = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        route.contains("mtu 1280"),
        "the pod learnt the path's MTU from the router's error: {route}"
    );
}

#[test]
fn a_pods_ping_to_the_outside_comes_from_the_node_and_the_nodes_own_ping_still_works() {
    let _g = net_lock();
    let lab = Lab::up(&manifest(""), &[]);
    wait_serving(&lab, "t/a");
    // The outside no longer routes the pod CIDR back to the node: only a masqueraded ping
    // gets its reply.
    let ext = format!("{}-ext", lab.prefix);
    let o = sh(Command::new("ip").args(["-n", &ext, "route", "del", "198.18.16.0/20"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ping = |from: &str| {
        lab.exec(from, &["ping", "-c", "3", "-i", "0.2", "-W", "2", EXTERNAL])
            .status
            .success()
    };
    assert!(ping("t/c"), "pod c's ping to the outside is answered");
    let flows = lab.stromctl(&["conntrack", "--addr", EXTERNAL]);
    assert!(
        flows["entries"].as_array().unwrap().iter().any(|e| {
            e["protocol"].as_str() == Some("icmp")
                && e["translated"].as_str().unwrap().starts_with(NODE)
        }),
        "the ping is tracked, masqueraded to the node's address: {flows}"
    );
    // The node's own ping: its replies (identifiers the kernel picks) stay the kernel's.
    assert!(ping("node"), "the node's own ping is answered");
    assert!(
        ping("t/a"),
        "another pod's ping, at the same time as the first's flow lives"
    );
}

#[test]
fn fragmented_datagrams_reach_a_node_port_and_a_masqueraded_flow_from_outside() {
    // The uplink's program tells a first fragment by its ports and sends the later ones,
    // which have none, where the first went (stromd gives them its translation).
    let _g = net_lock();
    let lab = Lab::up(&manifest(&web("np", "NodePort", 30070, "")), &[]);
    wait_serving(&lab, "t/a");
    // From outside to the NodePort: 3000 bytes, in three fragments.
    let send = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.settimeout(2)\ns.connect(('{NODE}', 30071))\ns.send(b'x' * 3000)\nprint(s.recv(1500).decode())\n"
    );
    let o = lab.exec("external", &["python3", "-c", &send]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.starts_with("t/a "),
        "the backend answered the datagram: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A pod's datagram to the outside, masqueraded, answered with 3000 bytes: three
    // fragments to the node's SNAT port.
    let server = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', 7002))\ns.settimeout(10)\nd, a = s.recvfrom(100)\ns.sendto(b'y' * 3000, a)\n";
    let _server = Proc(
        Command::new("ip")
            .args(["netns", "exec", &format!("{}-ext", lab.prefix)])
            .args(["python3", "-c", server])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while !String::from_utf8_lossy(
        &lab.exec("external", &["ss", "-Hlun", "sport = :7002"])
            .stdout,
    )
    .contains("7002")
    {
        assert!(t.elapsed() < Duration::from_secs(5), "the server listens");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ask = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.settimeout(2)\ns.connect(('{EXTERNAL}', 7002))\ns.send(b'hi')\nd = s.recv(65535)\nprint(len(d), d[:1].decode())\n"
    );
    let o = lab.exec("t/c", &["python3", "-c", &ask]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        out.trim(),
        "3000 y",
        "the fragmented answer reached the pod: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// ```text
///   external ══ 2 queues ══ uplink ── stromd  queue 0's socket (worker 0)
///                                             queue 1's socket (worker 1)
///                                       ├── pod t/a ─┐ app=web, one on each worker
///                                       └── pod t/b ─┘
/// ```
/// Like a multi-queue NIC: each connection comes in on the queue its hash picks, but each
/// flow is translated by one worker (a client's, under ClientIP affinity), which the answers
/// of a backend on the other worker go back through. Under `externalTrafficPolicy: Local` every connection is answered
/// from the NodePort with the client's address kept, whichever queue and backend it got; a
/// ClientIP Service keeps the client on one backend across its connections.
#[test]
fn node_ports_over_a_multi_queue_uplink_answer_every_connection_whatever_its_queue_and_backend() {
    let _g = net_lock();
    let backend = |name: &str| {
        format!(
            "---
kind: Pod
metadata: {{name: {name}, namespace: t, labels: {{app: web}}}}
spec: {{containers: [{{name: c, ports: [{{containerPort: 80}}, {{containerPort: 53, protocol: UDP}}]}}]}}
"
        )
    };
    let m = format!(
        "{}{}{}{}",
        backend("a"),
        backend("b"),
        web(
            "local",
            "NodePort",
            30090,
            "  externalTrafficPolicy: Local\n"
        ),
        web("sticky", "NodePort", 30100, "  sessionAffinity: ClientIP\n")
    );
    let lab = Lab::up(&m, &["--workers", "2", "--uplink-queues", "2"]);
    let up = lab.port_of_kind("uplink");
    assert_eq!(up["queue_workers"], serde_json::json!([0, 1]), "{up}");
    assert_ne!(
        lab.port_of("a")["worker"],
        lab.port_of("b")["worker"],
        "a backend on each worker"
    );
    lab.wait_listening("t/a", 80);
    lab.wait_listening("t/b", 80);
    // 24 connections each: both queues and both backends are used but with probability
    // 2^-23; before flows had owners, those whose backend was the other queue's worker went
    // unanswered (the answer left untranslated).
    for (proto, port) in [("tcp", "http"), ("udp", "dns")] {
        let mut who = std::collections::BTreeSet::new();
        for i in 0..24 {
            let (w, client) = probe(
                &lab,
                &["--from", "external", "--to", "t/local", "--port-name", port],
            )
            .unwrap_or_else(|e| panic!("{proto} connection {i}: {e}"));
            assert_eq!(client, EXTERNAL, "{proto}: the client's own address");
            who.insert(w);
        }
        assert_eq!(who.len(), 2, "{proto}: both backends answered: {who:?}");
    }
    let mut who = std::collections::BTreeSet::new();
    for i in 0..16 {
        let (w, _) = probe(
            &lab,
            &[
                "--from",
                "external",
                "--to",
                "t/sticky",
                "--port-name",
                "http",
            ],
        )
        .unwrap_or_else(|e| panic!("ClientIP connection {i}: {e}"));
        who.insert(w);
    }
    assert_eq!(who.len(), 1, "one backend for the client: {who:?}");
    // Where the flows are: the ClientIP Service's all on the client's owner; Local flows
    // whose backend is on another worker than their owner also there, as the owner's.
    let ct = lab.stromctl(&["conntrack"]);
    let entries = ct["entries"].as_array().expect("entries");
    let sticky: std::collections::BTreeSet<_> = entries
        .iter()
        .filter(|e| e["service"] == "t/sticky")
        .map(|e| e["worker"].as_u64())
        .collect();
    assert_eq!(sticky.len(), 1, "one owner for the client: {ct}");
    let owned: Vec<_> = entries.iter().filter(|e| e["owner"].is_u64()).collect();
    assert!(!owned.is_empty(), "answers handed back to owners: {ct}");
    for e in owned {
        assert_ne!(e["owner"], e["worker"], "{e}");
        assert_eq!(e["service"], "", "tracked for its owner only: {e}");
    }
    let redirects = lab.uplink_queue_redirects(2);
    assert!(
        redirects.iter().all(|&n| n > 0),
        "each queue carried connections: {redirects:?}"
    );
}
