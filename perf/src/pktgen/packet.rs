//! Frame templates: Ethernet + IPv4 + UDP, TCP SYN or ICMP echo, with a 16-byte stamp at the
//! start of the payload (flow id, sequence number, send time) that the sink reads back.
//!
//! Frames are written field by field at fixed offsets into a UMEM frame: the generator owns the
//! format on both ends, and building a frame must cost tens of nanoseconds (etherparse builds
//! through an intermediate representation; it checks the result in the tests).

use std::net::Ipv4Addr;

use smoltcp::wire::checksum;

/// Ethernet header length.
pub const ETH: usize = 14;
/// IPv4 header length (no options).
pub const IP: usize = 20;
/// Bytes of the stamp.
pub const STAMP: usize = 16;
/// IPv4 identification of every generated packet: how the sink tells them from other traffic.
pub const MARK: u16 = 0x5354;
/// Largest frame (a 1500-byte MTU, without FCS).
pub const MAX_FRAME: usize = 1514;
/// The frame sizes of simple IMIX (64, 594 and 1518 bytes on the wire, without FCS) and their
/// weights 7:4:1.
pub const IMIX: [(usize, u32); 3] = [(60, 7), (590, 4), (1514, 1)];

/// Layer 4 of the template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    Udp,
    /// TCP with only SYN set.
    TcpSyn,
    /// ICMP echo request.
    Icmp,
}

impl Proto {
    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Udp => 17,
            Proto::TcpSyn => 6,
            Proto::Icmp => 1,
        }
    }

    /// Layer 4 header length.
    pub fn header_len(self) -> usize {
        match self {
            Proto::Udp | Proto::Icmp => 8,
            Proto::TcpSyn => 20,
        }
    }

    /// Smallest frame that holds the headers and the stamp.
    pub fn min_frame(self) -> usize {
        (ETH + IP + self.header_len() + STAMP).max(60)
    }
}

/// One packet's variable fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fields {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub flow: u32,
    pub seq: u32,
    pub sent_ns: u64,
}

/// The stamp read back from a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub flow: u32,
    pub seq: u32,
    pub sent_ns: u64,
}

/// Fixed parts of a frame.
#[derive(Debug, Clone, Copy)]
pub struct Template {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub proto: Proto,
    pub ttl: u8,
}

/// The payload byte after the stamp (what fills the frame up to its size).
const FILL: u8 = 0x61;

