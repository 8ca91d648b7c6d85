//! Frames larger than a page between the pods of a node: strom-cni gives each pod a large
//! interface MTU (65000) with its route to the node's pod subnet at it and the default route
//! at the path's MTU; stromd carries such frames as chains of buffers (multi-buffer AF_XDP)
//! on one worker and between workers, answers one too big for a smaller path with
//! fragmentation-needed, and drops by name a frame longer than the kernel sends whole.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strom_tests::{drops_in, net_lock, pod, sh, Lab};

const EXTERNAL: &str = "198.18.0.2";
/// The port the integrity check's receiver listens on in pod b.
const SINK: u16 = 7070;

fn two_pods() -> String {
    pod("t", "a", &[80], &[]) + &pod("t", "b", &[80], &[])
}

/// A receiver in `target` (a pod, or external) on TCP `port`: reads one connection (accepted
/// within 10 s) to its end and prints how many bytes came and their SHA-256.
fn receiver(lab: &Lab, target: &str, port: u16) -> std::process::Child {
    let script = format!(
        "import socket, hashlib\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('0.0.0.0', {port}))\ns.listen(1)\ns.settimeout(10)\nc, _ = s.accept()\nh = hashlib.sha256()\nn = 0\nwhile True:\n    b = c.recv(1 << 20)\n    if not b:\n        break\n    h.update(b)\n    n += len(b)\nprint(n, h.hexdigest(), flush=True)\n"
    );
    python_in(lab, target, &script)
}

/// Sends 32 MiB of pseudo-random bytes from pod a to pod b's receiver and checks that what
/// arrived is what was sent, and that the segments were large (the sender's MSS, from the
/// route to pod b at the interface's MTU).
fn transfer_intact(lab: &Lab) {
    transfer_intact_to(lab, &lab.pod_ip("t/b"), SINK);
}

/// As [`transfer_intact`], to pod b's receiver through `b:port` (its address, or a Service's).
fn transfer_intact_to(lab: &Lab, b: &str, port: u16) {
    let mut rx = receiver(lab, "t/b", SINK);
    let deadline = Instant::now() + Duration::from_secs(5);
    let send = format!(
        "import socket, hashlib, random, time\nrandom.seed(7)\ndata = random.randbytes(32 << 20)\nfor _ in range(50):\n    try:\n        s = socket.create_connection(('{b}', {port}))\n        break\n    except OSError:\n        time.sleep(0.1)\nmss = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)\ns.sendall(data)\ns.close()\nprint(len(data), hashlib.sha256(data).hexdigest(), mss)\n"
    );
    let o = lab.exec("t/a", &["python3", "-c", &send]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sent = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let mut words = sent.split_whitespace();
    let (len, sum, mss) = (
        words.next().unwrap_or_default().to_string(),
        words.next().unwrap_or_default().to_string(),
        words.next().unwrap_or_default().parse::<u32>().unwrap_or(0),
    );
    while Instant::now() < deadline && rx.try_wait().ok().flatten().is_none() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = rx.kill();
    let out = rx.wait_with_output().unwrap();
    let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        got,
        format!("{len} {sum}"),
        "what pod b received is what pod a sent ({})",
        String::from_utf8_lossy(&out.stderr)
    );
    // The kernel bounds a connection's MSS to half the largest window the peer offered so far:
    // far above one buffer's 3840 bytes either way.
    assert!(mss > 16_000, "segments spanning several buffers: MSS {mss}");
}

fn ping(lab: &Lab, from: &str, args: &[&str]) -> (bool, String) {
    let mut argv = vec!["ping"];
    argv.extend_from_slice(args);
    let o = lab.exec(from, &argv);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
    )
}

