//! What a Service costs per packet (criterion): the whole pipeline for a pod's packet to a
//! ClusterIP, for a flow conntrack already has (DNAT from its entry) and for a new flow
//! (frontend lookup, Maglev, conntrack insert, DNAT; the entry is removed again after each
//! packet, which the figure includes), with 10, 1k and 100k Services of 10 endpoints each
//! (100k: 1M endpoints). Also conntrack alone at 1M flows: its memory, insert, lookup, what
//! the expiry sweep costs per loop, and what keeping it across a restart costs (printed
//! once); and building the Service table.
//!
//!   cargo bench -p strom-dataplane --bench services

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use etherparse::PacketBuilder;
use strom_api::{EndpointSpec, Protocol, ServicePortSpec, ServiceSpec};
use strom_dataplane::conntrack::persist::SavedTables;
use strom_dataplane::conntrack::{Conntrack, FlowKey, Seen, TCP};
use strom_dataplane::pipeline::{self, Context, InPort, PortKind};
use strom_dataplane::tables::services::{Backend, DesiredServices, SvcRef};
use strom_dataplane::tables::{Next, NodeTable, RouteTable, Tables};

const A_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const HA_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
const GW: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 16, 1);

/// Service `i`'s ClusterIP (in 198.19.0.0/16 and beyond: only a key here).
fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i)
}

/// Endpoint `j` of Service `i`: pods on the node (10 of them take every route).
fn endpoint(j: u32) -> EndpointSpec {
    EndpointSpec {
        ip: IpAddr::V4(Ipv4Addr::new(198, 18, 16, 10 + j as u8)),
        port: 8080,
        ready: true,
        serving: true,
        terminating: false,
        local: true,
        in_topology: true,
        target: String::new(),
    }
}

fn tables(services: u32) -> Tables {
    let mut d = DesiredServices::default();
    for i in 0..services {
        d.set(
            ServiceSpec {
                namespace: "bench".into(),
                name: format!("s{i}"),
                cluster_ips: vec![IpAddr::V4(vip(i))],
                external_ips: vec![],
                load_balancer_ips: vec![],
                ports: vec![ServicePortSpec {
                    name: String::new(),
                    protocol: Protocol::Udp,
                    port: 80,
                    node_port: None,
                    endpoints: (0..10).map(endpoint).collect(),
                }],
                affinity_timeout_s: None,
                external_local: false,
                internal_local: false,
                health_check_node_port: None,
            },
            &[],
        )
        .unwrap();
    }
    let mut t = Tables {
        node: NodeTable::new(GW),
        routes: RouteTable::default(),
        services: d.table(),
        policy: Default::default(),
    };
    for j in 0..10u8 {
        t.routes.local.insert(
            IpAddr::V4(Ipv4Addr::new(198, 18, 16, 10 + j)),
            Next {
                port: u32::from(j) + 1,
                worker: 0,
                dst_mac: [2, 0, 0, 0, 0, 10 + j],
                src_mac: [2, 0, 0, 0, 1, 10 + j],
                mtu: 1500,
            },
        );
    }
    t
}

/// A 60-byte UDP frame from the client pod to Service `i`.
fn udp60(i: u32, sport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(A_MAC, HA_MAC)
        .ipv4(CLIENT.octets(), vip(i).octets(), 64)
        .udp(sport, 80);
    let mut v = Vec::new();
    b.write(&mut v, &[0x61; 18]).unwrap();
    v
}

fn pod_port() -> InPort<'static> {
    static IPS: [IpAddr; 1] = [IpAddr::V4(CLIENT)];
    InPort {
        id: 0,
        kind: PortKind::Pod,
        host_mac: HA_MAC,
        pod_mac: A_MAC,
        ips: &IPS,
    }
}

fn per_packet(c: &mut Criterion) {
    let mut g = c.benchmark_group("service");
    g.throughput(Throughput::Elements(1));
    for n in [10u32, 1_000, 100_000] {
        let t = tables(n);
        let view = t.view();
        let port = pod_port();
        let frame = udp60(n / 2, 4000);
        let mut buf = vec![0u8; 2048];
        let mut ctx = Context::new(0, 1 << 16);
        buf[..frame.len()].copy_from_slice(&frame);
        pipeline::process(&mut buf, frame.len(), &port, &view, &mut ctx);
        g.bench_function(format!("established_flow_{n}_services"), |b| {
            b.iter(|| {
                buf[..frame.len()].copy_from_slice(&frame);
                black_box(pipeline::process(
                    &mut buf,
                    frame.len(),
                    &port,
                    &view,
                    &mut ctx,
                ))
            })
        });
        let mut ctx = Context::new(0, 1 << 16);
        let mut sport = 0u16;
        let frames: Vec<Vec<u8>> = (0..1024u32).map(|k| udp60(k * 97 % n, 1000)).collect();
        g.bench_function(format!("new_flow_{n}_services"), |b| {
            b.iter(|| {
                sport = sport.wrapping_add(1);
                let f = &frames[usize::from(sport) % frames.len()];
                buf[..f.len()].copy_from_slice(f);
                buf[14 + 20..14 + 22].copy_from_slice(&sport.to_be_bytes());
                let a = pipeline::process(&mut buf, f.len(), &port, &view, &mut ctx);
                // Keep the table's size steady: the flow goes again.
                let key = FlowKey {
                    src: CLIENT,
                    dst: Ipv4Addr::new(f[30], f[31], f[32], f[33]),
                    sport,
                    dport: 80,
                    proto: 17,
                };
                if let Some(h) = ctx.ct.lookup(&key, 0) {
                    ctx.ct.remove(h.slot);
                }
                black_box(a)
            })
        });
    }
    g.finish();
}

