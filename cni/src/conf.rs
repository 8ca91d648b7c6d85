//! Network configuration and results, as the CNI specification writes them.
//!
//! Hand-written with serde rather than taken from a CNI crate: the plugin must return results
//! in three spec versions (0.4.0's `version` field on ips, 1.0.0, 1.1.0) and its own error
//! codes, and the crates that exist either stop at 1.0.0 or are too young to pin (docs/design.md).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{code, CniError};

/// Versions whose configs we accept and whose results we emit.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// `localMtu` unless configured: large enough that a TCP segment of one pod to another on the
/// node is most of 64 KiB (the kernel's GSO size), as the pod's own stack would hand the kernel
/// without stromd in the path.
pub const DEFAULT_LOCAL_MTU: u32 = 65_000;
/// The largest `localMtu`: any IPv4 packet (stromd's largest pod MTU).
pub const MAX_LOCAL_MTU: u32 = 65_535;

/// The largest `stromdTimeoutMs`: 5 minutes.
const MAX_STROMD_TIMEOUT_MS: u64 = 300_000;

/// The plugin's network configuration (one entry of a conflist, with name and cniVersion).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    /// MTU of the paths leaving the node (other nodes, Services, outside): the pod's default
    /// route carries it; default: the uplink's MTU minus the overlay header (50), or 1450, at
    /// most what stromd carries through the uplink (`strom_api::MAX_UPLINK_MTU`).
    #[serde(default)]
    pub mtu: Option<u32>,
    /// MTU of the pod's interface, and of its route to the node's pod subnet: pods of one node
    /// exchange frames this large through stromd (multi-buffer AF_XDP); default 65000. At or
    /// below `mtu`, the interface takes `mtu` and there is no route of its own.
    #[serde(default)]
    pub local_mtu: Option<u32>,
    /// The cluster's Service CIDRs, routed like the node's pod subnet at the interface's MTU
    /// (only when that exceeds `mtu`): stromd on this node translates every connection to
    /// them, so a pod reaches a Service with a local backend in large frames, while TCP's MSS
    /// exchange and a fragmentation-needed answer translated back through the Service fit
    /// the rest to a remote backend's path. The cost: toward a backend behind the uplink, a
    /// UDP datagram larger than the path's MTU is lost once with DF (the pod then learns the
    /// path's MTU for that ClusterIP) and always without DF (stromd does not fragment).
    /// Empty (the default): Services at the path's MTU.
    #[serde(default)]
    pub service_cidrs: Vec<ipnet::Ipv4Net>,
    /// The node's uplink, for the default MTU.
    #[serde(default)]
    pub uplink_interface: Option<String>,
    /// The gateway every pod routes through (stromd answers ARP for it).
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    /// stromd's API socket.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// How long to wait for stromd, in milliseconds: the deadline of every read and write on
    /// its socket (default: 10 s, 3 s for STATUS). A stromd that has not answered by then
    /// fails the call with 11, "try again later" (STATUS: 50).
    #[serde(default)]
    pub stromd_timeout_ms: Option<u64>,
    /// Where each call is logged.
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    #[serde(default)]
    pub ipam: Option<Value>,
    #[serde(default)]
    pub dns: Option<Value>,
    #[serde(default)]
    pub runtime_config: Option<RuntimeConfig>,
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// Keys we do not use (args, capabilities, ...) are accepted and ignored.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// Capability arguments from the runtime.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(default)]
    pub mac: Option<String>,
}

/// The built-in allocator's settings (`ipam.type` = "strom").
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StromIpam {
    /// "strom" (accepted here so that unknown keys can be refused).
    #[serde(rename = "type")]
    pub _type: String,
    /// The node's pod CIDR.
    pub subnet: ipnet::Ipv4Net,
    /// Where leases are kept.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/strom/ipam")
}

