//! strom-cni: the CNI plugin of strom (spec 0.4.0, 1.0.0, 1.1.0).
//!
//! ADD creates a veth pair, configures the pod side (address from IPAM, default route via the
//! pod gateway, MTU, offloads off), and registers the host side with stromd. DEL undoes it and
//! never fails for what is already gone. CHECK compares the wiring with prevResult. STATUS asks
//! stromd whether it can wire pods. GC removes what the runtime no longer knows.
#![deny(unsafe_code)]

mod conf;
mod error;
mod ipam;
mod link;
mod nl;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strom_api::mac::{fmt_mac, parse_mac};
use strom_api::{Client, PortInterface, PortKey, PortSpec, Request, Response};

use conf::{CniResult, Interface, IpConfig, NetConf, Route, SUPPORTED};
use error::{code, CniError};
use ipam::{Ipam, Owner};

const LATEST: &str = "1.1.0";
/// The message of the error for an ADD of a container that is wired already (nothing is
/// undone: it belongs to the earlier ADD).
const ALREADY_WIRED: &str = "container is already wired";
/// How long stromd has to answer each request, unless `stromdTimeoutMs` says otherwise.
const STROMD_TIMEOUT: Duration = Duration::from_secs(10);
/// The same for STATUS, which only asks and should not hold the runtime up.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);
/// VXLAN over IPv4: outer Ethernet 14 + IP 20 + UDP 8 + VXLAN 8.
const OVERLAY_HEADER: u32 = 50;

/// The CNI_* environment of one call.
struct Env {
    command: String,
    container_id: String,
    netns: String,
    ifname: String,
    args: Vec<(String, String)>,
    path: Vec<PathBuf>,
}

impl Env {
    fn read() -> Result<Self, CniError> {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        let command = var("CNI_COMMAND");
        if command.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                "CNI_COMMAND is not set",
                "one of ADD, DEL, CHECK, STATUS, GC, VERSION",
            ));
        }
        let args = var("CNI_ARGS")
            .split(';')
            .filter(|s| !s.is_empty())
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        let path = var("CNI_PATH")
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect();
        Ok(Env {
            command,
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args,
            path,
        })
    }

    fn arg(&self, k: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(a, _)| a == k)
            .map(|(_, v)| v.as_str())
    }

    /// Checks what ADD, DEL and CHECK need.
    fn require(&self, netns: bool) -> Result<(), CniError> {
        let bad = |what: &str, why: String| {
            Err(CniError::new(
                code::INVALID_ENV,
                format!("invalid {what}"),
                why,
            ))
        };
        if self.container_id.is_empty()
            || !self
                .container_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return bad(
                "CNI_CONTAINERID",
                format!("{:?}: must be non-empty [A-Za-z0-9_.-]", self.container_id),
            );
        }
        if self.ifname.is_empty()
            || self.ifname.len() > 15
            || self.ifname.contains(['/', ' ', ':'])
            || self.ifname == "."
            || self.ifname == ".."
        {
            return bad(
                "CNI_IFNAME",
                format!("{:?}: a valid interface name", self.ifname),
            );
        }
        if self.netns.chars().any(char::is_whitespace) {
            return bad(
                "CNI_NETNS",
                format!("{:?}: a path without white space", self.netns),
            );
        }
        if netns && self.netns.is_empty() {
            return bad("CNI_NETNS", "not set".into());
        }
        Ok(())
    }

    fn owner(&self) -> Owner {
        Owner {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }
}

fn io_err(msg: &str) -> impl Fn(String) -> CniError + '_ {
    move |e| CniError::new(code::WIRING, msg, e)
}

/// A connection to stromd. Failing to connect is always "try again later" (11): a runtime
/// retries, and stromd (re)starting is what it waits for.
fn client(c: &NetConf) -> Result<Client, CniError> {
    Client::connect(c.socket(), c.stromd_timeout(STROMD_TIMEOUT))
        .map_err(|e| error::from_stromd(&e, "stromd refused the connection"))
}

fn mac_for(ip: Ipv4Addr) -> String {
    // Locally administered, derived from the address (stable across restarts of the pod).
    let o = ip.octets();
    fmt_mac(&[0x0a, 0x58, o[0], o[1], o[2], o[3]])
}

