//! What NetworkPolicy costs (criterion, and two figures printed): 1000 pods, all on the node
//! (stromd's table at its largest: every one isolated), with 10, 1k and 10k policies compiled
//! by strom-control from Kubernetes objects as a cluster would have them (pods selected by
//! labels, namespace selectors, numbered and named ports, port ranges, ipBlocks; for the
//! per-packet figures one policy in ten a named port to a block that cuts through the pods'
//! addresses, which the compiler lists pod by pod).
//!
//! - Per packet (criterion), 60-byte TCP frames through the whole pipeline on one core: a
//!   pod's new connection to another pod that the policies allow (two verdicts: the packet's,
//!   and its answers', denied on their own so the flow is tracked; the entry is removed again
//!   after each packet, which the figure includes) and one they deny (counted against every
//!   policy isolating the pod); the same established connection without policies (conntrack
//!   empty, and in use for another flow) and with them, and a flow between two pods no policy
//!   isolates; the verdict alone.
//! - Memory (printed): the bytes `PolicyTable::build` allocates that are still live once the
//!   table is built, counted by the bench's global allocator while it builds (bytes asked for,
//!   not the allocator's own overhead), with and without the tangled policies.
//! - Programming latency (printed, 1k pods and 1k policies, with and without the tangled
//!   policies): one policy's port changed, then the time until a worker loop on another core
//!   sees the new table (and that it allows the new port): compile every policy, encode the
//!   `SetPolicies` request as stromd's client does, decode it as stromd's server does,
//!   `Reconciler::set_policies` (what the controller does for it: build, publish, retire),
//!   and a busy worker's next load of the tables. Not included: the socket round trip (a Unix
//!   socket, writing and reading the line; stromd refuses a line over `MAX_LINE`, which the
//!   bench prints the request's size against), and the watch that notices the change.
//!
//!   taskset -c 1 cargo bench -p strom-dataplane --bench policy
//!
//! (The latency's worker thread pins itself to core 0, as stromd's busy worker has a core of
//! its own; the rest runs where taskset puts it.)

use std::alloc::System;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use etherparse::PacketBuilder;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use strom_api::{Peers, PolicySet, Request, Rule};
use strom_control::k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use strom_control::manifests::Objects;
use strom_control::policy::{compile, Input};
use strom_dataplane::conntrack::{FlowKey, Seen, TCP};
use strom_dataplane::drop::DropReason;
use strom_dataplane::pipeline::{self, Action, Context, InPort, PortKind};
use strom_dataplane::reconcile::Reconciler;
use strom_dataplane::tables::policy::PolicySlots;
use strom_dataplane::tables::services::{Backend, SvcRef};
use strom_dataplane::tables::{Next, NodeTable, PolicyTable, RouteTable, TableHandle, Tables};

/// The system allocator, counting (stats_alloc): a few relaxed atomic adds per allocation,
/// paid by every figure alike.
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// What `f` returns, with the bytes and the allocations it left live (allocated while it ran
/// and not freed, less what it freed of older allocations). Only this thread may allocate
/// meanwhile.
fn counted<R>(f: impl FnOnce() -> R) -> (R, isize, isize) {
    let region = Region::new(GLOBAL);
    let r = f();
    let c = region.change();
    (
        r,
        c.bytes_allocated as isize - c.bytes_deallocated as isize,
        c.allocations as isize - c.deallocations as isize,
    )
}

const NODE: &str = "n1";
const GW: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Pods in the ten namespaces ns0..ns9; the last ten of the 1000 are clients in a namespace
/// of their own that no policy selects.
const PODS: u32 = 990;
const CLIENTS: u32 = 10;
/// Named ports to a block through the pods, in this many of each 100 policies (the per-packet
/// figures; memory and latency are also measured without).
const TANGLED: u32 = 10;
/// Where pod A's egress lets it out on 443 (and, in the latency run, the port changed).
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);