impl NetConf {
    /// Parses and checks stdin.
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                code::DECODE,
                "cannot decode network configuration",
                e.to_string(),
            )
        })?;
        let version = v.get("cniVersion").and_then(Value::as_str).unwrap_or("");
        if !SUPPORTED.contains(&version) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                "incompatible CNI version",
                format!(
                    "config version {version:?}; supported: {}",
                    SUPPORTED.join(", ")
                ),
            ));
        }
        let c: NetConf = serde_json::from_value(v).map_err(|e| {
            CniError::new(
                code::INVALID_CONFIG,
                "invalid network configuration",
                e.to_string(),
            )
        })?;
        if c.name.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "invalid network configuration",
                "name is empty",
            ));
        }
        if let Some(m) = c.mtu {
            let max = strom_api::MAX_UPLINK_MTU;
            if !(576..=max).contains(&m) {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    "invalid network configuration",
                    format!("mtu {m} (576..={max}: the most stromd carries through the uplink)"),
                ));
            }
        }
        if let Some(m) = c.local_mtu {
            if !(576..=MAX_LOCAL_MTU).contains(&m) {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    "invalid network configuration",
                    format!("localMtu {m} (576..={MAX_LOCAL_MTU})"),
                ));
            }
        }
        if let Some(t) = c.stromd_timeout_ms {
            // Zero would mean no deadline to the socket (and is refused by it); more than the
            // maximum outlasts any runtime's own deadline for the call.
            if !(1..=MAX_STROMD_TIMEOUT_MS).contains(&t) {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    "invalid network configuration",
                    format!("stromdTimeoutMs {t} (1..={MAX_STROMD_TIMEOUT_MS})"),
                ));
            }
        }
        Ok(c)
    }

    /// How long to wait for stromd: `stromdTimeoutMs`, or `default`.
    pub fn stromd_timeout(&self, default: Duration) -> Duration {
        self.stromd_timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(default)
    }

    /// The IPAM plugin type.
    pub fn ipam_type(&self) -> Result<&str, CniError> {
        self.ipam
            .as_ref()
            .and_then(|i| i.get("type"))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    "invalid network configuration",
                    "ipam.type is missing",
                )
            })
    }

    /// The built-in allocator's settings.
    pub fn strom_ipam(&self) -> Result<StromIpam, CniError> {
        serde_json::from_value(self.ipam.clone().unwrap_or(Value::Null)).map_err(|e| {
            CniError::new(
                code::INVALID_CONFIG,
                "invalid ipam configuration",
                e.to_string(),
            )
        })
    }

    /// The pod interface's MTU: `localMtu`, but never below the path MTU `path`.
    pub fn local_mtu(&self, path: u32) -> u32 {
        self.local_mtu.unwrap_or(DEFAULT_LOCAL_MTU).max(path)
    }

    /// The pod gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway.unwrap_or(Ipv4Addr::new(169, 254, 1, 1))
    }

    /// stromd's socket.
    pub fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(strom_api::DEFAULT_SOCKET))
    }
}

/// An interface in a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// An address in a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Only in results before 1.0.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// A route in a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

/// A result (ADD's output, CHECK's and DEL's prevResult).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Value>,
}

impl CniResult {
    /// Shapes the result for `version` (0.3.x/0.4.0 carry `version` on every ip).
    pub fn for_version(mut self, version: &str) -> Self {
        let old = version.starts_with("0.");
        for ip in &mut self.ips {
            ip.version = old.then(|| {
                if ip.address.contains(':') {
                    "6".into()
                } else {
                    "4".into()
                }
            });
        }
        self.cni_version = version.to_string();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unsupported_version_with_code_1() {
        let e =
            NetConf::parse(br#"{"cniVersion":"0.2.0","name":"n","type":"strom-cni"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
    }

    #[test]
    fn rejects_garbage_with_code_6_and_bad_fields_with_7() {
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code, code::DECODE);
        let e =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"strom-cni","mtu":"x"}"#)
                .unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
    }

    #[test]
    fn service_cidrs_are_networks() {
        let parse = |t: &str| {
            NetConf::parse(
                format!(r#"{{"cniVersion":"1.1.0","name":"n","type":"strom-cni"{t}}}"#).as_bytes(),
            )
        };
        assert!(parse("").unwrap().service_cidrs.is_empty());
        let c = parse(r#","serviceCidrs":["10.96.0.0/12","198.19.0.0/16"]"#).unwrap();
        assert_eq!(
            c.service_cidrs,
            vec![
                "10.96.0.0/12".parse::<ipnet::Ipv4Net>().unwrap(),
                "198.19.0.0/16".parse().unwrap()
            ]
        );
        for bad in [
            r#""10.96.0.0/12""#,
            r#"["10.96.0.0/33"]"#,
            r#"["fd00::/64"]"#,
        ] {
            let e = parse(&format!(r#","serviceCidrs":{bad}"#)).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{bad}");
        }
    }

    #[test]
    fn stromd_timeout_is_configurable_within_bounds() {
        let parse = |t: &str| {
            NetConf::parse(
                format!(r#"{{"cniVersion":"1.1.0","name":"n","type":"strom-cni"{t}}}"#).as_bytes(),
            )
        };
        let default = Duration::from_secs(10);
        assert_eq!(parse("").unwrap().stromd_timeout(default), default);
        assert_eq!(
            parse(r#","stromdTimeoutMs":250"#)
                .unwrap()
                .stromd_timeout(default),
            Duration::from_millis(250)
        );
        for bad in ["0", "300001", "-1", "\"1s\""] {
            assert_eq!(
                parse(&format!(r#","stromdTimeoutMs":{bad}"#))
                    .unwrap_err()
                    .code,
                code::INVALID_CONFIG,
                "{bad}"
            );
        }
    }

    #[test]
    fn accepts_unknown_keys() {
        let c = NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","type":"strom-cni","capabilities":{"ips":true},"args":{}}"#).unwrap();
        assert_eq!(c.name, "n");
    }

    #[test]
    fn old_results_carry_ip_version() {
        let r = CniResult {
            cni_version: String::new(),
            interfaces: vec![],
            ips: vec![IpConfig {
                version: None,
                address: "198.18.16.2/32".into(),
                gateway: None,
                interface: Some(1),
            }],
            routes: vec![],
            dns: None,
        };
        assert_eq!(
            r.clone().for_version("0.4.0").ips[0].version.as_deref(),
            Some("4")
        );
        assert_eq!(r.for_version("1.0.0").ips[0].version, None);
    }
}
