//! strom-pktgen: an AF_XDP traffic generator and sink, in the spirit of the kernel's pktgen.
//!
//! ```text
//!   strom-pktgen send --dev eth0 ...        strom-pktgen sink --dev eth0 ...
//!   threads 0..N, one per tx queue           threads 0..N, one per rx queue
//!   template ─▶ UMEM frame ─▶ tx ring ═══▶  XDP redirect ─▶ rx ring ─▶ stamp: flow, seq, time
//!                                            per flow: received, lost, reordered, latency
//! ```
//!
//! Each thread owns one AF_XDP socket on its queue and a slice of the frames (strom-xdp's
//! `xsk` module, the same I/O layer as stromd), builds frames in place and commits them in
//! batches with one `sendto` per batch of the kernel's.

#![deny(unsafe_code)]

mod flows;
mod packet;
mod sink;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use strom_api::mac::parse_mac;
use strom_xdp::xsk::{BindMode, SharedUmem, WorkerUmem, XskPort, XskSizes};

use flows::{Flows, IpRange, PortRange};
use packet::{Fields, Proto, Template, IMIX, MAX_FRAME};

#[derive(Parser)]
#[command(version, about = "AF_XDP traffic generator and sink")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Options both ends share.
#[derive(clap::Args, Clone)]
struct Common {
    /// Interface to send on or receive from.
    #[arg(long)]
    dev: String,
    /// Queues to use, one thread each (queues 0..N). A sink must cover every receive queue
    /// in use on the device: its XDP program drops frames of queues without a socket.
    #[arg(long, default_value_t = 1)]
    queues: u32,
    /// Cores to pin the threads to, comma separated (thread i -> cores[i % len]).
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
    /// Stop after this many seconds (0: until SIGINT, or --count for send).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Live statistics every this many milliseconds (0: none).
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Write the final summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send generated traffic.
    Send {
        #[command(flatten)]
        common: Common,
        /// Destination MAC (the next hop's).
        #[arg(long)]
        dst_mac: String,
        /// Source MAC (default: the interface's).
        #[arg(long)]
        src_mac: Option<String>,
        /// Source addresses, A or A-B.
        #[arg(long)]
        src_ip: IpRange,
        /// Destination addresses, A or A-B.
        #[arg(long)]
        dst_ip: IpRange,
        /// Source ports, P or P-Q.
        #[arg(long, default_value = "4000")]
        src_port: PortRange,
        /// Destination ports, P or P-Q.
        #[arg(long, default_value = "9")]
        dst_port: PortRange,
        /// Layer 4 template.
        #[arg(long, value_enum, default_value = "udp")]
        proto: Proto,
        /// Frame size in bytes without FCS (60..=1514), or "imix" (60/590/1514, 7:4:1).
        #[arg(long, default_value = "60")]
        size: String,
        /// Packets per second over all threads (0: as fast as the rings go).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Stop after this many packets over all threads (0: no limit).
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// IPv4 TTL.
        #[arg(long, default_value_t = 64)]
        ttl: u8,
    },
    /// Count received generated traffic per flow: received, lost, reordered, latency.
    Sink {
        #[command(flatten)]
        common: Common,
        /// Flows to list in the printed summary (the JSON has all).
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
}

/// Frames per thread in the UMEM, and ring sizes.
const SIZES: XskSizes = XskSizes {
    frames: 4096,
    ring: 2048,
    fill: 1024,
    // A generator's sink receives at line rate from its first frame: kept deep throughout.
    fill_min: 1024,
};

/// Frames built per batch.
const BATCH: u32 = 64;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.cmd {
        Cmd::Send {
            common,
            dst_mac,
            src_mac,
            src_ip,
            dst_ip,
            src_port,
            dst_port,
            proto,
            size,
            rate,
            count,
            ttl,
        } => {
            let flows = Flows {
                src: src_ip,
                dst: dst_ip,
                sport: src_port,
                dport: dst_port,
            };
            let nflows = flows.count().map_err(anyhow::Error::msg)?;
            let sizes = parse_size(&size, proto)?;
            let dst_mac = parse_mac(&dst_mac).context("--dst-mac")?;
            let src_mac = match src_mac {
                Some(m) => parse_mac(&m).context("--src-mac")?,
                None => {
                    let t =
                        std::fs::read_to_string(format!("/sys/class/net/{}/address", common.dev))
                            .with_context(|| format!("MAC of {}", common.dev))?;
                    parse_mac(t.trim()).context("interface MAC")?
                }
            };
            let template = Template {
                src_mac,
                dst_mac,
                proto,
                ttl,
            };
            send(
                &common,
                Plan {
                    template,
                    flows,
                    nflows,
                    sizes,
                    rate,
                    count,
                },
            )
        }
        Cmd::Sink { common, top } => sink::run(&common, top),
    }
}

