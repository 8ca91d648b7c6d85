//! Interface names, and the read-only questions CHECK and GC ask of iproute2 (`ip -j`: its
//! JSON is the stable, documented view of links, addresses and routes). The ADD/DEL path uses
//! netlink in-process (`nl`).

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Runs a command, feeding `stdin`; returns stdout or a message with stderr.
pub fn run(cmd: &mut Command, stdin: Option<&str>) -> Result<String, String> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{desc}: {e}"))?;
    if let (Some(input), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(input.as_bytes())
            .map_err(|e| format!("{desc}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{desc}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{desc}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip` in the current (node) namespace, or in `netns` (a path) through nsenter.
pub fn ip(netns: Option<&str>) -> Command {
    match netns {
        None => Command::new("ip"),
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={ns}")).arg("ip");
            c
        }
    }
}

/// The host-side veth name for a container's interface: "st" + 13 hex digits of
/// SHA-256(container id, ifname). 15 characters, the kernel's limit; a collision needs 52
/// equal bits.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let mut h = Sha256::new();
    h.update(container_id.as_bytes());
    h.update([0u8]);
    h.update(ifname.as_bytes());
    let d = h.finalize();
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("st{}", &hex[..13])
}

/// True for names `host_ifname` produces.
pub fn is_host_ifname(name: &str) -> bool {
    name.len() == 15
        && name.starts_with("st")
        && name[2..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The node-side interface as `ip -j link show` describes it, if it exists. Asked of netlink,
/// not sysfs: a runtime may run the plugin through `nsenter --net`, which leaves /sys showing
/// another namespace.
pub fn node_link(name: &str) -> Option<Value> {
    let out = run(ip(None).args(["-j", "link", "show", "dev", name]), None).ok()?;
    serde_json::from_str::<Value>(&out)
        .ok()?
        .as_array()?
        .first()
        .cloned()
}

/// Does the node-side interface exist? (if_nametoindex: one ioctl in the current namespace.)
pub fn node_link_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// Deletes a node-side link; a missing one is not an error.
pub fn delete_node_link(name: &str) -> Result<(), String> {
    crate::nl::delete_link(name)
}

/// Names of the node's veth interfaces.
pub fn node_veths() -> Result<Vec<String>, String> {
    let out = run(
        ip(None).args(["-j", "-d", "link", "show", "type", "veth"]),
        None,
    )?;
    let v: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l.get("ifname").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// `ip -j addr show dev IF` inside `netns`.
pub fn pod_link(netns: &str, ifname: &str) -> Result<Value, String> {
    let out = run(
        ip(Some(netns)).args(["-j", "addr", "show", "dev", ifname]),
        None,
    )?;
    let v: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
    v.as_array()
        .and_then(|a| a.first().cloned())
        .ok_or_else(|| format!("{ifname} not found in {netns}"))
}

/// `ip -j route show` inside `netns`.
pub fn pod_routes(netns: &str) -> Result<Vec<Value>, String> {
    let out = run(ip(Some(netns)).args(["-j", "-4", "route", "show"]), None)?;
    let v: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_short_stable_and_distinct() {
        let a = host_ifname("abc", "eth0");
        assert_eq!(a.len(), 15);
        assert!(is_host_ifname(&a));
        assert_eq!(a, host_ifname("abc", "eth0"));
        assert_ne!(a, host_ifname("abc", "eth1"));
        assert_ne!(a, host_ifname("abd", "eth0"));
        assert!(!is_host_ifname("eth0"));
        assert!(!is_host_ifname("stzzzzzzzzzzzzz"));
    }
}
