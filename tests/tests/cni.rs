//! strom-cni invoked exactly as a container runtime does (CNI_* environment, config on stdin),
//! against a real stromd on a lab node with no pods.
//!
//! ```text
//!   runtime (this test) ── exec ──▶ strom-cni ──▶ veth st…(node) ═ eth0 (pod netns)
//!                                        └──── unix socket ──▶ stromd (node netns)
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strom_tests::{bin_dir, link_exists, net_lock, sh, Lab};

struct Call<'a> {
    lab: &'a Lab,
    conf: Value,
    /// Raw stdin instead of `conf` (for undecodable input).
    stdin: Option<Vec<u8>>,
}

fn conf(lab: &Lab, version: &str) -> Value {
    json!({
        "cniVersion": version,
        "name": "strom-test",
        "type": "strom-cni",
        "socket": lab.socket().display().to_string(),
        "logFile": lab.dir.join("cni-test.log").display().to_string(),
        "ipam": {"type": "strom", "subnet": "198.18.16.0/24", "dataDir": lab.dir.join("ipam-test").display().to_string()},
        // The pod subnet again: routed once.
        "serviceCidrs": ["198.19.0.0/16", "198.18.16.0/24"],
        "dns": {"nameservers": ["198.18.0.53"]}
    })
}

impl<'a> Call<'a> {
    fn new(lab: &'a Lab, conf: Value) -> Self {
        Call {
            lab,
            conf,
            stdin: None,
        }
    }

    /// Runs strom-cni in the node namespace. Returns (exit ok, stdout JSON).
    fn run(
        &self,
        command: &str,
        container: &str,
        netns: &str,
        env: &[(&str, &str)],
    ) -> (bool, Value) {
        let mut c = self.lab.cni(command, container, netns, "p");
        c.env("CNI_PATH", format!("{}:/usr/lib/cni", bin_dir().display()));
        for (k, v) in env {
            c.env(k, v);
        }
        let conf = self.conf.to_string();
        let out = feed(
            c.stderr(Stdio::piped()),
            self.stdin.as_deref().unwrap_or(conf.as_bytes()),
        );
        let v = if out.stdout.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!(
                    "stdout is not JSON ({e}): {}",
                    String::from_utf8_lossy(&out.stdout)
                )
            })
        };
        (out.status.success(), v)
    }
}

