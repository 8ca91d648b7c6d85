//! Per-stage and whole-pipeline cost on one core (criterion). Tables at a realistic size:
//! 110 pods on the node (the kubelet default maximum). Also what one route change costs the
//! reconciler: building and publishing the next route table with 110 pods and with 10k routes.
//!
//!   cargo bench -p strom-dataplane --bench pipeline

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use etherparse::PacketBuilder;
use strom_dataplane::pipeline::{self, arp, eth, ipv4, rewrite, spoof, InPort, PortKind};
use strom_dataplane::tables::routes::{port_routes, DesiredRoutes};
use strom_dataplane::tables::{Next, NodeTable, RouteTable, TableHandle, Tables};

const PODS: u8 = 110;
const A_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const HA_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
const GW: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

fn pod_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 16, i + 1)
}

fn tables() -> Tables {
    let mut t = Tables {
        node: NodeTable::new(GW),
        routes: RouteTable::default(),
        services: Default::default(),
        policy: Default::default(),
    };
    for i in 0..PODS {
        t.routes.local.insert(
            IpAddr::V4(pod_ip(i)),
            Next {
                port: u32::from(i),
                worker: 0,
                dst_mac: [2, 0, 0, 0, 0, i + 1],
                src_mac: [2, 0, 0, 0, 1, i + 1],
                mtu: 1500,
            },
        );
    }
    t
}

/// A 60-byte UDP frame (the smallest Ethernet frame without FCS) from pod 0 to pod `dst`.
fn udp60(dst: u8) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(A_MAC, HA_MAC)
        .ipv4(pod_ip(0).octets(), pod_ip(dst).octets(), 64)
        .udp(4000, 9);
    let mut v = Vec::new();
    b.write(&mut v, &[0x61; 18]).unwrap();
    assert_eq!(v.len(), 60);
    v
}

/// Pod 0's port, as the worker hands it to the pipeline.
fn pod_port() -> InPort<'static> {
    static IPS: [IpAddr; 1] = [IpAddr::V4(Ipv4Addr::new(198, 18, 16, 1))];
    InPort {
        id: 0,
        kind: PortKind::Pod,
        host_mac: HA_MAC,
        pod_mac: A_MAC,
        ips: &IPS,
    }
}

fn arp_request() -> Vec<u8> {
    let mut v = vec![0xff; 6];
    v.extend_from_slice(&A_MAC);
    v.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    v.extend_from_slice(&A_MAC);
    v.extend_from_slice(&pod_ip(0).octets());
    v.extend_from_slice(&[0; 6]);
    v.extend_from_slice(&GW.octets());
    v
}

fn stages(c: &mut Criterion) {
    let t = tables();
    let port = pod_port();
    let pkt = udp60(57);
    let mut g = c.benchmark_group("stage");
    g.throughput(Throughput::Elements(1));
    g.bench_function("eth_classify", |b| {
        b.iter(|| eth::classify(black_box(&pkt)))
    });
    g.bench_function("ipv4_validate", |b| {
        b.iter(|| ipv4::validate(black_box(&pkt[14..])))
    });
    g.bench_function("spoof_check", |b| {
        b.iter(|| spoof::check(black_box(&pkt), &port, IpAddr::V4(pod_ip(0))))
    });
    g.bench_function("route_lookup_110_pods", |b| {
        b.iter(|| t.view().route(black_box(IpAddr::V4(pod_ip(57)))).copied())
    });
    let next = *t.view().route(IpAddr::V4(pod_ip(57))).unwrap();
    g.bench_function("ttl_decrement_rfc1624", |b| {
        b.iter_batched_ref(
            || pkt.clone(),
            |p| ipv4::decrement_ttl(&mut p[14..]),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("rewrite_macs", |b| {
        b.iter_batched_ref(
            || pkt.clone(),
            |p| rewrite::macs(p, black_box(&next)),
            BatchSize::SmallInput,
        )
    });
    let a = arp_request();
    g.bench_function("gateway_arp_reply", |b| {
        b.iter_batched_ref(
            || a.clone(),
            |p| arp::answer_gateway(p, &port, GW),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn whole(c: &mut Criterion) {
    let t = tables();
    let port = pod_port();
    // 64 frames to 64 different pods, each in a 2 KiB frame buffer (the UMEM's are 4 KiB).
    let batch: Vec<Vec<u8>> = (0..64u8)
        .map(|i| {
            let mut f = vec![0u8; 2048];
            let p = udp60(1 + i);
            f[..60].copy_from_slice(&p);
            f
        })
        .collect();
    let mut ctx = pipeline::Context::default();
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(64));
    g.bench_function("pod_to_pod_batch_64", |b| {
        b.iter_batched_ref(
            || batch.clone(),
            |frames| {
                for f in frames.iter_mut() {
                    black_box(pipeline::process(f, 60, &port, &t.view(), &mut ctx));
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// Desired routes of `n` pods (one address each, spread over 2 workers).
fn desired(n: u32) -> DesiredRoutes {
    let mut d = DesiredRoutes::default();
    for i in 0..n {
        let ip = IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i));
        let next = Next {
            port: i,
            worker: (i % 2) as u16,
            dst_mac: [2, 0, 0, 0, 0, i as u8],
            src_mac: [2, 0, 0, 0, 1, i as u8],
            mtu: 1450,
        };
        d.ports.insert(i, port_routes(&[ip], next));
    }
    d
}

/// One route change: the reconciler builds the next route table from the desired state and
/// publishes it (the old version is dropped here, as the reconciler does once the workers
/// have moved past it). The node table is not copied.
fn table_change(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_change");
    for n in [110u32, 10_000] {
        let mut d = desired(n);
        let handle = TableHandle::new(NodeTable::new(GW));
        handle.publish_routes(RouteTable::build(&d));
        let t = RouteTable::build(&d);
        let bytes =
            t.local.capacity() * (std::mem::size_of::<IpAddr>() + std::mem::size_of::<Next>() + 1);
        println!("route table with {n} routes: about {} KiB", bytes / 1024);
        let extra = IpAddr::V4(Ipv4Addr::new(198, 19, 255, 1));
        let mut flip = false;
        g.bench_function(format!("publish_one_change_{n}_routes"), |b| {
            b.iter(|| {
                flip = !flip;
                if flip {
                    d.ports
                        .insert(u32::MAX, port_routes(&[extra], d.ports[&0][0].1));
                } else {
                    d.ports.remove(&u32::MAX);
                }
                drop(handle.publish_routes(RouteTable::build(&d)));
            })
        });
    }
    g.finish();
}

criterion_group!(benches, stages, whole, table_change);
criterion_main!(benches);
