//! Why an object could not be translated: each error names the object (`Service ns/name`,
//! `EndpointSlice ns/name`), the field and the value, so that a user can fix the manifest.

/// A malformed Service or EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    #[error("{object}: no spec")]
    NoSpec { object: String },
    #[error("{object}: {field} {value:?} is not an IP address")]
    BadAddress {
        object: String,
        field: String,
        value: String,
    },
    #[error("{object}: {field} {value} is out of range (1-65535)")]
    PortOutOfRange {
        object: String,
        field: String,
        value: i64,
    },
    #[error("{object}: {field} {value:?} is not TCP, UDP or SCTP")]
    UnknownProtocol {
        object: String,
        field: String,
        value: String,
    },
    #[error("{object}: {field} {value:?} is not one of {allowed}")]
    UnknownValue {
        object: String,
        field: String,
        value: String,
        allowed: &'static str,
    },
    #[error("{object}: {what} appears twice")]
    Duplicate { object: String, what: String },
    #[error("{object}: {reason}")]
    Invalid { object: String, reason: String },
}
