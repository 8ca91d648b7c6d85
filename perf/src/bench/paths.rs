//! The paths under test: what forwards between the node's two veths, and where traffic is sent.
//!
//! A new path (pod → Service through stromd, cross-node) is one more entry here: a name, the
//! scenario it measures, how it is started and stopped, and the address the pods send to.
//! A path can also check what it did after each measurement ([`Running::verify`]).

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::policies;
use crate::topo::{
    ns_command, ns_run, ns_run_input, run, stop_child, Topology, CRR_PORT, IPERF_PORT, IP_A, IP_B,
    SINK_PORT_FIRST, SINK_PORT_LAST, SOCKPERF_PORT, VIP,
};
use crate::traffic::Traffic;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Path {
    Stromd,
    StromdSvc,
    StromdPol,
    StromdGeneric,
    Kernel,
    KernelNat,
    Testpmd,
}

pub const ALL: [Path; 7] = [
    Path::Stromd,
    Path::StromdSvc,
    Path::StromdPol,
    Path::StromdGeneric,
    Path::Kernel,
    Path::KernelNat,
    Path::Testpmd,
];

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Stromd => "stromd",
            Path::StromdSvc => "stromd-svc",
            Path::StromdPol => "stromd-pol",
            Path::StromdGeneric => "stromd-generic",
            Path::Kernel => "kernel",
            Path::KernelNat => "kernel-nat",
            Path::Testpmd => "testpmd",
        }
    }

    pub fn parse(s: &str) -> Result<Path> {
        ALL.into_iter().find(|p| p.name() == s).with_context(|| {
            let names: Vec<_> = ALL.iter().map(|p| p.name()).collect();
            format!("unknown path {s:?} (known: {})", names.join(", "))
        })
    }

    /// What the row measures, in the words of the Kubernetes model.
    pub fn scenario(self) -> &'static str {
        match self {
            Path::KernelNat | Path::StromdSvc => "pod → Service VIP (DNAT to pod B)",
            Path::StromdPol => "pod → pod, both selected by 100 NetworkPolicies",
            _ => "pod → pod",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Path::Stromd => "stromd (one worker, busy polling, AF_XDP)",
            Path::StromdSvc => "stromd with the Service (DNAT, conntrack; as stromd)",
            Path::StromdPol => {
                "stromd with 100 NetworkPolicies (both pods isolated both ways, every flow \
                 judged and tracked; as stromd)"
            }
            Path::StromdGeneric => {
                "stromd with the pods' XDP program in generic mode (the pods keep checksum \
                 offload, TSO and GSO, their routes to each other at 1500; as stromd)"
            }
            Path::Kernel => "Linux IP forwarding",
            Path::KernelNat => "Linux + nftables DNAT (kube-proxy nftables style)",
            Path::Testpmd => "DPDK testpmd, MAC forwarding over AF_XDP",
        }
    }

    /// Where the pods send.
    pub fn destination(self) -> Ipv4Addr {
        match self {
            Path::KernelNat | Path::StromdSvc => VIP,
            _ => IP_B,
        }
    }

    /// Whether the path carries `traffic`: the `pods` traffic needs a path that serves many
    /// ports (stromd, Linux forwarding); testpmd forwards between two ports only, the
    /// Service VIP of kernel-nat leads to pod B alone, and stromd-pol's policies are about
    /// pods A and B.
    pub fn serves(self, traffic: Traffic) -> bool {
        !matches!(traffic, Traffic::Pods(_)) || matches!(self, Path::Stromd | Path::Kernel)
    }

    /// Whether the path attaches native XDP programs to the node's veths (which gives them
    /// NAPI instances: their receive work then runs in NAPI polls, see `--napi-core`).
    /// stromd-generic's programs run in the veths' backlog softirq on the sender's core, which
    /// `--napi-core` does not move.
    pub fn attaches_xdp(self) -> bool {
        matches!(
            self,
            Path::Stromd | Path::StromdSvc | Path::StromdPol | Path::Testpmd
        )
    }

    /// Debian packages the path needs beyond the common ones.
    pub fn packages(self) -> &'static [&'static str] {
        match self {
            Path::Testpmd => &["dpdk-dev", "librte-net-af-xdp23"],
            _ => &[],
        }
    }
}

