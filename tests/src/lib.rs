//! Helpers for the integration tests: a lab node per test (RAII: torn down on drop, even when
//! the test fails), one network test at a time, and the built binaries.
//!
//! Tests need root, iproute2, ethtool, iputils-ping and python3 (for raw frames), and the
//! workspace built first (`cargo build --release --workspace`), which the README's test
//! command does.
#![deny(unsafe_code)]

pub mod k8s;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use serde_json::Value;

static NET: Mutex<()> = Mutex::new(());
static SWEEP: Once = Once::new();
static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Prefix of every namespace a test makes ("zt" + pid + sequence).
pub const NS_PREFIX: &str = "zt";

/// Serializes network tests (the machine has two cores) and sweeps stale namespaces of an
/// earlier, crashed run once per test binary: those whose creating process (the number in
/// the name, pid mod 100000) is gone. A run going on beside this one keeps its namespaces.
pub fn net_lock() -> MutexGuard<'static, ()> {
    SWEEP.call_once(|| {
        let live: std::collections::HashSet<u32> = std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                    .map(|pid| pid % 100_000)
                    .collect()
            })
            .unwrap_or_default();
        let out = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            let ns = l.split_whitespace().next().unwrap_or("");
            let owner = ns
                .strip_prefix(NS_PREFIX)
                .and_then(|r| r.split('x').next())
                .and_then(|p| p.parse::<u32>().ok());
            if owner.is_some_and(|p| !live.contains(&p)) {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
        // The pins of crashed runs' labs (strom-lab's pin directory is named by its prefix).
        for e in std::fs::read_dir("/run/strom-lab-bpf")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().to_string();
            let owner = name
                .strip_prefix(NS_PREFIX)
                .and_then(|r| r.split('x').next())
                .and_then(|p| p.parse::<u32>().ok());
            if owner.is_some_and(|p| !live.contains(&p)) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
    NET.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where the workspace binaries are: $STROM_BIN_DIR, or the profile directory of this test.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("STROM_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf();
    for b in [
        "stromd",
        "strom-cni",
        "strom-lab",
        "stromctl",
        "strom-control",
    ] {
        assert!(
            dir.join(b).is_file(),
            "{} missing: build the workspace first (cargo build --release --workspace)",
            dir.join(b).display()
        );
    }
    dir
}

/// Runs a command, returning its output (never panics on failure status).
pub fn sh(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// Does network namespace `ns` (a name under /run/netns) have an interface called `dev`?
pub fn link_exists(ns: &str, dev: &str) -> bool {
    sh(Command::new("ip").args(["-n", ns, "link", "show", dev]))
        .status
        .success()
}

/// The drops counted under any of `reasons` in a `stromctl stats` answer, all workers.
pub fn drops_in(stats: &Value, reasons: &[&str]) -> u64 {
    stats["workers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["drops"].as_array().cloned().unwrap_or_default())
        .filter(|d| reasons.iter().any(|r| d[0] == *r))
        .map(|d| d[1].as_u64().unwrap_or(0))
        .sum()
}

/// A lab node with pods, brought down on drop.
pub struct Lab {
    pub dir: PathBuf,
    pub prefix: String,
    _manifest: PathBuf,
}

impl Lab {
    /// `strom-lab up` with `manifest` (YAML) and extra flags (e.g. `--workers 2`).
    pub fn up(manifest: &str, flags: &[&str]) -> Lab {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("{NS_PREFIX}{}x{n}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("strom-test-{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        let mpath = std::env::temp_dir().join(format!("strom-test-{prefix}.yaml"));
        std::fs::write(&mpath, manifest).unwrap();
        let lab = Lab {
            dir,
            prefix,
            _manifest: mpath.clone(),
        };
        let out = sh(lab
            .cmd()
            .arg("up")
            .arg(&mpath)
            .args(["--prefix", &lab.prefix])
            .args(flags));
        assert!(
            out.status.success(),
            "strom-lab up: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        lab
    }

    /// Waits (at most 10 s) until every pod's responder listens on all its ports: `strom-lab up`
    /// and `apply` start the responders without waiting for them. Read from each responder's
    /// /proc/PID/net (its namespace's sockets).
    pub fn wait_until_serving(&self) {
        let st: Value =
            serde_json::from_slice(&std::fs::read(self.dir.join("state.json")).unwrap()).unwrap();
        let t = Instant::now();
        for (k, p) in st["pods"].as_object().expect("pods in the lab state") {
            let Some(pid) = p["responder"].as_u64() else {
                continue;
            };
            let ports = p["decl"]["ports"].as_array().cloned().unwrap_or_default();
            loop {
                let listening = |file: &str, port: u64, state: &str| {
                    let want = format!(":{port:04X}");
                    std::fs::read_to_string(format!("/proc/{pid}/net/{file}"))
                        .unwrap_or_default()
                        .lines()
                        .skip(1)
                        .any(|l| {
                            let f: Vec<&str> = l.split_whitespace().collect();
                            f.len() > 3 && f[1].ends_with(&want) && f[3] == state
                        })
                };
                let serving = ports.iter().all(|d| {
                    let port = d["port"].as_u64().unwrap_or(0);
                    match d["protocol"].as_str() {
                        Some("tcp") => listening("tcp", port, "0A"),
                        Some("udp") => listening("udp", port, "07"),
                        _ => true,
                    }
                });
                if serving {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "{k}'s responder (pid {pid}) does not serve {ports:?} 10 s after the lab came up"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Waits (at most 5 s) until `pod` listens on TCP `port` (a responder just started).
    pub fn wait_listening(&self, pod: &str, port: u16) {
        let t = Instant::now();
        loop {
            let o = self.exec(pod, &["ss", "-Hltn", &format!("sport = :{port}")]);
            if !String::from_utf8_lossy(&o.stdout).trim().is_empty() {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{pod} listens on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `strom-lab apply` of `manifest` (YAML): its stdout and stderr; panics when it fails.
    pub fn apply(&self, manifest: &str) -> (String, String) {
        let m = std::env::temp_dir().join(format!("{}-apply.yaml", self.prefix));
        std::fs::write(&m, manifest).unwrap();
        let o = sh(self.cmd().arg("apply").arg(&m));
        let _ = std::fs::remove_file(&m);
        let (out, err) = (
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        );
        assert!(o.status.success(), "strom-lab apply: {out}{err}");
        (out, err)
    }

    /// A strom-lab command on this lab.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(bin_dir().join("strom-lab"));
        c.arg("--dir").arg(&self.dir);
        c
    }

    /// stromd's API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("stromd.sock")
    }

    pub fn node_ns(&self) -> String {
        format!("{}-node", self.prefix)
    }

    pub fn pod_ns(&self, key: &str) -> String {
        format!("{}-{}", self.prefix, key.replace('/', "-"))
    }

    /// `strom-lab probe`: true on allow.
    pub fn probe(&self, from: &str, to: &str, port: u16, proto: &str) -> bool {
        let o = sh(self.cmd().args([
            "probe",
            "--from",
            from,
            "--to",
            to,
            "--port",
            &port.to_string(),
            "--protocol",
            proto,
        ]));
        o.status.success()
    }

    /// Runs a command in a pod, the node or external.
    pub fn exec(&self, target: &str, argv: &[&str]) -> Output {
        sh(self.cmd().args(["exec", target, "--"]).args(argv))
    }

    /// strom-cni in the node's namespace as a runtime calls it: a clean environment with
    /// `CNI_COMMAND` `command` for `container` in `netns`, interface eth0, and the pod's name
    /// `pod` in namespace t in `CNI_ARGS`. The caller sets `CNI_PATH`, anything else, and the
    /// config on stdin.
    pub fn cni(&self, command: &str, container: &str, netns: &str, pod: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.node_ns()])
            .arg(bin_dir().join("strom-cni"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=t;K8S_POD_NAME={pod}"),
            );
        c
    }

    /// `stromctl --socket <this lab's>`, to be given its arguments.
    pub fn ctl(&self) -> Command {
        let mut c = Command::new(bin_dir().join("stromctl"));
        c.arg("--socket").arg(self.socket());
        c
    }

    /// `stromctl -o json ...`.
    pub fn stromctl(&self, args: &[&str]) -> Value {
        let o = sh(self.ctl().args(["-o", "json"]).args(args));
        assert!(
            o.status.success(),
            "stromctl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).expect("stromctl json")
    }

    /// stromd's record of the port of the pod named `name` (stromctl ports, JSON).
    pub fn port_of(&self, name: &str) -> Value {
        let ports = self.stromctl(&["ports"]);
        ports["ports"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["spec"]["pod_name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no port for pod {name}: {ports}"))
    }

    /// stromd's pod ports (stromctl ports without the uplink).
    pub fn pod_ports(&self) -> Vec<Value> {
        let ports = self.stromctl(&["ports"]);
        ports["ports"]
            .as_array()
            .map(|a| a.iter().filter(|p| p["kind"] == "pod").cloned().collect())
            .unwrap_or_default()
    }

    /// stromd's record of its port of kind `kind` ("uplink").
    pub fn port_of_kind(&self, kind: &str) -> Value {
        let ports = self.stromctl(&["ports"]);
        ports["ports"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["kind"] == kind))
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} port: {ports}"))
    }

    /// stromd's process id, from the lab's state.
    pub fn stromd_pid(&self) -> u32 {
        let st: Value =
            serde_json::from_slice(&std::fs::read(self.dir.join("state.json")).unwrap()).unwrap();
        st["stromd"]
            .as_u64()
            .unwrap_or_else(|| panic!("no stromd pid in the lab state: {st}")) as u32
    }

    /// Frames stromd received on all ports.
    pub fn rx_packets(&self) -> u64 {
        let ports = self.stromctl(&["ports"]);
        ports["ports"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p["counters"]["rx_packets"].as_u64())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The pod's address.
    pub fn pod_ip(&self, key: &str) -> String {
        let st: Value =
            serde_json::from_slice(&std::fs::read(self.dir.join("state.json")).unwrap()).unwrap();
        st["pods"][key]["ip"]
            .as_str()
            .unwrap_or_else(|| panic!("no ip for {key}"))
            .to_string()
    }

    /// Sum of a drop reason over all workers.
    pub fn drops(&self, reason: &str) -> u64 {
        drops_in(&self.stromctl(&["stats"]), &[reason])
    }

    /// Frames the kernel dropped on stromd's sockets, all workers (no fill frame, rx ring
    /// full), from one read of the counters.
    pub fn kernel_drops(&self) -> u64 {
        drops_in(
            &self.stromctl(&["stats"]),
            &["xsk_no_fill_frame", "xsk_rx_ring_full"],
        )
    }

    /// Frames the uplink's XDP program redirected to stromd's socket on each of its first
    /// `queues` receive queues (`ethtool -S`).
    pub fn uplink_queue_redirects(&self, queues: usize) -> Vec<u64> {
        let o = sh(Command::new("ip").args([
            "netns",
            "exec",
            &self.node_ns(),
            "ethtool",
            "-S",
            "uplink",
        ]));
        let stats = String::from_utf8_lossy(&o.stdout);
        (0..queues)
            .map(|q| {
                let key = format!("rx_queue_{q}_xdp_redirect:");
                stats
                    .lines()
                    .find_map(|l| l.trim().strip_prefix(&key))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or_else(|| panic!("{key} in {stats}"))
            })
            .collect()
    }

    /// Asserts that every worker received frames.
    pub fn assert_every_worker_received(&self) {
        let stats = self.stromctl(&["stats"]);
        for w in stats["workers"].as_array().expect("workers") {
            assert!(
                w["counters"]["rx_packets"].as_u64().unwrap_or(0) > 0,
                "every worker received: {stats}"
            );
        }
    }

    /// Free, in fill rings and total frames of worker 0's UMEM slice.
    pub fn frames(&self) -> (u64, u64, u64) {
        let s = self.stromctl(&["stats"]);
        let w = &s["workers"][0];
        (
            w["frames_free"].as_u64().unwrap_or(0),
            w["frames_in_fill"].as_u64().unwrap_or(0),
            w["frames_total"].as_u64().unwrap_or(0),
        )
    }

    /// Host-side veth names with an XDP program attached, in the node namespace.
    pub fn xdp_links(&self) -> Vec<String> {
        let o = sh(Command::new("ip").args(["-n", &self.node_ns(), "-j", "link", "show"]));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|l| l.get("xdp").is_some())
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = sh(self.cmd().args(["down", "--prefix", &self.prefix]));
        let _ = std::fs::remove_file(&self._manifest);
    }
}

/// Namespaces whose name starts with `prefix`.
pub fn namespaces_with(prefix: &str) -> Vec<String> {
    let o = sh(Command::new("ip").args(["netns", "list"]));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// A pod manifest with TCP and UDP ports.
pub fn pod(ns: &str, name: &str, tcp: &[u16], udp: &[u16]) -> String {
    let mut ports = String::new();
    for p in tcp {
        ports.push_str(&format!(
            "        - {{ containerPort: {p}, protocol: TCP }}\n"
        ));
    }
    for p in udp {
        ports.push_str(&format!(
            "        - {{ containerPort: {p}, protocol: UDP }}\n"
        ));
    }
    let ports = if ports.is_empty() {
        String::new()
    } else {
        format!("      ports:\n{ports}")
    };
    format!("---\nkind: Pod\nmetadata: {{ name: {name}, namespace: {ns} }}\nspec:\n  containers:\n    - name: c\n{ports}")
}

/// One answer of the lab's responder: (who answered, the client address it saw).
pub fn who(answer: &str) -> (String, String) {
    let mut w = answer.split_whitespace();
    let name = w.next().unwrap_or("").to_string();
    let client = w
        .next()
        .and_then(|a| a.rsplit_once(':'))
        .map(|(ip, _)| ip.to_string())
        .unwrap_or_default();
    (name, client)
}

/// A long-running process (a control plane component, strom-control) logging to a file,
/// which a test can stop, kill and start again; stopped by its id on drop.
pub struct Daemon {
    cmd: Command,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `cmd`, its output appended to `log`.
    pub fn start(cmd: Command, log: &Path) -> Daemon {
        let mut d = Daemon {
            cmd,
            child: None,
            log: log.to_path_buf(),
        };
        d.spawn();
        d
    }

    /// Starts it (again; one still running is stopped first, never left behind).
    pub fn spawn(&mut self) {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("{}: {e}", self.log.display()));
        let child = self
            .cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{:?}: {e}", self.cmd));
        self.child = Some(child);
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last `n` lines of its log.
    pub fn tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `count` new connections (or UDP exchanges) from pod `from` to `ip:port` over `proto`
/// (`strom-lab connect --lines`, 16 at a time): each answer (`NAME CLIENT:PORT`), or the
/// line saying why there was none.
pub fn connect_lines(
    lab: &Lab,
    from: &str,
    ip: &str,
    port: u16,
    proto: &str,
    timeout_ms: u64,
    count: usize,
) -> Vec<Result<String, String>> {
    let o = lab.exec(
        from,
        &[
            bin_dir().join("strom-lab").to_str().unwrap(),
            "connect",
            "--lines",
            "--ip",
            ip,
            "--port",
            &port.to_string(),
            "--protocol",
            proto,
            "--timeout-ms",
            &timeout_ms.to_string(),
            "--count",
            &count.to_string(),
        ],
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| match l.split_once(' ') {
            Some(("allow", a)) => Ok(a.to_string()),
            _ => Err(l.to_string()),
        })
        .collect()
}

/// A process in a pod's namespace, stopped (by its id) on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A responder in `pod` holding its connections on TCP `port` (answering on every read).
pub fn hold_responder(lab: &Lab, pod: &str, port: u16) -> Proc {
    let p = Command::new("ip")
        .args(["netns", "exec", &lab.pod_ns(pod)])
        .arg(bin_dir().join("strom-lab"))
        .args(["responder", "--name", pod, "--hold-tcp", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Proc(p)
}

/// TCP connections held open from a pod (`strom-lab hold`).
pub struct Held {
    proc: Proc,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
    count: usize,
    /// Who answered each connection when it opened (None: it did not open).
    pub first: Vec<Option<String>>,
}

impl Held {
    pub fn open(lab: &Lab, from: &str, ip: &str, port: u16, count: usize) -> Held {
        let mut c = Command::new("ip")
            .args(["netns", "exec", &lab.pod_ns(from)])
            .arg(bin_dir().join("strom-lab"))
            .args(["hold", "--ip", ip, "--port", &port.to_string()])
            .args(["--count", &count.to_string(), "--timeout-ms", "3000"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = c.stdin.take().unwrap();
        let mut out = BufReader::new(c.stdout.take().unwrap());
        let mut first = Vec::new();
        for _ in 0..count {
            let mut l = String::new();
            out.read_line(&mut l).unwrap();
            first.push(l.strip_prefix("open ").map(|a| who(a).0));
        }
        Held {
            proc: Proc(c),
            stdin,
            out,
            count,
            first,
        }
    }

    /// Writes on every connection: for each, who answered (Ok) or the error, and how long
    /// it took.
    pub fn again(mut self) -> Vec<(Result<String, String>, Duration)> {
        self.stdin.write_all(b"go\n").unwrap();
        self.stdin.flush().unwrap();
        let mut r = Vec::new();
        for _ in 0..self.count {
            let mut l = String::new();
            self.out.read_line(&mut l).unwrap();
            let l = l.trim();
            let (head, ms) = l.rsplit_once(' ').unwrap_or((l, "0"));
            let ms = Duration::from_millis(ms.parse().unwrap_or(0));
            r.push(match head.strip_prefix("again ") {
                Some(a) => (Ok(who(a).0), ms),
                None => (Err(head.to_string()), ms),
            });
        }
        let _ = self.proc.0.wait();
        r
    }
}
