//! CNI errors with the specification's codes.

use serde::Serialize;

/// A CNI error: printed as the spec's error JSON on stdout, exit status 1.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

/// Error codes of the CNI specification (and ours, 100+).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// The IPAM range is exhausted or the requested address is taken.
    pub const IPAM_EXHAUSTED: u32 = 100;
    /// Wiring the interface failed.
    pub const WIRING: u32 = 101;
    /// stromd refused the port.
    pub const DATAPLANE: u32 = 102;
    /// CHECK found a difference.
    pub const CHECK_FAILED: u32 = 103;
    /// A delegated IPAM plugin failed.
    pub const DELEGATE: u32 = 104;
}

impl CniError {
    /// An error with a code, a short message and details.
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

#[derive(Serialize)]
struct Wire<'a> {
    #[serde(rename = "cniVersion")]
    cni_version: &'a str,
    code: u32,
    msg: &'a str,
    details: &'a str,
}

impl CniError {
    /// The JSON the runtime reads.
    pub fn to_json(&self, version: &str) -> String {
        serde_json::to_string(&Wire {
            cni_version: version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        })
        .unwrap_or_else(|_| format!(r#"{{"code":{},"msg":"error"}}"#, self.code))
    }
}