fn default_mtu(c: &NetConf) -> u32 {
    if let Some(m) = c.mtu {
        return m;
    }
    c.uplink_interface
        .as_deref()
        .and_then(link::node_link)
        .and_then(|l| l.get("mtu").and_then(Value::as_u64))
        .and_then(|m| u32::try_from(m).ok())
        .map(|m| m.saturating_sub(OVERLAY_HEADER))
        .unwrap_or(1500 - OVERLAY_HEADER)
        .min(strom_api::MAX_UPLINK_MTU)
}

/// The address IPAM gives this attachment, and how to give it back.
enum Addr {
    Own(Ipam),
    Delegated(PathBuf),
}

fn find_plugin(env: &Env, name: &str) -> Result<PathBuf, CniError> {
    if name.contains('/') {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "invalid ipam.type",
            name.to_string(),
        ));
    }
    env.path
        .iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "IPAM plugin not found",
                format!("{name} in CNI_PATH {:?}", env.path),
            )
        })
}

/// Runs a delegated IPAM plugin exactly as the runtime would run us.
fn delegate(plugin: &PathBuf, command: &str, stdin: &[u8]) -> Result<Option<CniResult>, CniError> {
    let mut child = Command::new(plugin)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            CniError::new(
                code::DELEGATE,
                "cannot run IPAM plugin",
                format!("{}: {e}", plugin.display()),
            )
        })?;
    if let Some(mut w) = child.stdin.take() {
        w.write_all(stdin)
            .map_err(|e| CniError::new(code::DELEGATE, "IPAM plugin stdin", e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| CniError::new(code::DELEGATE, "IPAM plugin", e.to_string()))?;
    if !out.status.success() {
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        return Err(CniError::new(
            code::DELEGATE,
            format!("IPAM plugin {} failed", plugin.display()),
            v.get("msg")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned()),
        ));
    }
    if command != "ADD" {
        return Ok(None);
    }
    serde_json::from_slice(&out.stdout).map(Some).map_err(|e| {
        CniError::new(
            code::DELEGATE,
            "IPAM plugin returned an unreadable result",
            e.to_string(),
        )
    })
}

fn addr_source(c: &NetConf, env: &Env) -> Result<Addr, CniError> {
    match c.ipam_type()? {
        "strom" => {
            let cfg = c.strom_ipam()?;
            let gw = c.gateway();
            Ok(Addr::Own(Ipam::new(
                &cfg.data_dir,
                &c.name,
                cfg.subnet,
                vec![gw],
            )?))
        }
        other => Ok(Addr::Delegated(find_plugin(env, other)?)),
    }
}

fn requested_ip(c: &NetConf, env: &Env) -> Result<Option<Ipv4Addr>, CniError> {
    let raw = env.arg("IP").map(str::to_string).or_else(|| {
        c.runtime_config
            .as_ref()
            .and_then(|r| r.ips.first().cloned())
    });
    raw.map(|s| {
        let s = s.split('/').next().unwrap_or_default();
        if s.contains(':') {
            return Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                "IPv6 addresses are not supported yet",
                s.to_string(),
            ));
        }
        s.parse::<Ipv4Addr>().map_err(|e| {
            CniError::new(
                code::INVALID_CONFIG,
                "invalid requested IP",
                format!("{s}: {e}"),
            )
        })
    })
    .transpose()
}

