//! Results of a run: the JSON kept on disk, the medians, the table and the BENCHMARKS.md block.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::traffic::Metric;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub meta: Meta,
    pub samples: Vec<Sample>,
    /// Measurements that gave no number, and why.
    #[serde(default)]
    pub failures: Vec<Failure>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    pub round: u32,
    pub path: String,
    pub traffic: String,
    pub error: String,
}

impl Failure {
    pub fn new(round: u32, path: &str, traffic: &str, e: &anyhow::Error) -> Failure {
        Failure {
            round,
            path: path.into(),
            traffic: traffic.into(),
            error: format!("{e:#}"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// UTC date and time the run started.
    pub started: String,
    pub command: String,
    pub secs: u32,
    pub rounds: u32,
    /// Paths in the order the first round ran them, and the traffic in the order every path
    /// ran it.
    pub paths: Vec<PathInfo>,
    pub traffic: Vec<String>,
    pub sender_core: usize,
    pub dut_core: usize,
    /// The core the node veths' NAPI threads were pinned to (`--napi-core`); none: their
    /// receive work ran on the sender's core, in its softirq.
    #[serde(default)]
    pub napi_core: Option<usize>,
    pub machine: Machine,
    /// `git describe` of the tree the binaries were built from, when known.
    pub commit: Option<String>,
    /// Versions of the tools the run used.
    pub tools: BTreeMap<String, String>,
    /// Each round started one path further on than the one before. Runs before 2026-11-27
    /// 21:00 measured the paths in the same order every round.
    #[serde(default)]
    pub rotated: bool,
    /// The pods' interface MTU on stromd's paths (`--pod-mtu`); none: runs from before pods
    /// had a large MTU toward each other (1500 throughout).
    #[serde(default)]
    pub pod_mtu: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathInfo {
    pub name: String,
    pub scenario: String,
    pub description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub os: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub round: u32,
    pub path: String,
    pub metric: String,
    pub value: f64,
    /// For UDP: what strom-pktgen offered, in Mpps.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub offered_mpps: Option<f64>,
    /// For TCP: segments the senders retransmitted (iperf3).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retransmits: Option<u64>,
    /// For new connections (`crr`): those that failed (refused, timed out, reset, no local
    /// port), fewer than the share that fails the measurement.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub failed_conns: Option<u64>,
}

/// Median and spread of one path's samples of one metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

/// The median of a non-empty slice (the mean of the middle two for an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

fn stat(v: &[f64]) -> Option<Stat> {
    if v.is_empty() {
        return None;
    }
    Some(Stat {
        median: median(v),
        min: v.iter().copied().fold(f64::INFINITY, f64::min),
        max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        n: v.len(),
    })
}

impl Results {
    /// Metrics in the order the traffic ran.
    pub fn metrics(&self) -> Vec<Metric> {
        let mut out: Vec<Metric> = Vec::new();
        for s in &self.samples {
            if let Some(m) = Metric::from_key(&s.metric) {
                if !out.contains(&m) {
                    out.push(m);
                }
            }
        }
        out.sort();
        out
    }

    pub fn path_names(&self) -> Vec<&str> {
        self.meta.paths.iter().map(|p| p.name.as_str()).collect()
    }

    /// What `pick` takes from each of one path's samples of `metric`.
    fn values<T>(&self, path: &str, metric: Metric, pick: impl Fn(&Sample) -> Option<T>) -> Vec<T> {
        let key = metric.key();
        self.samples
            .iter()
            .filter(|s| s.path == path && s.metric == key)
            .filter_map(pick)
            .collect()
    }

    pub fn stat(&self, path: &str, metric: Metric) -> Option<Stat> {
        stat(&self.values(path, metric, |s| Some(s.value)))
    }

    /// The median of one path's TCP retransmits for a metric.
    pub fn retransmits(&self, path: &str, metric: Metric) -> Option<f64> {
        let v = self.values(path, metric, |s| s.retransmits.map(|r| r as f64));
        (!v.is_empty()).then(|| median(&v))
    }

    /// The median of one path's failed connections for a metric (`crr`).
    pub fn failed_conns(&self, path: &str, metric: Metric) -> Option<f64> {
        let v = self.values(path, metric, |s| s.failed_conns.map(|f| f as f64));
        (!v.is_empty()).then(|| median(&v))
    }

    /// The median rate strom-pktgen offered for one path's UDP metric.
    pub fn offered(&self, path: &str, metric: Metric) -> Option<f64> {
        let v = self.values(path, metric, |s| s.offered_mpps);
        (!v.is_empty()).then(|| median(&v))
    }

    /// The medians table, with a row of stromd / peer ratios for every peer.
    pub fn table(&self) -> String {
        let metrics = self.metrics();
        let mut t = String::from("| path | scenario |");
        for m in &metrics {
            let _ = write!(t, " {} |", m.label());
        }
        t.push_str("\n| --- | --- |");
        for _ in &metrics {
            t.push_str(" ---: |");
        }
        t.push('\n');
        for p in &self.meta.paths {
            let bold = p.name.starts_with("stromd");
            let _ = write!(t, "| {} | {} |", p.description, p.scenario);
            for m in &metrics {
                match self.stat(&p.name, *m) {
                    Some(s) if bold => {
                        let _ = write!(t, " **{}** ({}) |", fmt(s.median), spread(&s));
                    }
                    Some(s) => {
                        let _ = write!(t, " {} ({}) |", fmt(s.median), spread(&s));
                    }
                    None => t.push_str(" – |"),
                }
            }
            t.push('\n');
        }
        // stromd against every peer; stromd with the Service against the kernel's DNAT;
        // stromd with policies, and with its pod programs in generic mode, against stromd.
        let mut rows: Vec<(&str, String, BTreeMap<Metric, f64>)> = self
            .ratios("stromd")
            .into_iter()
            .filter(|(peer, _)| !["stromd-svc", "stromd-pol", "stromd-generic"].contains(&&**peer))
            .map(|(peer, r)| ("stromd", peer, r))
            .collect();
        for (subject, against) in [
            ("stromd-svc", "kernel-nat"),
            ("stromd-pol", "stromd"),
            ("stromd-generic", "stromd"),
            ("stromd-generic", "kernel"),
        ] {
            rows.extend(
                self.ratios(subject)
                    .into_iter()
                    .filter(|(peer, _)| peer == against)
                    .map(|(peer, r)| (subject, peer, r)),
            );
        }
        for (subject, peer, ratios) in rows {
            let _ = write!(t, "| {subject} / {peer} | |");
            for m in &metrics {
                match ratios.get(m) {
                    Some(r) => {
                        let _ = write!(t, " {r:.2}×");
                        let mut rr = self.round_ratios(subject, &peer, *m);
                        if rr.len() >= 2 {
                            rr.sort_by(f64::total_cmp);
                            let (k, _) = sign_test_k(rr.len() as u32, CONFIDENCE);
                            let _ = write!(t, " ({:.2}–{:.2})", rr[k - 1], rr[rr.len() - k]);
                        }
                        t.push_str(" |");
                    }
                    None => t.push_str(" – |"),
                }
            }
            t.push('\n');
        }
        t
    }

    /// `path`'s sample over `peer`'s of the same round, for every round that has both.
    /// Pairing by round takes out what drifts between rounds (the machine is shared).
    pub fn round_ratios(&self, path: &str, peer: &str, metric: Metric) -> Vec<f64> {
        let of = |p: &str| -> BTreeMap<u32, f64> {
            self.values(p, metric, |s| Some((s.round, s.value)))
                .into_iter()
                .collect()
        };
        let b = of(peer);
        of(path)
            .into_iter()
            .filter_map(|(round, a)| b.get(&round).filter(|&&b| b > 0.0).map(|b| a / b))
            .collect()
    }

    /// For every other path: the ratio of `path`'s median to that path's, per metric.
    pub fn ratios(&self, path: &str) -> Vec<(String, BTreeMap<Metric, f64>)> {
        let metrics = self.metrics();
        if !self.path_names().contains(&path) {
            return Vec::new();
        }
        self.meta
            .paths
            .iter()
            .filter(|p| p.name != path)
            .map(|p| {
                let r = metrics
                    .iter()
                    .filter_map(|m| {
                        let a = self.stat(path, *m)?.median;
                        let b = self.stat(&p.name, *m)?.median;
                        (b > 0.0).then_some((*m, a / b))
                    })
                    .collect();
                (p.name.clone(), r)
            })
            .collect()
    }

    /// "path: item, item; path: item" over the paths that have items for `metrics`.
    fn per_path(
        &self,
        metrics: &[Metric],
        item: impl Fn(&str, Metric) -> Option<String>,
    ) -> String {
        let parts: Vec<String> = self
            .meta
            .paths
            .iter()
            .filter_map(|p| {
                let items: Vec<String> = metrics.iter().filter_map(|m| item(&p.name, *m)).collect();
                (!items.is_empty()).then(|| format!("{}: {}", p.name, items.join(", ")))
            })
            .collect();
        parts.join("; ")
    }

    /// What bounds each figure, partly from the numbers of this run.
    pub fn limits(&self) -> String {
        let metrics = self.metrics();
        let mut out = String::new();
        let udp: Vec<Metric> = metrics
            .iter()
            .copied()
            .filter(|m| matches!(m, Metric::UdpMpps(_)))
            .collect();
        if !udp.is_empty() {
            let _ = write!(
                out,
                "- **UDP Mpps** is what reached pod B's interface (`rx_packets`) per second of \
                 sending. strom-pktgen offers 60-byte frames from core {} as fast as its ring \
                 goes; the share of the offered rate each path delivered (medians):",
                self.meta.sender_core
            );
            let shares = self.per_path(&udp, |path, m| {
                let Metric::UdpMpps(n) = m else { return None };
                let got = self.stat(path, m)?.median;
                let offered = self.offered(path, m)?;
                (offered > 0.0)
                    .then(|| format!("{n} flows {:.0}% of {offered:.3}", got / offered * 100.0))
            });
            let _ = write!(out, " {shares}");
            out.push_str(
                ". A path that delivers nearly all it is offered is bounded by the sender, \
                 not by itself. For the AF_XDP paths (stromd, testpmd) the kernel bounds both \
                 sides: veth supports AF_XDP only in copy mode, so every frame is copied into \
                 the UMEM on receive and back into an skb on transmit, and the transmit call \
                 runs pod B's receive path inline (veth delivers in the sender's context). ",
            );
            match self.meta.napi_core {
                None => out.push_str(
                    "The copy into the UMEM, with the XDP program, runs in the node veth's NAPI \
                     poll on the sending pod's core, so that core's time is shared between the \
                     sender and the receive work of the path under test. ",
                ),
                Some(c) => {
                    let _ = write!(
                        out,
                        "The copy into the UMEM, with the XDP program, runs in the node veths' \
                         NAPI threads, pinned to core {c} (`--napi-core`). "
                    );
                }
            }
            out.push_str(
                "The flow count matters only to paths with per-flow state (conntrack in \
                 kernel-nat).\n",
            );
        }
        let tcp: Vec<Metric> = metrics
            .iter()
            .copied()
            .filter(|m| matches!(m, Metric::TcpGbps(_)))
            .collect();
        if !tcp.is_empty() {
            match self.meta.pod_mtu.filter(|&m| m > 1500) {
                Some(mtu) => {
                    let _ = write!(
                        out,
                        "- **TCP Gbit/s**: stromd's pods have an interface MTU of {mtu} toward each \
                         other (strom-cni's `localMtu`) and toward the Service CIDR (its \
                         `serviceCidrs`), so a segment of most of 64 KB crosses \
                         stromd as one frame spanning up to 17 buffers (multi-buffer AF_XDP), \
                         copied into the UMEM on receive and into an skb on transmit, with the \
                         kernel asked to finish its checksum (transmit metadata), which pod B \
                         then takes as verified; TSO, GSO and checksum offload stay off in its \
                         pods (an XDP program on the host veth turns the first two off anyway). \
                         testpmd's pods keep 1500: every 1448-byte \
                         segment crosses on its own. The kernel paths keep 1500 with TSO and GSO \
                         on and move 64 KB super-packets."
                    );
                    if self.meta.paths.iter().any(|p| p.name == "stromd-generic") {
                        let _ = write!(
                            out,
                            " stromd-generic attaches the pods' program in generic mode: its \
                             pods keep their offloads and route to each other at 1500, and a \
                             super-packet of up to {} bytes of 1448-byte segments crosses \
                             stromd whole as one frame.",
                            mtu.saturating_sub(1000)
                        );
                    }
                    out.push_str(
                        " More streams share the same two cores. Segments retransmitted in a \
                         measurement (medians; a path that drops shows here):",
                    );
                }
                None => out.push_str(
                    "- **TCP Gbit/s** through an AF_XDP path in native mode has no TSO or GSO \
                     (an XDP program on the host veth turns them off), so every 1448-byte segment \
                     crosses the path on its own, while the kernel paths move 64 KB \
                     super-packets; more streams share the same two cores. Segments \
                     retransmitted in a measurement (medians; a path that drops shows here):",
                ),
            }
            let retransmits = self.per_path(&tcp, |path, m| {
                let Metric::TcpGbps(n) = m else { return None };
                Some(format!("{n} stream(s) {:.0}", self.retransmits(path, m)?))
            });
            let _ = write!(out, " {retransmits}");
            out.push_str(".\n");
        }
        if metrics.contains(&Metric::TcpConnsPerS) {
            let _ = write!(
                out,
                "- **TCP conn/s** is new TCP connections completed per second from pod A: \
                 {} loops at once of connect, a 1-byte request, a 1-byte answer and close \
                 (strom-bench's own client and server, as netperf's TCP_CRR, both pinned to \
                 core {}). A connection is about nine packets through the path, and through a \
                 Service a new conntrack entry, a backend choice and DNAT. Both ends' \
                 sockets (the handshake, socket setup and teardown) run on that core, and for \
                 the kernel paths the forwarding too, in softirq context; through an AF_XDP \
                 path the receiving pod's stack runs inside the path's transmit, on the path's \
                 core (veth delivers in the sender's context). Pod A closes first and \
                 reuses its ports in TIME_WAIT (`tcp_tw_reuse`, ports 1024-65535, in its \
                 namespace). Connections that failed in a measurement (medians; more than {} \
                 in 1000 fail the measurement):",
                crate::crr::CONNS,
                self.meta.sender_core,
                crate::crr::MAX_ERROR_SHARE * 1000.0,
            );
            let failed = self.per_path(&[Metric::TcpConnsPerS], |path, m| {
                Some(format!("{:.0}", self.failed_conns(path, m)?))
            });
            let _ = write!(out, " {failed}");
            out.push_str(".\n");
        }
        if metrics
            .iter()
            .any(|m| matches!(m, Metric::RttP50 | Metric::RttP99))
        {
            out.push_str(
                "- **RTT** is sockperf's UDP ping-pong round trip (`--full-rtt`). The AF_XDP \
                 paths spin on their core (busy polling), so a request is picked up at once",
            );
            if let Some(c) = self.meta.napi_core {
                let _ = write!(
                    out,
                    " (here, once the node veth's NAPI thread on core {c} has been woken \
                     and has copied it into the ring)"
                );
            }
            out.push_str(
                "; the kernel paths forward in softirq context of the sending pod. p99 is \
                 dominated by the scheduler on a shared 2-core machine.\n",
            );
        }
        out
    }

    /// The generated part of BENCHMARKS.md.
    pub fn markdown(&self, json_name: &str, chart_name: Option<&str>) -> String {
        let m = &self.meta;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{BEGIN} (generated by `strom-bench` from `{json_name}`; change \
             `perf/src/bench/report.rs`, not this block) -->\n"
        );
        let _ = writeln!(
            s,
            "Run of {} on {} ({} cores, {:.0} GiB), {}, kernel {}{}. {} interleaved rounds \
             (every path once per round{}), {} s per measurement; the sender is pinned to core \
             {}, the path under test to core {}{}. Tools: {}.\n",
            m.started,
            m.machine.cpu,
            m.machine.cores,
            m.machine.memory_gib,
            m.machine.os,
            m.machine.kernel,
            m.commit
                .as_deref()
                .map(|c| format!(", strom {c}"))
                .unwrap_or_default(),
            m.rounds,
            if m.rotated {
                ", each round starting one path further on"
            } else {
                ""
            },
            m.secs,
            m.sender_core,
            m.dut_core,
            m.napi_core
                .map(|c| format!(
                    ", the node veths' receive work for the AF_XDP paths (threaded NAPI) to \
                     core {c}"
                ))
                .unwrap_or_default(),
            m.tools
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(s, "```sh\n{}\n```\n", m.command);
        let (k, confidence) = sign_test_k(m.rounds, CONFIDENCE);
        let bracket = if k == 1 {
            "the lowest to the highest".to_string()
        } else {
            format!("the {} lowest to the {} highest", ordinal(k), ordinal(k))
        };
        let _ = writeln!(
            s,
            "Medians (lowest–highest of the rounds). Ratios are of medians, and for RTT lower \
             is better; in brackets after a ratio, {bracket} of the rounds' own ratios \
             (stromd's sample over the peer's of the same round). If the rounds are \
             independent, that range holds the true median ratio with {:.1}% confidence for {} \
             rounds whatever the shape of the noise (the sign-test interval), so a range that \
             spans 1.00 means this run cannot tell the two paths apart, and one that lies above \
             (or, for RTT, below) 1.00 shows stromd ahead.\n",
            100.0 * confidence,
            m.rounds
        );
        s.push_str(&self.table());
        if let Some(c) = chart_name {
            let _ = writeln!(
                s,
                "\n![medians per path, bars from lowest to highest round]({c})"
            );
        }
        if !self.failures.is_empty() {
            s.push_str("\nMeasurements that failed (their medians are over fewer rounds):\n");
            for f in &self.failures {
                let _ = writeln!(
                    s,
                    "- round {} {} {}: {}",
                    f.round, f.path, f.traffic, f.error
                );
            }
        }
        s.push_str("\nWhat limits each figure:\n");
        s.push_str(&self.limits());
        s.push('\n');
        s.push_str(END);
        s.push('\n');
        s
    }
}

pub const BEGIN: &str = "<!-- strom-bench:begin";
pub const END: &str = "<!-- strom-bench:end -->";

/// `doc` with its generated block replaced by `block` (appended when `doc` has none).
pub fn regenerate(doc: &str, block: &str) -> String {
    if let (Some(b), Some(e)) = (doc.find(BEGIN), doc.find(END)) {
        if b < e {
            let mut out = String::with_capacity(doc.len() + block.len());
            out.push_str(&doc[..b]);
            out.push_str(block.trim_end_matches('\n'));
            out.push_str(&doc[e + END.len()..]);
            return out;
        }
    }
    let mut out = doc.trim_end_matches('\n').to_string();
    out.push_str("\n\n");
    out.push_str(block);
    out
}

/// The confidence the ratio ranges aim for (at least; fewer than 6 rounds cannot reach it).
pub const CONFIDENCE: f64 = 0.95;

/// The probability that the lowest and highest of `n` independent samples bracket their
/// distribution's median: 1 − 2·(1/2)^n.
pub fn sign_test_confidence(n: u32) -> f64 {
    1.0 - 0.5f64.powi(n.saturating_sub(1).min(1000) as i32)
}

/// The sign-test interval for the median of `n` independent samples: their `k`-th lowest and
/// `k`-th highest bracket it with probability 1 − 2·P(Binomial(n, ½) < k), whatever the
/// distribution. Returns the largest `k` whose probability is at least `level`, with that
/// probability; when no `k` reaches it (fewer than 6 samples at 95%), 1: the lowest and highest.
pub fn sign_test_k(n: u32, level: f64) -> (usize, f64) {
    let n = n.min(1000);
    // P(Binomial(n, ½) = i), term by term from (½)^n.
    let mut p = 0.5f64.powi(n as i32);
    let mut below = 0.0; // P(Binomial < k)
    let mut best = (1, sign_test_confidence(n));
    for k in 1..=(n as usize).div_ceil(2) {
        below += p;
        p *= f64::from(n - (k as u32 - 1)) / k as f64;
        let confidence = 1.0 - 2.0 * below;
        if confidence < level {
            break;
        }
        best = (k, confidence);
    }
    best
}

/// 2nd, 3rd, 4th, ...
fn ordinal(k: usize) -> String {
    let suffix = match (k % 10, k % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{k}{suffix}")
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn spread(s: &Stat) -> String {
    format!("{}–{}", fmt(s.min), fmt(s.max))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results(samples: &[(&str, &str, f64, Option<f64>)]) -> Results {
        let paths = ["stromd", "testpmd"]
            .iter()
            .map(|n| PathInfo {
                name: n.to_string(),
                scenario: "pod → pod".into(),
                description: n.to_string(),
            })
            .collect();
        Results {
            meta: Meta {
                started: "2026-11-27 08:00 UTC".into(),
                command: "strom-bench run".into(),
                secs: 5,
                rounds: 3,
                paths,
                traffic: vec!["udp256".into(), "latency".into()],
                sender_core: 0,
                dut_core: 1,
                napi_core: None,
                machine: Machine {
                    cpu: "cpu".into(),
                    cores: 2,
                    memory_gib: 24.0,
                    kernel: "6.18".into(),
                    os: "Debian 12".into(),
                },
                commit: None,
                tools: BTreeMap::new(),
                rotated: true,
                pod_mtu: None,
            },
            samples: samples
                .iter()
                .enumerate()
                .map(|(i, (p, m, v, o))| Sample {
                    round: i as u32,
                    path: p.to_string(),
                    metric: m.to_string(),
                    value: *v,
                    offered_mpps: *o,
                    retransmits: None,
                    failed_conns: None,
                })
                .collect(),
            failures: Vec::new(),
        }
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
    }

    #[test]
    fn medians_ratios_and_offered_share() {
        let r = results(&[
            ("stromd", "udp_mpps_256_flows", 0.40, Some(0.60)),
            ("stromd", "udp_mpps_256_flows", 0.30, Some(0.60)),
            ("stromd", "udp_mpps_256_flows", 0.35, Some(0.50)),
            ("testpmd", "udp_mpps_256_flows", 0.20, Some(0.60)),
            ("testpmd", "udp_mpps_256_flows", 0.25, Some(0.60)),
            ("testpmd", "udp_mpps_256_flows", 0.30, Some(0.60)),
            ("stromd", "rtt_p50_us", 20.0, None),
            ("testpmd", "rtt_p50_us", 25.0, None),
        ]);
        let s = r.stat("stromd", Metric::UdpMpps(256)).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (0.35, 0.30, 0.40, 3));
        assert_eq!(r.offered("stromd", Metric::UdpMpps(256)), Some(0.60));
        let ratios = r.ratios("stromd");
        assert_eq!(ratios.len(), 1);
        assert_eq!(ratios[0].0, "testpmd");
        assert!((ratios[0].1[&Metric::UdpMpps(256)] - 1.4).abs() < 1e-9);
        assert!((ratios[0].1[&Metric::RttP50] - 0.8).abs() < 1e-9);
        let table = r.table();
        assert!(
            table.contains(
                "| stromd | pod → pod | **0.350** (0.300–0.400) | **20.0** (20.0–20.0) |"
            ),
            "{table}"
        );
        assert!(
            table.contains("| stromd / testpmd | | 1.40× | 0.80× |"),
            "{table}"
        );
        assert!(
            r.limits().contains("stromd: 256 flows 58% of 0.600"),
            "{}",
            r.limits()
        );
    }

    #[test]
    fn the_report_says_on_which_core_the_veths_receive_work_ran() {
        let mut r = results(&[
            ("stromd", "udp_mpps_1_flows", 0.50, Some(0.5)),
            ("stromd", "rtt_p50_us", 20.0, None),
        ]);
        assert!(r.limits().contains("NAPI poll on the sending pod's core"));
        assert!(r.limits().contains("picked up at once; the kernel paths"));
        assert!(!r.markdown("x.json", None).contains("threaded NAPI"));
        r.meta.napi_core = Some(2);
        assert!(r.limits().contains("NAPI threads, pinned to core 2"));
        assert!(r.limits().contains(
            "picked up at once (here, once the node veth's NAPI thread on core 2 has been woken"
        ));
        assert!(r.markdown("x.json", None).contains(
            "the path under test to core 1, the node veths' receive work for the \
                       AF_XDP paths (threaded NAPI) to core 2."
        ));
        // Runs written before the option existed read as without it.
        let mut v = serde_json::to_value(&r).unwrap();
        v["meta"].as_object_mut().unwrap().remove("napi_core");
        let old: Results = serde_json::from_value(v).unwrap();
        assert_eq!(old.meta.napi_core, None);
    }

    #[test]
    fn rounds_are_paired_for_the_ratio_range() {
        let mut r = results(&[
            ("stromd", "udp_mpps_1_flows", 0.50, None),
            ("testpmd", "udp_mpps_1_flows", 0.40, None),
            ("stromd", "udp_mpps_1_flows", 0.60, None),
            ("testpmd", "udp_mpps_1_flows", 0.80, None),
            ("stromd", "udp_mpps_1_flows", 0.70, None),
            ("stromd", "udp_mpps_1_flows", 0.90, None),
            ("testpmd", "udp_mpps_1_flows", 0.60, None),
        ]);
        // Rounds 0, 1, 2 have both paths; round 3 has stromd only (its peer failed).
        for (s, round) in r.samples.iter_mut().zip([0, 0, 1, 1, 2, 3, 2]) {
            s.round = round;
        }
        let v = r.round_ratios("stromd", "testpmd", Metric::UdpMpps(1));
        assert_eq!(v.len(), 3);
        for (got, want) in v.iter().zip([1.25, 0.75, 0.70 / 0.60]) {
            assert!((got - want).abs() < 1e-9, "{v:?}");
        }
        // Medians 0.65 and 0.60; the rounds' own ratios run from 0.75 to 1.25.
        assert!(
            r.table()
                .contains("| stromd / testpmd | | 1.08× (0.75–1.25) |"),
            "{}",
            r.table()
        );
        assert!(r
            .round_ratios("stromd", "testpmd", Metric::RttP50)
            .is_empty());
    }

    #[test]
    fn the_sign_test_interval_confidence() {
        assert_eq!(sign_test_confidence(1), 0.0);
        assert_eq!(sign_test_confidence(2), 0.5);
        assert_eq!(sign_test_confidence(5), 0.9375);
        assert!((sign_test_confidence(7) - 0.984375).abs() < 1e-12);
    }

    #[test]
    fn the_sign_test_interval_narrows_with_more_rounds_and_keeps_95_percent() {
        // Too few rounds for 95%: the lowest and highest, at what they give.
        assert_eq!(sign_test_k(5, 0.95), (1, 0.9375));
        // 7 rounds: only the lowest and highest reach 95% (98.4%; the 2nd give 87.5%).
        let (k, c) = sign_test_k(7, 0.95);
        assert_eq!(k, 1);
        assert!((c - 0.984375).abs() < 1e-12);
        // 9 rounds: the 2nd lowest and highest, 1 − 2·10/512.
        let (k, c) = sign_test_k(9, 0.95);
        assert_eq!(k, 2);
        assert!((c - (1.0 - 20.0 / 512.0)).abs() < 1e-12);
        // 15 rounds: the 4th, 1 − 2·576/32768 = 96.5% (the 5th would give 88.2%).
        let (k, c) = sign_test_k(15, 0.95);
        assert_eq!(k, 4);
        assert!((c - (1.0 - 1152.0 / 32768.0)).abs() < 1e-12);
        // 20 rounds: the 6th, 1 − 2·21700/2^20.
        let (k, c) = sign_test_k(20, 0.95);
        assert_eq!(k, 6);
        assert!((c - (1.0 - 43400.0 / 1048576.0)).abs() < 1e-12);
        assert_eq!(sign_test_k(0, 0.95).0, 1);
        assert!(sign_test_k(1000, 0.95).0 > 400);
    }

    #[test]
    fn a_ratio_range_over_many_rounds_is_the_sign_test_interval() {
        // 9 rounds of stromd at 1.0 against testpmd at 1.0, except one round each way far off:
        // the lowest and highest round ratios are left out, the 2nd are shown.
        let mut samples = Vec::new();
        let ratios = [0.5, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.1, 2.0];
        for r in ratios {
            samples.push(("stromd", "udp_mpps_1_flows", r, None));
            samples.push(("testpmd", "udp_mpps_1_flows", 1.0, None));
        }
        let mut r = results(&samples);
        for (i, s) in r.samples.iter_mut().enumerate() {
            s.round = (i / 2) as u32;
        }
        r.meta.rounds = 9;
        assert!(
            r.table()
                .contains("| stromd / testpmd | | 1.00× (0.90–1.10) |"),
            "{}",
            r.table()
        );
        assert!(r
            .markdown("x.json", None)
            .contains("the 2nd lowest to the 2nd highest of the rounds' own ratios"));
        assert!(r
            .markdown("x.json", None)
            .contains("96.1% confidence for 9 rounds"));
    }

    #[test]
    fn ordinals() {
        let got: Vec<String> = [1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 101, 111]
            .into_iter()
            .map(ordinal)
            .collect();
        assert_eq!(
            got,
            [
                "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd",
                "101st", "111th"
            ]
        );
    }

    #[test]
    fn connections_per_second_have_a_column_a_ratio_and_their_failures() {
        let mut r = results(&[
            ("stromd", "tcp_conns_per_s", 5000.0, None),
            ("stromd-svc", "tcp_conns_per_s", 4000.0, None),
            ("stromd-svc", "tcp_conns_per_s", 4400.0, None),
            ("kernel-nat", "tcp_conns_per_s", 2000.0, None),
            ("kernel-nat", "tcp_conns_per_s", 2200.0, None),
        ]);
        r.meta.paths = ["stromd", "stromd-svc", "kernel-nat"]
            .iter()
            .map(|n| PathInfo {
                name: n.to_string(),
                scenario: "s".into(),
                description: n.to_string(),
            })
            .collect();
        for (s, (round, failed)) in
            r.samples
                .iter_mut()
                .zip([(1, 0), (1, 3), (2, 1), (1, 0), (2, 0)])
        {
            s.round = round;
            s.failed_conns = Some(failed);
        }
        let table = r.table();
        assert!(table.contains("| TCP conn/s |"), "{table}");
        assert!(
            table.contains("| stromd-svc | s | **4200** (4000–4400) |"),
            "{table}"
        );
        // Higher is better, as packets per second: stromd-svc over kernel-nat, both rounds.
        assert!(
            table.contains("| stromd-svc / kernel-nat | | 2.00× (2.00–2.00) |"),
            "{table}"
        );
        assert!(
            table.contains("| stromd / kernel-nat | | 2.38× |"),
            "{table}"
        );
        let limits = r.limits();
        assert!(limits.contains("**TCP conn/s**"), "{limits}");
        assert!(
            limits.contains("stromd: 0; stromd-svc: 2; kernel-nat: 0."),
            "{limits}"
        );
        assert!(limits.contains("more than 1 in 1000 fail"), "{limits}");
        // The count is kept in the JSON, and runs written before it read as without it.
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["samples"][1]["failed_conns"], 3);
        assert!(v["samples"][0].get("retransmits").is_none());
        let mut old =
            serde_json::to_value(results(&[("stromd", "rtt_p50_us", 20.0, None)])).unwrap();
        old["samples"][0]
            .as_object_mut()
            .unwrap()
            .remove("failed_conns");
        let old: Results = serde_json::from_value(old).unwrap();
        assert_eq!(old.samples[0].failed_conns, None);
        assert!(!old.limits().contains("conn/s"));
    }

    #[test]
    fn stromd_with_policies_is_reported_against_stromd_alone() {
        let mut r = results(&[
            ("stromd", "udp_mpps_1_flows", 1.60, None),
            ("stromd-pol", "udp_mpps_1_flows", 1.52, None),
            ("kernel", "udp_mpps_1_flows", 1.40, None),
            ("stromd", "udp_mpps_1_flows", 1.50, None),
            ("stromd-pol", "udp_mpps_1_flows", 1.50, None),
            ("kernel", "udp_mpps_1_flows", 1.50, None),
        ]);
        r.meta.paths = ["stromd", "stromd-pol", "kernel"]
            .iter()
            .map(|n| PathInfo {
                name: n.to_string(),
                scenario: "s".into(),
                description: n.to_string(),
            })
            .collect();
        for (s, round) in r.samples.iter_mut().zip([1, 1, 1, 2, 2, 2]) {
            s.round = round;
        }
        let table = r.table();
        assert!(
            table.contains("| stromd-pol | s | **1.51** (1.50–1.52) |"),
            "{table}"
        );
        // Medians 1.51 over 1.55; the rounds' own ratios 0.95 and 1.00.
        assert!(
            table.contains("| stromd-pol / stromd | | 0.97× (0.95–1.00) |"),
            "{table}"
        );
        assert!(table.contains("| stromd / kernel | |"), "{table}");
        // Neither the inverse nor stromd-pol against the other peers.
        assert!(!table.contains("| stromd / stromd-pol |"), "{table}");
        assert!(!table.contains("| stromd-pol / kernel |"), "{table}");
        assert_eq!(table.matches(" / ").count(), 2, "{table}");
    }

    #[test]
    fn a_path_without_samples_shows_a_dash() {
        let r = results(&[("stromd", "tcp_gbps_1_streams", 1.9, None)]);
        assert!(
            r.table().contains("| testpmd | pod → pod | – |"),
            "{}",
            r.table()
        );
        assert!(r.ratios("stromd")[0].1.is_empty());
    }

    #[test]
    fn the_run_says_whether_its_rounds_rotated_the_paths() {
        let mut r = results(&[("stromd", "rtt_p50_us", 20.0, None)]);
        let rotated = "3 interleaved rounds (every path once per round, each round starting \
                       one path further on)";
        assert!(r.markdown("r.json", None).contains(rotated));
        // A run recorded before the field existed kept one order.
        let mut json = serde_json::to_value(&r).unwrap();
        json["meta"].as_object_mut().unwrap().remove("rotated");
        r = serde_json::from_value(json).unwrap();
        let md = r.markdown("r.json", None);
        assert!(!r.meta.rotated);
        assert!(
            md.contains("3 interleaved rounds (every path once per round),"),
            "{md}"
        );
    }

    #[test]
    fn the_block_is_replaced_in_place_or_appended() {
        let r = results(&[("stromd", "rtt_p50_us", 20.0, None)]);
        let block = r.markdown("perf/x.json", Some("perf/bench.svg"));
        assert!(block.starts_with(BEGIN) && block.trim_end().ends_with(END));
        let doc = format!("# title\n\nbefore\n\n{BEGIN} old -->\nold table\n{END}\n\nafter\n");
        let new = regenerate(&doc, &block);
        assert!(new.starts_with("# title\n\nbefore\n\n"));
        assert!(new.ends_with(&format!("{END}\n\nafter\n")));
        assert!(!new.contains("old table"));
        assert!(new.contains("![medians per path"));
        // Regenerating again changes nothing.
        assert_eq!(regenerate(&new, &block), new);
        let appended = regenerate("# title\n", &block);
        assert_eq!(appended, format!("# title\n\n{block}"));
    }
}