impl Template {
    /// Writes a complete frame of `len` bytes (`proto.min_frame()..=MAX_FRAME`) into
    /// `buf[..len]` with correct IPv4 and layer 4 checksums.
    pub fn write(&self, buf: &mut [u8], len: usize, f: &Fields) {
        let l4 = self.proto.header_len();
        let buf = &mut buf[..len];
        buf[0..6].copy_from_slice(&self.dst_mac);
        buf[6..12].copy_from_slice(&self.src_mac);
        buf[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip_len = (len - ETH) as u16;
        let ip = &mut buf[ETH..ETH + IP];
        ip[0] = 0x45;
        ip[1] = 0;
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[4..6].copy_from_slice(&MARK.to_be_bytes());
        ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
        ip[8] = self.ttl;
        ip[9] = self.proto.number();
        ip[10..12].fill(0);
        ip[12..16].copy_from_slice(&f.src.octets());
        ip[16..20].copy_from_slice(&f.dst.octets());
        let c = !checksum::data(ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());

        let seg = &mut buf[ETH + IP..];
        let stamp = l4;
        seg[stamp..stamp + 4].copy_from_slice(&f.flow.to_be_bytes());
        seg[stamp + 4..stamp + 8].copy_from_slice(&f.seq.to_be_bytes());
        seg[stamp + 8..stamp + 16].copy_from_slice(&f.sent_ns.to_be_bytes());
        seg[stamp + STAMP..].fill(FILL);
        let seg_len = seg.len() as u16;
        match self.proto {
            Proto::Udp => {
                seg[0..2].copy_from_slice(&f.sport.to_be_bytes());
                seg[2..4].copy_from_slice(&f.dport.to_be_bytes());
                seg[4..6].copy_from_slice(&seg_len.to_be_bytes());
                seg[6..8].fill(0);
            }
            Proto::TcpSyn => {
                seg[0..2].copy_from_slice(&f.sport.to_be_bytes());
                seg[2..4].copy_from_slice(&f.dport.to_be_bytes());
                seg[4..8].copy_from_slice(&f.seq.to_be_bytes());
                seg[8..12].fill(0);
                seg[12] = 5 << 4; // data offset: 5 words
                seg[13] = 0x02; // SYN
                seg[14..16].copy_from_slice(&64240u16.to_be_bytes());
                seg[16..20].fill(0);
            }
            Proto::Icmp => {
                seg[0] = 8; // echo request
                seg[1] = 0;
                seg[2..4].fill(0);
                seg[4..6].copy_from_slice(&(f.flow as u16).to_be_bytes());
                seg[6..8].copy_from_slice(&(f.seq as u16).to_be_bytes());
            }
        }
        let sum = match self.proto {
            Proto::Icmp => checksum::data(seg),
            p => checksum::combine(&[
                pseudo_header(f.src, f.dst, p.number(), seg_len),
                checksum::data(seg),
            ]),
        };
        let mut c = !sum;
        if self.proto == Proto::Udp && c == 0 {
            c = 0xffff; // 0 means "no checksum" in UDP
        }
        let at = match self.proto {
            Proto::Udp => 6,
            Proto::TcpSyn => 16,
            Proto::Icmp => 2,
        };
        seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
}

fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: u16) -> u16 {
    let mut b = [0u8; 12];
    b[0..4].copy_from_slice(&src.octets());
    b[4..8].copy_from_slice(&dst.octets());
    b[9] = proto;
    b[10..12].copy_from_slice(&len.to_be_bytes());
    checksum::data(&b)
}

/// Reads the stamp of a generated IPv4 frame (`MARK` in the identification field); None for
/// anything else.
pub fn read_stamp(frame: &[u8]) -> Option<Stamp> {
    if frame.len() < ETH + IP || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[ETH..];
    if ip[0] != 0x45 || ip[4..6] != MARK.to_be_bytes() {
        return None;
    }
    let l4 = match ip[9] {
        17 => Proto::Udp,
        6 => Proto::TcpSyn,
        1 => Proto::Icmp,
        _ => return None,
    }
    .header_len();
    let s = ip.get(IP + l4..IP + l4 + STAMP)?;
    Some(Stamp {
        flow: u32::from_be_bytes(s[0..4].try_into().ok()?),
        seq: u32::from_be_bytes(s[4..8].try_into().ok()?),
        sent_ns: u64::from_be_bytes(s[8..16].try_into().ok()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    fn fields() -> Fields {
        Fields {
            src: Ipv4Addr::new(198, 18, 1, 2),
            dst: Ipv4Addr::new(198, 18, 2, 2),
            sport: 4000,
            dport: 9,
            flow: 7,
            seq: 42,
            sent_ns: 123_456_789,
        }
    }

    fn build(proto: Proto, len: usize) -> Vec<u8> {
        let t = Template {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            proto,
            ttl: 64,
        };
        let mut buf = vec![0xee; MAX_FRAME];
        t.write(&mut buf, len, &fields());
        buf.truncate(len);
        buf
    }

    #[test]
    fn every_template_parses_with_correct_checksums_at_every_size() {
        for proto in [Proto::Udp, Proto::TcpSyn, Proto::Icmp] {
            for len in [proto.min_frame(), 128, 590, MAX_FRAME] {
                let b = build(proto, len);
                let p = SlicedPacket::from_ethernet(&b).expect("parses");
                let Some(NetSlice::Ipv4(ip)) = p.net else {
                    panic!("ipv4")
                };
                let h = ip.header();
                assert_eq!(h.to_header().calc_header_checksum(), h.header_checksum());
                assert_eq!(usize::from(h.total_len()), len - ETH);
                match (proto, p.transport) {
                    (Proto::Udp, Some(TransportSlice::Udp(u))) => {
                        let want = u
                            .to_header()
                            .calc_checksum_ipv4(&h.to_header(), u.payload())
                            .unwrap();
                        assert_eq!(u.checksum(), want, "udp {len}");
                    }
                    (Proto::TcpSyn, Some(TransportSlice::Tcp(t))) => {
                        assert!(t.syn() && !t.ack());
                        let want = t
                            .to_header()
                            .calc_checksum_ipv4(&h.to_header(), t.payload())
                            .unwrap();
                        assert_eq!(t.checksum(), want, "tcp {len}");
                    }
                    (Proto::Icmp, Some(TransportSlice::Icmpv4(i))) => {
                        let want = i.header().icmp_type.calc_checksum(i.payload());
                        assert_eq!(i.checksum(), want, "icmp {len}");
                    }
                    (p, t) => panic!("{p:?}: {t:?}"),
                }
            }
        }
    }

    #[test]
    fn the_stamp_reads_back_and_foreign_frames_have_none() {
        for proto in [Proto::Udp, Proto::TcpSyn, Proto::Icmp] {
            let b = build(proto, proto.min_frame());
            let s = read_stamp(&b).unwrap();
            assert_eq!((s.flow, s.seq, s.sent_ns), (7, 42, 123_456_789));
        }
        let mut b = build(Proto::Udp, 60);
        b[ETH + 5] ^= 1; // another identification
        assert_eq!(read_stamp(&b), None);
        assert_eq!(read_stamp(&b[..20]), None);
    }
}
