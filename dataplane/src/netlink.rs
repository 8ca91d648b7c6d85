//! Deleting a port's interface for its CNI DEL (`PortInterface::Delete`).
//!
//! The kernel's deletion of a veth returns to its caller only after `netdev_run_todo()` has
//! waited in `rcu_barrier()` for every RCU callback queued on any CPU and then for the last
//! references to the device: 15-40 ms on this project's machine, most of a CNI DEL
//! (BENCHMARKS.md §2). The device is unlisted well before that wait, within a millisecond or
//! two: its name and index are free, it is gone from both namespaces, its AF_XDP socket is
//! unbound, and the kernel announces it with RTM_DELLINK to the link group. So the deletion
//! runs in a thread of its own, and the caller waits for the announcement only.
//!
//! Messages are built and read with `netlink-packet-route` over a plain `netlink-sys` socket:
//! stromd's API thread is synchronous, and one request does not need an async runtime.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_route::link::LinkMessage;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// The link notification group (`RTNLGRP_LINK` in linux/rtnetlink.h).
const RTNLGRP_LINK: u32 = 1;
/// Room for one read of notifications: the kernel sends each in a datagram of its own, a
/// link's with every attribute under 4 KiB.
const RECV_BUF: usize = 32 * 1024;

/// Why an interface could not be deleted, or its deletion not seen.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("netlink: {0}")]
    Io(#[from] std::io::Error),
    #[error("the kernel refused to delete interface {ifindex}: {errno}")]
    Refused { ifindex: u32, errno: Errno },
    #[error("interface {ifindex} was not unlisted within {waited:?}")]
    NotUnlisted { ifindex: u32, waited: Duration },
    #[error("the deleting thread ended without an answer")]
    Lost,
}

/// A deletion under way: the thread that asked the kernel, and what tells the waiter.
pub struct Deletion {
    ifindex: u32,
    /// Subscribed to the link group before the request went out.
    listener: Socket,
    /// Readable once the thread has its answer (the deletion returned).
    done: UnixStream,
    answer: crossbeam_channel::Receiver<Result<(), LinkError>>,
    thread: JoinHandle<()>,
}

impl Deletion {
    /// Starts deleting interface `ifindex` if it is still the one called `ifname` (a veth
    /// takes its peer with it). `None` when there is no such interface: it is gone already,
    /// or the name now belongs to another index, which is not the port's to delete.
    pub fn start(ifindex: u32, ifname: &str) -> Result<Option<Deletion>, LinkError> {
        if nix::net::if_::if_nametoindex(ifname).ok() != Some(ifindex) {
            return Ok(None);
        }
        let mut listener = Socket::new(NETLINK_ROUTE)?;
        listener.bind(&SocketAddr::new(0, 0))?;
        listener.add_membership(RTNLGRP_LINK)?;
        let (done, signal) = UnixStream::pair()?;
        let (tx, answer) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name(format!("delete-{ifindex}"))
            .spawn(move || {
                let r = delete(ifindex);
                if let Err(e) = &r {
                    tracing::warn!(ifindex, error = %e, "deleting a removed port's interface");
                }
                let _ = tx.send(r);
                drop(signal);
            })?;
        Ok(Some(Deletion {
            ifindex,
            listener,
            done,
            answer,
            thread,
        }))
    }

    /// Waits until the kernel has unlisted the interface (or refused to delete it), `within`
    /// at most. The thread goes on to the end of the deletion; join it (`into_thread`).
    pub fn unlisted(&self, within: Duration) -> Result<(), LinkError> {
        let deadline = Instant::now() + within;
        let mut buf = Vec::with_capacity(RECV_BUF);
        loop {
            // The deletion returned: the interface is gone, or the kernel said why not.
            if let Ok(r) = self.answer.try_recv() {
                return r;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LinkError::NotUnlisted {
                    ifindex: self.ifindex,
                    waited: within,
                });
            }
            let mut fds = [
                PollFd::new(self.listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.done.as_fd(), PollFlags::POLLIN),
            ];
            match poll(
                &mut fds,
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(std::io::Error::from(e).into()),
            }
            if fds[1].any().unwrap_or(false) {
                return self.answer.recv().unwrap_or(Err(LinkError::Lost));
            }
            if !fds[0].any().unwrap_or(false) {
                continue;
            }
            buf.clear();
            match self.listener.recv(&mut buf, libc::MSG_DONTWAIT) {
                Ok(_) => {
                    if announces_deletion(&buf, self.ifindex) {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // Notifications were lost (ENOBUFS): ours may be among them.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    if nix::net::if_::if_indextoname(self.ifindex).is_err() {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The deleting thread, to be joined once the deletion has returned.
    pub fn into_thread(self) -> JoinHandle<()> {
        self.thread
    }
}

/// Does this datagram announce the deletion of `ifindex`? A notification the crate cannot
/// decode is not ours to judge: the caller goes on waiting, at worst for the deletion's end.
fn announces_deletion(datagram: &[u8], ifindex: u32) -> bool {
    let mut at = 0;
    while at < datagram.len() {
        let Ok(m) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram[at..]) else {
            return false;
        };
        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) = &m.payload {
            if l.header.index == ifindex {
                return true;
            }
        }
        let len = m.header.length as usize;
        if len == 0 {
            return false;
        }
        at += len.next_multiple_of(4);
    }
    false
}

/// RTM_DELLINK for `ifindex`, and the kernel's answer. Gone already is success.
fn delete(ifindex: u32) -> Result<(), LinkError> {
    let mut s = Socket::new(NETLINK_ROUTE)?;
    s.bind_auto()?;
    s.connect(&SocketAddr::new(0, 0))?;
    let mut link = LinkMessage::default();
    link.header.index = ifindex;
    let mut req = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::DelLink(link)),
    );
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    req.header.sequence_number = 1;
    req.finalize();
    let mut out = vec![0; req.buffer_len()];
    req.serialize(&mut out);
    s.send(&out, 0)?;
    let mut buf = Vec::with_capacity(RECV_BUF);
    loop {
        buf.clear();
        s.recv(&mut buf, 0)?;
        let mut at = 0;
        while at < buf.len() {
            let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[at..])
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            if let NetlinkPayload::Error(e) = &m.payload {
                return match e.code.map(|c| Errno::from_raw(-c.get())) {
                    None | Some(Errno::ENODEV) => Ok(()),
                    Some(errno) => Err(LinkError::Refused { ifindex, errno }),
                };
            }
            let len = m.header.length as usize;
            if len == 0 {
                break;
            }
            at += len.next_multiple_of(4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dellink(index: u32) -> Vec<u8> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        let mut m = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::from(RouteNetlinkMessage::DelLink(link)),
        );
        m.finalize();
        let mut b = vec![0; m.buffer_len()];
        m.serialize(&mut b);
        b
    }

    #[test]
    fn only_the_deletion_of_the_same_index_is_ours() {
        assert!(announces_deletion(&dellink(7), 7));
        assert!(!announces_deletion(&dellink(8), 7));
        let mut two = dellink(8);
        two.extend(dellink(7));
        assert!(announces_deletion(&two, 7), "the second of two messages");
    }

    #[test]
    fn what_cannot_be_decoded_is_not_taken_for_a_deletion() {
        assert!(!announces_deletion(&[], 7));
        assert!(!announces_deletion(&[0xff; 3], 7));
        let mut cut = dellink(7);
        cut.truncate(20);
        assert!(!announces_deletion(&cut, 7));
    }
}