fn cmd_add(c: &NetConf, env: &Env, stdin: &[u8]) -> Result<CniResult, CniError> {
    env.require(true)?;
    if !std::path::Path::new(&env.netns).exists() {
        return Err(CniError::new(
            code::INVALID_ENV,
            "CNI_NETNS does not exist",
            env.netns.clone(),
        ));
    }
    let host = link::host_ifname(&env.container_id, &env.ifname);
    if link::node_link_exists(&host) {
        return Err(CniError::new(
            code::WIRING,
            ALREADY_WIRED,
            format!("{host} exists; DEL first"),
        ));
    }
    let source = addr_source(c, env)?;
    // The node's pod subnet, reached at the pod interface's own MTU: the allocator's, or the
    // prefix the delegated IPAM plugin gave the address (none for a /32).
    let (ip, local) = match &source {
        Addr::Own(ipam) => (
            ipam.allocate(&env.owner(), requested_ip(c, env)?)?,
            Some(ipam.subnet().trunc()).filter(|n| n.prefix_len() < 32),
        ),
        Addr::Delegated(p) => {
            let r = delegate(p, "ADD", stdin)?.unwrap_or_else(|| CniResult {
                cni_version: String::new(),
                interfaces: vec![],
                ips: vec![],
                routes: vec![],
                dns: None,
            });
            let first = r.ips.iter().find_map(|i| {
                i.address
                    .split('/')
                    .next()
                    .and_then(|a| a.parse::<Ipv4Addr>().ok())
            });
            let local = r.ips.iter().find_map(|i| {
                let net = i.address.parse::<ipnet::Ipv4Net>().ok()?;
                (net.prefix_len() < 32).then(|| net.trunc())
            });
            let ip = first.ok_or_else(|| {
                CniError::new(
                    code::DELEGATE,
                    "IPAM plugin returned no IPv4 address",
                    format!("{:?}", r.ips),
                )
            })?;
            (ip, local)
        }
    };
    match wire(c, env, &host, ip, local) {
        Ok(r) => Ok(r),
        Err(e) if e.msg == ALREADY_WIRED => Err(e),
        Err(e) => {
            // Undo in reverse: registration and interfaces (stromd deletes the veth of a port it
            // has; the rest is deleted here), address. Best effort; DEL/GC finish.
            if let Ok(mut cl) = client(c) {
                let _ = cl.call(&Request::RemovePort {
                    key: PortKey::Ifname(host.clone()),
                    interface: PortInterface::Delete,
                });
            }
            let _ = link::delete_node_link(&host);
            release(&source, env, stdin);
            Err(e)
        }
    }
}

fn wire(
    c: &NetConf,
    env: &Env,
    host: &str,
    ip: Ipv4Addr,
    local: Option<ipnet::Ipv4Net>,
) -> Result<CniResult, CniError> {
    // The interface carries `localMtu` toward the node's pods; the default route keeps
    // everything else at the path's MTU. Without a known pod subnet, the path's MTU throughout.
    let path_mtu = default_mtu(c);
    let local = local.filter(|_| c.local_mtu(path_mtu) > path_mtu);
    let mtu = if local.is_some() {
        c.local_mtu(path_mtu)
    } else {
        path_mtu
    };
    // The Service CIDRs at the interface's MTU too, where it is larger than the path's.
    let mut routed: Vec<ipnet::Ipv4Net> = local.into_iter().collect();
    if local.is_some() {
        for n in c.service_cidrs.iter().map(ipnet::Ipv4Net::trunc) {
            if !routed.contains(&n) {
                routed.push(n);
            }
        }
    }
    let local = routed;
    let routes = nl::PodRoutes {
        path_mtu: (mtu > path_mtu).then_some(path_mtu),
        local: local.clone(),
    };
    let gw = c.gateway();
    let mac = env
        .arg("MAC")
        .map(str::to_string)
        .or_else(|| c.runtime_config.as_ref().and_then(|r| r.mac.clone()))
        .unwrap_or_else(|| mac_for(ip));
    let Some(mac_bytes) = parse_mac(&mac) else {
        return Err(CniError::new(code::INVALID_CONFIG, "invalid MAC", mac));
    };
    let (ns, ifn) = (&env.netns, &env.ifname);
    let netns = std::fs::File::open(ns).map_err(|e| {
        CniError::new(
            code::INVALID_ENV,
            "cannot open CNI_NETNS",
            format!("{ns}: {e}"),
        )
    })?;
    let pod_side = match nl::wire_node(host, ifn, mac_bytes, mtu, netns, ip, gw, routes)
        .map_err(io_err("wiring the node side"))?
    {
        nl::Created::Ok(p) => p,
        nl::Created::Exists => {
            return Err(CniError::new(
                code::WIRING,
                ALREADY_WIRED,
                format!("{host} exists; DEL first"),
            ))
        }
    };
    let spec = PortSpec {
        ifname: host.to_string(),
        ips: vec![ip.into()],
        mac: mac.clone(),
        container_id: env.container_id.clone(),
        pod_ifname: ifn.clone(),
        pod_namespace: env.arg("K8S_POD_NAMESPACE").unwrap_or_default().to_string(),
        pod_name: env.arg("K8S_POD_NAME").unwrap_or_default().to_string(),
    };
    // Registration runs while the pod side is configured; both must succeed.
    let registered = client(c).and_then(|mut cl| {
        // 102 only when stromd answered no; busy or gone is 11, and the runtime retries.
        cl.call(&Request::AddPort { spec })
            .map_err(|e| error::from_stromd(&e, "stromd refused the port"))
    });
    nl::join(pod_side).map_err(io_err("wiring the pod side"))?;
    let host_mac = match registered {
        Ok(Response::Port(p)) => p.host_mac,
        Ok(other) => {
            return Err(CniError::new(
                code::DATAPLANE,
                "unexpected answer from stromd",
                format!("{other:?}"),
            ))
        }
        Err(e) => return Err(e),
    };
    Ok(CniResult {
        cni_version: c.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: host.to_string(),
                mac: host_mac,
                mtu: Some(mtu),
                sandbox: None,
            },
            Interface {
                name: ifn.clone(),
                mac,
                mtu: Some(mtu),
                sandbox: Some(ns.clone()),
            },
        ],
        ips: vec![IpConfig {
            version: None,
            address: format!("{ip}/32"),
            gateway: Some(gw.to_string()),
            interface: Some(1),
        }],
        routes: std::iter::once(Route {
            dst: "0.0.0.0/0".into(),
            gw: Some(gw.to_string()),
        })
        .chain(local.iter().map(|n| Route {
            dst: n.to_string(),
            gw: Some(gw.to_string()),
        }))
        .collect(),
        dns: c
            .dns
            .clone()
            .filter(|d| d.as_object().is_some_and(|o| !o.is_empty())),
    }
    .for_version(&c.cni_version))
}