/// Runs `c` with `input` on its stdin, as a runtime hands a plugin its config; its output.
fn feed(c: &mut Command, input: &[u8]) -> std::process::Output {
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn netns(lab: &Lab, name: &str) -> String {
    let ns = format!("{}-{name}", lab.prefix);
    assert!(sh(Command::new("ip").args(["netns", "add", &ns]))
        .status
        .success());
    format!("/run/netns/{ns}")
}

fn host_links(lab: &Lab) -> Vec<String> {
    let o =
        sh(Command::new("ip").args(["-n", &lab.node_ns(), "-j", "link", "show", "type", "veth"]));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .filter(|n| n.starts_with("st"))
        .collect()
}

fn leases(lab: &Lab) -> usize {
    std::fs::read(lab.dir.join("ipam-test/strom-test/leases.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["leases"].as_object().map(|o| o.len()))
        .unwrap_or(0)
}

fn port_count(lab: &Lab) -> usize {
    lab.pod_ports().len()
}

/// A 1.0.0 config whose stromd socket nobody listens on.
fn conf_without_stromd(lab: &Lab) -> Value {
    let mut c = conf(lab, "1.0.0");
    c["socket"] = json!(lab.dir.join("nobody-listens.sock").display().to_string());
    c
}

/// Does the pod namespace at `netns` (a /run/netns path) have an eth0?
fn pod_has_eth0(netns: &str) -> bool {
    link_exists(netns.trim_start_matches("/run/netns/"), "eth0")
}

fn nothing_left(lab: &Lab) {
    assert!(
        host_links(lab).is_empty(),
        "no veth left: {:?}",
        host_links(lab)
    );
    assert_eq!(leases(lab), 0, "no lease left");
    assert_eq!(port_count(lab), 0, "no stromd port left");
}

#[test]
fn add_check_del_in_every_supported_version() {
    let _g = net_lock();
    let lab = Lab::up("", &[]);
    for (i, version) in ["0.4.0", "1.0.0", "1.1.0"].iter().enumerate() {
        let call = Call::new(&lab, conf(&lab, version));
        let ns = netns(&lab, &format!("v{i}"));
        let id = format!("c{i}");
        let (ok, r) = call.run("ADD", &id, &ns, &[]);
        assert!(ok, "ADD {version}: {r}");
        assert_eq!(r["cniVersion"], *version);
        assert_eq!(r["interfaces"].as_array().unwrap().len(), 2);
        assert_eq!(r["interfaces"][1]["sandbox"], ns.as_str());
        assert_eq!(r["interfaces"][1]["name"], "eth0");
        assert_eq!(r["ips"][0]["interface"], 1);
        assert_eq!(r["ips"][0]["gateway"], "169.254.1.1");
        assert!(r["ips"][0]["address"].as_str().unwrap().ends_with("/32"));
        assert_eq!(
            r["ips"][0].get("version").is_some(),
            version.starts_with("0."),
            "{r}"
        );
        let dsts: Vec<&str> = r["routes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["dst"].as_str().unwrap())
            .collect();
        assert_eq!(dsts, ["0.0.0.0/0", "198.18.16.0/24", "198.19.0.0/16"]);
        // The Service CIDR at the interface's MTU, the default route at the path's.
        let route = |to: &str| {
            let out = Command::new("ip")
                .args(["netns", "exec", ns.trim_start_matches("/run/netns/")])
                .args(["ip", "route", "get", to])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert!(
            !route("198.19.3.4").contains("mtu"),
            "{}",
            route("198.19.3.4")
        );
        assert!(
            route("198.20.0.1").contains("mtu 1450"),
            "{}",
            route("198.20.0.1")
        );
        assert_eq!(r["dns"]["nameservers"][0], "198.18.0.53");
        assert_eq!(port_count(&lab), 1);
        let mut check = Call::new(&lab, conf(&lab, version));
        check.conf["prevResult"] = r.clone();
        let (ok, out) = check.run("CHECK", &id, &ns, &[]);
        assert!(ok, "CHECK {version}: {out}");
        let mut del = Call::new(&lab, conf(&lab, version));
        del.conf["prevResult"] = r;
        assert!(del.run("DEL", &id, &ns, &[]).0);
        nothing_left(&lab);
        assert!(!pod_has_eth0(&ns), "no eth0 left in the pod after DEL");
        assert!(call.run("DEL", &id, &ns, &[]).0, "DEL again succeeds");
        assert!(
            call.run("DEL", &id, "", &[]).0,
            "DEL without a netns succeeds"
        );
    }
}

#[test]
fn version_and_error_codes_follow_the_spec() {
    let _g = net_lock();
    let lab = Lab::up("", &[]);
    let ns = netns(&lab, "e");
    let call =
        |conf: Value, env: &[(&str, &str)]| Call::new(&lab, conf).run("ADD", "cerr", &ns, env);
    let v = Call::new(&lab, json!({"cniVersion": "1.0.0"}))
        .run("VERSION", "", "", &[])
        .1;
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    let mut c = conf(&lab, "0.2.0");
    assert_eq!(call(c.clone(), &[]).1["code"], 1, "incompatible version");
    c["cniVersion"] = json!("1.0.0");
    c["mtu"] = json!("big");
    assert_eq!(call(c, &[]).1["code"], 7, "invalid config");
    let mut c = conf(&lab, "1.0.0");
    c["ipam"] = json!({"type": "strom"});
    assert_eq!(call(c, &[]).1["code"], 7, "ipam without subnet");
    let mut c = conf(&lab, "1.0.0");
    c["ipam"] = json!({"type": "no-such-ipam"});
    assert_eq!(call(c, &[]).1["code"], 7, "unknown ipam plugin");
    assert_eq!(
        call(conf(&lab, "1.0.0"), &[("CNI_CONTAINERID", "")]).1["code"],
        4,
        "missing container id"
    );
    assert_eq!(
        call(
            conf(&lab, "1.0.0"),
            &[("CNI_NETNS", "/run/netns/none-such")]
        )
        .1["code"],
        4,
        "netns missing"
    );
    assert_eq!(
        call(conf(&lab, "1.0.0"), &[("CNI_ARGS", "IP=10.0.0.1")]).1["code"],
        100,
        "requested IP outside the subnet"
    );
    let (ok, e) = Call::new(&lab, json!(null)).run("ADD", "cerr", &ns, &[]);
    assert!(!ok);
    assert_eq!(
        e["code"], 1,
        "a config that is not an object has no version we support"
    );
    let garbage = Call {
        lab: &lab,
        conf: json!(null),
        stdin: Some(b"{not json".to_vec()),
    };
    assert_eq!(
        garbage.run("ADD", "cerr", &ns, &[]).1["code"],
        6,
        "undecodable config"
    );
    assert_eq!(
        call(conf(&lab, "1.0.0"), &[("CNI_ARGS", "IP=fd00::5")]).1["code"],
        2,
        "an IPv6 address is a field we do not support yet"
    );
    let any = Call::new(&lab, conf(&lab, "1.0.0"));
    assert_eq!(
        any.run("FROB", "cerr", &ns, &[]).1["code"],
        4,
        "unknown CNI_COMMAND"
    );
    let mut check = conf(&lab, "1.0.0");
    check["prevResult"] = json!({"cniVersion": "1.0.0", "ips": []});
    let (ok, e) = Call::new(&lab, check).run("CHECK", "never-added", &ns, &[]);
    assert!(!ok);
    assert_eq!(e["code"], 3, "CHECK of an unknown container: {e}");
    nothing_left(&lab);
}

#[test]
fn stromd_down_gives_try_again_later_and_leaves_nothing() {
    let _g = net_lock();
    let lab = Lab::up("", &[]);
    let ns = netns(&lab, "d");
    let call = Call::new(&lab, conf_without_stromd(&lab));
    let (ok, e) = call.run("ADD", "cdown", &ns, &[]);
    assert!(!ok);
    assert_eq!(e["code"], 11, "{e}");
    nothing_left(&lab);
    assert!(!pod_has_eth0(&ns), "no eth0 left in the pod");
    let (ok, e) = call.run("STATUS", "", "", &[]);
    assert!(!ok);
    assert_eq!(e["code"], 50);
    assert!(
        Call::new(&lab, conf(&lab, "1.1.0"))
            .run("STATUS", "", "", &[])
            .0,
        "STATUS with stromd up"
    );
}

/// DEL when stromd cannot be reached (it normally deletes the veth): the plugin deletes the
/// veth itself and releases the address. The registration stromd still holds goes with the
/// next DEL that reaches it.
#[test]
fn del_without_stromd_deletes_the_veth_itself_and_a_later_del_unregisters() {
    let _g = net_lock();
    let lab = Lab::up("", &[]);
    let ns = netns(&lab, "u");
    let call = Call::new(&lab, conf(&lab, "1.0.0"));
    let (ok, r) = call.run("ADD", "cunreach", &ns, &[]);
    assert!(ok, "ADD: {r}");
    assert_eq!(
        (host_links(&lab).len(), leases(&lab), port_count(&lab)),
        (1, 1, 1)
    );
    let (ok, r) = Call::new(&lab, conf_without_stromd(&lab)).run("DEL", "cunreach", &ns, &[]);
    assert!(ok, "DEL without stromd: {r}");
    assert!(host_links(&lab).is_empty(), "{:?}", host_links(&lab));
    assert_eq!(leases(&lab), 0, "the address is released");
    assert_eq!(port_count(&lab), 1, "stromd was not told");
    let (ok, r) = call.run("DEL", "cunreach", &ns, &[]);
    assert!(ok, "DEL with stromd: {r}");
    nothing_left(&lab);
}

#[test]
fn check_names_what_differs() {
    let _g = net_lock();
    let lab = Lab::up("", &[]);
    let ns = netns(&lab, "k");
    let call = Call::new(&lab, conf(&lab, "1.0.0"));
    let (ok, r) = call.run("ADD", "ck", &ns, &[]);
    assert!(ok);
    sh(Command::new("ip").args([
        "netns",
        "exec",
        ns.trim_start_matches("/run/netns/"),
        "ip",
        "link",
        "set",
        "eth0",
        "mtu",
        "1300",
    ]));
    let mut check = Call::new(&lab, conf(&lab, "1.0.0"));
    check.conf["prevResult"] = r;
    let (ok, e) = check.run("CHECK", "ck", &ns, &[]);
    assert!(!ok);
    assert_eq!(e["code"], 103);
    assert!(e["details"].as_str().unwrap().contains("MTU 1300"), "{e}");
    assert!(call.run("DEL", "ck", &ns, &[]).0);
    nothing_left(&lab);
}

#[test]
fn requested_addresses_are_honoured() {
    let _g = net_lock();
    let lab = Lab::up("", &[]);
    let call = Call::new(&lab, conf(&lab, "1.0.0"));
    let ns1 = netns(&lab, "r1");
    let (ok, r) = call.run(
        "ADD",
        "r1",
        &ns1,
        &[("CNI_ARGS", "IgnoreUnknown=1;IP=198.18.16.77")],
    );
    assert!(ok, "{r}");
    assert_eq!(r["ips"][0]["address"], "198.18.16.77/32");
    let mut rc = conf(&lab, "1.0.0");
    rc["runtimeConfig"] = json!({"ips": ["198.18.16.88/24"]});
    let ns2 = netns(&lab, "r2");
    let (ok, r) = Call::new(&lab, rc).run("ADD", "r2", &ns2, &[]);
    assert!(ok, "{r}");
    assert_eq!(r["ips"][0]["address"], "198.18.16.88/32");
    let ns3 = netns(&lab, "r3");
    let (ok, e) = call.run("ADD", "r3", &ns3, &[("CNI_ARGS", "IP=198.18.16.77")]);
    assert!(!ok);
    assert_eq!(e["code"], 100, "taken");
    for (id, ns) in [("r1", &ns1), ("r2", &ns2), ("r3", &ns3)] {
        assert!(call.run("DEL", id, ns, &[]).0);
    }
    nothing_left(&lab);
}

#[test]
fn gc_removes_what_the_runtime_no_longer_knows() {
    let _g = net_lock();
    let lab = Lab::up("", &[]);
    let call = Call::new(&lab, conf(&lab, "1.1.0"));
    let keep = netns(&lab, "g1");
    let leak = netns(&lab, "g2");
    assert!(call.run("ADD", "keep", &keep, &[]).0);
    assert!(call.run("ADD", "leak", &leak, &[]).0);
    let mut gc = conf(&lab, "1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    assert!(Call::new(&lab, gc).run("GC", "", "", &[]).0);
    assert_eq!(host_links(&lab).len(), 1);
    assert_eq!(leases(&lab), 1);
    assert_eq!(port_count(&lab), 1);
    let mut gc = conf(&lab, "1.1.0");
    gc["cni.dev/attachments"] = json!([]);
    assert!(
        Call::new(&lab, gc).run("GC", "", "", &[]).0,
        "the older key works too"
    );
    nothing_left(&lab);
}

#[test]
fn fifty_parallel_adds_get_distinct_addresses_and_dels_leave_nothing() {
    let _g = net_lock();
    let lab = Lab::up("", &[]);
    let nss: Vec<String> = (0..50).map(|i| netns(&lab, &format!("p{i}"))).collect();
    let lab = &lab;
    let results: Vec<(bool, Value)> = std::thread::scope(|s| {
        let hs: Vec<_> = nss
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                s.spawn(move || {
                    Call::new(lab, conf(lab, "1.0.0")).run("ADD", &format!("par{i}"), ns, &[])
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut addrs: Vec<String> = results
        .iter()
        .map(|(ok, r)| {
            assert!(ok, "{r}");
            r["ips"][0]["address"].as_str().unwrap().to_string()
        })
        .collect();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), 50, "distinct addresses");
    assert_eq!(port_count(lab), 50);
    std::thread::scope(|s| {
        for (i, ns) in nss.iter().enumerate() {
            s.spawn(move || {
                assert!(
                    Call::new(lab, conf(lab, "1.0.0"))
                        .run("DEL", &format!("par{i}"), ns, &[])
                        .0
                )
            });
        }
    });
    nothing_left(lab);
}

#[test]
fn killed_in_the_middle_of_add_then_del_leaves_nothing() {
    let _g = net_lock();
    let lab = Lab::up("", &[]);
    for (i, delay_ms) in [2u64, 6, 10, 15, 25].iter().enumerate() {
        let ns = netns(&lab, &format!("k{i}"));
        let id = format!("kill{i}");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &lab.node_ns()])
            .arg(bin_dir().join("strom-cni"))
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", &id)
            .env("CNI_NETNS", &ns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf(&lab, "1.0.0").to_string().as_bytes())
            .unwrap();
        std::thread::sleep(Duration::from_millis(*delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        // A runtime's DEL comes later than the helpers (ip, nsenter) the killed plugin had
        // already started; let them finish as they would before a real DEL.
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            Call::new(&lab, conf(&lab, "1.0.0"))
                .run("DEL", &id, &ns, &[])
                .0
        );
        nothing_left(&lab);
    }
}

#[test]
fn host_local_ipam_is_delegated_to() {
    let _g = net_lock();
    assert!(
        std::path::Path::new("/usr/lib/cni/host-local").is_file(),
        "containernetworking-plugins is installed by the setup script"
    );
    let lab = Lab::up("", &[]);
    let mut c = conf(&lab, "1.0.0");
    c["ipam"] = json!({"type": "host-local", "ranges": [[{"subnet": "198.18.16.0/24", "rangeStart": "198.18.16.200", "rangeEnd": "198.18.16.210"}]], "dataDir": lab.dir.join("host-local").display().to_string()});
    let call = Call::new(&lab, c);
    let ns = netns(&lab, "hl");
    let (ok, r) = call.run("ADD", "hl", &ns, &[]);
    assert!(ok, "{r}");
    assert_eq!(r["ips"][0]["address"], "198.18.16.200/32");
    let mut check = Call::new(&lab, call.conf.clone());
    check.conf["prevResult"] = r.clone();
    let (ok, out) = check.run("CHECK", "hl", &ns, &[]);
    assert!(ok, "CHECK passes through to host-local: {out}");
    check.conf["prevResult"]["ips"][0]["address"] = json!("198.18.16.201/32");
    let (ok, out) = check.run("CHECK", "hl", &ns, &[]);
    assert!(!ok, "an address the pod does not have fails CHECK: {out}");
    assert!(call.run("DEL", "hl", &ns, &[]).0);
    assert!(host_links(&lab).is_empty());
    let left: Vec<_> = std::fs::read_dir(lab.dir.join("host-local/strom-test"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("198."))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "host-local released its lease: {left:?}");
}

#[test]
fn install_step_puts_binary_and_conflist_in_place() {
    let dir = std::env::temp_dir().join(format!("strom-install-{}", std::process::id()));
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let o = sh(Command::new("bash")
        .arg(root.join("scripts/install-cni"))
        .env("CNI_BIN_DIR", dir.join("bin"))
        .env("CNI_CONF_DIR", dir.join("net.d"))
        .env("STROM_CNI", bin_dir().join("strom-cni")));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let list: Value =
        serde_json::from_slice(&std::fs::read(dir.join("net.d/10-strom.conflist")).unwrap())
            .unwrap();
    assert_eq!(list["cniVersion"], "1.0.0");
    assert_eq!(list["plugins"][0]["type"], "strom-cni");
    let out = feed(
        Command::new(dir.join("bin/strom-cni")).env("CNI_COMMAND", "VERSION"),
        br#"{"cniVersion":"1.0.0"}"#,
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["supportedVersions"]
        .as_array()
        .unwrap()
        .contains(&json!("1.0.0")));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// How a fake stromd treats every connection it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fake {
    /// Reads the request and closes without answering: stromd died mid-request.
    Closes,
    /// Closes at once, the request unread: the caller sees the connection reset.
    Resets,
    /// Holds the connection and never answers: stromd busy past the caller's deadline.
    Silent,
    /// Sends half an answer line and closes: stromd died while answering.
    CutShort,
    /// Answers every request with an error: a real refusal.
    Refuses,
    /// Answers every request with a status that says not ready.
    NotReady,
}

/// What `Fake::NotReady` gives as its reason.
const NOT_READY_REASON: &str = "uplink zz9 has no carrier";

/// A stand-in for stromd on a Unix socket of the test's own: it accepts on a thread until
/// dropped, and treats each connection as its `Fake` says.
struct FakeStromd {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeStromd {
    fn start(path: &Path, mode: Fake) -> FakeStromd {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            // Silent connections stay open until the fake goes.
            let mut held = Vec::new();
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut s) = conn else { continue };
                if mode == Fake::Resets {
                    continue;
                }
                if mode == Fake::Silent {
                    held.push(s);
                    continue;
                }
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                let _ = BufReader::new(&s).read_line(&mut line);
                let answer: Vec<u8> = match mode {
                    Fake::CutShort => br#"{"result":"po"#.to_vec(),
                    Fake::Refuses => {
                        b"{\"result\":\"error\",\"message\":\"no room for the port\"}\n".to_vec()
                    }
                    Fake::NotReady => format!(
                        "{}\n",
                        json!({"result": "status", "ready": false, "version": "fake",
                               "workers": 0, "ports": 0, "poll_mode": "busy",
                               "uplink": null, "reason": NOT_READY_REASON})
                    )
                    .into_bytes(),
                    Fake::Closes | Fake::Resets | Fake::Silent => Vec::new(),
                };
                let _ = s.write_all(&answer);
            }
        });
        FakeStromd {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeStromd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs strom-cni directly (no namespace: STATUS and the log need none), as `Call::run` does.
fn run_plain(command: &str, conf: &Value, env: &[(&str, &str)]) -> (bool, Value) {
    let mut c = Command::new(bin_dir().join("strom-cni"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = feed(c.stderr(Stdio::null()), conf.to_string().as_bytes());
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), v)
}

/// A stromd that is busy past the deadline, goes away mid-request or cannot be connected to is
/// a transient failure: ADD says 11, "try again later", and the runtime retries. Only an answer
/// from stromd refusing the port is 102. Every failed ADD leaves nothing behind, and DEL
/// succeeds whatever stromd does.
#[test]
fn stromd_busy_or_gone_mid_call_is_try_again_later_and_only_a_refusal_is_102() {
    let _g = net_lock();
    let lab = Lab::up("", &[]);
    let sock = lab.dir.join("fake-stromd.sock");
    let mut c = conf(&lab, "1.0.0");
    c["socket"] = json!(sock.display().to_string());
    // The deadline for stromd's answer: short, so that the silent fake costs little.
    c["stromdTimeoutMs"] = json!(300);
    let call = Call::new(&lab, c);
    let gone = "stromd went away before answering";
    let cases = [
        (Some(Fake::Closes), 11, gone),
        (Some(Fake::Resets), 11, gone),
        (Some(Fake::Silent), 11, "stromd did not answer in time"),
        (Some(Fake::CutShort), 11, gone),
        (None, 11, "stromd is not reachable"),
        (Some(Fake::Refuses), 102, "stromd refused the port"),
    ];
    for (i, (mode, want, msg)) in cases.into_iter().enumerate() {
        let ns = netns(&lab, &format!("f{i}"));
        let id = format!("fake{i}");
        let fake = match mode {
            Some(m) => Some(FakeStromd::start(&sock, m)),
            None => {
                // The socket is there, nobody listens on it: connection refused.
                let _ = std::fs::remove_file(&sock);
                drop(UnixListener::bind(&sock).unwrap());
                None
            }
        };
        let t = Instant::now();
        let (ok, e) = call.run("ADD", &id, &ns, &[]);
        let took = t.elapsed();
        assert!(!ok, "{mode:?}: {e}");
        assert_eq!(e["code"], want, "{mode:?}: {e}");
        assert_eq!(e["msg"], msg, "{mode:?}: {e}");
        // ADD waits for stromd's answer at most the deadline, and its undo once more.
        assert!(took < Duration::from_secs(5), "{mode:?}: ADD took {took:?}");
        nothing_left(&lab);
        assert!(!pod_has_eth0(&ns), "{mode:?}: no eth0 left in the pod");
        let (ok, r) = call.run("DEL", &id, &ns, &[]);
        assert!(ok, "{mode:?}: DEL: {r}");
        drop(fake);
    }
}

/// STATUS fails (50, not available) when stromd answers that it is not ready, and says why.
#[test]
fn status_fails_with_stromds_reason_when_it_is_not_ready() {
    let dir = std::env::temp_dir().join(format!("strom-cni-status-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("fake-stromd.sock");
    let c = json!({"cniVersion": "1.1.0", "name": "strom-test", "type": "strom-cni",
                   "socket": sock.display().to_string(), "stromdTimeoutMs": 300});
    let fake = FakeStromd::start(&sock, Fake::NotReady);
    let (ok, e) = run_plain("STATUS", &c, &[]);
    assert!(!ok, "{e}");
    assert_eq!(e["code"], 50, "{e}");
    let details = e["details"].as_str().unwrap_or_default();
    assert!(details.contains("not ready"), "{e}");
    assert!(details.contains(NOT_READY_REASON), "{e}");
    drop(fake);
    for (mode, what) in [(Fake::Silent, "busy"), (Fake::Closes, "gone mid-call")] {
        let fake = FakeStromd::start(&sock, mode);
        let (ok, e) = run_plain("STATUS", &c, &[]);
        assert!(!ok, "{what}: {e}");
        assert_eq!(e["code"], 50, "{what}: {e}");
        drop(fake);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Concurrent calls sharing a logFile each append one whole JSON line: none is torn or
/// interleaved with another's. The container ids are long and full of characters JSON escapes,
/// so that a line written piecemeal would be written in many pieces.
#[test]
fn parallel_calls_append_whole_json_lines_to_a_shared_log() {
    const CALLS: usize = 50;
    let dir = std::env::temp_dir().join(format!("strom-cni-log-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("cni.log");
    let c = json!({"cniVersion": "1.1.0", "name": "strom-test", "type": "strom-cni",
                   "socket": dir.join("nobody-listens.sock").display().to_string(),
                   "logFile": log.display().to_string()});
    std::thread::scope(|s| {
        for i in 0..CALLS {
            let c = &c;
            s.spawn(move || {
                let id = format!("{i}:{}", "\"\\\t".repeat(1500));
                let (ok, e) = run_plain("STATUS", c, &[("CNI_CONTAINERID", &id)]);
                assert!(!ok, "STATUS without stromd fails: {e}");
            });
        }
    });
    let text = std::fs::read_to_string(&log).unwrap();
    let mut seen = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("line {n} is not JSON ({e}): {line:.200}"));
        assert_eq!(v["verb"], "STATUS", "{line:.200}");
        let id = v["container_id"].as_str().unwrap();
        seen.push(id.split(':').next().unwrap().parse::<usize>().unwrap());
    }
    seen.sort();
    assert_eq!(seen, (0..CALLS).collect::<Vec<_>>(), "one line per call");
    std::fs::remove_dir_all(&dir).unwrap();
}