/// The flows measured: A (ns0, app a0) to B (ns0, app a0) on its named port http (8080),
/// allowed by A's egress and B's ingress (the policies selecting a0 in ns0), B's answers
/// denied on their own (so the connection is tracked); D (ns1, app a0, tier t0) to B, which
/// B's ingress denies; two clients no policy isolates.
const A: u32 = 100;
const B: u32 = 200;
const D: u32 = 101;
const C1: u32 = PODS;
const C2: u32 = PODS + 1;
const HTTP: u16 = 8080;

/// Pod `i`'s address (the benchmarking range: only a key here).
fn pod_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 16, 0)) + i)
}

fn pod_mac(i: u32) -> [u8; 6] {
    [2, 0, 0, 0, (i >> 8) as u8, i as u8]
}

fn host_mac(i: u32) -> [u8; 6] {
    [2, 0, 0, 1, (i >> 8) as u8, i as u8]
}

/// The cluster: 10 namespaces (teams t0..t2) of 99 pods each (10 apps, tiers by app, a named
/// port http on 8080 or 8081), 10 client pods, and `policies` policies, policy `i` in
/// namespace `i % 10` selecting app `(i / 10) % 10` for ingress (from an app of its
/// namespace, and from tiers t1/t2 of a team's namespaces, on http and a 10-port range) and
/// egress (to an app in any namespace on http and DNS, and outside the pods on 443, or in
/// `tangled` of each 100, to the pods' block on http).
fn cluster(policies: u32, tangled: u32) -> Objects {
    let mut yaml = String::new();
    for ns in 0..10 {
        yaml += &format!(
            "kind: Namespace\nmetadata: {{name: ns{ns}, labels: {{team: t{}}}}}\n---\n",
            ns % 3
        );
    }
    yaml += "kind: Namespace\nmetadata: {name: clients, labels: {team: t0}}\n---\n";
    for i in 0..PODS {
        let ns = i % 10;
        let app = (i / 10) % 10;
        yaml += &format!(
            "kind: Pod\nmetadata: {{name: p{i}, namespace: ns{ns}, labels: {{app: a{app}, tier: t{}}}}}\n\
             spec: {{nodeName: {NODE}, containers: [{{name: c, ports: [{{name: http, containerPort: {}}}]}}]}}\n\
             status: {{podIP: {}}}\n---\n",
            app % 3,
            8080 + app % 2,
            pod_ip(i)
        );
    }
    for c in 0..CLIENTS {
        yaml += &format!(
            "kind: Pod\nmetadata: {{name: c{c}, namespace: clients, labels: {{app: client, tier: t1}}}}\n\
             spec: {{nodeName: {NODE}, containers: [{{name: c}}]}}\n\
             status: {{podIP: {}}}\n---\n",
            pod_ip(PODS + c)
        );
    }
    for i in 0..policies {
        let ns = i % 10;
        let app = (i / 10) % 10;
        let from = (i / 7) % 10;
        let outside = if i % 100 >= 100 - tangled {
            "{to: [{ipBlock: {cidr: 198.18.16.0/22, except: [198.18.17.0/24]}}], ports: [{port: http}]}"
        } else {
            "{to: [{ipBlock: {cidr: 0.0.0.0/0, except: [198.18.0.0/15]}}], ports: [{port: 443}]}"
        };
        yaml += &format!(
            "kind: NetworkPolicy\nmetadata: {{name: np{i}, namespace: ns{ns}}}\nspec:\n  \
             podSelector: {{matchLabels: {{app: a{app}}}}}\n  policyTypes: [Ingress, Egress]\n  \
             ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: a{from}}}}}}}, \
             {{namespaceSelector: {{matchLabels: {{team: t{}}}}}, podSelector: {{matchExpressions: \
             [{{key: tier, operator: In, values: [t1, t2]}}]}}}}]\n    \
             ports: [{{port: http}}, {{port: {}, endPort: {}}}]\n  \
             egress:\n  - to: [{{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: a{from}}}}}}}]\n    \
             ports: [{{port: http}}, {{protocol: UDP, port: 53}}]\n  \
             - {outside}\n---\n",
            i % 3,
            1000 + i,
            1010 + i
        );
    }
    let mut o = Objects::default();
    o.add_text(&yaml, "bench.yaml");
    assert!(o.invalid.is_empty(), "{:?}", o.invalid);
    o
}

