//! TCP connection states, as far as timeouts need them (a subset of Linux's
//! `nf_conntrack_proto_tcp.c`, without its window tracking): a flow is kept long while it is
//! established, briefly while it opens or closes, and barely once reset.

/// Where a tracked TCP connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    /// The client's SYN seen, no answer yet.
    SynSent,
    /// The server's SYN-ACK seen.
    SynRecv,
    Established,
    /// One side has sent a FIN.
    FinWait,
    /// Both sides have sent a FIN: the last ACKs and retransmissions may still come.
    TimeWait,
    /// A RST was seen.
    Close,
}

/// TCP flags the state machine reads.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// Timeouts in ms, Linux's defaults (`nf_conntrack_tcp_timeout_*`) but for established
/// connections, which get kube-proxy's setting (`--conntrack-tcp-timeout-established`, 24 h).
pub const SYN_SENT_MS: u64 = 120_000;
pub const SYN_RECV_MS: u64 = 60_000;
pub const ESTABLISHED_MS: u64 = 86_400_000;
pub const FIN_WAIT_MS: u64 = 120_000;
pub const TIME_WAIT_MS: u64 = 120_000;
pub const CLOSE_MS: u64 = 10_000;

impl TcpState {
    /// The state a flow starts in from its first packet's flags: a SYN opens it; anything
    /// else is a connection picked up in the middle (after a restart of stromd, say), taken as
    /// established, as Linux does with `nf_conntrack_tcp_loose`.
    pub fn first(flags: u8) -> TcpState {
        if flags & RST != 0 {
            TcpState::Close
        } else if flags & SYN != 0 && flags & ACK == 0 {
            TcpState::SynSent
        } else {
            TcpState::Established
        }
    }

    /// The state after a packet with `flags` in the original direction (`reply` false) or the
    /// reply direction; `fins` records which directions have sent a FIN (bit 0 original,
    /// bit 1 reply).
    pub fn next(self, flags: u8, reply: bool, fins: &mut u8) -> TcpState {
        // After a RST only a new SYN (`reopens`, handled by the caller) starts anything.
        if flags & RST != 0 || self == TcpState::Close {
            return TcpState::Close;
        }
        if flags & FIN != 0 {
            *fins |= if reply { 2 } else { 1 };
        }
        match self {
            _ if *fins == 3 => TcpState::TimeWait,
            _ if *fins != 0 => TcpState::FinWait,
            TcpState::SynSent if reply && flags & SYN != 0 && flags & ACK != 0 => TcpState::SynRecv,
            TcpState::SynRecv if !reply && flags & ACK != 0 && flags & SYN == 0 => {
                TcpState::Established
            }
            // A reply other than a SYN-ACK to a SYN (data: the handshake was missed).
            TcpState::SynSent if reply && flags & SYN == 0 => TcpState::Established,
            s => s,
        }
    }

    /// How long the flow lives without traffic in this state.
    pub fn timeout_ms(self) -> u64 {
        match self {
            TcpState::SynSent => SYN_SENT_MS,
            TcpState::SynRecv => SYN_RECV_MS,
            TcpState::Established => ESTABLISHED_MS,
            TcpState::FinWait => FIN_WAIT_MS,
            TcpState::TimeWait => TIME_WAIT_MS,
            TcpState::Close => CLOSE_MS,
        }
    }

    /// Whether a new SYN from the client starts a new connection on this tuple (the old one
    /// is over: Linux reopens from TIME_WAIT and CLOSE likewise).
    pub fn reopens(self) -> bool {
        matches!(self, TcpState::TimeWait | TcpState::Close)
    }

    pub fn name(self) -> &'static str {
        match self {
            TcpState::SynSent => "syn_sent",
            TcpState::SynRecv => "syn_recv",
            TcpState::Established => "established",
            TcpState::FinWait => "fin_wait",
            TcpState::TimeWait => "time_wait",
            TcpState::Close => "close",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_opens_closes_and_gets_the_timeouts_of_each_state() {
        let mut fins = 0;
        let mut s = TcpState::first(SYN);
        assert_eq!(s, TcpState::SynSent);
        s = s.next(SYN | ACK, true, &mut fins);
        assert_eq!(s, TcpState::SynRecv);
        s = s.next(ACK, false, &mut fins);
        assert_eq!(s, TcpState::Established);
        assert_eq!(s.timeout_ms(), 86_400_000);
        s = s.next(ACK, true, &mut fins);
        assert_eq!(s, TcpState::Established);
        s = s.next(FIN | ACK, false, &mut fins);
        assert_eq!(s, TcpState::FinWait);
        s = s.next(ACK, true, &mut fins);
        assert_eq!(s, TcpState::FinWait);
        s = s.next(FIN | ACK, true, &mut fins);
        assert_eq!(s, TcpState::TimeWait);
        assert!(s.reopens());
        assert_eq!(
            TcpState::Established.next(RST, true, &mut 0),
            TcpState::Close
        );
        assert_eq!(TcpState::Close.timeout_ms(), 10_000);
        assert_eq!(
            TcpState::Close.next(FIN | ACK, false, &mut 0),
            TcpState::Close,
            "a FIN after a RST does not keep the flow for FIN_WAIT's two minutes"
        );
        assert_eq!(TcpState::first(ACK), TcpState::Established, "picked up");
        assert_eq!(TcpState::first(RST | ACK), TcpState::Close);
    }
}
