//! Bringing a lab node up and down. Everything the lab creates is recorded in `<dir>/state.json`
//! before it is created, so `down` removes it even after a crash; namespaces are also swept by
//! their name prefix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::manifest::{Manifests, PodDecl};

/// The lab's addresses (RFC 2544 benchmark range).
pub const NODE_ADDR: &str = "198.18.0.1";
pub const EXT_ADDR: &str = "198.18.0.2";
/// stromd's metrics port, on 127.0.0.1 of the node's namespace (each lab has its own).
pub const STROMD_METRICS_PORT: u16 = 9101;
const CONFLIST: &str = include_str!("../../configs/10-strom.conflist");

/// Settings of a lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub dir: PathBuf,
    pub prefix: String,
    pub bin_dir: PathBuf,
    pub pod_cidr: String,
    pub workers: usize,
    pub poll_mode: String,
    #[serde(default = "one")]
    pub uplink_queues: u16,
    /// Cores stromd's workers are pinned to (empty: not pinned).
    #[serde(default)]
    pub cores: Vec<usize>,
    /// `conntrack_max` in stromd's `[dataplane]` (unset: stromd's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conntrack_max: Option<usize>,
    /// strom-cni's `localMtu` (unset: strom-cni's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_mtu: Option<u32>,
    /// `pod_xdp` in stromd's `[dataplane]` (unset: stromd's default, native).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_xdp: Option<String>,
}

fn one() -> u16 {
    1
}

/// What `apply` changed (pods by `namespace/name`; relabelled: labels or readiness).
#[derive(Debug, Default)]
pub struct Applied {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub relabelled: Vec<String>,
}

/// A wired pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    pub decl: PodDecl,
    pub netns: String,
    pub container_id: String,
    pub ip: Option<String>,
    pub responder: Option<u32>,
}

/// What exists.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub settings: Settings,
    pub stromd: Option<u32>,
    pub pods: BTreeMap<String, PodState>,
    /// The Services stromd was given, by `namespace/name` (services.rs).
    #[serde(default)]
    pub services: BTreeMap<String, strom_api::ServiceSpec>,
    /// The ClusterIPs and NodePorts the lab allocated, kept so that they stay the same
    /// across applies.
    #[serde(default)]
    pub allocations: strom_control::manifests::Allocations,
    /// The compiled NetworkPolicies stromd was given (policy.rs).
    #[serde(default)]
    pub policies: strom_api::PolicySet,
}

impl Settings {
    pub fn node_ns(&self) -> String {
        format!("{}-node", self.prefix)
    }
    pub fn ext_ns(&self) -> String {
        format!("{}-ext", self.prefix)
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("stromd.sock")
    }
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
    fn pod_ns(&self, p: &PodDecl) -> String {
        format!("{}-{}-{}", self.prefix, p.namespace, p.name)
    }
}

pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("ip").args(args))
}

/// The cores the pods' processes (and the lab's probes) run on when stromd's workers are
/// pinned: every core but theirs, as a node keeps its dataplane's cores to it (kubelet's
/// reserved CPUs). Unset: anywhere.
static POD_CPUS: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Keeps what the lab starts in pods off `cores` (stromd's workers' cores), if any core is
/// left for them.
pub fn keep_pods_off(cores: &[usize]) {
    if cores.is_empty() {
        return;
    }
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rest: Vec<String> = (0..n)
        .filter(|c| !cores.contains(c))
        .map(|c| c.to_string())
        .collect();
    if !rest.is_empty() {
        let _ = POD_CPUS.set(rest.join(","));
    }
}

/// `ip netns exec NS CMD...`, on the pods' cores (`keep_pods_off`).
pub fn in_ns(ns: &str, prog: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]);
    if let Some(cpus) = POD_CPUS.get() {
        c.args(["taskset", "-c", cpus]);
    }
    c.arg(prog);
    c
}

fn netns_list() -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILL.
pub fn stop_pid(pid: u32, grace: Duration) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
    let t = Instant::now();
    while pid_alive(pid) && t.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(20));
    }
    if pid_alive(pid) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// Starts a detached process (own process group, output to `log`). Returns its pid.
fn spawn_detached(mut cmd: Command, log: &Path) -> anyhow::Result<u32> {
    use std::os::unix::process::CommandExt;
    let f = std::fs::File::create(log)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .process_group(0)
        .spawn()
        .with_context(|| format!("{cmd:?}"))?;
    Ok(child.id())
}