fn input(o: &Objects) -> Input<'_> {
    Input {
        policies: &o.network_policies,
        pods: &o.pods,
        namespaces: &o.namespaces,
        node: Some(NODE),
    }
}

fn compiled(o: &Objects) -> PolicySet {
    let c = compile(&input(o));
    assert!(c.rejected.is_empty(), "{:?}", c.rejected);
    c.set
}

/// The set compiled for `n` policies, `tangled` of each 100 with named ports into the pods'
/// block.
fn compiled_for(n: u32, tangled: u32) -> PolicySet {
    let o = cluster(n, tangled);
    let t0 = Instant::now();
    let set = compiled(&o);
    let took = t0.elapsed();
    let rules: usize = set.groups.iter().map(|g| g.rules.len()).sum();
    let blocks: usize = set
        .groups
        .iter()
        .flat_map(|g| &g.rules)
        .map(|r| match &r.peers {
            Peers::Any => 0,
            Peers::Some { blocks, .. } => blocks.len(),
        })
        .sum();
    println!(
        "{n} policies ({tangled}% tangled) over {} pods: compiled in {:.1} ms; {} isolated pods, \
         {} groups, {rules} rules, {blocks} address blocks",
        PODS + CLIENTS,
        ms(took),
        set.pods.len(),
        set.groups.len()
    );
    set
}

/// The sets the per-packet figures use: 10, 1k and 10k policies, `TANGLED`% tangled
/// (compiled once for the whole run).
fn sets() -> &'static [(u32, PolicySet)] {
    static SETS: OnceLock<Vec<(u32, PolicySet)>> = OnceLock::new();
    SETS.get_or_init(|| {
        [10u32, 1_000, 10_000]
            .into_iter()
            .map(|n| (n, compiled_for(n, TANGLED)))
            .collect()
    })
}

/// The node's tables: a route to every pod, and the policy table for `set`.
fn tables(set: Option<&PolicySet>) -> Tables {
    let mut t = Tables {
        node: NodeTable::new(GW),
        routes: RouteTable::default(),
        services: Default::default(),
        policy: Default::default(),
    };
    for i in 0..PODS + CLIENTS {
        t.routes.local.insert(
            IpAddr::V4(pod_ip(i)),
            Next {
                port: i + 1,
                worker: 0,
                dst_mac: pod_mac(i),
                src_mac: host_mac(i),
                mtu: 1500,
            },
        );
    }
    if let Some(set) = set {
        t.policy = PolicyTable::build(set, 1, &mut PolicySlots::default()).unwrap();
    }
    t
}

/// Pod `i`'s port, as its worker hands it to the pipeline.
fn port_of(i: u32, ips: &[IpAddr]) -> InPort<'_> {
    InPort {
        id: i + 1,
        kind: PortKind::Pod,
        host_mac: host_mac(i),
        pod_mac: pod_mac(i),
        ips,
    }
}

#[derive(Clone, Copy)]
enum Flags {
    Syn,
    SynAck,
    Ack,
}

/// A 60-byte TCP frame from pod `src` to pod `dst`.
fn tcp60(src: u32, dst: u32, sport: u16, dport: u16, flags: Flags) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(pod_mac(src), host_mac(src))
        .ipv4(pod_ip(src).octets(), pod_ip(dst).octets(), 64)
        .tcp(sport, dport, 1, 64240);
    let b = match flags {
        Flags::Syn => b.syn(),
        Flags::SynAck => b.syn().ack(2),
        Flags::Ack => b.ack(2),
    };
    let mut v = Vec::new();
    b.write(&mut v, &[0x61; 6]).unwrap();
    assert_eq!(v.len(), 60);
    v
}