/// The frame sizes a thread cycles through.
fn parse_size(s: &str, proto: Proto) -> anyhow::Result<Vec<usize>> {
    let min = proto.min_frame();
    if s.eq_ignore_ascii_case("imix") {
        // Frames smaller than the template's headers are sent at its smallest size.
        return Ok(IMIX
            .iter()
            .flat_map(|&(len, w)| std::iter::repeat_n(len.max(min), w as usize))
            .collect());
    }
    let n: usize = s.parse().context("--size: a number or imix")?;
    if !(min..=MAX_FRAME).contains(&n) {
        bail!("--size {n}: {proto:?} frames are {min}..={MAX_FRAME} bytes");
    }
    Ok(vec![n])
}

/// What the send threads do.
#[derive(Clone)]
struct Plan {
    template: Template,
    flows: Flows,
    nflows: u32,
    sizes: Vec<usize>,
    rate: u64,
    count: u64,
}

/// One thread's running totals, read by the main thread.
#[derive(Default)]
pub struct Counters {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    /// Frames the tx ring turned away (only when the kernel falls behind).
    pub ring_full: AtomicU64,
    /// Nanoseconds from the start until this thread stopped sending (0 while it sends).
    pub sending_ns: AtomicU64,
}

/// Monotonic clock in nanoseconds, comparable between processes on this machine (the stamp's
/// send time; CLOCK_MONOTONIC through the vDSO, no syscall).
pub fn now_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// Until when the threads run: SIGINT/SIGTERM, or the deadline.
#[derive(Clone)]
pub struct Run {
    stop: Arc<AtomicBool>,
    pub start: Instant,
    deadline: Option<Instant>,
}

impl Run {
    /// True while neither a signal came nor the deadline passed.
    pub fn going(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && self.deadline.is_none_or(|d| Instant::now() < d)
    }
}

/// One thread's share: its queue, its slice of the UMEM and its AF_XDP socket on the queue.
pub struct Queue {
    pub q: u32,
    pub umem: WorkerUmem,
    pub port: XskPort,
}

