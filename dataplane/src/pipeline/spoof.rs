//! Anti-spoofing: a pod sends only as itself.

use std::net::IpAddr;

use super::{InPort, PortKind};
use crate::drop::DropReason;

const SRC_MAC: core::ops::Range<usize> = 6..12;

/// From a pod port, the source MAC must be the registered pod's.
#[inline]
pub fn check_mac(frame: &[u8], port: &InPort<'_>) -> Result<(), DropReason> {
    if port.kind == PortKind::Pod && frame[SRC_MAC] != port.pod_mac {
        return Err(DropReason::SpoofedMac);
    }
    Ok(())
}

/// From a pod port, source MAC and source IP must be the registered pod's.
#[inline]
pub fn check(frame: &[u8], port: &InPort<'_>, src: IpAddr) -> Result<(), DropReason> {
    check_mac(frame, port)?;
    if port.kind == PortKind::Pod && !port.ips.contains(&src) {
        return Err(DropReason::SpoofedIp);
    }
    Ok(())
}
