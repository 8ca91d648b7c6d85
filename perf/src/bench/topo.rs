//! The benchmark topology: two pods and a node, each in its own network namespace.
//!
//! ```text
//!   pod A (ns <p>-a)                node (ns <p>-n)                 pod B (ns <p>-b)
//!   eth0 198.18.1.2/24 ══ veth ══ ha 198.18.1.1   hb 198.18.2.1 ══ veth ══ eth0 198.18.2.2/24
//!   default via 198.18.1.1          the path under test forwards     default via 198.18.2.1
//!                                   between ha and hb                nftables drops UDP to the
//!                                                                    sink ports before the sockets
//! ```
//! The project's own benchmark topology (fixed addresses and static
//! neighbours, so no path depends on ARP), with a sink that covers the port ranges of the flow
//! counts strom-bench sends. Everything lives in namespaces this module creates and removes
//! (also when a run fails: [`Topology`] removes them when dropped).

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const IP_A: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
pub const GW_A: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const IP_B: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
pub const GW_B: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
/// Pods beyond A and B (the `pods` traffic): pod i (1-based) is `<prefix>-p<i>`, address
/// 198.18.3.i, MAC 02:00:00:00:03:ii, joined to the node by veth `h<i>`; the node routes its
/// /32 to that veth with a static neighbour. They only receive.
pub const EXTRA_NET: [u8; 3] = [198, 18, 3];

/// The address of extra pod `i` (1-based).
pub fn extra_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(EXTRA_NET[0], EXTRA_NET[1], EXTRA_NET[2], i as u8)
}

/// The MAC of extra pod `i`.
pub fn extra_mac(i: usize) -> String {
    format!("02:00:00:00:03:{i:02x}")
}

/// The node's pod CIDR (stromd's `pod_cidr`): A's and B's addresses lie in it.
pub const POD_CIDR: &str = "198.18.0.0/22";

/// The Service address the kernel-nat path translates to pod B.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);

/// The Service CIDR `VIP` lies in: the pods route it as strom-cni's `serviceCidrs` does, like
/// the pod CIDR.
pub const SERVICE_CIDR: &str = "198.19.0.0/16";

/// UDP flood: source ports from here, destination ports from `SINK_PORT_FIRST`.
pub const SRC_PORT_FIRST: u16 = 1024;
pub const SINK_PORT_FIRST: u16 = 9;
/// Pod B drops UDP to `SINK_PORT_FIRST..=SINK_PORT_LAST` before the socket layer.
pub const SINK_PORT_LAST: u16 = SINK_PORT_FIRST + 255;
pub const IPERF_PORT: u16 = 5201;
pub const SOCKPERF_PORT: u16 = 11111;
/// The `crr` traffic's server (TCP, in pod B).
pub const CRR_PORT: u16 = 8080;

/// Runs a command to completion; its stderr goes into the error when it fails.
pub fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command in a namespace to completion.
pub fn ns_run(ns: &str, args: &[&str]) -> Result<String> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    run(&v)
}

/// `ip netns exec NS`, the command to run there still to be added.
pub fn ns_command(ns: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]);
    c
}

