//! Kubernetes objects to stromd's [`ServiceSpec`](strom_api::ServiceSpec), as kube-proxy
//! reads them: one file per kind ([`service`], [`endpoints`] for EndpointSlices), the field
//! parsers they share here.

mod endpoints;
mod error;
mod service;

pub use endpoints::{belongs, labelled_for, ForNode, SERVICE_NAME_LABEL};
pub use error::TranslateError;
pub use service::{service_spec, DEFAULT_AFFINITY_TIMEOUT_S};

use std::net::IpAddr;

use strom_api::Protocol;

/// `protocol` as the API spells it (`TCP`, `UDP`, `SCTP`; unset is TCP).
pub(crate) fn protocol(
    value: Option<&str>,
    object: &str,
    field: &str,
) -> Result<Protocol, TranslateError> {
    match value.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(TranslateError::UnknownProtocol {
            object: object.into(),
            field: field.into(),
            value: other.into(),
        }),
    }
}

/// A port number: the API's int32, which must be 1-65535.
pub(crate) fn port(value: i32, object: &str, field: &str) -> Result<u16, TranslateError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| TranslateError::PortOutOfRange {
            object: object.into(),
            field: field.into(),
            value: value.into(),
        })
}

/// An IP address written in a field.
pub(crate) fn address(value: &str, object: &str, field: &str) -> Result<IpAddr, TranslateError> {
    value.parse().map_err(|_| TranslateError::BadAddress {
        object: object.into(),
        field: field.into(),
        value: value.into(),
    })
}

#[cfg(test)]
mod tests;
