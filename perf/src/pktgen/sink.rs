//! The receiving end: an XDP program (stromd's pod program: everything but ARP for others and
//! traffic for listed local addresses goes to the socket) redirects frames to one AF_XDP socket
//! per queue; each thread reads the stamps and keeps per-flow records.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use strom_xdp::bpf::{Role, XdpPrograms};
use xdpilone::xdp::XdpDesc;

use crate::packet::read_stamp;
use crate::{now_ns, pin, setup, Common, Queue};

/// One flow as the sink saw it.
#[derive(Debug, Default, Clone, Copy)]
pub struct FlowRecord {
    pub received: u64,
    /// Highest sequence number seen + 1.
    pub next: u64,
    /// Frames that arrived after a later one of the same flow.
    pub reordered: u64,
    pub latency_sum_ns: u64,
    pub latency_max_ns: u64,
}

impl FlowRecord {
    /// Sequence numbers below the highest seen that never arrived (loss after the last
    /// received frame of a flow is invisible to the sink: compare with the sender's count).
    pub fn lost(&self) -> u64 {
        self.next.saturating_sub(self.received)
    }

    fn merge(&mut self, o: &FlowRecord) {
        self.received += o.received;
        self.next = self.next.max(o.next);
        self.reordered += o.reordered;
        self.latency_sum_ns += o.latency_sum_ns;
        self.latency_max_ns = self.latency_max_ns.max(o.latency_max_ns);
    }
}

/// What a sink thread hands back.
struct ThreadResult {
    flows: HashMap<u32, FlowRecord>,
    latency: Histogram<u64>,
    other: u64,
    /// CLOCK_MONOTONIC of the first and last batch with generated frames (0: none).
    first_ns: u64,
    last_ns: u64,
}

