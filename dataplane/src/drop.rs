//! Named drop reasons. Every dropped frame is counted under exactly one of these.

/// Why a frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DropReason {
    /// Shorter than an Ethernet header.
    Runt = 0,
    /// 802.1Q/802.1ad tagged frame on a pod port (pods never tag).
    VlanTagged,
    /// An ethertype strom does not carry.
    UnknownEthertype,
    /// IPv6 is planned, not forwarded yet.
    Ipv6NotSupported,
    /// ARP packet too short or not Ethernet/IPv4.
    ArpMalformed,
    /// ARP that is neither a request nor for the pod gateway (e.g. gratuitous ARP).
    ArpNotForGateway,
    /// IPv4 header too short, bad version, bad IHL or a total length beyond the frame.
    Ipv4Malformed,
    /// IPv4 header checksum wrong.
    Ipv4BadChecksum,
    /// Source MAC is not the registered pod's.
    SpoofedMac,
    /// Source IP is not one of the registered pod's.
    SpoofedIp,
    /// TTL ran out (an ICMP time-exceeded is sent back when allowed).
    TtlExpired,
    /// No route to the destination.
    NoRoute,
    /// Addressed to the pod gateway itself, which only answers ARP.
    ToGateway,
    /// Broadcast or multicast IPv4 destination (not routed).
    NotUnicast,
    /// The destination port's TX ring was full.
    TxFull,
    /// The destination worker's hand-off queue was full.
    HandoffFull,
    /// The destination port went away while the frame was in flight.
    PortGone,
    /// A frame from another worker found this worker's frame pool empty.
    NoFrame,
    /// The kernel had no frame in the port's fill ring for a received packet (counted by the
    /// kernel, read from the socket's statistics every few thousand loops).
    XskNoFillFrame,
    /// The kernel found the port's rx ring full (stromd read too slowly).
    XskRxRingFull,
    /// The kernel refused a fill or tx descriptor (a stromd bug if ever non-zero).
    XskInvalidDesc,
    /// The kernel dropped a received frame for another reason it counts as `rx_dropped`: a
    /// frame larger than a UMEM frame's room (4096 bytes less the kernel's 256 of headroom) on
    /// a socket without multi-buffer (the uplink's), e.g. from a link whose MTU is above what
    /// stromd carries there; or, on a pod's multi-buffer socket, a frame whose chain found
    /// fewer frames in the fill ring than it needed (the kernel counts no empty fill ring
    /// for it).
    XskRxTooLarge,
    /// Destination MAC not the receiving port's (broadcast, multicast or another host's):
    /// only frames addressed to the gateway are routed.
    ForeignDstMac,
    /// A destination no router forwards: this host (0/8, 127/8), reserved (240/4),
    /// link-local other than the gateway, a directed broadcast of the node's subnets.
    MartianDst,
    /// Larger than the egress MTU with Don't Fragment set: an ICMP fragmentation-needed
    /// with the next-hop MTU goes back to the sender (PMTU discovery).
    FragNeeded,
    /// Larger than the egress MTU without Don't Fragment: stromd does not fragment.
    TooBigNoDf,
    /// To a Service's address on a port or protocol it does not serve (or a fragment or an
    /// ICMP message to it: stromd translates whole TCP, UDP and SCTP packets).
    ServiceUnknownPort,
    /// A new connection to a Service port without a usable endpoint: rejected (TCP RST, ICMP
    /// port unreachable otherwise), never black-holed.
    ServiceNoEndpoints,
    /// A TCP segment of a connection whose backend has left its Service: answered with a RST.
    BackendGone,
    /// A new flow found the worker's conntrack table full (`conntrack_max`).
    ConntrackFull,
    /// A new flow's answers would come on a tuple another flow already answers on.
    ConntrackClash,
    /// To a node address on a NodePort no Service has (any more), or on an SNAT port no
    /// tracked flow answers on.
    NodePortUnknown,
    /// No free SNAT port on the worker for a new masqueraded or SNATed flow.
    SnatPortsExhausted,
    /// A later fragment of a pod's datagram leaving the cluster whose first fragment stromd
    /// did not translate (it came later, or too long before): it cannot be masqueraded
    /// without reassembly, and must not leave with the pod's address.
    FragmentUntranslated,
    /// No NetworkPolicy selecting the pod allowed it (ingress to it or egress from it), and
    /// it belongs to no allowed connection.
    PolicyDenied,
    /// A frame spanning more buffers than the kernel sends as one packet (`MAX_CHAIN`, 18:
    /// about 69 KB): never truncated.
    TooManyBuffers,
    /// A multi-buffer frame whose chain of descriptors ended without its last (the kernel
    /// publishes chains whole: a stromd or kernel bug if ever non-zero).
    ChainBroken,
    /// A frame larger than one buffer for a port whose socket is not multi-buffer (the
    /// uplink's: its MTU stops such frames at the route first).
    NoMultiBuffer,
}

