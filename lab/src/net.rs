//! The lab's responders and probes: tiny TCP/UDP servers that answer with the pod's name, and
//! the client side that says who answered.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

/// Serves every port until killed. Each TCP connection and UDP datagram gets `name\n`.
pub fn respond(name: &str, tcp: &[u16], udp: &[u16]) -> anyhow::Result<()> {
    let mut threads = Vec::new();
    for &p in tcp {
        let l = TcpListener::bind(("0.0.0.0", p))?;
        let reply = format!("{name}\n");
        threads.push(std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = s.write_all(reply.as_bytes());
            }
        }));
    }
    for &p in udp {
        let s = UdpSocket::bind(("0.0.0.0", p))?;
        let reply = format!("{name}\n");
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(reply.as_bytes(), from);
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
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
        "udp" => {
            let s = UdpSocket::bind(("0.0.0.0", 0)).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            let mut b = [0u8; 2048];
            // Up to three tries: the first datagram may wait for ARP.
            let mut last = String::new();
            for _ in 0..3 {
                s.send_to(b"probe", addr).map_err(|e| e.to_string())?;
                match s.recv_from(&mut b) {
                    Ok((n, _)) => {
                        buf.extend_from_slice(&b[..n]);
                        break;
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