/// Stops a child: SIGINT, then SIGKILL if it has not exited within `grace`. Returns whether it
/// stopped on SIGINT.
pub fn stop_child(child: &mut Child, grace: Duration) -> bool {
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// Runs a command in a namespace with its input from `stdin`.
pub fn ns_run_input(ns: &str, args: &[&str], stdin: &str) -> Result<()> {
    use std::io::Write;
    let mut child = ns_command(ns)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", args[0]))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{} in {ns} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The three namespaces and what the paths need to know about them.
pub struct Topology {
    pub a: String,
    pub b: String,
    pub n: String,
    pub mac_a: String,
    pub mac_b: String,
    pub mac_ha: String,
    pub mac_hb: String,
    /// Namespaces of the extra pods (index i-1 for pod i).
    pub extra: Vec<String>,
}

impl Topology {
    /// Removes namespaces left by an earlier run with the same prefix, then builds the topology
    /// with `extra` more pods (at most 200).
    pub fn create(prefix: &str, extra: usize) -> Result<Topology> {
        if extra > 200 {
            bail!("{extra} extra pods: at most 200");
        }
        let mut t = Topology {
            a: format!("{prefix}-a"),
            b: format!("{prefix}-b"),
            n: format!("{prefix}-n"),
            mac_a: String::new(),
            mac_b: String::new(),
            mac_ha: String::new(),
            mac_hb: String::new(),
            extra: (1..=extra).map(|i| format!("{prefix}-p{i}")).collect(),
        };
        t.remove();
        // From here on, a failure drops `t`, which removes what was made.
        for ns in [&t.a, &t.b, &t.n] {
            run(&["ip", "netns", "add", ns])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        for (host, pod) in [("ha", &t.a), ("hb", &t.b)] {
            run(&[
                "ip", "link", "add", host, "netns", &t.n, "type", "veth", "peer", "name", "eth0",
                "netns", pod,
            ])?;
        }
        let (ip_a, ip_b) = (format!("{IP_A}/24"), format!("{IP_B}/24"));
        let (gw_a, gw_b) = (format!("{GW_A}/24"), format!("{GW_B}/24"));
        run(&["ip", "-n", &t.n, "addr", "add", &gw_a, "dev", "ha"])?;
        run(&["ip", "-n", &t.n, "addr", "add", &gw_b, "dev", "hb"])?;
        run(&["ip", "-n", &t.a, "addr", "add", &ip_a, "dev", "eth0"])?;
        run(&["ip", "-n", &t.b, "addr", "add", &ip_b, "dev", "eth0"])?;
        for (ns, dev) in [(&t.a, "eth0"), (&t.b, "eth0"), (&t.n, "ha"), (&t.n, "hb")] {
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        }
        run(&[
            "ip",
            "-n",
            &t.a,
            "route",
            "add",
            "default",
            "via",
            &GW_A.to_string(),
        ])?;
        run(&[
            "ip",
            "-n",
            &t.b,
            "route",
            "add",
            "default",
            "via",
            &GW_B.to_string(),
        ])?;
        t.mac_a = mac(&t.a, "eth0")?;
        t.mac_b = mac(&t.b, "eth0")?;
        t.mac_ha = mac(&t.n, "ha")?;
        t.mac_hb = mac(&t.n, "hb")?;
        // Static neighbours, so that no path depends on ARP.
        for (ns, ip, lladdr, dev) in [
            (&t.a, GW_A, &t.mac_ha, "eth0"),
            (&t.b, GW_B, &t.mac_hb, "eth0"),
            (&t.n, IP_A, &t.mac_a, "ha"),
            (&t.n, IP_B, &t.mac_b, "hb"),
        ] {
            run(&[
                "ip",
                "-n",
                ns,
                "neigh",
                "replace",
                &ip.to_string(),
                "lladdr",
                lladdr,
                "dev",
                dev,
                "nud",
                "permanent",
            ])?;
        }
        ns_run_input(
            &t.b,
            &["nft", "-f", "-"],
            &format!(
                "table inet sink {{\n  chain pre {{ type filter hook prerouting priority -300; \
                 udp dport {SINK_PORT_FIRST}-{SINK_PORT_LAST} drop; }}\n}}\n"
            ),
        )?;
        for i in 1..=extra {
            t.add_extra(i)?;
        }
        Ok(t)
    }

    /// Extra pod `i`: namespace, veth, address, the node's route and neighbour, the sink rule.
    fn add_extra(&self, i: usize) -> Result<()> {
        let ns = &self.extra[i - 1];
        let host = format!("h{i}");
        let (ip, mac) = (extra_ip(i).to_string(), extra_mac(i));
        run(&["ip", "netns", "add", ns])?;
        run(&[
            "ip", "link", "add", &host, "netns", &self.n, "type", "veth", "peer", "name", "eth0",
            "address", &mac, "netns", ns,
        ])?;
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{ip}/32"),
            "dev",
            "eth0",
        ])?;
        run(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
        run(&["ip", "-n", &self.n, "link", "set", &host, "up"])?;
        run(&[
            "ip",
            "-n",
            &self.n,
            "route",
            "add",
            &format!("{ip}/32"),
            "dev",
            &host,
        ])?;
        run(&[
            "ip",
            "-n",
            &self.n,
            "neigh",
            "replace",
            &ip,
            "lladdr",
            &mac,
            "dev",
            &host,
            "nud",
            "permanent",
        ])?;
        ns_run_input(
            ns,
            &["nft", "-f", "-"],
            &format!(
                "table inet sink {{\n  chain pre {{ type filter hook prerouting priority -300; \
                 udp dport {SINK_PORT_FIRST}-{SINK_PORT_LAST} drop; }}\n}}\n"
            ),
        )
    }

    /// Packets the first `n` extra pods' interfaces have received, together.
    pub fn rx_extra(&self, n: usize) -> Result<u64> {
        let mut sum = 0;
        for ns in self.extra.iter().take(n) {
            let s = ns_run(ns, &["cat", "/sys/class/net/eth0/statistics/rx_packets"])?;
            sum += s
                .trim()
                .parse::<u64>()
                .context("rx_packets of an extra pod")?;
        }
        Ok(sum)
    }

    /// The node-side interfaces of the extra pods, with their addresses and MACs.
    pub fn extra_ports(&self) -> Vec<(String, Ipv4Addr, String)> {
        (1..=self.extra.len())
            .map(|i| (format!("h{i}"), extra_ip(i), extra_mac(i)))
            .collect()
    }

    /// Packets pod B's interface has received.
    pub fn rx_b(&self) -> Result<u64> {
        let s = ns_run(
            &self.b,
            &["cat", "/sys/class/net/eth0/statistics/rx_packets"],
        )?;
        s.trim().parse().context("rx_packets of pod B")
    }

    /// Runs the NAPI instances of the node's veths in kernel threads (`threaded`) pinned to
    /// `core`, and returns how many threads it pinned. A veth has NAPI instances only while an
    /// XDP program is attached, so this is called after the path has started; they go with
    /// the program, and the next path's are pinned anew. The threads are named
    /// `napi/<interface>-<id>`; the interface names are this topology's own.
    pub fn pin_napi(&self, core: usize) -> Result<usize> {
        for dev in ["ha", "hb"] {
            ns_run(
                &self.n,
                &[
                    "sh",
                    "-c",
                    &format!("echo 1 > /sys/class/net/{dev}/threaded"),
                ],
            )?;
        }
        let mut pinned = 0;
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
                continue;
            };
            if ["napi/ha-", "napi/hb-"]
                .iter()
                .any(|p| comm.trim().starts_with(p))
            {
                run(&["taskset", "-pc", &core.to_string(), &pid.to_string()])?;
                pinned += 1;
            }
        }
        Ok(pinned)
    }

    /// Checksum offload, TSO and GSO in the sending pods: on for the kernel paths and
    /// stromd-generic, off for the other AF_XDP paths (as strom-cni sets them; a native XDP
    /// program on the host veth clears TSO and GSO anyway; docs/design.md).
    pub fn offloads(&self, on: bool) -> Result<()> {
        let v = if on { "on" } else { "off" };
        for ns in [&self.a, &self.b] {
            ns_run(ns, &["ethtool", "-K", "eth0", "tx", v, "tso", v, "gso", v])?;
        }
        self.gso_max_size(65536)
    }

    /// The largest super-packet the pods' stacks build (`gso_max_size`, 65536 by default).
    pub fn gso_max_size(&self, bytes: u32) -> Result<()> {
        let b = bytes.to_string();
        for ns in [&self.a, &self.b] {
            ns_run(
                ns,
                &["ip", "link", "set", "dev", "eth0", "gso_max_size", &b],
            )?;
        }
        Ok(())
    }

    /// Pods A and B as strom-cni wires them: interfaces (both ends) at `local`, the routes to
    /// the pod CIDR and the Service CIDR at it, the default route at `path` (no route MTU when
    /// they are equal).
    pub fn pod_mtu(&self, local: u32, path: u32) -> Result<()> {
        let (l, p) = (local.to_string(), path.to_string());
        for (ns, dev) in [
            (&self.a, "eth0"),
            (&self.b, "eth0"),
            (&self.n, "ha"),
            (&self.n, "hb"),
        ] {
            ns_run(ns, &["ip", "link", "set", dev, "mtu", &l])?;
        }
        for (ns, gw) in [(&self.a, GW_A), (&self.b, GW_B)] {
            let gw = gw.to_string();
            let mut default = vec!["ip", "route", "replace", "default", "via", &gw];
            if local != path {
                default.extend(["mtu", &p]);
            }
            ns_run(ns, &default)?;
            for net in [POD_CIDR, SERVICE_CIDR] {
                ns_run(ns, &["ip", "route", "replace", net, "via", &gw])?;
            }
        }
        Ok(())
    }

    /// The pods' routes to each other (the pod CIDR, and the Service CIDR) at `mtu`, their interfaces left as they
    /// are: what the sender's TCP segments to (its TSO then builds 64 KB frames of such
    /// segments), while the receiver still takes a frame as large as its interface's MTU.
    pub fn pod_route_mtu(&self, mtu: u32) -> Result<()> {
        let m = mtu.to_string();
        for (ns, gw) in [(&self.a, GW_A), (&self.b, GW_B)] {
            let gw = gw.to_string();
            for net in [POD_CIDR, SERVICE_CIDR] {
                ns_run(ns, &["ip", "route", "replace", net, "via", &gw, "mtu", &m])?;
            }
        }
        Ok(())
    }

    fn remove(&self) {
        for ns in [&self.a, &self.b, &self.n]
            .into_iter()
            .chain(self.extra.iter())
        {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.remove();
    }
}

fn mac(ns: &str, dev: &str) -> Result<String> {
    Ok(
        ns_run(ns, &["cat", &format!("/sys/class/net/{dev}/address")])?
            .trim()
            .to_string(),
    )
}