/// strom-cni's wiring: the pod's interface (and its host side) at 65000, the route to the
/// node's pod subnet at it, the default route at the path's MTU (the uplink's 1500 less 50).
/// A 64 000-byte ping crosses pod to pod, and a 32 MiB TCP transfer arrives intact in 64 KiB
/// segments: on one worker (the frames themselves) and between two (copied whole through a
/// large hand-off buffer).
#[test]
fn a_64_kib_frame_crosses_between_pods_whole_on_one_worker_and_between_workers() {
    let _g = net_lock();
    for workers in ["1", "2"] {
        let lab = Lab::up(&two_pods(), &["--workers", workers]);
        lab.wait_until_serving();
        let mtu =
            String::from_utf8_lossy(&lab.exec("t/a", &["cat", "/sys/class/net/eth0/mtu"]).stdout)
                .trim()
                .to_string();
        assert_eq!(mtu, "65000", "the pod's interface");
        let routes = String::from_utf8_lossy(&lab.exec("t/a", &["ip", "route"]).stdout).to_string();
        assert!(
            routes.contains("default via 169.254.1.1 dev eth0 proto static mtu 1450"),
            "{routes}"
        );
        assert!(
            routes.contains("198.18.16.0/20 via 169.254.1.1 dev eth0"),
            "{routes}"
        );
        let a = lab.port_of("a");
        let b = lab.port_of("b");
        let apart = a["worker"] != b["worker"];
        assert_eq!(apart, workers == "2", "{a} {b}");
        let b_ip = lab.pod_ip("t/b");
        let (ok, text) = ping(
            &lab,
            "t/a",
            &[
                "-c", "3", "-i", "0.2", "-M", "do", "-s", "64000", "-W", "2", &b_ip,
            ],
        );
        assert!(
            ok && text.contains("64008 bytes from"),
            "{workers} workers: {text}"
        );
        transfer_intact(&lab);
        no_chain_drops(&lab);
    }
}

/// The ClusterIP of the Service in front of pod b's integrity receiver.
const SINK_VIP: &str = "198.19.7.7";

