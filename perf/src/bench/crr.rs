//! New TCP connections per second (the `crr` traffic, as netperf's TCP_CRR): a server in pod B
//! and a client in pod A, both this binary (hidden subcommands run in the pods' namespaces).
//!
//! Every connection is connect, a 1-byte request, a 1-byte answer, close: about nine packets
//! through the path (handshake, request, answer, both FINs and their ACKs), and through a
//! Service a new conntrack entry, a backend choice and DNAT each time. The client runs a few
//! connection loops at once, each on its own blocking socket; the figure is connections
//! completed per second. A connection that fails (refused, timed out, reset, no local port
//! left) is counted by kind and never retried: the parent fails the sample when more than
//! [`MAX_ERROR_SHARE`] of the attempts failed, and records the count otherwise.
//!
//! The client closes first, so TIME_WAIT stays in pod A, as it does for a pod that calls a
//! Service. The sender's side then runs out of ports unless they come back quickly: at a few
//! thousand connections a second the default range (28232 ports) is gone long before TIME_WAIT
//! (60 s) ends, and connect() fails with EADDRNOTAVAIL. So pod A's namespace gets a wide port
//! range and `tcp_tw_reuse=1` (both per namespace; the root namespace is left alone): a port in
//! TIME_WAIT is reused for a new connection to the same destination once its last timestamp is
//! a second old, and 64512 ports last for more than 60000 connections a second. Having the
//! server close first would keep pod A's ports free instead, but would measure a pattern pods
//! rarely show towards a Service (the caller closes), and the tuple's reuse is the same either
//! way for the paths' conntrack: a SYN on a closed tuple opens a new connection.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Connection loops the client runs at once.
pub const CONNS: u32 = 8;

/// The share of attempts that may fail before the sample does (1 in 1000). A path that drops
/// now and then (a SYN retransmitted still connects within the timeout) stays under it; one
/// that refuses or loses connections as a rule, or a client out of ports, does not.
pub const MAX_ERROR_SHARE: f64 = 0.001;

/// How long one step of a connection (connect, write, read) may take. Longer than the first SYN
/// retransmission (1 s), so one dropped SYN or answer is a slow connection, not a failed one.
const STEP_TIMEOUT: Duration = Duration::from_secs(3);

/// pod A's ephemeral ports (`net.ipv4.ip_local_port_range`) and the reuse of its ports in
/// TIME_WAIT: see the module's comment.
pub const CLIENT_SYSCTLS: [&str; 2] = [
    "net.ipv4.ip_local_port_range=1024 65535",
    "net.ipv4.tcp_tw_reuse=1",
];

/// What the client prints (one JSON object on its standard output).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Connections that completed: connected, answered, closed.
    pub connections: u64,
    /// From the first connect to the end of the last connection.
    pub seconds: f64,
    /// Failed connections by kind (see [`kind`]).
    pub errors: BTreeMap<String, u64>,
    /// The first failure's message, for the error the sample fails with.
    pub first_error: Option<String>,
}

impl Report {
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Connections per second and the connections that failed, or an error when none
    /// completed or more than [`MAX_ERROR_SHARE`] of the attempts failed.
    pub fn judge(&self) -> Result<(f64, u64)> {
        let failed = self.failed();
        let attempts = self.connections + failed;
        let why = || match &self.first_error {
            Some(first) => {
                let kinds: Vec<String> = self
                    .errors
                    .iter()
                    .map(|(k, n)| format!("{n} {k}"))
                    .collect();
                format!("{}; first: {first}", kinds.join(", "))
            }
            None => "no connection failed either".into(),
        };
        if self.connections == 0 || self.seconds <= 0.0 {
            bail!(
                "no connection completed in {:.1} s ({attempts} attempts): {}",
                self.seconds,
                why()
            );
        }
        if failed as f64 > attempts as f64 * MAX_ERROR_SHARE {
            bail!(
                "{failed} of {attempts} connections failed, more than {}%: {}",
                MAX_ERROR_SHARE * 100.0,
                why()
            );
        }
        Ok((self.connections as f64 / self.seconds, failed))
    }
}

/// Reads the client's output.
pub fn parse(out: &str) -> Result<Report> {
    serde_json::from_str(out.trim())
        .with_context(|| format!("the crr client's output is not its report: {out:?}"))
}

/// The kind a failed connection is counted under.
pub fn kind(e: &std::io::Error) -> &'static str {
    match e.kind() {
        ErrorKind::ConnectionRefused => "refused",
        // A read or write timeout shows as EAGAIN (WouldBlock) on Linux.
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timed out",
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => "reset",
        ErrorKind::AddrNotAvailable | ErrorKind::AddrInUse => "no local port",
        ErrorKind::UnexpectedEof => "closed without an answer",
        _ => "other",
    }
}

fn pin(core: Option<usize>) -> Result<()> {
    if let Some(id) = core {
        // Threads spawned later inherit the calling thread's affinity.
        if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
            bail!("cannot pin to core {id}");
        }
    }
    Ok(())
}

