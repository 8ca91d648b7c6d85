//! A TCP reset in answer to a segment (RFC 9293 §3.10.7.1, "If the connection does not
//! exist"): what a connection to a Service without endpoints, or to a backend that went away,
//! gets back at once instead of waiting out its timeouts.

use std::net::Ipv4Addr;

use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, TcpPacket, TcpSeqNumber};

use super::eth::HEADER_LEN;
use crate::mac::Mac;

const IP_HDR: usize = 20;
const TCP_HDR: usize = 20;

/// Rewrites the TCP segment in `buf[..len]` (a validated IPv4 packet behind an Ethernet
/// header) into a RST back to its sender, from `from` (the address the sender used), out of
/// the port it came in on (`host_mac`). None for a RST (never answered) or a runt.
pub fn tcp_rst(buf: &mut [u8], len: usize, host_mac: Mac, from: Ipv4Addr) -> Option<usize> {
    let (src, sport, dport, seq, ack, syn, fin, has_ack, payload) = {
        let ip = Ipv4Packet::new_checked(&buf[HEADER_LEN..len]).ok()?;
        let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
        if tcp.rst() {
            return None;
        }
        (
            ip.src_addr(),
            tcp.src_port(),
            tcp.dst_port(),
            tcp.seq_number(),
            tcp.ack_number(),
            tcp.syn(),
            tcp.fin(),
            tcp.ack(),
            tcp.payload().len(),
        )
    };
    let new_len = HEADER_LEN + IP_HDR + TCP_HDR;
    if buf.len() < new_len {
        return None;
    }
    let mut pod_mac = [0u8; 6];
    pod_mac.copy_from_slice(&buf[6..12]);
    buf[0..6].copy_from_slice(&pod_mac);
    buf[6..12].copy_from_slice(&host_mac);
    buf[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    {
        let mut tcp = TcpPacket::new_unchecked(&mut buf[HEADER_LEN + IP_HDR..new_len]);
        tcp.set_src_port(dport);
        tcp.set_dst_port(sport);
        tcp.set_header_len(TCP_HDR as u8);
        tcp.clear_flags();
        tcp.set_rst(true);
        if has_ack {
            // <SEQ=SEG.ACK><CTL=RST>
            tcp.set_seq_number(ack);
            tcp.set_ack_number(TcpSeqNumber(0));
        } else {
            // <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>
            let seg_len = payload + usize::from(syn) + usize::from(fin);
            tcp.set_seq_number(TcpSeqNumber(0));
            tcp.set_ack_number(seq + seg_len);
            tcp.set_ack(true);
        }
        tcp.set_window_len(0);
        tcp.set_urgent_at(0);
        tcp.fill_checksum(&IpAddress::Ipv4(from), &IpAddress::Ipv4(src));
    }
    let mut ip = Ipv4Packet::new_unchecked(&mut buf[HEADER_LEN..new_len]);
    ip.set_version(4);
    ip.set_header_len(IP_HDR as u8);
    ip.set_dscp(0);
    ip.set_ecn(0);
    ip.set_total_len((IP_HDR + TCP_HDR) as u16);
    ip.set_ident(0);
    ip.clear_flags();
    ip.set_dont_frag(true);
    ip.set_frag_offset(0);
    ip.set_hop_limit(64);
    ip.set_next_header(IpProtocol::Tcp);
    ip.set_src_addr(from);
    ip.set_dst_addr(src);
    ip.fill_checksum();
    Some(new_len)
}
