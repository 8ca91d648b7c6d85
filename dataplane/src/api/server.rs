//! The API socket: many clients at once, one controller.
//!
//! ```text
//!   acceptor thread ─▶ one thread per connection (reads a line within its deadline, parses it)
//!                            │  (request, reply channel)
//!                            ▼
//!   controller (the caller's thread): handles requests one at a time, in arrival order
//! ```
//!
//! The registry stays single-threaded (no locks around it), and no client can hold another
//! up: a connection's reading, parsing and writing happen in its own thread, with deadlines,
//! so a silent, slow or malicious client only ever occupies that thread. What a request waits
//! for is the requests ahead of it at the controller, each short.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use strom_api::{encode_line, Request, Response};

use super::Controller;

/// The longest request line taken. A port spec is a few hundred bytes; a node's whole
/// NetworkPolicy set is the big one: 7.4 MiB for 10k policies over 1k pods, 27 MiB when a
/// tenth of them name ports toward address blocks that cover pods (listed pod by pod;
/// `benches/policy.rs`). The socket is root's alone (0600); a connection gives back the
/// memory of a long line once it is answered.
pub const MAX_LINE: usize = 32 << 20;
/// A connection's line buffer larger than this is freed after its request.
const KEEP_LINE: usize = 1 << 20;
/// Connections served at once; one more is answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a request line may take to arrive once its first byte has.
pub const LINE_DEADLINE: Duration = Duration::from_secs(10);
/// How long a connection may stay silent between requests before it is closed.
pub const IDLE_DEADLINE: Duration = Duration::from_secs(300);
/// How long a connection waits for the controller's answer.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(30);
/// How long the acceptor waits after a failed accept (EMFILE, ENOMEM) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long writing an answer may take (a client that does not read loses its answer).
const WRITE_DEADLINE: Duration = Duration::from_secs(2);

/// Errors of binding the API socket.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another stromd is serving {0} (it holds {1}); stop it first")]
    InUse(PathBuf, PathBuf),
    #[error(
        "another process holds {1} and has not answered on {0} for {2:?} (a stromd that is \
         stuck, still starting, or still exiting); stop it first"
    )]
    Unanswered(PathBuf, PathBuf, Duration),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// Proof that this process is the one stromd of an API socket: an exclusive `flock` on
/// `<socket>.lock`, held for the life of the process. The kernel drops it when the holder's
/// files are released, even after SIGKILL; that is after the process's AF_XDP sockets are
/// closed, which for a hundred ports takes the kernel a second or two after the kill. A
/// stromd started meanwhile waits for it ([`lock_waiting`]) rather than being refused by a
/// dying one, and is never let in beside a live one.
#[derive(Debug)]
pub struct ApiLock {
    _file: nix::fcntl::Flock<std::fs::File>,
}

/// Takes the API socket's lock ([`ApiLock`]), or says that another stromd holds it.
fn lock(socket: &Path) -> Result<ApiLock, BindError> {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let io = |e| BindError::Io(lock_path.clone(), e);
    if let Some(d) = socket.parent() {
        std::fs::create_dir_all(d).map_err(io)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(f) => Ok(ApiLock { _file: f }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            Err(BindError::InUse(socket.to_path_buf(), lock_path))
        }
        Err((_, e)) => Err(io(e.into())),
    }
}

/// How long a starting stromd waits for the API lock ([`lock_waiting`]) while its holder does
/// not answer: a killed stromd with a few hundred ports is released by the kernel within a
/// few seconds.
pub const LOCK_PATIENCE: Duration = Duration::from_secs(10);
/// How long a status request to the lock's holder may take before it counts as unanswered:
/// well above what a live stromd's controller takes between requests (a port's socket waits
/// half a second at most for its interface's deletion).
const HOLDER_ANSWER: Duration = Duration::from_secs(1);
/// How often the lock is tried again while waiting.
const LOCK_RETRY: Duration = Duration::from_millis(10);

