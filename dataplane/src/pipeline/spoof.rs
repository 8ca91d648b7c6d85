//! Anti-spoofing: a pod sends only as itself.

use std::net::IpAddr;

use super::InPort;
use crate::drop::DropReason;

const SRC_MAC: core::ops::Range<usize> = 6..12;

/// The source MAC must be the registered pod's.
#[inline]
pub fn check_mac(frame: &[u8], port: &InPort<'_>) -> Result<(), DropReason> {
    if frame[SRC_MAC] != port.pod_mac {
        return Err(DropReason::SpoofedMac);
    }
    Ok(())
}

/// Source MAC and source IP must be the registered pod's.
#[inline]
pub fn check(frame: &[u8], port: &InPort<'_>, src: IpAddr) -> Result<(), DropReason> {
    check_mac(frame, port)?;
    if !port.ips.contains(&src) {
        return Err(DropReason::SpoofedIp);
    }
    Ok(())
}
