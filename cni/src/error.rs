//! CNI errors with the specification's codes.

use std::io::ErrorKind;

use serde::Serialize;
use strom_api::ClientError;

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
    /// stromd refused the port: it answered, with an error (or with an answer that cannot be
    /// read). stromd unreachable, busy or gone mid-call is `TRY_AGAIN_LATER`.
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

/// The CNI error for a failed exchange with stromd; `refused` is the message when stromd
/// answered with a refusal.
///
/// Only an answer from stromd is final: a refusal, or an answer that cannot be read (a stromd
/// of another version), is `DATAPLANE` (102) and a retry would get the same. Everything else
/// says nothing about the request, only that stromd could not answer it now: no one listening
/// (the socket missing, or left by a stromd that died: connection refused), no answer within
/// the deadline (stromd busy), the connection reset or closed before a whole answer line
/// (stromd died mid-call). Those are `TRY_AGAIN_LATER` (11), the spec's code that makes the
/// runtime call again.
pub fn from_stromd(e: &ClientError, refused: &str) -> CniError {
    let again = |msg: &str| CniError::new(code::TRY_AGAIN_LATER, msg, e.to_string());
    match e {
        ClientError::Connect { .. } => again("stromd is not reachable"),
        ClientError::Io(io) if matches!(io.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            again("stromd did not answer in time")
        }
        ClientError::Io(_) | ClientError::Closed => again("stromd went away before answering"),
        // A line cut short: stromd died while writing it (the client reads to the newline or
        // the end of the stream).
        ClientError::Decode(d) if d.is_eof() => again("stromd went away before answering"),
        ClientError::Decode(_) => CniError::new(
            code::DATAPLANE,
            "unreadable answer from stromd",
            e.to_string(),
        ),
        ClientError::Refused(_) => CniError::new(code::DATAPLANE, refused, e.to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: ErrorKind) -> ClientError {
        ClientError::Io(std::io::Error::from(kind))
    }

    #[test]
    fn only_an_answer_from_stromd_is_a_refusal() {
        let decode = |s: &str| {
            ClientError::Decode(serde_json::from_str::<serde_json::Value>(s).unwrap_err())
        };
        let transient = [
            ClientError::Connect {
                path: "/run/strom/stromd.sock".into(),
                source: std::io::Error::from(ErrorKind::ConnectionRefused),
            },
            ClientError::Connect {
                path: "/run/strom/stromd.sock".into(),
                source: std::io::Error::from(ErrorKind::NotFound),
            },
            io(ErrorKind::WouldBlock),
            io(ErrorKind::TimedOut),
            io(ErrorKind::ConnectionReset),
            io(ErrorKind::BrokenPipe),
            ClientError::Closed,
            decode(r#"{"result":"po"#),
        ];
        for e in &transient {
            assert_eq!(from_stromd(e, "refused").code, code::TRY_AGAIN_LATER, "{e}");
        }
        let refused = from_stromd(&ClientError::Refused("no room".into()), "stromd refused");
        assert_eq!(refused.code, code::DATAPLANE);
        assert_eq!(refused.msg, "stromd refused");
        assert!(refused.details.contains("no room"), "{refused}");
        assert_eq!(
            from_stromd(&decode("[1, 2]x"), "refused").code,
            code::DATAPLANE,
            "an answer that is there but unreadable"
        );
        assert_eq!(
            from_stromd(&io(ErrorKind::WouldBlock), "refused").msg,
            "stromd did not answer in time"
        );
    }
}
