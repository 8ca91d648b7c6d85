//! The lab's responders and probes: tiny TCP/UDP/SCTP servers that answer with the pod's name
//! and the client address they saw, and the client side that says who answered.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

const IPPROTO_SCTP: i32 = 132;
/// What `connect` says when the kernel has no SCTP (the probe's exit code 2).
pub const NO_SCTP: &str = "SCTP is not supported by this kernel (no sctp module)";

/// A one-to-one SCTP socket (SOCK_STREAM): accept, read and write work as for TCP, so it is
/// served and probed through std's TCP types.
fn sctp_socket() -> std::io::Result<Socket> {
    Socket::new(
        Domain::IPV4,
        Type::STREAM,
        Some(Protocol::from(IPPROTO_SCTP)),
    )
}

fn no_sctp(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPROTONOSUPPORT | libc::ESOCKTNOSUPPORT | libc::EAFNOSUPPORT)
    )
}

/// Whether this kernel can open SCTP sockets.
pub fn sctp_supported() -> bool {
    sctp_socket().is_ok()
}

fn sctp_listener(port: u16) -> std::io::Result<TcpListener> {
    let s = sctp_socket()?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    s.listen(64)?;
    Ok(s.into())
}

/// The answer to one connection or datagram: `name client-address:port`, so that a probe
/// sees who answered (its first word) and from where the connection reached it (what a
/// Service's NAT left of the client's address).
fn answer(name: &str, peer: Option<SocketAddr>) -> String {
    match peer {
        Some(p) => format!("{name} {p}\n"),
        None => format!("{name}\n"),
    }
}

/// Serves every port until killed. Each TCP or SCTP connection and UDP datagram gets
/// [`answer`]. SCTP ports are left out, with a warning, when the kernel has no SCTP. The
/// TCP ports in `hold` keep each connection open: [`answer`] at once, then again for
/// every read, until the client closes (a long-lived connection, for the tests of flows
/// that outlive a change of the Service's endpoints).
pub fn respond(
    name: &str,
    tcp: &[u16],
    udp: &[u16],
    sctp: &[u16],
    hold: &[u16],
) -> anyhow::Result<()> {
    let mut threads = Vec::new();
    for &p in hold {
        let l = TcpListener::bind(("0.0.0.0", p))?;
        let name = name.to_string();
        threads.push(std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || hold_connection(&name, s));
            }
        }));
    }
    let mut listeners = Vec::new();
    for &p in tcp {
        listeners.push(TcpListener::bind(("0.0.0.0", p))?);
    }
    for &p in sctp {
        match sctp_listener(p) {
            Ok(l) => listeners.push(l),
            Err(e) if no_sctp(&e) => eprintln!("sctp port {p} not served: {NO_SCTP}"),
            Err(e) => return Err(anyhow::anyhow!("sctp port {p}: {e}")),
        }
    }
    for l in listeners {
        let name = name.to_string();
        threads.push(std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = s.write_all(answer(&name, s.peer_addr().ok()).as_bytes());
            }
        }));
    }
    for &p in udp {
        let s = UdpSocket::bind(("0.0.0.0", p))?;
        let name = name.to_string();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(answer(&name, Some(from)).as_bytes(), from);
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// One held connection: the answer now and after every read, until EOF or an error.
fn hold_connection(name: &str, mut s: TcpStream) {
    let peer = s.peer_addr().ok();
    let mut buf = [0u8; 512];
    if s.write_all(answer(name, peer).as_bytes()).is_err() {
        return;
    }
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(answer(name, peer).as_bytes()).is_err() {
            return;
        }
    }
}

/// One line from a held connection (up to the newline), or why there was none.
fn read_line(s: &mut TcpStream) -> Result<String, String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => {
                return Err(if line.is_empty() {
                    "connection closed (EOF)".into()
                } else {
                    String::from_utf8_lossy(&line).into_owned()
                })
            }
            Ok(_) if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) => line.push(b[0]),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Holds `count` TCP connections to `ip:port` (opened one after the other): prints