/// Cores and binaries the paths run with.
pub struct Env {
    pub bin: PathBuf,
    pub work: PathBuf,
    pub dut_core: usize,
    pub sender_core: usize,
    /// Where the node veths' NAPI threads go (`--napi-core`), if anywhere.
    pub napi_core: Option<usize>,
    /// Extra flags for stromd.
    pub stromd_args: Vec<String>,
    /// The pods' interface MTU on stromd's paths (`--pod-mtu`).
    pub pod_mtu: u32,
}

/// A started path; `stop` (or drop) ends it.
pub struct Running {
    child: Option<Child>,
    _stdin: Option<ChildStdin>,
    _dir: Option<TempDir>,
    /// stromd-pol: what to check after each measurement.
    policed: Option<Policed>,
}

/// stromd with policies: its API socket, and the drops already reported (`policy_denied`
/// over the workers, and the sum of the per-policy counts).
struct Policed {
    sock: PathBuf,
    denied: u64,
    by_policy: u64,
}

impl Running {
    pub fn stop(mut self) -> Result<()> {
        self.halt()
    }

    /// After a measurement of `traffic` (also one that failed, which drops may explain): for
    /// stromd-pol, that the policies dropped none of it
    /// (no `policy_denied` drop on any worker, no drop counted against any policy) and that
    /// stromd tracks its flows (the policies isolated it: the answers pass by conntrack).
    /// Nothing for the other paths.
    pub fn verify(&mut self, traffic: Traffic) -> Result<()> {
        let Some(p) = self.policed.as_mut() else {
            return Ok(());
        };
        let mut c = strom_api::Client::connect(&p.sock, Duration::from_secs(5))?;
        let strom_api::Response::Stats { workers, .. } = c.call(&strom_api::Request::Stats)? else {
            bail!("stromd answered Stats with something else");
        };
        let denied: u64 = workers
            .iter()
            .flat_map(|w| &w.drops)
            .filter(|(reason, _)| reason == "policy_denied")
            .map(|(_, n)| n)
            .sum();
        let strom_api::Response::Policies { policies } = c.call(&strom_api::Request::Policies)?
        else {
            bail!("stromd answered Policies with something else");
        };
        let (by_policy, per_policy) = policies::drops(&policies);
        if denied > p.denied || by_policy > p.by_policy {
            let new = denied - p.denied;
            (p.denied, p.by_policy) = (denied, by_policy);
            bail!(
                "the NetworkPolicies dropped {new} packets of this traffic (policy_denied; \
                 counted since stromd started, {per_policy}): they must allow all of it \
                 (perf/src/bench/policies.rs)"
            );
        }
        if let Some((port, least)) = policies::tracked(traffic) {
            let strom_api::Response::Conntrack { total, .. } =
                c.call(&strom_api::Request::Conntrack {
                    filter: strom_api::ConntrackFilter {
                        port: Some(port),
                        ..Default::default()
                    },
                    count_only: true,
                })?
            else {
                bail!("stromd answered Conntrack with something else");
            };
            if total < least {
                bail!(
                    "stromd tracks {total} flows with port {port}, not at least {least}: the \
                     policies did not isolate this traffic as stromd-pol means them to"
                );
            }
        }
        Ok(())
    }

