//! Where a flow's state lives, measured: what each way for the two directions of a flow to
//! meet the same state (conntrack, NAT) costs per packet on this machine.
//!
//! - `owner_lookup`: the flow's owner worker looks its state up in a table of its own
//!   (hashbrown, 100k flows): no atomics, no shared cache line.
//! - `handoff_64` / `handoff_1500`: a frame received on another worker is copied into the
//!   owner's hand-off queue (crossbeam `ArrayQueue`, as stromd's cross-worker path) and taken
//!   out on the owner's core: the price of flow affinity for the frames that arrive elsewhere.
//! - `shared_line_pingpong`: two cores writing one cache line in turn: what every lookup of a
//!   table shared between workers pays at least when the two directions of a flow run on two
//!   cores and update the flow's entry (state, timestamps, counters).
//!
//!   cargo bench -p strom-dataplane --bench flow_state

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use crossbeam_queue::ArrayQueue;
use hashbrown::HashMap;

/// A 5-tuple, as conntrack keys it.
#[derive(Clone, Copy, Hash, PartialEq, Eq)]
struct FlowKey {
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
    proto: u8,
}

/// What conntrack keeps per flow (state, expiry, NAT, counters): about a cache line.
#[derive(Clone, Copy, Default)]
struct FlowState {
    _state: u8,
    last_seen_ms: u64,
    _nat: [u32; 4],
    packets: u64,
    bytes: u64,
}

fn key(i: u32) -> FlowKey {
    FlowKey {
        src: 0xc612_1000 + (i % 110),
        dst: 0xc612_1000 + (i / 110 % 110),
        sport: (i % 60000) as u16,
        dport: 80,
        proto: 6,
    }
}

fn owner_lookup(c: &mut Criterion) {
    const FLOWS: u32 = 100_000;
    let mut t: HashMap<FlowKey, FlowState> = HashMap::with_capacity(FLOWS as usize);
    for i in 0..FLOWS {
        t.insert(key(i), FlowState::default());
    }
    let mut g = c.benchmark_group("flow_state");
    g.throughput(Throughput::Elements(1));
    let mut i = 0u32;
    g.bench_function("owner_lookup_100k_flows", |b| {
        b.iter(|| {
            i = i.wrapping_mul(2_654_435_761).wrapping_add(1) % FLOWS;
            if let Some(s) = t.get_mut(&key(black_box(i))) {
                s.last_seen_ms = u64::from(i);
                s.packets += 1;
                s.bytes += 60;
            }
        })
    });
    g.finish();
}

/// A frame in a hand-off queue, as stromd's (a whole 2 KiB frame buffer).
struct Frame {
    len: u16,
    data: [u8; 2048],
}

/// Frames per second through a hand-off queue from this thread to another one that takes
/// them out, `len` bytes copied in each; returns ns per frame.
fn handoff(len: usize, frames: u64) -> f64 {
    let q = Arc::new(ArrayQueue::<Frame>::new(2048));
    let done = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (q, done) = (q.clone(), done.clone());
        std::thread::spawn(move || {
            let mut got = 0u64;
            let mut sum = 0u64;
            while !done.load(Ordering::Relaxed) || !q.is_empty() {
                if let Some(f) = q.pop() {
                    sum += u64::from(f.data[usize::from(f.len) - 1]);
                    got += 1;
                }
            }
            black_box(sum);
            got
        })
    };
    let src = vec![0x61u8; len];
    let t = Instant::now();
    let mut sent = 0;
    while sent < frames {
        let mut f = Frame {
            len: len as u16,
            data: [0; 2048],
        };
        f.data[..len].copy_from_slice(&src);
        if q.push(f).is_ok() {
            sent += 1;
        }
    }
    done.store(true, Ordering::Relaxed);
    let got = consumer.join().unwrap_or(0);
    assert_eq!(got, frames);
    t.elapsed().as_nanos() as f64 / frames as f64
}

/// ns per round trip of one cache line between two threads, each writing it in turn.
fn pingpong(rounds: u64) -> f64 {
    let line = Arc::new(AtomicU64::new(0));
    let other = {
        let line = line.clone();
        std::thread::spawn(move || {
            for r in 0..rounds {
                while line.load(Ordering::Acquire) != 2 * r + 1 {
                    std::hint::spin_loop();
                }
                line.store(2 * r + 2, Ordering::Release);
            }
        })
    };
    let t = Instant::now();
    for r in 0..rounds {
        line.store(2 * r + 1, Ordering::Release);
        while line.load(Ordering::Acquire) != 2 * r + 2 {
            std::hint::spin_loop();
        }
    }
    let ns = t.elapsed().as_nanos() as f64 / rounds as f64;
    let _ = other.join();
    ns
}

fn cross_core(c: &mut Criterion) {
    let mut g = c.benchmark_group("flow_state");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for len in [64usize, 1500] {
        g.bench_function(format!("handoff_{len}"), |b| {
            b.iter_custom(|iters| {
                let per = handoff(len, iters.max(1000));
                Duration::from_nanos((per * iters as f64) as u64)
            })
        });
    }
    g.bench_function("shared_line_pingpong", |b| {
        b.iter_custom(|iters| {
            let per = pingpong(iters.max(1000));
            Duration::from_nanos((per * iters as f64) as u64)
        })
    });
    g.finish();
}

criterion_group!(benches, owner_lookup, cross_core);
criterion_main!(benches);