fn conntrack_1m(c: &mut Criterion) {
    const N: usize = 1 << 20;
    let mut g = c.benchmark_group("conntrack_1m");
    g.sample_size(10);
    let key = |i: usize| FlowKey {
        src: Ipv4Addr::from(0xc612_0000 | (i as u32 >> 16)),
        dst: Ipv4Addr::new(10, 96, 0, 1),
        sport: i as u16,
        dport: 80,
        proto: TCP,
    };
    let backend = Backend {
        ip: Ipv4Addr::new(198, 18, 16, 10),
        port: 8080,
    };
    let syn = Seen {
        tcp_flags: 0x02,
        sctp_end: false,
    };
    let d = pipeline::CONNTRACK_MAX;
    println!(
        "a worker at the default conntrack_max ({d}): conntrack {} MiB, affinity {} MiB",
        Conntrack::new(d).memory_bytes() >> 20,
        strom_dataplane::conntrack::affinity::Affinity::new(d).memory_bytes() >> 20
    );
    let mut ct = Conntrack::new(N);
    let t0 = std::time::Instant::now();
    for i in 0..N - 1024 {
        let k = key(i);
        let r = FlowKey {
            src: backend.ip,
            sport: backend.port,
            ..k.reversed()
        };
        ct.insert(k, r, SvcRef::default(), backend, syn, 0, 0)
            .unwrap();
    }
    let fill = t0.elapsed();
    println!(
        "conntrack: {} flows inserted in {:.0} ms ({:.0} ns each); the table holds {} MiB ({} bytes a flow)",
        ct.len(),
        fill.as_secs_f64() * 1e3,
        fill.as_nanos() as f64 / ct.len() as f64,
        ct.memory_bytes() >> 20,
        ct.memory_bytes() / N
    );
    restart(&ct);
    let mut i = 0usize;
    g.bench_function("lookup_hit", |b| {
        b.iter(|| {
            i = (i + 7919) % (N - 1024);
            black_box(ct.lookup(&key(i), 1))
        })
    });
    let mut j = 0usize;
    g.bench_function("insert_and_remove", |b| {
        b.iter(|| {
            j = (j + 1) % 1024;
            let k = key(N - 1024 + j);
            let r = FlowKey {
                src: backend.ip,
                sport: backend.port,
                ..k.reversed()
            };
            let s = ct
                .insert(k, r, SvcRef::default(), backend, syn, 0, 0)
                .unwrap();
            ct.remove(s);
        })
    });
    // Sweeping: what looking at 64 slots costs a worker's loop when none has expired (a
    // removal's cost is in insert_and_remove).
    g.bench_function("sweep_64_slots", |b| b.iter(|| black_box(ct.sweep(1, 64))));
    g.finish();
}

/// What keeping `ct` across a restart of stromd costs, once (docs/design.md, "Across a
/// restart of stromd"): saving its flows, encoding them as the snapshot file does (CBOR),
/// decoding them, and taking them up into a new table.
fn restart(ct: &Conntrack) {
    let ms = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;
    let t = std::time::Instant::now();
    let saved = SavedTables {
        flows: ct.save(1, |_| Some(0)),
        clients: Vec::new(),
    };
    let save = ms(t);
    let t = std::time::Instant::now();
    let mut buf = Vec::new();
    ciborium::into_writer(&saved, &mut buf).unwrap();
    let encode = ms(t);
    drop(saved);
    let t = std::time::Instant::now();
    let back: SavedTables = ciborium::from_reader(buf.as_slice()).unwrap();
    let decode = ms(t);
    let mut next = Conntrack::new(ct.max());
    let t = std::time::Instant::now();
    let r = next.restore(&back.flows, 0, 1, |_| Some(SvcRef::default()));
    let take = ms(t);
    assert_eq!(r.taken, ct.len(), "{r:?}");
    println!(
        "kept across a restart: {} flows saved in {save:.0} ms, encoded in {encode:.0} ms to {} MiB ({} bytes a flow), decoded in {decode:.0} ms, taken up in {take:.0} ms",
        ct.len(),
        buf.len() >> 20,
        buf.len() / ct.len()
    );
}

fn build(c: &mut Criterion) {
    let mut g = c.benchmark_group("service_table");
    g.sample_size(10);
    g.bench_function("build_100k_services_1m_endpoints", |b| {
        b.iter(|| black_box(tables(100_000).services.frontend_count()))
    });
    g.finish();
}

criterion_group!(benches, per_packet, conntrack_1m, build);
criterion_main!(benches);