fn release(source: &Addr, env: &Env, stdin: &[u8]) {
    let r = match source {
        Addr::Own(ipam) => ipam.release(&env.owner()).map(|_| ()),
        Addr::Delegated(p) => delegate(p, "DEL", stdin).map(|_| ()),
    };
    if let Err(e) = r {
        eprintln!("strom-cni: releasing the address: {e}");
    }
}

/// DEL: every step runs even if an earlier one failed; only a broken config fails.
fn cmd_del(c: &NetConf, env: &Env, stdin: &[u8], notes: &mut Vec<String>) -> Result<(), CniError> {
    env.require(false)?;
    let host = link::host_ifname(&env.container_id, &env.ifname);
    // stromd unregisters the port and deletes its veth, and answers once the kernel has
    // unlisted the pair; the kernel's teardown after that (an `rcu_barrier()` and the wait for
    // the device's last references, most of a veth deletion's time) goes on in stromd, not in
    // the runtime's call (BENCHMARKS.md §2). The address is released meanwhile.
    std::thread::scope(|s| {
        let releasing = s.spawn(|| addr_source(c, env).map(|src| release(&src, env, stdin)));
        if let Err(e) = client(c).and_then(|mut cl| {
            cl.call(&Request::RemovePort {
                key: PortKey::Container {
                    container_id: env.container_id.clone(),
                    pod_ifname: env.ifname.clone(),
                },
                interface: PortInterface::Delete,
            })
            .map_err(|e| error::from_stromd(&e, "stromd refused to unregister the port"))
        }) {
            notes.push(format!("stromd: {e}"));
        }
        // Whatever stromd did not delete (it is down, never had the port, or did not see the
        // interface go): deleted here; nothing to do when the interface is gone.
        if let Err(e) = link::delete_node_link(&host) {
            notes.push(format!("deleting {host}: {e}"));
        }
        match releasing.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => notes.push(format!("ipam: {e}")),
            Err(_) => notes.push("ipam: thread panicked".into()),
        }
    });
    Ok(())
}