/// The ephemeral port of the `k`th connection.
fn ephemeral(k: u32) -> u16 {
    32768 + (k % 28000) as u16
}

fn criterion_config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
}

fn new_flow(c: &mut Criterion) {
    let ips = |i: u32| [IpAddr::V4(pod_ip(i))];
    let (a_ips, d_ips) = (ips(A), ips(D));
    let (port_a, port_d) = (port_of(A, &a_ips), port_of(D, &d_ips));
    let mut g = c.benchmark_group("policy_new_flow");
    g.throughput(Throughput::Elements(1));
    for (n, set) in sets() {
        let t = tables(Some(set));
        let view = t.view();
        let mut ctx = Context::new(0, 1 << 16);
        ctx.follow_policy(view.policy);
        let syn = tcp60(A, B, ephemeral(0), HTTP, Flags::Syn);
        let mut buf = vec![0u8; 2048];
        let key = |sport| FlowKey {
            src: pod_ip(A),
            dst: pod_ip(B),
            sport,
            dport: HTTP,
            proto: TCP,
        };
        // What is measured: allowed, tracked (its answers are denied on their own), sent.
        buf[..60].copy_from_slice(&syn);
        let a = pipeline::process(&mut buf, 60, &port_a, &view, &mut ctx);
        assert!(
            matches!(a, Action::Tx { port, .. } if port == B + 1),
            "{a:?}"
        );
        let h = ctx.ct.lookup(&key(ephemeral(0)), 0).expect("tracked");
        ctx.ct.remove(h.slot);
        let mut k = 0u32;
        g.bench_function(format!("allowed_{n}_policies"), |b| {
            b.iter(|| {
                k = k.wrapping_add(1);
                let sport = ephemeral(k);
                buf[..60].copy_from_slice(&syn);
                buf[34..36].copy_from_slice(&sport.to_be_bytes());
                let a = pipeline::process(&mut buf, 60, &port_a, &view, &mut ctx);
                // Keep the table's size steady: the flow goes again.
                if let Some(h) = ctx.ct.lookup(&key(sport), 0) {
                    ctx.ct.remove(h.slot);
                }
                black_box(a)
            })
        });
        assert!(ctx.ct.is_empty());
        let denied = tcp60(D, B, ephemeral(0), HTTP, Flags::Syn);
        buf[..60].copy_from_slice(&denied);
        let a = pipeline::process(&mut buf, 60, &port_d, &view, &mut ctx);
        assert_eq!(a, Action::Drop(DropReason::PolicyDenied));
        let denial = t
            .policy
            .verdict(pod_ip(D), pod_ip(B), TCP, HTTP)
            .unwrap_err();
        assert_eq!(denial.direction, strom_api::Direction::Ingress);
        g.bench_function(format!("denied_{n}_policies"), |b| {
            b.iter(|| {
                k = k.wrapping_add(1);
                buf[..60].copy_from_slice(&denied);
                buf[34..36].copy_from_slice(&ephemeral(k).to_be_bytes());
                black_box(pipeline::process(&mut buf, 60, &port_d, &view, &mut ctx))
            })
        });
        assert!(ctx.ct.is_empty());
    }
    g.finish();
}