/// The server: `threads` threads accept on `port` and answer each connection's byte with one
/// byte, then wait for the client's close, until the process is stopped (SIGINT). A connection
/// that fails is left to the client to count.
pub fn server(port: u16, threads: u32, core: Option<usize>) -> Result<()> {
    pin(core)?;
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
        .with_context(|| format!("listening on port {port}"))?;
    let mut handles = Vec::new();
    for _ in 0..threads.max(1) {
        let l = listener.try_clone()?;
        handles.push(std::thread::spawn(move || loop {
            match l.accept() {
                Ok((s, _)) => {
                    let _ = answer(s);
                }
                // Out of descriptors or the like: let it pass rather than spin.
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn answer(mut s: TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(STEP_TIMEOUT))?;
    s.set_write_timeout(Some(STEP_TIMEOUT))?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    s.write_all(&b)?;
    // The client closes first (TIME_WAIT on its side): wait for its FIN, then close.
    let mut rest = [0u8; 64];
    while s.read(&mut rest)? > 0 {}
    Ok(())
}

/// The client: `conns` loops of connect, request, answer, close to `dst` for `secs` seconds;
/// prints its [`Report`] as JSON.
pub fn client(dst: SocketAddr, conns: u32, secs: f64, core: Option<usize>) -> Result<()> {
    pin(core)?;
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Report::default()));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..conns.max(1))
        .map(|_| {
            let (done, errors) = (Arc::clone(&done), Arc::clone(&errors));
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    match connection(dst) {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err((step, e)) => {
                            let mut r = errors.lock().unwrap_or_else(|p| p.into_inner());
                            *r.errors.entry(kind(&e).into()).or_default() += 1;
                            r.first_error.get_or_insert_with(|| format!("{step}: {e}"));
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("a connection loop panicked"))?;
    }
    let mut report = std::mem::take(&mut *errors.lock().unwrap_or_else(|p| p.into_inner()));
    report.connections = done.load(Ordering::Relaxed);
    report.seconds = start.elapsed().as_secs_f64();
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// One connection; on failure, the step that failed and why.
fn connection(dst: SocketAddr) -> Result<(), (&'static str, std::io::Error)> {
    let mut s = TcpStream::connect_timeout(&dst, STEP_TIMEOUT).map_err(|e| ("connect", e))?;
    s.set_read_timeout(Some(STEP_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(STEP_TIMEOUT)))
        .map_err(|e| ("setsockopt", e))?;
    s.write_all(b"?").map_err(|e| ("request", e))?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).map_err(|e| ("answer", e))?;
    // Dropping the socket closes it: the client's FIN goes first.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(connections: u64, errors: &[(&str, u64)]) -> Report {
        Report {
            connections,
            seconds: 2.0,
            errors: errors.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
            first_error: (!errors.is_empty())
                .then(|| "connect: Connection refused (os error 111)".into()),
        }
    }

    #[test]
    fn the_clients_report_is_read_back() {
        let r = report(9000, &[("timed out", 2)]);
        let out = format!("{}\n", serde_json::to_string(&r).unwrap());
        assert_eq!(parse(&out).unwrap(), r);
        let none = parse(r#"{"connections":5,"seconds":1.0,"errors":{},"first_error":null}"#);
        assert_eq!(none.unwrap().failed(), 0);
        assert!(parse("").is_err());
        assert!(parse("strom-bench: listening on port 8080").is_err());
    }

    #[test]
    fn a_few_failures_are_counted_and_many_fail_the_sample() {
        assert_eq!(report(9000, &[]).judge().unwrap(), (4500.0, 0));
        // 3 of 9003: under 1 in 1000, kept and counted.
        assert_eq!(
            report(9000, &[("timed out", 2), ("reset", 1)])
                .judge()
                .unwrap(),
            (4500.0, 3)
        );
        // 10 of 9010: over it.
        let e = report(9000, &[("refused", 6), ("timed out", 4)])
            .judge()
            .unwrap_err()
            .to_string();
        assert!(e.contains("10 of 9010 connections failed"), "{e}");
        assert!(e.contains("6 refused, 4 timed out"), "{e}");
        assert!(e.contains("first: connect: Connection refused"), "{e}");
        // Nothing completed: a failure even without errors (a path that hangs).
        let e = report(0, &[]).judge().unwrap_err().to_string();
        assert!(e.contains("no connection completed"), "{e}");
        assert!(report(0, &[("refused", 40)]).judge().is_err());
    }

    #[test]
    fn failures_are_counted_by_kind() {
        let k = |e: ErrorKind| kind(&std::io::Error::from(e));
        assert_eq!(k(ErrorKind::ConnectionRefused), "refused");
        assert_eq!(k(ErrorKind::WouldBlock), "timed out");
        assert_eq!(k(ErrorKind::TimedOut), "timed out");
        assert_eq!(k(ErrorKind::ConnectionReset), "reset");
        assert_eq!(k(ErrorKind::AddrNotAvailable), "no local port");
        assert_eq!(k(ErrorKind::UnexpectedEof), "closed without an answer");
        assert_eq!(k(ErrorKind::PermissionDenied), "other");
    }

    #[test]
    fn a_connection_through_loopback_completes() {
        // The server and client against each other, on loopback in this namespace.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let dst = l.local_addr().unwrap();
        let t = std::thread::spawn(move || answer(l.accept().unwrap().0));
        connection(dst).unwrap();
        t.join().unwrap().unwrap();
    }
}
