//! Answers ARP requests for the pod gateway with the host-side MAC of the port (as Calico does
//! for 169.254.1.1): every pod routes through the same gateway address.

use std::net::Ipv4Addr;

use smoltcp::wire::{ArpHardware, ArpOperation, ArpPacket, EthernetFrame, EthernetProtocol};

use super::{InPort, PortKind};
use crate::drop::DropReason;

/// Turns an ARP request for `gateway` into the reply, in place. Returns the reply length.
#[inline]
pub fn answer_gateway(
    frame: &mut [u8],
    port: &InPort<'_>,
    gateway: Ipv4Addr,
) -> Result<usize, DropReason> {
    if port.kind != PortKind::Pod {
        // The uplink's ARP belongs to the kernel (its program passes it); never answer there.
        return Err(DropReason::ArpNotForGateway);
    }
    let len = frame.len();
    let mut eth = EthernetFrame::new_unchecked(&mut *frame);
    let mut arp =
        ArpPacket::new_checked(eth.payload_mut()).map_err(|_| DropReason::ArpMalformed)?;
    if arp.hardware_type() != ArpHardware::Ethernet
        || arp.protocol_type() != EthernetProtocol::Ipv4
        || arp.hardware_len() != 6
        || arp.protocol_len() != 4
    {
        return Err(DropReason::ArpMalformed);
    }
    if arp.operation() != ArpOperation::Request || arp.target_protocol_addr() != gateway.octets() {
        return Err(DropReason::ArpNotForGateway);
    }
    let mut sha = [0u8; 6];
    sha.copy_from_slice(arp.source_hardware_addr());
    let mut spa = [0u8; 4];
    spa.copy_from_slice(arp.source_protocol_addr());
    if !port.ips.contains(&Ipv4Addr::from(spa).into()) {
        return Err(DropReason::SpoofedIp);
    }
    arp.set_operation(ArpOperation::Reply);
    arp.set_source_hardware_addr(&port.host_mac);
    arp.set_source_protocol_addr(&gateway.octets());
    arp.set_target_hardware_addr(&sha);
    arp.set_target_protocol_addr(&spa);
    let mut eth = EthernetFrame::new_unchecked(&mut *frame);
    eth.set_dst_addr(smoltcp::wire::EthernetAddress(sha));
    eth.set_src_addr(smoltcp::wire::EthernetAddress(port.host_mac));
    Ok(len)
}