impl DropReason {
    /// Every reason, in counter-index order.
    pub const ALL: [DropReason; 38] = [
        DropReason::Runt,
        DropReason::VlanTagged,
        DropReason::UnknownEthertype,
        DropReason::Ipv6NotSupported,
        DropReason::ArpMalformed,
        DropReason::ArpNotForGateway,
        DropReason::Ipv4Malformed,
        DropReason::Ipv4BadChecksum,
        DropReason::SpoofedMac,
        DropReason::SpoofedIp,
        DropReason::TtlExpired,
        DropReason::NoRoute,
        DropReason::ToGateway,
        DropReason::NotUnicast,
        DropReason::TxFull,
        DropReason::HandoffFull,
        DropReason::PortGone,
        DropReason::NoFrame,
        DropReason::XskNoFillFrame,
        DropReason::XskRxRingFull,
        DropReason::XskInvalidDesc,
        DropReason::XskRxTooLarge,
        DropReason::ForeignDstMac,
        DropReason::MartianDst,
        DropReason::FragNeeded,
        DropReason::TooBigNoDf,
        DropReason::ServiceUnknownPort,
        DropReason::ServiceNoEndpoints,
        DropReason::BackendGone,
        DropReason::ConntrackFull,
        DropReason::ConntrackClash,
        DropReason::NodePortUnknown,
        DropReason::SnatPortsExhausted,
        DropReason::FragmentUntranslated,
        DropReason::PolicyDenied,
        DropReason::TooManyBuffers,
        DropReason::ChainBroken,
        DropReason::NoMultiBuffer,
    ];
    /// Number of reasons (size of counter arrays).
    pub const COUNT: usize = Self::ALL.len();

    /// Stable snake_case name, as shown by `stromctl` and the API.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Runt => "runt",
            DropReason::VlanTagged => "vlan_tagged",
            DropReason::UnknownEthertype => "unknown_ethertype",
            DropReason::Ipv6NotSupported => "ipv6_not_supported",
            DropReason::ArpMalformed => "arp_malformed",
            DropReason::ArpNotForGateway => "arp_not_for_gateway",
            DropReason::Ipv4Malformed => "ipv4_malformed",
            DropReason::Ipv4BadChecksum => "ipv4_bad_checksum",
            DropReason::SpoofedMac => "spoofed_mac",
            DropReason::SpoofedIp => "spoofed_ip",
            DropReason::TtlExpired => "ttl_expired",
            DropReason::NoRoute => "no_route",
            DropReason::ToGateway => "to_gateway",
            DropReason::NotUnicast => "not_unicast",
            DropReason::TxFull => "tx_full",
            DropReason::HandoffFull => "handoff_full",
            DropReason::PortGone => "port_gone",
            DropReason::NoFrame => "no_free_frame",
            DropReason::XskNoFillFrame => "xsk_no_fill_frame",
            DropReason::XskRxRingFull => "xsk_rx_ring_full",
            DropReason::XskInvalidDesc => "xsk_invalid_desc",
            DropReason::XskRxTooLarge => "xsk_rx_too_large",
            DropReason::ForeignDstMac => "foreign_dst_mac",
            DropReason::MartianDst => "martian_destination",
            DropReason::FragNeeded => "fragmentation_needed",
            DropReason::TooBigNoDf => "too_big_not_fragmented",
            DropReason::ServiceUnknownPort => "service_unknown_port",
            DropReason::ServiceNoEndpoints => "service_no_endpoints",
            DropReason::BackendGone => "service_backend_gone",
            DropReason::ConntrackFull => "conntrack_full",
            DropReason::ConntrackClash => "conntrack_clash",
            DropReason::NodePortUnknown => "node_port_unknown",
            DropReason::SnatPortsExhausted => "snat_ports_exhausted",
            DropReason::FragmentUntranslated => "fragment_not_translated",
            DropReason::PolicyDenied => "policy_denied",
            DropReason::TooManyBuffers => "too_many_buffers",
            DropReason::ChainBroken => "chain_broken",
            DropReason::NoMultiBuffer => "no_multi_buffer",
        }
    }

    /// Index into counter arrays.
    pub const fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_index_order_and_names_are_unique() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DropReason::COUNT);
    }
}