/// Takes the API socket's lock, waiting for it while its holder is not serving: a stromd
/// restarted right after `kill -9` finds the lock still held by the killed one until the
/// kernel has closed that one's sockets. A holder that answers a status request on the socket
/// is a live stromd: refused at once ([`BindError::InUse`]). One that has not answered for
/// `patience` (stuck, or a process that is not stromd) is refused with
/// [`BindError::Unanswered`]. (Connecting alone cannot tell live from dying: a killed
/// stromd's listener still accepts until its files are released.)
pub fn lock_waiting(socket: &Path, patience: Duration) -> Result<ApiLock, BindError> {
    let start = Instant::now();
    let mut next_ask = start;
    loop {
        let lock_path = match lock(socket) {
            Err(BindError::InUse(_, lock_path)) => lock_path,
            taken_or_failed => return taken_or_failed,
        };
        if Instant::now() >= next_ask {
            if holder_answers(socket) {
                return Err(BindError::InUse(socket.to_path_buf(), lock_path));
            }
            next_ask = Instant::now() + HOLDER_ANSWER;
        }
        if start.elapsed() >= patience {
            return Err(BindError::Unanswered(
                socket.to_path_buf(),
                lock_path,
                patience,
            ));
        }
        std::thread::sleep(LOCK_RETRY);
    }
}

/// Whether a stromd answers a status request on `socket` within [`HOLDER_ANSWER`]. The
/// connection is made without blocking (a listener whose backlog is full, its acceptor stuck,
/// refuses at once instead of holding the caller past its patience); the request and the
/// answer then have [`HOLDER_ANSWER`] each.
fn holder_answers(socket: &Path) -> bool {
    use nix::sys::socket::{connect, socket as open, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let Ok(addr) = UnixAddr::new(socket) else {
        return false;
    };
    let Ok(fd) = open(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return false;
    };
    // A Unix stream socket connects at once or fails (EAGAIN with a full backlog); it never
    // leaves a connection in progress.
    if connect(fd.as_raw_fd(), &addr).is_err() {
        return false;
    }
    let stream = UnixStream::from(fd);
    let ask = || -> std::io::Result<bool> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(HOLDER_ANSWER))?;
        stream.set_write_timeout(Some(HOLDER_ANSWER))?;
        (&stream).write_all(&encode_line(&Request::Status))?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        Ok(matches!(
            serde_json::from_str::<Response>(&line),
            Ok(Response::Status(_))
        ))
    };
    ask().unwrap_or(false)
}

/// Binds the API socket at `path`, readable and writable by its owner only (0600), for the
/// holder of its lock: a socket file left by a stromd that died is replaced.
pub fn bind(path: &Path, _lock: &ApiLock) -> Result<UnixListener, BindError> {
    let io = |e| BindError::Io(path.to_path_buf(), e);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(io)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    // Created 0600 (umask 0177 for the bind alone), so no other user can connect even for
    // the moment before a chmod would have run; the chmod is kept for filesystems that
    // ignore the umask on sockets.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// What reaches the controller.
pub(super) enum Msg {
    Request(Request, Sender<Response>),
    Stop,
}

/// Serves the API on `listener` (and the metrics endpoint on `metrics`) until `stop` is set (and `wake` becomes readable: the signal
/// handlers write to it). The controller runs on this thread; requests come from the
/// connection threads. Between requests it sleeps until one comes or its upkeep is due.
pub fn serve(
    listener: UnixListener,
    path: &Path,
    metrics: Option<std::net::TcpListener>,
    ctl: &mut Controller,
    stop: &AtomicBool,
    wake: UnixStream,
) -> std::io::Result<()> {
    let (tx, rx) = crossbeam_channel::unbounded::<Msg>();
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("strom-api-stop".into())
            .spawn(move || {
                let mut b = [0u8; 1];
                let _ = std::io::Read::read(&mut &wake, &mut b);
                let _ = tx.send(Msg::Stop);
            })?;
    }
    if let Some(m) = metrics {
        let tx = tx.clone();
        if let Ok(a) = m.local_addr() {
            tracing::info!(addr = %a, "serving /metrics, /healthz, /readyz");
        }
        std::thread::Builder::new()
            .name("strom-metrics".into())
            .spawn(move || super::metrics::serve(m, tx))?;
    }
    let conns = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("strom-api-accept".into())
        .spawn(move || accept(listener, tx, conns))?;
    tracing::info!(socket = %path.display(), "API listening");
    controller_loop(&rx, ctl, stop);
    let _ = std::fs::remove_file(path);
    Ok(())
}

fn controller_loop(rx: &Receiver<Msg>, ctl: &mut Controller, stop: &AtomicBool) {
    let mut next_refresh = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if Instant::now() >= next_refresh {
            next_refresh = ctl.tick();
        }
        let wait = next_refresh.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Msg::Request(req, reply)) => {
                let resp = ctl.handle(req);
                // The connection may have given up waiting: nothing to do then.
                let _ = reply.send(resp);
                ctl.after_reply();
                next_refresh = ctl.upkeep_by(next_refresh);
            }
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