fn established(c: &mut Criterion) {
    let ips = |i: u32| [IpAddr::V4(pod_ip(i))];
    let (a_ips, b_ips, c1_ips) = (ips(A), ips(B), ips(C1));
    let (port_a, port_b, port_c1) = (port_of(A, &a_ips), port_of(B, &b_ips), port_of(C1, &c1_ips));
    let sport = ephemeral(1);
    let ack = tcp60(A, B, sport, HTTP, Flags::Ack);
    let open = tcp60(C1, C2, sport, HTTP, Flags::Ack);
    let mut buf = vec![0u8; 2048];
    let mut g = c.benchmark_group("policy_established_flow");
    g.throughput(Throughput::Elements(1));
    {
        let t = tables(None);
        let view = t.view();
        let mut ctx = Context::new(0, 1 << 16);
        buf[..60].copy_from_slice(&ack);
        let a = pipeline::process(&mut buf, 60, &port_a, &view, &mut ctx);
        assert!(
            matches!(a, Action::Tx { port, .. } if port == B + 1),
            "{a:?}"
        );
        g.bench_function("no_policies", |b| {
            b.iter(|| {
                buf[..60].copy_from_slice(&ack);
                black_box(pipeline::process(&mut buf, 60, &port_a, &view, &mut ctx))
            })
        });
        // Conntrack in use for some other flow (a Service's, say): the pipeline no longer
        // skips parsing the ports and looking the flow up.
        let other = FlowKey {
            src: pod_ip(C1),
            dst: pod_ip(C2),
            sport: 40000,
            dport: 9,
            proto: TCP,
        };
        let backend = Backend {
            ip: other.dst,
            port: other.dport,
        };
        let syn = Seen {
            tcp_flags: 0x02,
            sctp_end: false,
        };
        ctx.ct
            .insert(other, other.reversed(), SvcRef::NONE, backend, syn, 0, 0)
            .unwrap();
        buf[..60].copy_from_slice(&ack);
        let a = pipeline::process(&mut buf, 60, &port_a, &view, &mut ctx);
        assert!(
            matches!(a, Action::Tx { port, .. } if port == B + 1),
            "{a:?}"
        );
        assert_eq!(ctx.ct.len(), 1);
        g.bench_function("no_policies_conntrack_in_use", |b| {
            b.iter(|| {
                buf[..60].copy_from_slice(&ack);
                black_box(pipeline::process(&mut buf, 60, &port_a, &view, &mut ctx))
            })
        });
    }
    for (n, set) in sets() {
        let t = tables(Some(set));
        let view = t.view();
        let mut ctx = Context::new(0, 1 << 16);
        ctx.follow_policy(view.policy);
        // The handshake: the connection is tracked (B's answers are denied on their own).
        for (port, frame) in [
            (&port_a, tcp60(A, B, sport, HTTP, Flags::Syn)),
            (&port_b, tcp60(B, A, HTTP, sport, Flags::SynAck)),
            (&port_a, ack.clone()),
        ] {
            buf[..60].copy_from_slice(&frame);
            let a = pipeline::process(&mut buf, 60, port, &view, &mut ctx);
            assert!(matches!(a, Action::Tx { .. }), "{a:?}");
        }
        assert_eq!(ctx.ct.len(), 1);
        g.bench_function(format!("tracked_{n}_policies"), |b| {
            b.iter(|| {
                buf[..60].copy_from_slice(&ack);
                black_box(pipeline::process(&mut buf, 60, &port_a, &view, &mut ctx))
            })
        });
        // Between two pods no policy isolates: untracked, every packet judged.
        let mut ctx = Context::new(0, 1 << 16);
        buf[..60].copy_from_slice(&open);
        let a = pipeline::process(&mut buf, 60, &port_c1, &view, &mut ctx);
        assert!(
            matches!(a, Action::Tx { port, .. } if port == C2 + 1),
            "{a:?}"
        );
        assert!(ctx.ct.is_empty());
        g.bench_function(format!("unisolated_pods_{n}_policies"), |b| {
            b.iter(|| {
                buf[..60].copy_from_slice(&open);
                black_box(pipeline::process(&mut buf, 60, &port_c1, &view, &mut ctx))
            })
        });
    }
    g.finish();
}