fn cmd_check(c: &NetConf, env: &Env, stdin: &[u8]) -> Result<(), CniError> {
    env.require(true)?;
    let prev: CniResult = serde_json::from_value(c.prev_result.clone().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "CHECK needs prevResult",
            "prevResult is missing",
        )
    })?)
    .map_err(|e| CniError::new(code::DECODE, "cannot decode prevResult", e.to_string()))?;
    let diff = |what: String| {
        Err(CniError::new(
            code::CHECK_FAILED,
            "wiring differs from prevResult",
            what,
        ))
    };
    let host = link::host_ifname(&env.container_id, &env.ifname);
    if !link::node_link_exists(&host) {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            "container is not wired",
            format!("host interface {host} is missing"),
        ));
    }
    let pod = link::pod_link(&env.netns, &env.ifname)
        .map_err(|e| CniError::new(code::CHECK_FAILED, "wiring differs from prevResult", e))?;
    if let Some(want) = prev
        .interfaces
        .iter()
        .find(|i| i.sandbox.is_some() && i.name == env.ifname)
    {
        let mac = pod
            .get("address")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !want.mac.is_empty() && !want.mac.eq_ignore_ascii_case(mac) {
            return diff(format!(
                "{} has MAC {mac}, prevResult says {}",
                env.ifname, want.mac
            ));
        }
        if let Some(m) = want.mtu {
            let have = pod.get("mtu").and_then(Value::as_u64).unwrap_or(0);
            if have != u64::from(m) {
                return diff(format!(
                    "{} has MTU {have}, prevResult says {m}",
                    env.ifname
                ));
            }
        }
    }
    let have_addrs: Vec<String> = pod
        .get("addr_info")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|i| {
                    Some(format!(
                        "{}/{}",
                        i.get("local")?.as_str()?,
                        i.get("prefixlen")?.as_u64()?
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    for ip in &prev.ips {
        if !have_addrs.contains(&ip.address) {
            return diff(format!(
                "address {} missing on {} (has {:?})",
                ip.address, env.ifname, have_addrs
            ));
        }
    }
    match addr_source(c, env)? {
        Addr::Delegated(plugin) => {
            delegate(&plugin, "CHECK", stdin)?;
        }
        Addr::Own(ipam) => {
            let leased: Vec<String> = ipam
                .lookup(&env.owner())?
                .iter()
                .map(|a| format!("{a}/32"))
                .collect();
            if let Some(ip) = prev.ips.iter().find(|ip| !leased.contains(&ip.address)) {
                return diff(format!(
                    "address {} is not leased to this container (leases: {leased:?})",
                    ip.address
                ));
            }
        }
    }
    let routes = link::pod_routes(&env.netns)
        .map_err(|e| CniError::new(code::IO, "reading pod routes", e))?;
    for r in &prev.routes {
        // `ip -j route` names the default route so, and a host route without its /32.
        let dst = if r.dst == "0.0.0.0/0" {
            "default"
        } else {
            r.dst.strip_suffix("/32").unwrap_or(&r.dst)
        };
        let ok = routes.iter().any(|have| {
            have.get("dst").and_then(Value::as_str) == Some(dst)
                && r.gw
                    .as_deref()
                    .is_none_or(|g| have.get("gateway").and_then(Value::as_str) == Some(g))
        });
        if !ok {
            return diff(format!("route {} via {:?} missing", r.dst, r.gw));
        }
    }
    match client(c)?.call(&Request::Ports) {
        Ok(Response::Ports { ports }) => {
            let Some(p) = ports.iter().find(|p| {
                p.spec.container_id == env.container_id && p.spec.pod_ifname == env.ifname
            }) else {
                return diff(format!(
                    "stromd has no port for container {}",
                    env.container_id
                ));
            };
            if p.spec.ifname != host {
                return diff(format!(
                    "stromd has port {} for it, expected {host}",
                    p.spec.ifname
                ));
            }
        }
        Ok(other) => {
            return Err(CniError::new(
                code::DATAPLANE,
                "unexpected answer from stromd",
                format!("{other:?}"),
            ))
        }
        Err(e) => return Err(error::from_stromd(&e, "stromd refused to list its ports")),
    }
    Ok(())
}

/// STATUS: every way of not being able to wire pods is the spec's 50, "not available" (the
/// runtime then holds ADDs back): stromd unreachable, busy, gone mid-call, refusing, or
/// answering that it is not ready, with the reason it gives.
fn cmd_status(c: &NetConf) -> Result<(), CniError> {
    let not = |e: String| CniError::new(code::NOT_AVAILABLE, "strom cannot wire pods now", e);
    let mut cl = Client::connect(c.socket(), c.stromd_timeout(STATUS_TIMEOUT))
        .map_err(|e| not(e.to_string()))?;
    match cl.call(&Request::Status) {
        Ok(Response::Status(s)) if s.ready => Ok(()),
        Ok(Response::Status(s)) => Err(not(format!(
            "stromd is not ready: {} ({} workers, {} ports, poll mode {}, stromd {})",
            s.reason.as_deref().unwrap_or("it gives no reason"),
            s.workers,
            s.ports,
            s.poll_mode,
            s.version
        ))),
        Ok(other) => Err(not(format!("unexpected answer from stromd: {other:?}"))),
        Err(e) => Err(not(e.to_string())),
    }
}

fn cmd_gc(c: &NetConf, env: &Env, notes: &mut Vec<String>) -> Result<(), CniError> {
    let list = c
        .other
        .get("cni.dev/valid-attachments")
        .or_else(|| c.other.get("cni.dev/attachments"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let valid: HashSet<(String, String)> = list
        .iter()
        .filter_map(|a| {
            Some((
                a.get("containerID")?.as_str()?.to_string(),
                a.get("ifname")?.as_str()?.to_string(),
            ))
        })
        .collect();
    let valid_hosts: HashSet<String> = valid.iter().map(|(c, i)| link::host_ifname(c, i)).collect();
    // Registrations.
    match client(c).and_then(|mut cl| {
        cl.call(&Request::Ports)
            .map(|r| (cl, r))
            .map_err(|e| error::from_stromd(&e, "stromd refused to list its ports"))
    }) {
        Ok((mut cl, Response::Ports { ports })) => {
            for p in ports {
                if link::is_host_ifname(&p.spec.ifname) && !valid_hosts.contains(&p.spec.ifname) {
                    // stromd deletes its interface, not among the valid ones either; what it
                    // does not delete is deleted below.
                    if let Err(e) = cl.call(&Request::RemovePort {
                        key: PortKey::Ifname(p.spec.ifname.clone()),
                        interface: PortInterface::Delete,
                    }) {
                        notes.push(format!("unregister {}: {e}", p.spec.ifname));
                    }
                }
            }
        }
        Ok(_) => {}
        Err(e) => notes.push(format!("stromd: {e}")),
    }
    // Interfaces.
    for v in link::node_veths().map_err(|e| CniError::new(code::IO, "listing veths", e))? {
        if link::is_host_ifname(&v) && !valid_hosts.contains(&v) {
            if let Err(e) = link::delete_node_link(&v) {
                notes.push(e);
            }
        }
    }
    // Addresses.
    if let Ok(Addr::Own(ipam)) = addr_source(c, env) {
        ipam.retain(|o| valid.contains(&(o.container_id.clone(), o.ifname.clone())))?;
    }
    Ok(())
}

/// Appends the call's line to `logFile`. Calls run concurrently (a runtime wires many pods at
/// once) and share the file, so each line goes in whole: built in a buffer first, written with
/// O_APPEND in one write(2) (one write to a regular file is not interleaved with another, and
/// O_APPEND puts it at the end), and under an exclusive flock, so that a short write's rest
/// (a full disk, a signal) or a writer that does not append cannot tear a line either. Logging
/// is best effort: a log that cannot be written never fails the call.
fn log_call(c: Option<&NetConf>, env: &Env, outcome: &str, started: Instant) {
    let Some(path) = c.and_then(|c| c.log_file.as_ref()) else {
        return;
    };
    if let Err(e) = append_line(path, &log_line(env, outcome, started)) {
        eprintln!("strom-cni: logging to {}: {e}", path.display());
    }
}

/// The call's log line, newline included.
fn log_line(env: &Env, outcome: &str, started: Instant) -> Vec<u8> {
    let line = json!({
        "time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
        "verb": env.command,
        "container_id": env.container_id,
        "ifname": env.ifname,
        "outcome": outcome,
        "ms": started.elapsed().as_secs_f64() * 1000.0,
    });
    // A Value always serializes; an empty line is never written (see `append_line`).
    let mut buf = serde_json::to_vec(&line).unwrap_or_default();
    if !buf.is_empty() {
        buf.push(b'\n');
    }
    buf
}

/// Appends `line` (a whole line, newline included) to `path` in one write(2), under an
/// exclusive flock of the file.
fn append_line(path: &Path, line: &[u8]) -> std::io::Result<()> {
    if line.is_empty() {
        return Ok(());
    }
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    // Released when `f` closes.
    f.lock()?;
    // One write(2) for the whole line; should the kernel take only part of it, the rest
    // follows under the same lock, so no other call's line comes between.
    let n = f.write(line)?;
    f.write_all(&line[n..])
}

fn main() {
    let started = Instant::now();
    let mut stdin = Vec::new();
    let env = match Env::read() {
        Ok(e) => e,
        Err(e) => {
            println!("{}", e.to_json(LATEST));
            std::process::exit(1);
        }
    };
    if env.command == "VERSION" {
        let _ = std::io::stdin().read_to_end(&mut stdin);
        let asked = serde_json::from_slice::<Value>(&stdin)
            .ok()
            .and_then(|v| {
                v.get("cniVersion")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .filter(|v| SUPPORTED.contains(&v.as_str()))
            .unwrap_or_else(|| LATEST.into());
        println!(
            "{}",
            json!({"cniVersion": asked, "supportedVersions": SUPPORTED})
        );
        return;
    }
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        println!(
            "{}",
            CniError::new(code::IO, "cannot read stdin", e.to_string()).to_json(LATEST)
        );
        std::process::exit(1);
    }
    let conf = NetConf::parse(&stdin);
    let version = conf
        .as_ref()
        .map(|c| c.cni_version.clone())
        .unwrap_or_else(|_| LATEST.into());
    let mut notes = Vec::new();
    let outcome: Result<Option<String>, CniError> =
        conf.as_ref()
            .map_err(Clone::clone)
            .and_then(|c| match env.command.as_str() {
                "ADD" => cmd_add(c, &env, &stdin)
                    .map(|r| Some(serde_json::to_string(&r).unwrap_or_default())),
                "DEL" => cmd_del(c, &env, &stdin, &mut notes).map(|()| None),
                "CHECK" => cmd_check(c, &env, &stdin).map(|()| None),
                "STATUS" => cmd_status(c).map(|()| None),
                "GC" => cmd_gc(c, &env, &mut notes).map(|()| None),
                other => Err(CniError::new(
                    code::INVALID_ENV,
                    "unknown CNI_COMMAND",
                    other.to_string(),
                )),
            });
    for n in &notes {
        eprintln!("strom-cni: {n}");
    }
    match outcome {
        Ok(out) => {
            if let Some(s) = out {
                println!("{s}");
            }
            let note = if notes.is_empty() {
                "ok".to_string()
            } else {
                format!("ok ({})", notes.join("; "))
            };
            log_call(conf.as_ref().ok(), &env, &note, started);
        }
        Err(e) => {
            println!("{}", e.to_json(&version));
            log_call(
                conf.as_ref().ok(),
                &env,
                &format!("error {}: {e}", e.code),
                started,
            );
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_lines_from_concurrent_writers_stay_whole() {
        let dir = std::env::temp_dir().join(format!("strom-cni-append-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/cni.log");
        // Longer than a pipe buffer and than one page: still one line each.
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let path = &path;
                s.spawn(move || {
                    for i in 0..50 {
                        let mut line = serde_json::to_vec(&json!({
                            "t": t, "i": i, "pad": "x".repeat(9000)
                        }))
                        .unwrap();
                        line.push(b'\n');
                        append_line(path, &line).unwrap();
                    }
                });
            }
        });
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8 * 50);
        for l in lines {
            let v: Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["pad"].as_str().map(str::len), Some(9000));
        }
        append_line(&path, b"").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().len(), text.len());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