fn accept(listener: UnixListener, tx: Sender<Msg>, conns: Arc<AtomicUsize>) {
    for s in listener.incoming() {
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors or memory: the pending connection stays queued, so
                // retrying at once would spin. Connections ending free what is needed.
                tracing::warn!(error = %e, "accepting an API connection failed");
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        if conns.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            conns.fetch_sub(1, Ordering::SeqCst);
            let _ = s.set_write_timeout(Some(WRITE_DEADLINE));
            let _ = (&s).write_all(&encode_line(&Response::Error {
                message: format!("too many connections (at most {MAX_CONNECTIONS})"),
            }));
            continue;
        }
        let tx = tx.clone();
        let conns2 = conns.clone();
        let spawned = std::thread::Builder::new()
            .name("strom-api-conn".into())
            .spawn(move || {
                if let Err(e) = connection(s, &tx) {
                    tracing::debug!(error = %e, "API connection ended");
                }
                conns2.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            conns.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Why reading a request line ended without one.
#[derive(Debug)]
enum LineEnd {
    /// The client closed the connection (between requests).
    Closed,
    /// The line was longer than `MAX_LINE`.
    TooLong,
    /// No complete line within its deadline.
    TimedOut,
    Io(std::io::Error),
}

/// Reads one line (without its newline) into `line`: within `IDLE_DEADLINE` for its first
/// byte and `LINE_DEADLINE` for the rest, never more than `MAX_LINE` bytes.
fn read_line(r: &mut BufReader<UnixStream>, line: &mut Vec<u8>) -> Result<(), LineEnd> {
    line.clear();
    let mut deadline = Instant::now() + IDLE_DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(LineEnd::TimedOut);
        }
        r.get_ref()
            .set_read_timeout(Some(left))
            .map_err(LineEnd::Io)?;
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(LineEnd::TimedOut)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LineEnd::Io(e)),
        };
        if buf.is_empty() {
            return Err(LineEnd::Closed);
        }
        if line.is_empty() {
            deadline = Instant::now() + LINE_DEADLINE;
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if line.len() + take > MAX_LINE {
            return Err(LineEnd::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take + usize::from(done));
        if done {
            return Ok(());
        }
    }
}

/// Parses one request line; what is wrong with it, in words, otherwise.
fn parse(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line).map_err(|e| format!("request is not UTF-8: {e}"))?;
    let text = text.trim();
    if text.is_empty() {
        return Err("empty request".into());
    }
    serde_json::from_str::<Request>(text).map_err(|e| format!("malformed request: {e}"))
}

/// Serves one connection: a line in, an answer out, until the client closes, stays silent
/// too long, or sends a line too long.
fn connection(s: UnixStream, tx: &Sender<Msg>) -> std::io::Result<()> {
    s.set_write_timeout(Some(WRITE_DEADLINE))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::with_capacity(64 * 1024, s);
    let mut line = Vec::new();
    loop {
        let resp = match read_line(&mut r, &mut line) {
            Ok(()) => {
                let parsed = parse(&line);
                if line.capacity() > KEEP_LINE {
                    line = Vec::new();
                }
                match parsed {
                    Ok(req) => ask(tx, req),
                    Err(message) => Response::Error { message },
                }
            }
            Err(LineEnd::TooLong) => {
                w.write_all(&encode_line(&Response::Error {
                    message: format!("request longer than {MAX_LINE} bytes"),
                }))?;
                return Ok(());
            }
            Err(LineEnd::Closed) | Err(LineEnd::TimedOut) => return Ok(()),
            Err(LineEnd::Io(e)) => return Err(e),
        };
        w.write_all(&encode_line(&resp))?;
    }
}