/// What both ends set up: a socket per queue of `c.dev`, each over its slice of the frames, and the clock.
fn setup(c: &Common) -> anyhow::Result<(u32, Vec<Queue>, Run)> {
    let ifindex = nix::net::if_::if_nametoindex(c.dev.as_str())
        .with_context(|| format!("interface {}", c.dev))?;
    if c.queues == 0 {
        bail!("--queues must be at least 1");
    }
    let umem = SharedUmem::new(SIZES, c.queues).context("UMEM (mapping the frames)")?;
    let queues = (0..c.queues)
        .map(|q| {
            let mut umem = umem.worker(q)?;
            let port = umem
                .open(ifindex, q, BindMode::Copy, false, false)
                .with_context(|| format!("AF_XDP socket on {} queue {q}", c.dev))?;
            Ok(Queue { q, umem, port })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let start = Instant::now();
    let deadline = (c.duration > 0.0).then(|| start + Duration::from_secs_f64(c.duration));
    Ok((
        ifindex,
        queues,
        Run {
            stop,
            start,
            deadline,
        },
    ))
}

/// Pins the calling thread to `cores[i % len]`, if any.
pub fn pin(cores: &[usize], i: usize) {
    if !cores.is_empty() {
        let id = cores[i % cores.len()];
        if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
            eprintln!("warning: cannot pin thread {i} to core {id}");
        }
    }
}

fn send(c: &Common, plan: Plan) -> anyhow::Result<()> {
    let (_, queues, run) = setup(c)?;
    let start = run.start;
    let counters: Vec<Arc<Counters>> = (0..c.queues).map(|_| Arc::default()).collect();
    let mut threads = Vec::new();
    for Queue {
        q,
        mut umem,
        mut port,
    } in queues
    {
        let (plan, run, cnt, cores) = (
            plan.clone(),
            run.clone(),
            counters[q as usize].clone(),
            c.cores.clone(),
        );
        let threads_n = c.queues;
        threads.push(std::thread::spawn(move || {
            pin(&cores, q as usize);
            // This thread's share of the rate and count, and its flows: q, q+N, q+2N, ...
            let rate = plan.rate as f64 / f64::from(threads_n);
            let count = plan.count / u64::from(threads_n)
                + u64::from(q == 0) * (plan.count % u64::from(threads_n));
            let my_flows: Vec<u32> = (q..plan.nflows).step_by(threads_n as usize).collect();
            if my_flows.is_empty() {
                return;
            }
            let mut seq = vec![0u32; my_flows.len()];
            let (mut fi, mut si) = (0usize, 0usize);
            let mut sent = 0u64;
            let t0 = Instant::now();
            while run.going() && (count == 0 || sent < count) {
                let mut budget = BATCH.min(port.tx_room());
                if count > 0 {
                    budget = budget.min((count - sent).min(u64::from(BATCH)) as u32);
                }
                if rate > 0.0 {
                    let allowed = (t0.elapsed().as_secs_f64() * rate) as u64;
                    let ahead = allowed.saturating_sub(sent);
                    if ahead == 0 {
                        // Next packet is due in 1/rate s: sleep when that is long.
                        if rate < 20_000.0 {
                            std::thread::sleep(Duration::from_micros(20));
                        }
                        let f = port.flush(&mut umem);
                        cnt.ring_full.fetch_add(f.dropped, Ordering::Relaxed);
                        continue;
                    }
                    budget = budget.min(ahead.min(u64::from(BATCH)) as u32);
                }
                let ts = now_ns();
                for _ in 0..budget {
                    let Some(addr) = umem.take_free() else { break };
                    let flow = plan.flows.get(my_flows[fi]);
                    let len = plan.sizes[si];
                    plan.template.write(
                        umem.frame_mut(addr),
                        len,
                        &Fields {
                            src: flow.src,
                            dst: flow.dst,
                            sport: flow.sport,
                            dport: flow.dport,
                            flow: my_flows[fi],
                            seq: seq[fi],
                            sent_ns: ts,
                        },
                    );
                    if !port.send(&mut umem, addr, len) {
                        break;
                    }
                    seq[fi] = seq[fi].wrapping_add(1);
                    fi = (fi + 1) % my_flows.len();
                    si = (si + 1) % plan.sizes.len();
                    sent += 1;
                }
                let f = port.flush(&mut umem);
                cnt.packets.fetch_add(f.packets, Ordering::Relaxed);
                cnt.bytes.fetch_add(f.bytes, Ordering::Relaxed);
                cnt.ring_full.fetch_add(f.dropped, Ordering::Relaxed);
                sent -= f.dropped;
            }
            cnt.sending_ns
                .store(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
            // Let the kernel finish what is on the ring.
            let end = Instant::now() + Duration::from_millis(200);
            while Instant::now() < end && port.tx_room() < SIZES.ring {
                port.flush(&mut umem);
            }
        }));
    }
    let total = |f: fn(&Counters) -> &AtomicU64| -> u64 {
        counters.iter().map(|c| f(c).load(Ordering::Relaxed)).sum()
    };
    let mut last = (Instant::now(), 0u64, 0u64);
    while threads.iter().any(|t| !t.is_finished()) {
        std::thread::sleep(Duration::from_millis(if c.interval_ms == 0 {
            100
        } else {
            c.interval_ms.min(100)
        }));
        if c.interval_ms > 0 && last.0.elapsed() >= Duration::from_millis(c.interval_ms) {
            let (p, b) = (total(|c| &c.packets), total(|c| &c.bytes));
            let dt = last.0.elapsed().as_secs_f64();
            eprintln!(
                "{:7.1}s  tx {:>10.0} pps  {:>9.1} Mbit/s  total {p}",
                start.elapsed().as_secs_f64(),
                (p - last.1) as f64 / dt,
                (b - last.2) as f64 * 8.0 / dt / 1e6
            );
            last = (Instant::now(), p, b);
        }
    }
    for t in threads {
        let _ = t.join();
    }
    // Rates over the time the threads were sending (not the final drain of the rings).
    let secs = counters
        .iter()
        .map(|c| c.sending_ns.load(Ordering::Relaxed))
        .max()
        .map_or(0.0, |ns| ns as f64 / 1e9)
        .max(1e-9);
    let (p, b, full) = (
        total(|c| &c.packets),
        total(|c| &c.bytes),
        total(|c| &c.ring_full),
    );
    let summary = serde_json::json!({
        "mode": "send",
        "dev": c.dev,
        "queues": c.queues,
        "proto": format!("{:?}", plan.template.proto),
        "sizes": plan.sizes,
        "flows": plan.nflows,
        "seconds": secs,
        "packets": p,
        "bytes": b,
        "pps": p as f64 / secs,
        "mbit_per_s": b as f64 * 8.0 / secs / 1e6,
        "ring_full": full,
    });
    println!(
        "sent {p} packets ({b} bytes) in {secs:.2} s: {:.0} pps, {:.1} Mbit/s, {} flows, {} queue(s); tx ring full {full} times",
        p as f64 / secs,
        b as f64 * 8.0 / secs / 1e6,
        plan.nflows,
        c.queues
    );
    if let Some(path) = &c.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)?;
    }
    Ok(())
}
