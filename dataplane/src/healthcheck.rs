//! `healthCheckNodePort`: for a LoadBalancer Service with `externalTrafficPolicy: Local`,
//! an HTTP server on the node's port that tells the load balancer whether this node has
//! endpoints of the Service, as kube-proxy's does (`pkg/proxy/healthcheck`): 200 with the
//! count of local endpoints, 503 when there is none. A thread per port, in stromd, and one per
//! connection it answers; the kernel carries the traffic (the port is not one of stromd's).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often a server looks whether it should stop.
const POLL: Duration = Duration::from_millis(100);

struct Server {
    local: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    service: String,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The health-check servers, by port.
#[derive(Default)]
pub struct HealthChecks {
    servers: BTreeMap<u16, Server>,
}

/// kube-proxy's answer body.
fn body(service: &str, local: u64) -> String {
    let (ns, name) = service.split_once('/').unwrap_or(("", service));
    serde_json::json!({
        "service": {"namespace": ns, "name": name},
        "localEndpoints": local,
        "serviceProxyHealthy": true,
    })
    .to_string()
}

/// Connections one server answers at once: each on a thread of its own, so that a slow or
/// silent client (held at most 1 s) does not keep the load balancer's probes waiting; one
/// more is closed at once.
const MAX_IN_FLIGHT: usize = 64;

fn serve(l: TcpListener, service: String, local: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    let service: Arc<str> = service.into();
    let in_flight = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((s, _)) => {
                if in_flight.fetch_add(1, Ordering::Relaxed) >= MAX_IN_FLIGHT {
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                    continue;
                }
                let n = local.load(Ordering::Relaxed);
                let (service, done) = (service.clone(), in_flight.clone());
                let spawned = std::thread::Builder::new()
                    .name("strom-hc-conn".into())
                    .spawn(move || {
                        answer(s, &service, n);
                        done.fetch_sub(1, Ordering::Relaxed);
                    });
                if spawned.is_err() {
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// Reads the request (at most 1 KiB, within 1 s) and answers with `local`'s status.
fn answer(mut s: std::net::TcpStream, service: &str, local: u64) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    let mut req = [0u8; 1024];
    let _ = s.read(&mut req);
    let b = body(service, local);
    let status = if local > 0 {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
        b.len()
    );
}

impl HealthChecks {
    /// Makes the servers match `want`: (port, Service, local endpoints). A port that cannot
    /// be bound is logged and tried again at the next change.
    pub fn sync(&mut self, want: &[(u16, String, u64)]) {
        self.servers.retain(|port, s| {
            want.iter()
                .any(|(p, svc, _)| p == port && *svc == s.service)
        });
        for (port, service, local) in want {
            if let Some(s) = self.servers.get(port) {
                s.local.store(*local, Ordering::Relaxed);
                continue;
            }
            let l = match TcpListener::bind(("0.0.0.0", *port)).and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            }) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(port, %service, error = %e, "cannot serve the health check");
                    continue;
                }
            };
            let local = Arc::new(AtomicU64::new(*local));
            let stop = Arc::new(AtomicBool::new(false));
            let (l2, st2, svc) = (local.clone(), stop.clone(), service.clone());
            let thread = std::thread::Builder::new()
                .name(format!("strom-hc-{port}"))
                .spawn(move || serve(l, svc, l2, st2))
                .ok();
            self.servers.insert(
                *port,
                Server {
                    local,
                    stop,
                    service: service.clone(),
                    thread,
                },
            );
        }
    }

    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(port: u16) -> String {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn answers_200_with_local_endpoints_and_503_without() {
        let port = {
            let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
            l.local_addr().unwrap().port()
        };
        let mut h = HealthChecks::default();
        h.sync(&[(port, "ns/lb".into(), 2)]);
        let r = get(port);
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(r.contains(r#""localEndpoints":2"#), "{r}");
        assert!(r.contains(r#""namespace":"ns""#), "{r}");
        // A silent client does not hold the next probe up.
        let silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let t = std::time::Instant::now();
        assert!(get(port).starts_with("HTTP/1.1 200"));
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        drop(silent);
        h.sync(&[(port, "ns/lb".into(), 0)]);
        assert!(get(port).starts_with("HTTP/1.1 503"), "none local");
        h.sync(&[]);
        assert!(h.ports().is_empty());
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "closed"
        );
    }
}
