//! Ethernet classification.

use smoltcp::wire::{EthernetFrame, EthernetProtocol};

use crate::drop::DropReason;

/// Length of an untagged Ethernet header.
pub const HEADER_LEN: usize = 14;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;

/// The layer-3 protocol a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L3 {
    Arp,
    Ipv4,
}

/// Checks the Ethernet header and names the payload.
#[inline]
pub fn classify(frame: &[u8]) -> Result<L3, DropReason> {
    let eth = EthernetFrame::new_checked(frame).map_err(|_| DropReason::Runt)?;
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => Ok(L3::Ipv4),
        EthernetProtocol::Arp => Ok(L3::Arp),
        EthernetProtocol::Ipv6 => Err(DropReason::Ipv6NotSupported),
        EthernetProtocol::Unknown(ETHERTYPE_VLAN | ETHERTYPE_QINQ) => Err(DropReason::VlanTagged),
        EthernetProtocol::Unknown(_) => Err(DropReason::UnknownEthertype),
    }
}