/// Hands a request to the controller and waits for its answer, bounded.
pub(super) fn ask(tx: &Sender<Msg>, req: Request) -> Response {
    let (reply, answer) = crossbeam_channel::bounded(1);
    if tx.send(Msg::Request(req, reply)).is_err() {
        return Response::Error {
            message: "stromd is stopping".into(),
        };
    }
    answer
        .recv_timeout(REPLY_DEADLINE)
        .unwrap_or_else(|_| Response::Error {
            message: format!(
                "stromd did not answer within {} s",
                REPLY_DEADLINE.as_secs()
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair_with(bytes: &[u8]) -> BufReader<UnixStream> {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(bytes).unwrap();
        drop(b);
        BufReader::new(a)
    }

    #[test]
    fn lines_are_read_one_by_one_and_the_end_is_told_apart() {
        let mut r = pair_with(b"{\"op\":\"status\"}\n\n\xff\xfe\n");
        let mut line = Vec::new();
        read_line(&mut r, &mut line).unwrap();
        assert_eq!(parse(&line), Ok(Request::Status));
        read_line(&mut r, &mut line).unwrap();
        assert_eq!(parse(&line), Err("empty request".into()));
        read_line(&mut r, &mut line).unwrap();
        assert!(parse(&line).unwrap_err().contains("not UTF-8"));
        assert!(matches!(read_line(&mut r, &mut line), Err(LineEnd::Closed)));
    }

    #[test]
    fn a_line_longer_than_the_limit_is_refused_without_reading_it_all() {
        let (a, b) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 * 1024];
            let mut b = b;
            // Twice the limit without a newline; the reader stops at the limit and closes.
            for _ in 0..2 * MAX_LINE / chunk.len() {
                if b.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let mut r = BufReader::new(a);
        let mut line = Vec::new();
        assert!(matches!(
            read_line(&mut r, &mut line),
            Err(LineEnd::TooLong)
        ));
        assert!(line.len() <= MAX_LINE);
        drop(r);
        writer.join().unwrap();
    }

    #[test]
    fn valid_json_of_the_wrong_shape_is_a_malformed_request() {
        assert!(parse(br#"{"op":"add_port"}"#)
            .unwrap_err()
            .starts_with("malformed request"));
        assert!(parse(b"[1,2,3]")
            .unwrap_err()
            .starts_with("malformed request"));
        assert!(parse(b"garbage")
            .unwrap_err()
            .starts_with("malformed request"));
    }

    #[test]
    fn a_held_socket_is_refused_and_a_stale_one_replaced() {
        let dir = std::env::temp_dir().join(format!("strom-bind-{}", std::process::id()));
        let path = dir.join("stromd.sock");
        let held = lock(&path).unwrap();
        let first = bind(&path, &held).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second stromd (another open file description: flock conflicts even within one
        // process) is refused while the first holds the lock.
        assert!(matches!(lock(&path), Err(BindError::InUse(..))));
        drop(first);
        drop(held);
        // The file is left behind, as by a stromd killed with SIGKILL: taken over.
        assert!(path.exists());
        let held = lock(&path).unwrap();
        let second = bind(&path, &held).unwrap();
        drop(second);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_starting_stromd_waits_for_a_silent_holder_and_is_refused_by_one_that_answers() {
        let dir = std::env::temp_dir().join(format!("strom-wait-{}", std::process::id()));
        let path = dir.join("stromd.sock");
        // A holder that does not answer (a killed stromd being torn down): waited for, and
        // the lock is taken once it lets go.
        let held = lock(&path).unwrap();
        let listener = bind(&path, &held).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(listener);
            drop(held);
        });
        let taken = lock_waiting(&path, Duration::from_secs(5)).unwrap();
        release.join().unwrap();
        drop(taken);
        // One that never lets go nor answers: refused after the patience.
        let held = lock(&path).unwrap();
        let listener = bind(&path, &held).unwrap();
        let t = Instant::now();
        let e = lock_waiting(&path, Duration::from_millis(400)).unwrap_err();
        assert!(matches!(e, BindError::Unanswered(..)), "{e}");
        assert!(t.elapsed() >= Duration::from_millis(400));
        // One that answers status (a live stromd): refused at once. (A fresh listener: the
        // one above has the unanswered probes queued.)
        drop(listener);
        let listener = bind(&path, &held).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let server = std::thread::spawn({
            let stop = stop.clone();
            move || {
                // Every connection answered, as a live stromd does, until told to stop.
                for s in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let s = s.unwrap();
                    let mut line = String::new();
                    if BufReader::new(&s).read_line(&mut line).is_err() {
                        continue;
                    }
                    assert_eq!(parse(line.as_bytes()).unwrap(), Request::Status);
                    let info = strom_api::StatusInfo {
                        ready: true,
                        reason: None,
                        version: "test".into(),
                        workers: 1,
                        ports: 0,
                        poll_mode: "busy".into(),
                        uplink: None,
                    };
                    let _ = (&s).write_all(&encode_line(&Response::Status(info)));
                }
            }
        });
        let e = lock_waiting(&path, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, BindError::InUse(..)), "{e}");
        stop.store(true, Ordering::Relaxed);
        let _ = UnixStream::connect(&path);
        server.join().unwrap();
        drop(held);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