/// A pod reaches a Service over its route to the Service CIDR at the interface's MTU
/// (strom-cni's `serviceCidrs`): with the backend on the node, TCP through the Service's DNAT
/// carries segments spanning many buffers and arrives intact, on one worker and between two.
#[test]
fn tcp_through_a_service_to_a_pod_of_the_node_carries_large_segments() {
    let _g = net_lock();
    let sink = format!(
        "---\nkind: Service\nmetadata: {{ name: sink, namespace: t }}\nspec: {{ clusterIP: {SINK_VIP}, selector: {{ app: b }}, ports: [ {{ name: sink, port: {SINK}, targetPort: {SINK} }} ] }}\n"
    );
    for workers in ["1", "2"] {
        let lab = Lab::up(
            &(two_pods_behind_node_ports() + &sink),
            &["--workers", workers],
        );
        lab.wait_until_serving();
        let routes = String::from_utf8_lossy(&lab.exec("t/a", &["ip", "route"]).stdout).to_string();
        assert!(
            routes.contains("198.19.0.0/16 via 169.254.1.1 dev eth0"),
            "the Service CIDR at the interface's MTU: {routes}"
        );
        transfer_intact_to(&lab, SINK_VIP, SINK);
        let svc = lab.stromctl(&["services"]);
        let port = svc["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["key"] == "t/sink:sink")
            .unwrap_or_else(|| panic!("no t/sink:sink: {svc}"));
        assert!(
            port["flows"].as_u64() >= Some(1),
            "through the Service: {port}"
        );
        no_chain_drops(&lab);
    }
}

/// No frame of a chain was dropped: broken, too long, refused for want of multi-buffer, or
/// for a full transmit ring.
fn no_chain_drops(lab: &Lab) {
    let stats = lab.stromctl(&["stats"]);
    assert_eq!(
        drops_in(
            &stats,
            &[
                "chain_broken",
                "too_many_buffers",
                "no_multi_buffer",
                "tx_full"
            ]
        ),
        0,
        "{stats}"
    );
}

/// A 9000-byte datagram with DF from a pod toward a 1500-byte path (outside, through the
/// uplink: masqueraded) gets fragmentation-needed with the MTU, translated back to the pod;
/// the pod's path-MTU discovery then keeps 1500 for that destination (a second such send
/// fails locally), and the datagram sent again without DF leaves fragmented by the pod and
/// arrives whole outside.
#[test]
fn a_9000_byte_packet_toward_a_1500_byte_path_gets_fragmentation_needed_and_pmtu_discovery_works() {
    let _g = net_lock();
    let lab = Lab::up(&two_pods(), &[]);
    lab.wait_until_serving();
    // Past the pod's default route (1450): stromd tells the pod the path's real MTU.
    let o = lab.exec(
        "t/a",
        &[
            "ip",
            "route",
            "change",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
            "mtu",
            "9000",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let receiver = Command::new("ip")
        .args(["netns", "exec", &format!("{}-ext", lab.prefix)])
        .args([
            "python3",
            "-c",
            "import socket\nu = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nu.bind(('0.0.0.0', 9999))\nu.settimeout(10)\nprint(len(u.recv(65535)), flush=True)\n",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = lab.drops("fragmentation_needed");
    // IP_MTU_DISCOVER (10): DO (2) sets DF and never fragments; WANT (1) fragments to the
    // path MTU it knows (the first send after the error may report it again: retried).
    let send = format!(
        "import socket, time, errno\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.setsockopt(socket.IPPROTO_IP, 10, 2)\ns.connect(('{EXTERNAL}', 9999))\nlearnt = False\nfor _ in range(20):\n    try:\n        s.send(b'x' * 8972)\n    except OSError as e:\n        if e.errno == errno.EMSGSIZE:\n            learnt = True\n            break\n    time.sleep(0.2)\nprint('learnt' if learnt else 'not learnt', s.getsockopt(socket.IPPROTO_IP, 14))\ns.setsockopt(socket.IPPROTO_IP, 10, 1)\nfor _ in range(3):\n    try:\n        s.send(b'x' * 8972)\n        break\n    except OSError:\n        pass\n"
    );
    let o = lab.exec("t/a", &["python3", "-c", &send]);
    let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(out, "learnt 1500", "the pod's socket learnt the path MTU");
    assert!(lab.drops("fragmentation_needed") > before);
    let route = String::from_utf8_lossy(&lab.exec("t/a", &["ip", "route", "get", EXTERNAL]).stdout)
        .to_string();
    assert!(route.contains("mtu 1500"), "cached path MTU: {route}");
    // A ping with DF past the path's MTU, the learnt MTU forgotten: stromd's error about the
    // masqueraded echo comes back to the pod quoting the echo as the pod sent it (its
    // identifier), so the pod's ping reports it and the pod learns the MTU again.
    let o = lab.exec("t/a", &["ip", "route", "flush", "cache"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, text) = ping(
        &lab,
        "t/a",
        &["-c", "1", "-M", "do", "-s", "8972", "-W", "2", EXTERNAL],
    );
    assert!(text.contains("mtu = 1500"), "the pod's ping heard: {text}");
    let r = receiver.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.stdout).trim(),
        "8972",
        "outside received the datagram whole: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    // Pod to pod the interface's MTU still holds.
    let b = lab.pod_ip("t/b");
    let (ok, text) = ping(
        &lab,
        "t/a",
        &["-c", "1", "-M", "do", "-s", "8972", "-W", "2", &b],
    );
    assert!(ok, "{text}");
}

/// The largest frame a veth passes (an IPv4 packet of 65 535 bytes: pods wired at MTU 65535)
/// spans 18 buffers, the longest chain the kernel sends as one packet: it crosses whole. (A
/// longer chain cannot come from a veth, which drops a frame beyond its MTU: the worker's
/// `too_many_buffers` drop of one is not reachable here, and only the reading of chains,
/// `xsk::packet_len`, has a unit test.)
#[test]
fn the_largest_ipv4_packet_crosses_as_the_longest_chain() {
    let _g = net_lock();
    let lab = Lab::up(&two_pods(), &["--local-mtu", "65535"]);
    lab.wait_until_serving();
    let b = lab.pod_ip("t/b");
    // 65 507 bytes of ICMP payload: 65 535 bytes of IP, 65 549 of frame, 18 buffers.
    let (ok, text) = ping(
        &lab,
        "t/a",
        &[
            "-c", "2", "-i", "0.3", "-M", "do", "-s", "65507", "-W", "2", &b,
        ],
    );
    assert!(ok && text.contains("65515 bytes from"), "{text}");
    let stats = lab.stromctl(&["stats"]);
    assert_eq!(
        drops_in(&stats, &["too_many_buffers", "chain_broken", "tx_full"]),
        0,
        "{stats}"
    );
}

/// The checksum errors a namespace's TCP and UDP counted (`/proc/net/snmp`'s InCsumErrors).
fn csum_errors(lab: &Lab, target: &str) -> u64 {
    let o = lab.exec(target, &["cat", "/proc/net/snmp"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    let (mut n, mut read) = (0, 0);
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        if !(names.starts_with("Tcp:") || names.starts_with("Udp:")) {
            continue;
        }
        for (k, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if k == "InCsumErrors" {
                n += v.parse::<u64>().expect("a count");
                read += 1;
            }
        }
    }
    assert_eq!(read, 2, "TCP's and UDP's InCsumErrors in {target}: {text}");
    n
}

/// Whether `pod`'s stack leaves the UDP checksum of what it sends partial (the
/// pseudo-header's sum, for the device to finish): one datagram to `to_ip`, read back from
/// the pod's own interface as it leaves.
fn sends_partial_checksums(lab: &Lab, pod: &str, to_ip: &str) -> bool {
    let script = format!(
        "import socket, struct\nr = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))\nr.bind(('eth0', 0))\nr.settimeout(5)\nu = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nu.sendto(b'p' * 200, ('{to_ip}', 9997))\nwhile True:\n    f = r.recv(65535)\n    if f[12:14] != b'\\x08\\x00' or f[23] != 17:\n        continue\n    ihl = (f[14] & 15) * 4\n    udp = f[14 + ihl:]\n    if struct.unpack('!H', udp[2:4])[0] != 9997:\n        continue\n    s = sum(struct.unpack('!4H', f[26:34])) + 17 + struct.unpack('!H', udp[4:6])[0]\n    while s > 0xffff:\n        s = (s & 0xffff) + (s >> 16)\n    print('partial' if struct.unpack('!H', udp[6:8])[0] == s else 'complete')\n    break\n"
    );
    let o = lab.exec(pod, &["python3", "-c", &script]);
    let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(
        o.status.success() && (out == "partial" || out == "complete"),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out == "partial"
}

/// A UDP datagram of `size` bytes from `from` to `to`'s port 9998 arrives whole.
fn udp_arrives(lab: &Lab, from: &str, to: &str, to_ip: &str, size: usize) {
    let receiver = python_in(
        lab,
        to,
        "import socket\nu = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nu.bind(('0.0.0.0', 9998))\nu.settimeout(5)\nprint(len(u.recv(65535)), flush=True)\n",
    );
    std::thread::sleep(Duration::from_millis(300));
    let send = format!(
        "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor _ in range(3):\n    s.sendto(b'y' * {size}, ('{to_ip}', 9998))\n    time.sleep(0.1)\n"
    );
    let o = lab.exec(from, &["python3", "-c", &send]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = receiver.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.stdout).trim(),
        size.to_string(),
        "{from} → {to}: {}",
        String::from_utf8_lossy(&r.stderr)
    );
}

/// Starts `script` with python3 in `target`'s namespace (a pod, or external), its output
/// piped.
fn python_in(lab: &Lab, target: &str, script: &str) -> std::process::Child {
    let ns = if target == "external" {
        format!("{}-ext", lab.prefix)
    } else {
        lab.pod_ns(target)
    };
    Command::new("ip")
        .args(["netns", "exec", &ns, "python3", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 in the namespace")
}

/// Pods a and b (labels app=a, app=b), each behind a NodePort Service of its own (30081,
/// 30082).
fn two_pods_behind_node_ports() -> String {
    let mut m = String::new();
    for (name, np) in [("a", 30081), ("b", 30082)] {
        m += &format!(
            "---\nkind: Pod\nmetadata: {{ name: {name}, namespace: t, labels: {{ app: {name} }} }}\nspec: {{ containers: [ {{ name: c, ports: [ {{ containerPort: 80 }} ] }} ] }}\n---\nkind: Service\nmetadata: {{ name: to-{name}, namespace: t }}\nspec: {{ type: NodePort, selector: {{ app: {name} }}, ports: [ {{ name: http, port: 80, nodePort: {np} }} ] }}\n"
        );
    }
    m
}

/// A pod that turns its transmit checksum offload on sends partial checksums (the
/// pseudo-header's sum only): stromd has the kernel finish them toward another pod (transmit
/// metadata, on one worker and between two) and finishes them itself toward the uplink, also
/// for an answer to a NodePort client that another worker translates (with two workers, one
/// of the pods is not on the uplink's worker). TCP arrives intact both ways and UDP whole, in
/// one buffer and in a chain, with no checksum error counted by any receiver and no descriptor
/// refused by the kernel; frames to pods went with checksum offload.
#[test]
fn a_pod_with_checksum_offload_on_is_served_toward_pods_and_outside() {
    let _g = net_lock();
    for workers in ["1", "2"] {
        let lab = Lab::up(&two_pods_behind_node_ports(), &["--workers", workers]);
        lab.wait_until_serving();
        for p in ["t/a", "t/b"] {
            let o = lab.exec(p, &["ethtool", "-K", "eth0", "tx", "on"]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let k = String::from_utf8_lossy(&lab.exec(p, &["ethtool", "-k", "eth0"]).stdout)
                .to_string();
            assert!(k.contains("tx-checksum-ip-generic: on"), "{k}");
        }
        let b = lab.pod_ip("t/b");
        let a = lab.pod_ip("t/a");
        // What this test is about: the pods' stacks now leave their checksums to the device.
        assert!(sends_partial_checksums(&lab, "t/a", &b));
        assert!(sends_partial_checksums(&lab, "t/b", &a));
        if workers == "2" {
            // One pod's answers to NodePort clients go through the other worker's SNAT port.
            assert_ne!(lab.port_of("a")["worker"], lab.port_of("b")["worker"]);
        }
        transfer_intact(&lab);
        udp_arrives(&lab, "t/a", "t/b", &b, 1000);
        udp_arrives(&lab, "t/a", "t/b", &b, 30_000);
        udp_arrives(&lab, "t/b", "t/a", &a, 30_000);
        // Outside through the uplink (masqueraded): completed by stromd.
        udp_arrives(&lab, "t/a", "external", EXTERNAL, 1400);
        tcp_to_external_intact(&lab);
        for pod in ["a", "b"] {
            let o = sh(lab.cmd().args([
                "probe",
                "--from",
                "external",
                "--to",
                &format!("t/to-{pod}"),
                "--port-name",
                "http",
            ]));
            let out = String::from_utf8_lossy(&o.stdout).to_string();
            assert!(
                o.status.success() && out.contains(&format!("answered by t/{pod}")),
                "{workers} workers, external → NodePort → pod {pod}: {out}{}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        for target in ["t/a", "t/b", "external"] {
            assert_eq!(csum_errors(&lab, target), 0, "{workers} workers: {target}");
        }
        let stats = lab.stromctl(&["stats"]);
        let offloaded: u64 = stats["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(|w| w["counters"]["csum_offloaded"].as_u64().unwrap_or(0))
            .sum();
        // 32 MiB in segments of at most 64 000 bytes is more than 500 of them.
        assert!(
            offloaded > 500,
            "frames to pods with checksum offload: {offloaded}"
        );
        assert_eq!(
            drops_in(&stats, &["xsk_invalid_desc", "tx_full", "chain_broken"]),
            0,
            "{stats}"
        );
    }
}

/// 4 MiB over TCP from pod a to `external` (through the uplink, masqueraded) arrive intact.
fn tcp_to_external_intact(lab: &Lab) {
    let sink = receiver(lab, "external", 7071);
    std::thread::sleep(Duration::from_millis(300));
    let send = format!(
        "import socket, hashlib, random\nrandom.seed(9)\ndata = random.randbytes(4 << 20)\ns = socket.create_connection(('{EXTERNAL}', 7071), timeout=10)\ns.sendall(data)\ns.close()\nprint(len(data), hashlib.sha256(data).hexdigest())\n"
    );
    let o = lab.exec("t/a", &["python3", "-c", &send]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = sink.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.stdout).trim(),
        String::from_utf8_lossy(&o.stdout).trim(),
        "outside received what pod a sent: {}",
        String::from_utf8_lossy(&r.stderr)
    );
}

/// Generic-mode XDP (`pod_xdp = "generic"`) with strom-cni's settings (the pods' offloads
/// off): the pods' programs are attached in skb mode, and what native mode carries crosses
/// too: a 64 000-byte ping and a 32 MiB transfer between pods on two workers, UDP and TCP to
/// outside.
#[test]
fn generic_mode_xdp_carries_what_native_mode_does() {
    let _g = net_lock();
    let lab = Lab::up(&two_pods(), &["--workers", "2", "--pod-xdp", "generic"]);
    lab.wait_until_serving();
    let pods = lab.pod_ports();
    assert_eq!(pods.len(), 2);
    for p in pods {
        assert_eq!(p["xdp_mode"], "generic", "{p}");
    }
    assert_eq!(lab.port_of_kind("uplink")["xdp_mode"], "native");
    let b = lab.pod_ip("t/b");
    let (ok, text) = ping(
        &lab,
        "t/a",
        &[
            "-c", "2", "-i", "0.2", "-M", "do", "-s", "64000", "-W", "2", &b,
        ],
    );
    assert!(ok && text.contains("64008 bytes from"), "{text}");
    transfer_intact(&lab);
    udp_arrives(&lab, "t/a", "external", EXTERNAL, 1400);
    tcp_to_external_intact(&lab);
    let stats = lab.stromctl(&["stats"]);
    assert_eq!(
        drops_in(&stats, &["xsk_invalid_desc", "tx_full", "chain_broken"]),
        0,
        "{stats}"
    );
}