fn histogram() -> Histogram<u64> {
    // 1 ns .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

pub fn run(c: &Common, top: usize) -> anyhow::Result<()> {
    let (ifindex, queues, run) = setup(c)?;
    let start = run.start;
    let mut xdp = XdpPrograms::load(None).context("loading the XDP program (root?)")?;
    let mode = xdp.attach(ifindex, Role::Pod)?;
    let received: Vec<Arc<AtomicU64>> = (0..c.queues).map(|_| Arc::default()).collect();
    let mut threads = Vec::new();
    for Queue {
        q,
        mut umem,
        mut port,
    } in queues
    {
        xdp.bind_slot(ifindex, q, q, port.as_fd())?;
        let (run, cnt, cores) = (run.clone(), received[q as usize].clone(), c.cores.clone());
        threads.push(std::thread::spawn(move || {
            pin(&cores, q as usize);
            let mut r = ThreadResult {
                flows: HashMap::new(),
                latency: histogram(),
                other: 0,
                first_ns: 0,
                last_ns: 0,
            };
            let mut descs = [XdpDesc {
                addr: 0,
                len: 0,
                options: 0,
            }; 64];
            while run.going() {
                let n = port.recv(&mut umem, &mut descs);
                if n == 0 {
                    port.flush(&mut umem);
                    std::hint::spin_loop();
                    continue;
                }
                let now = now_ns();
                if r.first_ns == 0 {
                    r.first_ns = now;
                }
                r.last_ns = now;
                for d in &descs[..n] {
                    let frame = &umem.frame_mut(d.addr)[..d.len as usize];
                    match read_stamp(frame) {
                        Some(s) => {
                            let f = r.flows.entry(s.flow).or_default();
                            f.received += 1;
                            let seq = u64::from(s.seq);
                            if seq + 1 > f.next {
                                f.next = seq + 1;
                            } else {
                                f.reordered += 1;
                            }
                            let lat = now.saturating_sub(s.sent_ns);
                            f.latency_sum_ns += lat;
                            f.latency_max_ns = f.latency_max_ns.max(lat);
                            let _ = r.latency.record(lat.max(1));
                        }
                        None => r.other += 1,
                    }
                    umem.recycle(d.addr);
                }
                cnt.fetch_add(n as u64, Ordering::Relaxed);
                port.flush(&mut umem);
            }
            r
        }));
    }
    eprintln!(
        "sink on {} ({} XDP), {} queue(s); Ctrl-C to stop",
        c.dev, mode, c.queues
    );
    let mut last = (Instant::now(), 0u64);
    while threads.iter().any(|t| !t.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        if c.interval_ms > 0 && last.0.elapsed() >= Duration::from_millis(c.interval_ms) {
            let n: u64 = received.iter().map(|r| r.load(Ordering::Relaxed)).sum();
            eprintln!(
                "{:7.1}s  rx {:>10.0} pps  total {n}",
                start.elapsed().as_secs_f64(),
                (n - last.1) as f64 / last.0.elapsed().as_secs_f64()
            );
            last = (Instant::now(), n);
        }
    }
    let mut flows: HashMap<u32, FlowRecord> = HashMap::new();
    let mut latency = histogram();
    let mut other = 0;
    let (mut first, mut last_ns) = (u64::MAX, 0u64);
    for t in threads {
        let r = t
            .join()
            .map_err(|_| anyhow::anyhow!("a sink thread panicked"))?;
        for (k, v) in r.flows {
            flows.entry(k).or_default().merge(&v);
        }
        latency.add(&r.latency).context("merging latency")?;
        other += r.other;
        if r.first_ns != 0 {
            first = first.min(r.first_ns);
            last_ns = last_ns.max(r.last_ns);
        }
    }
    drop(xdp);
    // The rate is over the time traffic arrived, not the time the sink waited.
    let secs = if last_ns > first {
        (last_ns - first) as f64 / 1e9
    } else {
        start.elapsed().as_secs_f64()
    };
    report(c, secs, &flows, &latency, other, top)
}

fn report(
    c: &Common,
    secs: f64,
    flows: &HashMap<u32, FlowRecord>,
    latency: &Histogram<u64>,
    other: u64,
    top: usize,
) -> anyhow::Result<()> {
    let total = flows.values().fold(FlowRecord::default(), |mut a, f| {
        a.merge(f);
        a
    });
    let received: u64 = flows.values().map(|f| f.received).sum();
    let lost: u64 = flows.values().map(FlowRecord::lost).sum();
    let us = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "received {received} generated packets in {secs:.2} s ({:.0} pps) over {} flows; lost {lost}, reordered {}; other frames {other}",
        received as f64 / secs,
        flows.len(),
        total.reordered
    );
    if received > 0 {
        println!(
            "latency (send stamp to sink): p50 {:.1} us, p99 {:.1} us, max {:.1} us",
            us(0.5),
            us(0.99),
            latency.max() as f64 / 1000.0
        );
    }
    let mut worst: Vec<(&u32, &FlowRecord)> = flows.iter().collect();
    worst.sort_by_key(|(k, f)| {
        (
            std::cmp::Reverse(f.lost()),
            std::cmp::Reverse(f.reordered),
            **k,
        )
    });
    if !worst.is_empty() && top > 0 {
        println!(
            "{:>8} {:>10} {:>8} {:>9} {:>10} {:>10}",
            "flow", "received", "lost", "reordered", "mean us", "max us"
        );
        for (k, f) in worst.iter().take(top) {
            println!(
                "{k:>8} {:>10} {:>8} {:>9} {:>10.1} {:>10.1}",
                f.received,
                f.lost(),
                f.reordered,
                f.latency_sum_ns as f64 / f.received.max(1) as f64 / 1000.0,
                f.latency_max_ns as f64 / 1000.0
            );
        }
    }
    if let Some(path) = &c.json {
        let mut per_flow: Vec<_> = flows.iter().collect();
        per_flow.sort_by_key(|(k, _)| **k);
        let v = serde_json::json!({
            "mode": "sink",
            "dev": c.dev,
            "queues": c.queues,
            "seconds": secs,
            "received": received,
            "pps": received as f64 / secs,
            "lost": lost,
            "reordered": total.reordered,
            "other": other,
            "latency_us": {"p50": us(0.5), "p99": us(0.99), "max": latency.max() as f64 / 1000.0},
            "flows": per_flow.iter().map(|(k, f)| serde_json::json!({
                "flow": k, "received": f.received, "lost": f.lost(), "reordered": f.reordered,
                "latency_mean_us": f.latency_sum_ns as f64 / f.received.max(1) as f64 / 1000.0,
                "latency_max_us": f.latency_max_ns as f64 / 1000.0,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}