/// `open ANSWER` for each (or `deny REASON`), then waits for a line on stdin, then writes
/// on each connection and prints `again ANSWER` or `error REASON`, with the milliseconds
/// the answer took, one line per connection in order. The connection's first answer says
/// which backend it reached; the second whether it still reaches it.
pub fn hold(ip: IpAddr, port: u16, count: usize, timeout: Duration) -> anyhow::Result<()> {
    let addr = SocketAddr::new(ip, port);
    let mut conns = Vec::new();
    let mut out = std::io::stdout();
    for _ in 0..count {
        let opened = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| e.to_string())
            .and_then(|mut s| {
                s.set_read_timeout(Some(timeout))
                    .map_err(|e| e.to_string())?;
                let a = read_line(&mut s)?;
                Ok((s, a))
            });
        match opened {
            Ok((s, a)) => {
                writeln!(out, "open {a}")?;
                conns.push(Some(s));
            }
            Err(e) => {
                writeln!(out, "deny {e}")?;
                conns.push(None);
            }
        }
    }
    out.flush()?;
    let mut go = String::new();
    std::io::stdin().read_line(&mut go)?;
    for c in &mut conns {
        let Some(s) = c else {
            writeln!(out, "error not open 0")?;
            continue;
        };
        let t = std::time::Instant::now();
        let r = s
            .write_all(b"again\n")
            .map_err(|e| e.to_string())
            .and_then(|()| read_line(s));
        let ms = t.elapsed().as_millis();
        match r {
            Ok(a) => writeln!(out, "again {a} {ms}")?,
            Err(e) => writeln!(out, "error {e} {ms}")?,
        }
    }
    out.flush()?;
    Ok(())
}

/// Connects and returns the answer line, or why there was none.
pub fn connect(ip: IpAddr, port: u16, protocol: &str, timeout: Duration) -> Result<String, String> {
    let addr = SocketAddr::new(ip, port);
    let mut buf = Vec::new();
    match protocol {
        "tcp" => {
            let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
        }
        "sctp" => {
            let s = sctp_socket().map_err(|e| {
                if no_sctp(&e) {
                    NO_SCTP.to_string()
                } else {
                    e.to_string()
                }
            })?;
            s.connect_timeout(&addr.into(), timeout)
                .map_err(|e| e.to_string())?;
            let mut s: TcpStream = s.into();
            s.set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
        }
        "udp" => {
            // Connected: the answer must come from the address asked (a Service's reply
            // translated back to it), and an ICMP port unreachable ends the probe at once
            // as "Connection refused".
            let s = UdpSocket::bind(("0.0.0.0", 0)).map_err(|e| e.to_string())?;
            s.connect(addr).map_err(|e| e.to_string())?;
            // Up to three tries within the timeout: the first datagram may wait for ARP.
            s.set_read_timeout(Some((timeout / 3).max(Duration::from_millis(1))))
                .map_err(|e| e.to_string())?;
            let mut b = [0u8; 2048];
            let mut last = String::new();
            for _ in 0..3 {
                s.send(b"probe").map_err(|e| e.to_string())?;
                match s.recv(&mut b) {
                    Ok(n) => {
                        buf.extend_from_slice(&b[..n]);
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        return Err(e.to_string())
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            if buf.is_empty() {
                return Err(last);
            }
        }
        other => {
            return Err(format!(
                "protocol {other} is not supported by the lab probe"
            ))
        }
    }
    let s = String::from_utf8_lossy(&buf).trim().to_string();
    if s.is_empty() {
        Err("connection closed without an answer".into())
    } else {
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_names_the_pod_first_then_the_client() {
        let peer: SocketAddr = "198.18.16.2:40312".parse().unwrap();
        assert_eq!(answer("ns/pod", Some(peer)), "ns/pod 198.18.16.2:40312\n");
        assert_eq!(answer("ns/pod", None), "ns/pod\n");
    }
}