    fn halt(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if !stop_child(&mut child, Duration::from_secs(10)) {
            bail!(
                "the path's process {} did not stop on SIGINT within 10 s; killed",
                child.id()
            );
        }
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The MTU of every path leaving a pod, and of the kernel's paths between pods.
const KERNEL_MTU: u32 = 1500;

/// Starts `path` in the node namespace of `t`.
pub fn start(path: Path, t: &Topology, env: &Env) -> Result<Running> {
    let none = Running {
        child: None,
        _stdin: None,
        _dir: None,
        policed: None,
    };
    match path {
        Path::Kernel | Path::KernelNat => {
            t.offloads(true)?;
            t.pod_mtu(KERNEL_MTU, KERNEL_MTU)?;
            ns_run(&t.n, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            ns_run(&t.n, &["nft", "flush", "ruleset"])?;
            if path == Path::KernelNat {
                ns_run_input(&t.n, &["nft", "-f", "-"], &nat_rules())?;
            }
            Ok(none)
        }
        Path::Testpmd => {
            t.offloads(false)?;
            t.pod_mtu(KERNEL_MTU, KERNEL_MTU)?;
            ns_run(&t.n, &["sysctl", "-qw", "net.ipv4.ip_forward=0"])?;
            let log = File::create(env.work.join("testpmd.log"))?;
            let lcores = format!("{},{}", env.sender_core, env.dut_core);
            let peer0 = format!("--eth-peer=0,{}", t.mac_a);
            let peer1 = format!("--eth-peer=1,{}", t.mac_b);
            // testpmd leaves when its standard input closes, so it keeps a pipe until stopped.
            let mut child = ns_command(&t.n)
                .args(["dpdk-testpmd", "-l", &lcores])
                .args([
                    "--no-pci",
                    "--no-huge",
                    "-m",
                    "1024",
                    "--log-level=lib.eal:error",
                ])
                .args([
                    "--vdev",
                    "net_af_xdp0,iface=ha",
                    "--vdev",
                    "net_af_xdp1,iface=hb",
                ])
                .args(["--", "--forward-mode=mac", &peer0, &peer1, "--auto-start"])
                .stdin(Stdio::piped())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting dpdk-testpmd")?;
            let stdin = child.stdin.take();
            let mut r = Running {
                child: Some(child),
                _stdin: stdin,
                _dir: None,
                policed: None,
            };
            // testpmd's stdout is a file, so its messages come late (block buffering); its
            // ports are up once both veths carry its XDP program.
            let n = t.n.clone();
            wait_for(
                || {
                    Ok(["ha", "hb"].iter().all(|dev| {
                        ns_run(&n, &["ip", "link", "show", "dev", dev])
                            .is_ok_and(|o| o.contains("xdp"))
                    }))
                },
                Duration::from_secs(20),
                &mut r,
                "dpdk-testpmd to attach to both veths (see testpmd.log)",
            )?;
            // The XDP program comes before the socket is in its map; give it a moment.
            std::thread::sleep(Duration::from_secs(1));
            Ok(r)
        }
        Path::Stromd | Path::StromdSvc | Path::StromdPol | Path::StromdGeneric => {
            if path == Path::StromdGeneric && env.pod_mtu < 4000 {
                bail!(
                    "stromd-generic needs --pod-mtu of 4000 or more: its pods' super-packets \
                     cross stromd whole and must fit the receiving pod's interface"
                );
            }
            // Generic mode leaves the pods' offloads alone: what it is measured for.
            t.offloads(path == Path::StromdGeneric)?;
            t.pod_mtu(env.pod_mtu, KERNEL_MTU)?;
            if path == Path::StromdGeneric {
                // The pods keep TSO at the path's MTU, as without a large MTU between them;
                // their interfaces stay large, since stromd hands a 64 KB frame on whole
                // (AF_XDP has no segmentation offload) and veth refuses a frame beyond the MTU.
                t.pod_route_mtu(KERNEL_MTU)?;
                // A super-packet of 64 KB with its headers would exceed the interfaces' MTU
                // (65000) once stromd hands it on as one frame.
                t.gso_max_size(env.pod_mtu.saturating_sub(1000))?;
            }
            ns_run(&t.n, &["sysctl", "-qw", "net.ipv4.ip_forward=0"])?;
            let mut r = start_stromd(t, env, path == Path::StromdGeneric)?;
            if path == Path::StromdSvc {
                set_service(env, &r)?;
            }
            if path == Path::StromdPol {
                set_policies(&mut r)?;
            }
            Ok(r)
        }
    }
}

/// The Service kernel-nat's rules make (`nat_rules`), programmed in stromd as strom-control
/// would: the VIP on the iperf3 port, the crr server's port, the sockperf port and each UDP
/// sink port, each to pod B.
fn service_spec() -> strom_api::ServiceSpec {
    use strom_api::{EndpointSpec, Protocol, ServicePortSpec};
    let port = |name: String, protocol, port| ServicePortSpec {
        name,
        protocol,
        port,
        node_port: None,
        endpoints: vec![EndpointSpec {
            ip: IP_B.into(),
            port,
            ready: true,
            serving: true,
            terminating: false,
            local: true,
            in_topology: true,
            target: "pod-b".into(),
        }],
    };
    let mut ports = vec![
        port("iperf".into(), Protocol::Tcp, IPERF_PORT),
        port("crr".into(), Protocol::Tcp, CRR_PORT),
        port("sockperf".into(), Protocol::Udp, SOCKPERF_PORT),
    ];
    ports.extend(
        (SINK_PORT_FIRST..=SINK_PORT_LAST).map(|p| port(format!("sink{p}"), Protocol::Udp, p)),
    );
    strom_api::ServiceSpec {
        namespace: "bench".into(),
        name: "b".into(),
        cluster_ips: vec![VIP.into()],
        external_ips: vec![],
        load_balancer_ips: vec![],
        ports,
        affinity_timeout_s: None,
        external_local: false,
        internal_local: false,
        health_check_node_port: None,
    }
}

fn set_service(env: &Env, r: &Running) -> Result<()> {
    let dir = &r._dir.as_ref().context("stromd's directory")?.0;
    let file = dir.join("service.json");
    std::fs::write(&file, serde_json::to_vec(&service_spec())?)?;
    stromctl(
        env,
        &dir.join("stromd.sock"),
        &["set-service", &file.to_string_lossy()],
    )
}

/// stromd-pol's 100 policies, compiled by strom-control and set in stromd as strom-lab sets
/// them (`SetPolicies`); then stromd must report each of them selecting both pods both ways.
fn set_policies(r: &mut Running) -> Result<()> {
    let set = policies::policy_set()?;
    let sock = r
        ._dir
        .as_ref()
        .context("stromd's directory")?
        .0
        .join("stromd.sock");
    let mut c = strom_api::Client::connect(&sock, Duration::from_secs(10))?;
    c.call(&strom_api::Request::SetPolicies {
        policies: set,
        delta: None,
    })
    .context("SetPolicies")?;
    let strom_api::Response::Policies { policies: status } =
        c.call(&strom_api::Request::Policies)?
    else {
        bail!("stromd answered Policies with something else");
    };
    policies::check_selected(&status)?;
    r.policed = Some(Policed {
        sock,
        denied: 0,
        by_policy: 0,
    });
    Ok(())
}

fn nat_rules() -> String {
    format!(
        "table ip svc {{
  chain pre {{ type nat hook prerouting priority dstnat;
    ip daddr {VIP} tcp dport {IPERF_PORT} dnat to {IP_B}
    ip daddr {VIP} tcp dport {CRR_PORT} dnat to {IP_B}
    ip daddr {VIP} udp dport {SINK_PORT_FIRST}-{SINK_PORT_LAST} dnat to {IP_B}
    ip daddr {VIP} udp dport {SOCKPERF_PORT} dnat to {IP_B}
  }}
  chain post {{ type nat hook postrouting priority srcnat; }}
}}"
    )
}

fn start_stromd(t: &Topology, env: &Env, generic: bool) -> Result<Running> {
    let dir = env.work.join("stromd");
    std::fs::create_dir_all(&dir)?;
    let dir = TempDir(dir);
    let sock = dir.0.join("stromd.sock");
    let config = format!(
        r#"[node]
# the pods reach the node's gateways by static neighbour entries
addresses = []
pod_cidr = "{pod_cidr}"
pod_gateway = "169.254.1.1"
# the node's own sockets are not benchmarked (no cgroup under `ip netns exec`'s /sys)
node_sockets = false
[dataplane]
workers = 1
cores = [{core}]
poll_mode = "busy"
api_socket = "{sock}"
state_dir = "{state}"
pod_xdp = "{pod_xdp}"
"#,
        pod_xdp = if generic { "generic" } else { "native" },
        pod_cidr = crate::topo::POD_CIDR,
        core = env.dut_core,
        sock = sock.display(),
        state = dir.0.display(),
    );
    let cfg = dir.0.join("stromd.toml");
    std::fs::write(&cfg, config)?;
    // The socket a previous stromd of this directory left (stromd, stromd-svc and stromd-pol
    // take turns in it) would pass for the new one's before it listens.
    let _ = std::fs::remove_file(&sock);
    let log = File::create(env.work.join("stromd.log"))?;
    let child = ns_command(&t.n)
        .arg(env.bin.join("stromd"))
        .arg("--config")
        .arg(&cfg)
        .args(["--log", "warn"])
        .args(&env.stromd_args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting stromd")?;
    let mut r = Running {
        child: Some(child),
        _stdin: None,
        _dir: Some(dir),
        policed: None,
    };
    wait_for(
        || {
            Ok(strom_api::Client::connect(&sock, Duration::from_secs(1))
                .and_then(|mut c| c.call(&strom_api::Request::Status))
                .is_ok())
        },
        Duration::from_secs(10),
        &mut r,
        "stromd's API (see stromd.log)",
    )?;
    let mut ports = vec![
        ("ha".to_string(), IP_A, t.mac_a.clone(), "pod-a".to_string()),
        ("hb".to_string(), IP_B, t.mac_b.clone(), "pod-b".to_string()),
    ];
    for (ifname, ip, mac) in t.extra_ports() {
        let id = format!("pod-{ifname}");
        ports.push((ifname, ip, mac, id));
    }
    for (ifname, ip, mac, id) in &ports {
        let (ifname, mac, id) = (ifname.as_str(), mac.as_str(), id.as_str());
        stromctl(
            env,
            &sock,
            &[
                "add-port",
                "--ifname",
                ifname,
                "--ip",
                &ip.to_string(),
                "--mac",
                mac,
                "--container-id",
                id,
            ],
        )?;
    }
    Ok(r)
}

fn stromctl(env: &Env, sock: &FsPath, args: &[&str]) -> Result<()> {
    let (bin, sock) = (env.bin.join("stromctl"), sock.to_string_lossy());
    let bin = bin.to_string_lossy();
    let mut argv = vec![bin.as_ref(), "-s", sock.as_ref()];
    argv.extend_from_slice(args);
    run(&argv).map(drop)
}

/// Polls `ready` until it holds; fails early if the process exits first.
fn wait_for(
    mut ready: impl FnMut() -> Result<bool>,
    limit: Duration,
    r: &mut Running,
    what: &str,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ready().unwrap_or(false) {
            return Ok(());
        }
        if let Some(child) = r.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                r.child = None;
                bail!("waiting for {what}: the process exited ({status})");
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("waiting for {what}: not ready within {} s", limit.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// stromd-svc and kernel-nat translate the same ports, so that every traffic reaches pod B
    /// through both (a port only one of them has would fail that path's measurement alone).
    #[test]
    fn the_service_and_the_nat_rules_translate_the_same_ports() {
        let rules = nat_rules();
        let spec = service_spec();
        let tcp: Vec<u16> = spec
            .ports
            .iter()
            .filter(|p| p.protocol == strom_api::Protocol::Tcp)
            .map(|p| p.port)
            .collect();
        assert_eq!(tcp, [IPERF_PORT, CRR_PORT]);
        for p in tcp {
            assert!(
                rules.contains(&format!("tcp dport {p} dnat to {IP_B}")),
                "{rules}"
            );
        }
        assert_eq!(rules.matches("tcp dport").count(), 2, "{rules}");
        let udp: Vec<u16> = spec
            .ports
            .iter()
            .filter(|p| p.protocol == strom_api::Protocol::Udp)
            .map(|p| p.port)
            .collect();
        let mut want: Vec<u16> = (SINK_PORT_FIRST..=SINK_PORT_LAST).collect();
        want.push(SOCKPERF_PORT);
        let mut got = udp.clone();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
        assert!(rules.contains(&format!(
            "udp dport {SINK_PORT_FIRST}-{SINK_PORT_LAST} dnat to {IP_B}"
        )));
        assert!(rules.contains(&format!("udp dport {SOCKPERF_PORT} dnat to {IP_B}")));
        for p in &spec.ports {
            assert_eq!(p.endpoints.len(), 1);
            assert_eq!(
                (p.endpoints[0].ip, p.endpoints[0].port),
                (IP_B.into(), p.port)
            );
        }
    }
}