impl State {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("state.json")
    }

    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let p = Self::path(dir);
        let b = std::fs::read(&p)
            .with_context(|| format!("no lab at {} (strom-lab up first)", dir.display()))?;
        let state: Self = serde_json::from_slice(&b)?;
        keep_pods_off(&state.settings.cores);
        Ok(state)
    }

    pub fn save(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.settings.dir)?;
        let tmp = self.settings.dir.join("state.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, Self::path(&self.settings.dir))?;
        Ok(())
    }

    /// The strom-cni entry of configs/10-strom.conflist, pointed at this lab's files.
    fn cni_conf(&self) -> anyhow::Result<String> {
        let list: Value = serde_json::from_str(CONFLIST)?;
        let mut conf = list["plugins"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["type"] == "strom-cni"))
            .cloned()
            .context("configs/10-strom.conflist has no strom-cni plugin")?;
        let s = &self.settings;
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        conf["socket"] = Value::from(s.socket().display().to_string());
        conf["logFile"] = Value::from(s.dir.join("cni.log").display().to_string());
        conf["ipam"]["subnet"] = Value::from(s.pod_cidr.clone());
        conf["ipam"]["dataDir"] = Value::from(s.dir.join("ipam").display().to_string());
        if let Some(m) = s.local_mtu {
            conf["localMtu"] = Value::from(m);
        }
        conf["serviceCidrs"] = serde_json::json!([crate::services::SERVICE_CIDR]);
        Ok(conf.to_string())
    }

    fn cni(&self, command: &str, p: &PodState) -> anyhow::Result<Value> {
        use std::io::Write;
        let s = &self.settings;
        let mut args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
            p.decl.namespace, p.decl.name
        );
        if let Some(ip) = &p.decl.ip {
            args.push_str(&format!(";IP={ip}"));
        }
        let mut child = in_ns(&s.node_ns(), s.bin("strom-cni"))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &p.container_id)
            .env("CNI_NETNS", format!("/run/netns/{}", p.netns))
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_PATH",
                format!("{}:/usr/lib/cni:/opt/cni/bin", s.bin_dir.display()),
            )
            .env("CNI_ARGS", args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running strom-cni")?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(self.cni_conf()?.as_bytes())?;
        let out = child.wait_with_output()?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if !out.status.success() {
            bail!(
                "strom-cni {command} for {}: {} ({})",
                p.decl.key(),
                v,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(v)
    }

    /// Creates the node: namespaces, uplink, stromd.
    pub fn up_node(settings: Settings) -> anyhow::Result<Self> {
        keep_pods_off(&settings.cores);
        if Self::path(&settings.dir).exists() {
            bail!(
                "a lab already runs from {} (strom-lab down first)",
                settings.dir.display()
            );
        }
        for b in ["stromd", "strom-cni", "stromctl"] {
            if !settings.bin(b).is_file() {
                bail!(
                    "{} not found (build the workspace, or pass --bin-dir)",
                    settings.bin(b).display()
                );
            }
        }
        sweep(&settings.prefix);
        let mut st = State {
            settings,
            stromd: None,
            pods: BTreeMap::new(),
            services: BTreeMap::new(),
            allocations: Default::default(),
            policies: Default::default(),
        };
        st.save()?;
        let s = st.settings.clone();
        let (node, ext) = (s.node_ns(), s.ext_ns());
        for ns in [&node, &ext] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let q = s.uplink_queues.to_string();
        ip(&[
            "-n",
            &node,
            "link",
            "add",
            "uplink",
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ext,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
        ])?;
        if s.uplink_queues > 1 {
            // veth starts with one queue in use; use them all on both ends.
            for (ns, dev) in [(&node, "uplink"), (&ext, "eth0")] {
                run(in_ns(ns, "ethtool").args(["-L", dev, "rx", &q, "tx", &q]))?;
            }
        }
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &format!("{NODE_ADDR}/24"),
            "dev",
            "uplink",
        ])?;
        ip(&[
            "-n",
            &ext,
            "addr",
            "add",
            &format!("{EXT_ADDR}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &node, "link", "set", "uplink", "up"])?;
        ip(&["-n", &ext, "link", "set", "eth0", "up"])?;
        // The node forwards in the kernel, as a Kubernetes node does: pod traffic is still
        // stromd's alone, because its XDP programs hand the kernel only what is for the
        // node itself, and stay attached (pinned) while stromd is stopped.
        run(in_ns(&node, "sysctl").args(["-qw", "net.ipv4.ip_forward=1"]))?;
        // The outside world routes the pod CIDR to the node (as a top-of-rack router would),
        // and, like a real wire, hands the node complete frames: no checksum offload state
        // crosses into AF_XDP (docs/design.md).
        ip(&["-n", &ext, "route", "add", &s.pod_cidr, "via", NODE_ADDR])?;
        run(in_ns(&ext, "ethtool").args(["-K", "eth0", "tx", "off", "tso", "off", "gso", "off"]))?;
        let cfg = format!(
            "[node]\naddresses = [\"{NODE_ADDR}\"]\npod_cidr = \"{}\"\nuplink = \"uplink\"\nuplink_gateway = \"{EXT_ADDR}\"\nnode_cgroup = \"{}\"\n\n[dataplane]\nworkers = {}\ncores = {:?}\npoll_mode = \"{}\"\napi_socket = \"{}\"\nstate_dir = \"{}\"\nbpf_pin_dir = \"{}\"\nmetrics_addr = \"127.0.0.1:{}\"\n",
            s.pod_cidr,
            node_cgroup(&s.prefix).display(),
            s.workers,
            s.cores,
            s.poll_mode,
            s.socket().display(),
            s.dir.join("stromd-state").display(),
            pin_dir(&s.prefix).display(),
            STROMD_METRICS_PORT
        );
        let cfg = match s.conntrack_max {
            Some(n) => format!("{cfg}conntrack_max = {n}\n"),
            None => cfg,
        };
        let cfg = match &s.pod_xdp {
            Some(m) => format!("{cfg}pod_xdp = {m:?}\n"),
            None => cfg,
        };
        std::fs::write(s.dir.join("stromd.toml"), cfg)?;
        mount_bpffs()?;
        mount_once(CGROUP2, "cgroup2")?;
        std::fs::create_dir_all(node_cgroup(&s.prefix))?;
        st.start_stromd()?;
        Ok(st)
    }

    /// Starts stromd in the node namespace and waits until it answers.
    /// (Its metrics are on 127.0.0.1:[`STROMD_METRICS_PORT`] of the node's namespace.)
    pub fn start_stromd(&mut self) -> anyhow::Result<()> {
        let s = self.settings.clone();
        // Not `in_ns`: stromd pins its workers to their cores itself.
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &s.node_ns()])
            .arg(s.bin("stromd"));
        cmd.arg("--config").arg(s.dir.join("stromd.toml"));
        let pid = spawn_detached(cmd, &s.dir.join("stromd.log"))?;
        self.stromd = Some(pid);
        self.save()?;
        let t = Instant::now();
        loop {
            if let Ok(mut c) = strom_api::Client::connect(s.socket(), Duration::from_secs(1)) {
                if c.call(&strom_api::Request::Status).is_ok() {
                    return Ok(());
                }
            }
            if !pid_alive(pid) || t.elapsed() > Duration::from_secs(10) {
                let log = std::fs::read_to_string(s.dir.join("stromd.log")).unwrap_or_default();
                bail!("stromd did not come up:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops stromd (SIGTERM). Its XDP programs stay attached (pinned), dropping what the
    /// pods send to each other or the outside until it starts again.
    pub fn stop_stromd(&mut self) {
        if let Some(pid) = self.stromd.take() {
            stop_pid(pid, Duration::from_secs(5));
        }
        let _ = self.save();
    }

    /// Adds a pod: namespace, CNI ADD, responder.
    pub fn add_pod(&mut self, decl: PodDecl) -> anyhow::Result<()> {
        let s = self.settings.clone();
        let key = decl.key();
        let netns = s.pod_ns(&decl);
        let container_id: String = Sha256::digest(format!("{}/{key}", s.prefix))
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut p = PodState {
            decl,
            netns: netns.clone(),
            container_id,
            ip: None,
            responder: None,
        };
        self.pods.insert(key.clone(), p.clone());
        self.save()?;
        ip(&["netns", "add", &netns])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        let r = self.cni("ADD", &p)?;
        p.ip = r["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .map(str::to_string);
        if !p.decl.ports.is_empty() {
            let mut cmd = in_ns(&netns, std::env::current_exe()?);
            cmd.args(["responder", "--name", &key]);
            // `--tcp 80 --udp 53 --sctp 9899 ...` (protocols are checked by the manifest reader).
            for d in &p.decl.ports {
                cmd.arg(format!("--{}", d.protocol)).arg(d.port.to_string());
            }
            p.responder = Some(spawn_detached(
                cmd,
                &s.dir.join(format!(
                    "responder-{}-{}.log",
                    p.decl.namespace, p.decl.name
                )),
            )?);
        }
        self.pods.insert(key, p);
        self.save()?;
        Ok(())
    }

    /// Removes a pod: responder, CNI DEL, namespace.
    pub fn remove_pod(&mut self, key: &str) -> anyhow::Result<()> {
        let Some(p) = self.pods.get(key).cloned() else {
            return Ok(());
        };
        if let Some(pid) = p.responder {
            stop_pid(pid, Duration::from_secs(2));
        }
        let r = self.cni("DEL", &p);
        // Whatever else runs in the pod (`strom-lab exec ... &`, the demo's iperf3) goes too.
        stop_ns_processes(&p.netns);
        let _ = ip(&["netns", "del", &p.netns]);
        self.pods.remove(key);
        self.save()?;
        r.map(|_| ())
    }

    /// Makes the pods match `m`: new ones added, missing ones removed.
    pub fn apply(&mut self, m: &Manifests) -> anyhow::Result<Applied> {
        let want: BTreeMap<String, PodDecl> = m.pods.iter().map(|p| (p.key(), p.clone())).collect();
        let mut done = Applied::default();
        let current: Vec<String> = self.pods.keys().cloned().collect();
        for k in current {
            let Some(have) = self.pods.get_mut(&k) else {
                continue;
            };
            match want.get(&k) {
                Some(d) if *d == have.decl => {}
                // Labels (and the lab's readiness) change on the running pod, as in
                // Kubernetes.
                Some(d) if d.same_wiring(&have.decl) => {
                    have.decl = d.clone();
                    done.relabelled.push(k);
                }
                _ => {
                    self.remove_pod(&k)?;
                    done.removed.push(k);
                }
            }
        }
        self.save()?;
        for (k, d) in want {
            if !self.pods.contains_key(&k) {
                self.add_pod(d)?;
                done.added.push(k);
            }
        }
        Ok(done)
    }

    /// Removes everything. Errors are collected, not fatal: the sweep goes on.
    pub fn down(mut self) -> Vec<String> {
        let mut errs = Vec::new();
        let keys: Vec<String> = self.pods.keys().cloned().collect();
        for k in keys {
            if let Err(e) = self.remove_pod(&k) {
                errs.push(e.to_string());
                self.pods.remove(&k);
            }
        }
        self.stop_stromd();
        sweep(&self.settings.prefix);
        let _ = std::fs::remove_dir_all(&self.settings.dir);
        errs
    }
}

/// Stops every process running in namespace `ns`.
fn stop_ns_processes(ns: &str) {
    if let Ok(pids) = ip(&["netns", "pids", ns]) {
        for pid in pids.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            stop_pid(pid, Duration::from_secs(2));
        }
    }
}

/// The bpffs every lab's stromd pins its XDP links on. Not /sys/fs/bpf: `ip netns exec`
/// mounts a sysfs of its own over /sys for the command it runs, so a bpffs mounted there by
/// stromd would live and die with that one process's mount namespace, and its pins with it.
/// A bpffs mounted by strom-lab here, in its own mount namespace, is seen by every stromd it
/// starts and outlives them.
pub const BPFFS: &str = "/run/strom-lab-bpf";

/// Where the lab's stromd pins its XDP links (one directory per lab, on [`BPFFS`]).
pub fn pin_dir(prefix: &str) -> PathBuf {
    Path::new(BPFFS).join(prefix)
}

/// Mounts [`BPFFS`] unless a bpffs is mounted there already.
fn mount_bpffs() -> anyhow::Result<()> {
    mount_once(BPFFS, "bpf")
}

/// Mounts a filesystem of type `fstype` on `dir` unless one is mounted there already.
fn mount_once(dir: &str, fstype: &str) -> anyhow::Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mounts")?
        .lines()
        .any(|l| {
            l.split_whitespace().nth(1) == Some(dir) && l.split_whitespace().nth(2) == Some(fstype)
        });
    if !mounted {
        std::fs::create_dir_all(dir)?;
        run(Command::new("mount").args(["-t", fstype, fstype, dir]))?;
    }
    Ok(())
}

/// The cgroup v2 hierarchy, mounted where the lab's processes see it: `ip netns exec` mounts
/// a sysfs of its own over /sys (as for [`BPFFS`]), hiding /sys/fs/cgroup from stromd.
pub const CGROUP2: &str = "/run/strom-lab-cgroup";

/// The lab node's cgroup: the node's own processes that strom-lab starts (`probe --from
/// node`, `exec node`) run in it, and stromd serves their sockets' connections to Services
/// (`node.node_cgroup`), so that no program is attached to the machine's root cgroup.
pub fn node_cgroup(prefix: &str) -> PathBuf {
    Path::new(CGROUP2).join(format!("{prefix}-node"))
}

/// A command run in the lab node's namespace and cgroup.
pub fn in_node(s: &Settings, prog: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = in_ns(&s.node_ns(), "sh");
    // The shell moves itself into the cgroup (0: the writer), then becomes the command.
    c.args(["-c", "echo 0 > \"$0/cgroup.procs\" && exec \"$@\""])
        .arg(node_cgroup(&s.prefix))
        .arg(prog);
    c
}

/// Deletes every namespace named `<prefix>-*` (and kills what runs inside), then the pins of
/// the lab's XDP links (their interfaces are gone with the namespaces).
pub fn sweep(prefix: &str) {
    for ns in netns_list() {
        if ns.starts_with(&format!("{prefix}-")) {
            stop_ns_processes(&ns);
            let _ = ip(&["netns", "del", &ns]);
        }
    }
    let _ = std::fs::remove_dir_all(pin_dir(prefix));
    // Empty now that the node's processes are stopped.
    let _ = std::fs::remove_dir(node_cgroup(prefix));
}