fn verdict(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy_verdict");
    g.throughput(Throughput::Elements(1));
    let (a, b, d) = (pod_ip(A), pod_ip(B), pod_ip(D));
    for (n, set) in sets() {
        let t = PolicyTable::build(set, 1, &mut PolicySlots::default()).unwrap();
        assert!(t.verdict(a, b, TCP, HTTP).is_ok());
        assert!(t.verdict(d, b, TCP, HTTP).is_err());
        g.bench_function(format!("allowed_{n}_policies"), |bn| {
            bn.iter(|| black_box(t.verdict(black_box(a), black_box(b), TCP, black_box(HTTP))))
        });
        g.bench_function(format!("denied_{n}_policies"), |bn| {
            bn.iter(|| black_box(t.verdict(black_box(d), black_box(b), TCP, black_box(HTTP))))
        });
    }
    g.finish();
}

fn mib(b: isize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// The compiled state's memory, and what building it takes.
fn memory(_c: &mut Criterion) {
    let plain: Vec<(u32, PolicySet)> = [1_000u32, 10_000]
        .into_iter()
        .map(|n| (n, compiled_for(n, 0)))
        .collect();
    let tangled = sets().iter().map(|(n, s)| (TANGLED, *n, s));
    for (tangled, n, set) in tangled.chain(plain.iter().map(|(n, s)| (0, *n, s))) {
        let (copy, set_bytes, _) = counted(|| set.clone());
        let (rules, rules_bytes, _) =
            counted(|| -> Vec<Vec<Rule>> { copy.groups.iter().map(|g| g.rules.clone()).collect() });
        drop((copy, rules));
        let line = serde_json::to_vec(&Request::SetPolicies {
            policies: set.clone(),
            delta: None,
        })
        .unwrap();
        let mut slots = PolicySlots::default();
        let t0 = Instant::now();
        let first = PolicyTable::build(set, 1, &mut slots).unwrap();
        let took = t0.elapsed();
        drop(first);
        // Again, counted, the slots already handed out: the table alone (built once more
        // with fresh slots, for what they take).
        let (table, table_bytes, allocations) =
            counted(|| PolicyTable::build(set, 2, &mut slots).unwrap());
        let (with_slots, slots_and_table, _) = counted(|| {
            let mut slots = PolicySlots::default();
            (PolicyTable::build(set, 1, &mut slots).unwrap(), slots)
        });
        drop(with_slots);
        println!(
            "policy table, {n} policies ({tangled}% tangled) over {} pods: {:.2} MiB live \
             ({allocations} allocations live), of which its copy of the rules (kept for \
             `stromctl trace`) {:.2} MiB; built in {:.1} ms; the policies' \
             counter slots {:.1} KiB; the PolicySet it is built from {:.2} MiB, {:.2} MiB as a \
             SetPolicies request line (stromd's API takes lines up to {:.0} MiB)",
            PODS + CLIENTS,
            mib(table_bytes),
            mib(rules_bytes),
            ms(took),
            (slots_and_table - table_bytes) as f64 / 1024.0,
            mib(set_bytes),
            mib(line.len() as isize + 1),
            mib(strom_dataplane::api::server::MAX_LINE as isize)
        );
        drop(table);
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// From a policy change to enforcement, 1k pods and 1k policies.
fn programming_latency(_c: &mut Criterion) {
    for tangled in [0, TANGLED] {
        latency(tangled);
    }
}

fn latency(tangled: u32) {
    const ROUNDS: u32 = 200;
    let mut o = cluster(1_000, tangled);
    let np0 = o
        .network_policies
        .iter()
        .position(|p| p.metadata.name.as_deref() == Some("np0"))
        .unwrap();
    let (workers, _commands) = strom_dataplane::worker::create(1, &[]).unwrap();
    let handle = TableHandle::new(NodeTable::new(GW));
    let mut reconciler = Reconciler::new(handle.clone(), workers.clone());
    reconciler.set_policies(&compiled(&o)).unwrap();

    // A busy worker's loop: loads the tables, and reports the first loop that sees each new
    // generation (checking that it allows what the change opened).
    let want = Arc::new(AtomicU64::new(u64::MAX));
    let port = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (seen_tx, seen_rx) = crossbeam_channel::bounded::<(Instant, bool)>(1);
    let worker = {
        let (handle, want, port, stop) = (handle.clone(), want.clone(), port.clone(), stop.clone());
        let shared = workers[0].clone();
        std::thread::spawn(move || {
            let pinned = core_affinity::set_for_current(core_affinity::CoreId { id: 0 });
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                let loaded = handle.load();
                let view = loaded.view();
                let g = view.policy.generation();
                if g != last && g == want.load(Ordering::Acquire) {
                    let at = Instant::now();
                    let p = port.load(Ordering::Relaxed) as u16;
                    let ok = view.policy.verdict(pod_ip(A), OUTSIDE, TCP, p).is_ok();
                    last = g;
                    let _ = seen_tx.send((at, ok));
                }
                drop(loaded);
                shared.counters.loops.fetch_add(1, Ordering::Release);
                std::hint::spin_loop();
            }
            pinned
        })
    };

    let mut total = Vec::new();
    let mut parts: [Vec<Duration>; 5] = Default::default();
    let mut line_len = 0;
    for round in 0..ROUNDS {
        // The change: np0's egress to outside the pods moves from one port to another.
        let p = 30_000 + round as u16;
        let spec = o.network_policies[np0].spec.as_mut().unwrap();
        let rule = &mut spec.egress.as_mut().unwrap()[1];
        rule.ports.as_mut().unwrap()[0].port = Some(IntOrString::Int(i32::from(p)));
        port.store(u64::from(p), Ordering::Relaxed);
        want.store(u64::from(round) + 2, Ordering::Release);

        let t0 = Instant::now();
        let set = compiled(&o);
        let t1 = Instant::now();
        let mut line = serde_json::to_vec(&Request::SetPolicies {
            policies: set,
            delta: None,
        })
        .unwrap();
        line.push(b'\n');
        let t2 = Instant::now();
        let text = std::str::from_utf8(&line).unwrap().trim();
        let Request::SetPolicies { policies, .. } = serde_json::from_str::<Request>(text).unwrap()
        else {
            unreachable!()
        };
        let t3 = Instant::now();
        reconciler.set_policies(&policies).unwrap();
        let t4 = Instant::now();
        let (seen, ok) = seen_rx.recv().unwrap();
        assert!(ok, "round {round}: the new table does not allow port {p}");
        line_len = line.len();
        total.push(seen - t0);
        parts[0].push(t1 - t0);
        parts[1].push(t2 - t1);
        parts[2].push(t3 - t2);
        parts[3].push(t4 - t3);
        parts[4].push(seen.saturating_duration_since(t3));
    }
    stop.store(true, Ordering::Relaxed);
    let pinned = worker.join().unwrap();
    total.sort_unstable();
    for p in &mut parts {
        p.sort_unstable();
    }
    println!(
        "programming latency, {} pods, 1000 policies ({tangled}% tangled), {ROUNDS} changes \
         (request line {:.2} MiB; worker thread pinned to core 0: {pinned}): p50 {:.1} ms, \
         p99 {:.1} ms, max {:.1} ms",
        PODS + CLIENTS,
        mib(line_len as isize),
        ms(percentile(&total, 0.5)),
        ms(percentile(&total, 0.99)),
        ms(total[total.len() - 1]),
    );
    let names = [
        "compile",
        "encode the request",
        "decode it",
        "set_policies (build, publish, retire)",
        "decoded → seen by the worker",
    ];
    for (name, p) in names.iter().zip(&parts) {
        println!(
            "  {name}: p50 {:.2} ms, p99 {:.2} ms",
            ms(percentile(p, 0.5)),
            ms(percentile(p, 0.99))
        );
    }
}

criterion_group! {
    name = benches;
    config = criterion_config();
    targets = memory, programming_latency, verdict, new_flow, established
}
criterion_main!(benches);
