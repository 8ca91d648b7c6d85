//! NetworkPolicy through strom-lab, as truth tables in the style of the upstream Kubernetes
//! netpol e2e tests (test/e2e/network/netpol/network_policy.go): namespaces x, y and z, each
//! with pods a, b and c serving 80 and 81 on TCP and UDP. Each case applies a set of policies
//! to the live lab (`strom-lab apply`, strom-control's compiler, stromd's tables), probes every
//! pod from every pod on every port and protocol (`strom-lab matrix`), and compares with the
//! reachability written in the case from the semantics of the API (networking.k8s.io/v1),
//! never from what stromd does. A case names the upstream test it mirrors where one exists.
//!
//! Differences from upstream, by design of the lab: a pod's connection to itself never leaves
//! its network namespace (the kernel loops it back), so no dataplane sees it and it is
//! expected allowed (upstream later stopped checking it too, `AllowLoopback`); every case is
//! checked on both ports and both protocols, where upstream mostly probes TCP 80.
//!
//! ```text
//!          x/a x/b x/c y/a y/b y/c z/a z/b z/c      each cell: 80/tcp 81/tcp 80/udp 81/udp
//!   x/a     .   ?   ?   ?   ?   ?   ?   ?   ?
//!   ...
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde_json::Value;
use strom_tests::{connect_lines, hold_responder, net_lock, sh, Held, Lab, Proc};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
/// The (port, protocol) pairs every pod serves.
const SERVED: [(u16, &str); 4] = [(80, "tcp"), (81, "tcp"), (80, "udp"), (81, "udp")];

/// Every pod's key, `ns/name`.
fn all_pods() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|n| PODS.iter().map(move |p| format!("{n}/{p}")))
        .collect()
}

/// A cell of the truth table: (from, to, port, protocol).
type Cell = (String, String, u16, &'static str);

/// Expected reachability, built from a default by the case's statements.
#[derive(Clone, Debug)]
struct Reach(BTreeMap<Cell, bool>);

/// Whether pod `key` is in `sel`: `*` (every pod), `x` (a namespace) or `x/a` (one pod).
fn selects(sel: &str, key: &str) -> bool {
    sel == "*" || sel == key || key.split('/').next() == Some(sel)
}

/// Whether (`port`, `proto`) is in `sel`: `*`, `80` (both protocols), `tcp` (both ports) or
/// `80/tcp`.
fn selects_port(sel: &str, port: u16, proto: &str) -> bool {
    let p = port.to_string();
    sel == "*" || sel == p || sel == proto || sel == format!("{p}/{proto}")
}

impl Reach {
    /// Every cell `v`.
    fn all(v: bool) -> Reach {
        let mut m = BTreeMap::new();
        for from in all_pods() {
            for to in all_pods() {
                for (port, proto) in SERVED {
                    m.insert((from.clone(), to.clone(), port, proto), v);
                }
            }
        }
        Reach(m)
    }

    /// Cells from `from` to `to` on `ports` (see [`selects`], [`selects_port`]) are `v`.
    fn set(mut self, from: &str, to: &str, ports: &str, v: bool) -> Reach {
        for ((f, t, port, proto), x) in self.0.iter_mut() {
            if selects(from, f) && selects(to, t) && selects_port(ports, *port, proto) {
                *x = v;
            }
        }
        self
    }

    /// Nothing reaches `to` (from any pod, on any port).
    fn deny_into(self, to: &str) -> Reach {
        self.set("*", to, "*", false)
    }

    /// `from` reaches nothing.
    fn deny_from(self, from: &str) -> Reach {
        self.set(from, "*", "*", false)
    }

    /// What is expected of a cell: a pod reaches itself always (loopback in its namespace).
    fn expected(&self, c: &Cell) -> bool {
        c.0 == c.1 || self.0[c]
    }
}

/// The lab's pods: label `pod: <name>` and `ns` on its namespace, as upstream; `extra` adds
/// labels to some pods (`(key, "k: v, k2: v2")`). Ports named as upstream's (serve-80-tcp).
fn pods(extra: &[(&str, &str)]) -> String {
    let mut m = String::new();
    for key in all_pods() {
        let (ns, name) = key.split_once('/').unwrap();
        let more = extra
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, l)| format!(", {l}"))
            .collect::<String>();
        let ports: Vec<String> = SERVED
            .iter()
            .map(|(p, proto)| {
                format!(
                    "{{name: serve-{p}-{proto}, containerPort: {p}, protocol: {}}}",
                    proto.to_uppercase()
                )
            })
            .collect();
        m += &format!(
            "---\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{pod: {name}{more}}}}}\nspec: {{containers: [{{name: c, ports: [{}]}}]}}\n",
            ports.join(", ")
        );
    }
    m
}

/// The namespaces, labelled `ns: <name>` (plus `extra` per namespace, `(ns, "k: v")`).
fn namespaces(extra: &[(&str, &str)]) -> String {
    NAMESPACES
        .iter()
        .map(|n| {
            let more = extra
                .iter()
                .filter(|(k, _)| k == n)
                .map(|(_, l)| format!(", {l}"))
                .collect::<String>();
            format!("---\nkind: Namespace\nmetadata: {{name: {n}, labels: {{ns: {n}{more}}}}}\n")
        })
        .collect()
}

/// A NetworkPolicy in namespace `ns`; `spec` is its spec's YAML, indented by two.
fn np(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    )
}

/// `strom-lab matrix --json`: every cell's observed reachability.
fn observe(lab: &Lab) -> BTreeMap<Cell, bool> {
    let o = sh(lab.cmd().args(["matrix", "--json"]));
    assert!(
        o.status.success(),
        "strom-lab matrix: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).expect("matrix json");
    v.as_array()
        .expect("matrix cells")
        .iter()
        .map(|c| {
            let proto = SERVED
                .iter()
                .map(|(_, p)| *p)
                .find(|p| c["protocol"] == *p)
                .expect("a served protocol");
            (
                (
                    c["from"].as_str().unwrap().to_string(),
                    c["to"].as_str().unwrap().to_string(),
                    c["port"].as_u64().unwrap() as u16,
                    proto,
                ),
                c["allow"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// The table of one (port, protocol): `X` where `f` says a cell passes, `.` where not.
fn table(port: u16, proto: &str, f: impl Fn(&Cell) -> bool) -> String {
    let pods = all_pods();
    let mut s = format!("{port}/{proto}\tto: {}\n", pods.join("\t"));
    for from in &pods {
        s += from;
        for to in &pods {
            let c = (from.clone(), to.clone(), port, static_proto(proto));
            s += if f(&c) { "\tX" } else { "\t." };
        }
        s += "\n";
    }
    s
}

fn static_proto(p: &str) -> &'static str {
    SERVED.iter().map(|(_, q)| *q).find(|q| *q == p).unwrap()
}

/// Checks the lab against `want`: the whole matrix, then each cell seen denied where allowed
/// is expected probed once more on its own (a lost UDP datagram or SYN is not a verdict). The
/// differences left, with the expected and observed tables, or None.
fn check(lab: &Lab, case: &str, want: &Reach) -> Option<String> {
    let seen = observe(lab);
    assert_eq!(
        seen.len(),
        want.0.len(),
        "{case}: the matrix has every cell"
    );
    let mut wrong = Vec::new();
    for (c, &ok) in &seen {
        // Seen denied where allowed is expected: probed once more (a lost datagram or SYN is
        // not a verdict). Seen allowed where denied is expected is wrong at once.
        if ok != want.expected(c) && (ok || !lab.probe(&c.0, &c.1, c.2, c.3)) {
            wrong.push(c.clone());
        }
    }
    if wrong.is_empty() {
        return None;
    }
    let mut s = format!("{case}: {} cell(s) wrong\n", wrong.len());
    for (port, proto) in SERVED {
        if wrong.iter().any(|c| c.2 == port && c.3 == proto) {
            s += &format!(
                "expected\n{}observed\n{}",
                table(port, proto, |c| want.expected(c)),
                table(port, proto, |c| seen[c])
            );
        }
    }
    Some(s)
}

/// A lab with the nine pods and the three namespaces (`manifest`), serving; `flags` for
/// `strom-lab up` (`--workers 2`: flows whose two pods are on different workers, their
/// answers handed over, denied ones with CONFIRM).
fn lab(manifest: &str, flags: &[&str]) -> Lab {
    let lab = Lab::up(manifest, flags);
    lab.wait_until_serving();
    lab
}

/// One case: its name (the upstream test it mirrors, or what it checks), its policies and
/// the reachability they mean.
struct Case {
    name: &'static str,
    policies: String,
    want: Reach,
}

fn case(name: &'static str, policies: String, want: Reach) -> Case {
    Case {
        name,
        policies,
        want,
    }
}

/// The single-step cases: each a set of policies over the unchanged pods and namespaces.
/// `ip(key)` is a pod's address (for ipBlock cases).
fn cases(ip: impl Fn(&str) -> String) -> Vec<Case> {
    let open = || Reach::all(true);
    vec![
        case(
            "should support a 'default-deny-ingress' policy",
            np("x", "deny-ingress", "  podSelector: {}\n  policyTypes: [Ingress]\n"),
            open().deny_into("x"),
        ),
        case(
            "should support a 'default-deny-all' policy (egress allows only UDP 53, which nothing serves)",
            np(
                "x",
                "deny-all-tcp-allow-dns",
                "  podSelector: {}\n  ingress: []\n  egress: [{ports: [{protocol: UDP, port: 53}]}]\n  policyTypes: [Ingress, Egress]\n",
            ),
            open().deny_into("x").deny_from("x"),
        ),
        case(
            "should enforce policy to allow traffic from pods within server namespace based on PodSelector",
            np(
                "x",
                "x-a-allows-x-b",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n",
            ),
            open().deny_into("x/a").set("x/b", "x/a", "*", true),
        ),
        case(
            "should enforce policy to allow ingress traffic from pods in all namespaces",
            np(
                "x",
                "allow-from-all-namespaces",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {}}]}]\n",
            ),
            open(),
        ),
        case(
            "should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
            np(
                "x",
                "allow-client-a-via-ns-selector",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]\n",
            ),
            open().set("x", "x/a", "*", false).set("z", "x/a", "*", false),
        ),
        case(
            "should enforce policy based on PodSelector with MatchExpressions",
            np(
                "x",
                "x-a-allows-x-b",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchExpressions: [{key: pod, operator: In, values: [b]}]}}]}]\n",
            ),
            open().deny_into("x/a").set("x/b", "x/a", "*", true),
        ),
        case(
            "should enforce policy based on NamespaceSelector with MatchExpressions",
            np(
                "x",
                "allow-ns-y-match-selector",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: In, values: [y]}]}}]}]\n",
            ),
            open().set("x", "x/a", "*", false).set("z", "x/a", "*", false),
        ),
        case(
            "should enforce policy based on PodSelector or NamespaceSelector",
            np(
                "x",
                "allow-ns-y-match-selector",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}}, {podSelector: {matchLabels: {pod: b}}}]}]\n",
            ),
            open().set("x/c", "x/a", "*", false),
        ),
        case(
            "should enforce policy based on PodSelector and NamespaceSelector",
            np(
                "x",
                "allow-ns-y-podselector-and-nsselector",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}, podSelector: {matchLabels: {pod: b}}}]}]\n",
            ),
            open()
                .deny_into("x/a")
                .set("y/b", "x/a", "*", true)
                .set("z/b", "x/a", "*", true),
        ),
        case(
            "should enforce policy based on Multiple PodSelectors and NamespaceSelectors",
            np(
                "x",
                "allow-ns-y-z-pod-b-c",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}, podSelector: {matchExpressions: [{key: pod, operator: In, values: [b, c]}]}}]}]\n",
            ),
            open()
                .set("x", "x/a", "*", false)
                .set("y/a", "x/a", "*", false)
                .set("z/a", "x/a", "*", false),
        ),
        case(
            "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
            np(
                "x",
                "allow-ns-y-pod-a-via-namespace-pod-selector",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: a}}}]}]\n",
            ),
            open().deny_into("x/a").set("y/a", "x/a", "*", true),
        ),
        case(
            "should enforce policy based on Ports (a port without protocol is TCP)",
            np(
                "x",
                "allow-client-a-via-ns-selector",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 81}]}]\n",
            ),
            open().deny_into("x/a").set("y", "x/a", "81/tcp", true),
        ),
        case(
            "should enforce multiple, stacked policies with overlapping podSelectors",
            np(
                "x",
                "allow-client-a-via-ns-selector-81",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 81}]}]\n",
            ) + &np(
                "x",
                "allow-client-a-via-ns-selector-80",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80}]}]\n",
            ),
            open().deny_into("x/a").set("y", "x/a", "tcp", true),
        ),
        case(
            "should support allow-all policy",
            np("x", "allow-all", "  podSelector: {}\n  ingress: [{}]\n"),
            open(),
        ),
        case(
            "should allow ingress access on one named port",
            np(
                "x",
                "allow-all-ingress-81",
                "  podSelector: {}\n  ingress: [{ports: [{port: serve-81-tcp}]}]\n",
            ),
            open().deny_into("x").set("*", "x", "81/tcp", true),
        ),
        case(
            "should allow ingress access from namespace on one named port",
            np(
                "x",
                "allow-client-in-ns-y-80",
                "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: serve-80-tcp}]}]\n",
            ),
            open().deny_into("x").set("y", "x", "80/tcp", true),
        ),
        case(
            "should allow egress access on one named port",
            np(
                "x",
                "allow-egress",
                "  podSelector: {}\n  egress: [{ports: [{port: serve-80-tcp}]}, {ports: [{protocol: UDP, port: 53}]}]\n  policyTypes: [Egress]\n",
            ),
            open().deny_from("x").set("x", "*", "80/tcp", true),
        ),
        case(
            "should deny ingress from pods on other namespaces",
            np(
                "x",
                "deny-ns-x",
                "  podSelector: {}\n  ingress: [{from: [{podSelector: {}}]}]\n",
            ),
            open().set("y", "x", "*", false).set("z", "x", "*", false),
        ),
        case(
            "should deny egress from pods based on PodSelector",
            np(
                "x",
                "deny-egress-pod-a",
                "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n",
            ),
            open().deny_from("x/a"),
        ),
        case(
            "should deny egress from all pods in a namespace",
            np(
                "x",
                "deny-egress-ns-x",
                "  podSelector: {}\n  policyTypes: [Egress]\n",
            ),
            open().deny_from("x"),
        ),
        case(
            "should work with Ingress, Egress specified together",
            np(
                "x",
                "allow-client-a-via-pod-selector",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n  egress: [{to: [{podSelector: {matchLabels: {pod: b}}}]}]\n  policyTypes: [Ingress, Egress]\n",
            ),
            open()
                .deny_into("x/a")
                .deny_from("x/a")
                .set("x/b", "x/a", "*", true)
                .set("x/a", "x/b", "*", true),
        ),
        case(
            "should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)",
            np(
                "x",
                "allow-to-ns-y-pod-b",
                "  podSelector: {matchLabels: {pod: a}}\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]}]\n  policyTypes: [Egress]\n",
            ) + &np("y", "allow-all-ingress", "  podSelector: {}\n  ingress: [{}]\n"),
            open().deny_from("x/a").set("x/a", "y/b", "*", true),
        ),
        case(
            "should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector",
            np(
                "x",
                "allow-to-ns-y-pod-a",
                "  podSelector: {matchLabels: {pod: a}}\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: a}}}]}]\n  policyTypes: [Egress]\n",
            ),
            open().deny_from("x/a").set("x/a", "y/a", "*", true),
        ),
        case(
            "should enforce multiple ingress policies with ingress allow-all policy taking precedence",
            np(
                "x",
                "allow-only-80",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{port: 80}]}]\n",
            ) + &np(
                "x",
                "allow-all",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{}]\n",
            ),
            open(),
        ),
        case(
            "should enforce multiple egress policies with egress allow-all policy taking precedence",
            np(
                "x",
                "allow-egress-80",
                "  podSelector: {matchLabels: {pod: a}}\n  egress: [{ports: [{port: 80}]}]\n  policyTypes: [Egress]\n",
            ) + &np(
                "x",
                "allow-egress-all",
                "  podSelector: {matchLabels: {pod: a}}\n  egress: [{}]\n  policyTypes: [Egress]\n",
            ),
            open(),
        ),
        case(
            "should allow egress access to server in CIDR block",
            np(
                "x",
                "allow-client-a-via-cidr-egress-rule",
                &format!(
                    "  podSelector: {{matchLabels: {{pod: a}}}}\n  egress: [{{to: [{{ipBlock: {{cidr: {}/32}}}}]}}]\n  policyTypes: [Egress]\n",
                    ip("y/b")
                ),
            ),
            open().deny_from("x/a").set("x/a", "y/b", "*", true),
        ),
        case(
            "should enforce except clause while egress access to server in CIDR block",
            np(
                "x",
                "deny-client-a-via-except-cidr-egress-rule",
                &format!(
                    "  podSelector: {{matchLabels: {{pod: a}}}}\n  egress: [{{to: [{{ipBlock: {{cidr: 198.18.0.0/15, except: [{}/32]}}}}]}}]\n  policyTypes: [Egress]\n",
                    ip("y/b")
                ),
            ),
            open().set("x/a", "y/b", "*", false),
        ),
        case(
            "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
            np(
                "x",
                "allow-client-a-via-cidr-egress-rule",
                &format!(
                    "  podSelector: {{matchLabels: {{pod: a}}}}\n  egress: [{{to: [{{ipBlock: {{cidr: 198.18.0.0/15, except: [{b}/32]}}}}]}}, {{to: [{{ipBlock: {{cidr: {b}/32}}}}]}}]\n  policyTypes: [Egress]\n",
                    b = ip("y/b")
                ),
            ),
            open(),
        ),
        case(
            "ipBlock matches pods too (ingress from one pod's address)",
            np(
                "x",
                "allow-from-y-a-by-address",
                &format!(
                    "  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress: [{{from: [{{ipBlock: {{cidr: {}/32}}}}]}}]\n",
                    ip("y/a")
                ),
            ),
            open().deny_into("x/a").set("y/a", "x/a", "*", true),
        ),
        case(
            "should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector",
            np(
                "x",
                "deny-ingress-x-a",
                "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n",
            ) + &np(
                "x",
                "allow-egress-x-a-to-b",
                "  podSelector: {matchLabels: {pod: a}}\n  egress: [{to: [{podSelector: {matchLabels: {pod: b}}}]}]\n  policyTypes: [Egress]\n",
            ),
            open()
                .deny_into("x/a")
                .deny_from("x/a")
                .set("x/a", "x/b", "*", true),
        ),
        case(
            "should enforce ingress policy allowing any port traffic to a server on a specific protocol",
            np(
                "x",
                "allow-ingress-by-proto",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{protocol: TCP}]}]\n",
            ),
            open().set("*", "x/a", "udp", false),
        ),
        case(
            "should not allow access by TCP when a policy specifies only UDP",
            np(
                "x",
                "allow-only-udp-ingress-on-port-81",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{protocol: UDP, port: 81}]}]\n",
            ),
            open().deny_into("x/a").set("*", "x/a", "81/udp", true),
        ),
        case(
            "should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP",
            np(
                "x",
                "allow-only-sctp-ingress-on-port-80",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{protocol: SCTP, port: 80}]}]\n",
            ),
            open().deny_into("x/a"),
        ),
        case(
            "should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label",
            np(
                "x",
                "allow-client-a-via-ns-selector-for-immutable-ns-label",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]}]\n",
            ),
            open().set("x", "x/a", "*", false).set("z", "x/a", "*", false),
        ),
        case(
            "should enforce policy based on NamespaceSelector with MatchExpressions using default ns label",
            np(
                "x",
                "allow-client-a-via-ns-selector-for-immutable-ns-label",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [y]}]}}]}]\n",
            ),
            open().set("y", "x/a", "*", false),
        ),
        case(
            "endPort: a port range (79-80 takes 80, not 81)",
            np(
                "x",
                "allow-range",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{protocol: TCP, port: 79, endPort: 80}, {protocol: UDP, port: 81, endPort: 90}]}]\n",
            ),
            open()
                .deny_into("x/a")
                .set("*", "x/a", "80/tcp", true)
                .set("*", "x/a", "81/udp", true),
        ),
        case(
            "matchExpressions Exists and DoesNotExist (pods labelled team: x/b, y/b)",
            np(
                "x",
                "allow-team",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchExpressions: [{key: team, operator: Exists}]}}]}]\n",
            ) + &np(
                "x",
                "allow-no-team-anywhere",
                "  podSelector: {matchLabels: {pod: c}}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchExpressions: [{key: team, operator: DoesNotExist}]}}]}]\n",
            ),
            open()
                .deny_into("x/a")
                .set("x/b", "x/a", "*", true)
                .set("x/b", "x/c", "*", false)
                .set("y/b", "x/c", "*", false),
        ),
        case(
            "policyTypes omitted, empty ingress and egress lists: only ingress is isolated",
            np(
                "x",
                "no-types",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: []\n  egress: []\n",
            ),
            open().deny_into("x/a"),
        ),
        case(
            "policyTypes omitted with egress rules: both directions isolated",
            np(
                "x",
                "no-types-egress",
                "  podSelector: {matchLabels: {pod: a}}\n  egress: [{to: [{podSelector: {matchLabels: {pod: b}}}]}]\n",
            ),
            open()
                .deny_into("x/a")
                .deny_from("x/a")
                .set("x/a", "x/b", "*", true),
        ),
        case(
            "answers of an allowed connection pass: x/a's egress allows nothing, its ingress all",
            np(
                "x",
                "ingress-all-egress-none",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{}]\n  policyTypes: [Ingress, Egress]\n",
            ),
            open().deny_from("x/a"),
        ),
    ]
}

/// Every single-step case on one live lab, each applied over the last (so each is also a
/// policy change on a running node): all mismatches reported at the end, with their tables.
#[test]
fn truth_table() {
    let _g = net_lock();
    let base = namespaces(&[]) + &pods(&[("x/b", "team: blue"), ("y/b", "team: blue")]);
    let lab = lab(&base, &[]);
    let mut failures = Vec::new();
    let all = cases(|k| lab.pod_ip(k));
    for c in &all {
        let t = Instant::now();
        lab.apply(&(base.clone() + &c.policies));
        if let Some(f) = check(&lab, c.name, &c.want) {
            failures.push(f);
        }
        eprintln!("{} ({:.1?})", c.name, t.elapsed());
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
}

/// Two-step cases: a label of a pod or a namespace, or a policy, changes on the live lab and
/// the verdicts follow at once.
#[test]
fn changes_on_a_live_lab() {
    let _g = net_lock();
    let base = namespaces(&[]) + &pods(&[]);
    let lab = lab(&base, &[]);
    let mut failures = Vec::new();
    let mut step = |name: &str, manifest: String, want: Reach| {
        lab.apply(&manifest);
        if let Some(f) = check(&lab, name, &want) {
            failures.push(f);
        }
    };
    let open = || Reach::all(true);

    // should allow ingress access from updated namespace
    let p = np(
        "x",
        "allow-client-a-via-ns-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns2: updated}}}]}]\n",
    );
    step(
        "updated namespace (before: no namespace is ns2=updated)",
        base.clone() + &p,
        open().deny_into("x/a"),
    );
    step(
        "should allow ingress access from updated namespace (y labelled ns2=updated)",
        namespaces(&[("y", "ns2: updated")]) + &pods(&[]) + &p,
        open().deny_into("x/a").set("y", "x/a", "*", true),
    );

    // should allow ingress access from updated pod
    let p = np(
        "x",
        "allow-client-a-via-pod-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod2: updated}}}]}]\n",
    );
    step(
        "updated pod (before: no pod is pod2=updated)",
        base.clone() + &p,
        open().deny_into("x/a"),
    );
    step(
        "should allow ingress access from updated pod (x/b labelled pod2=updated)",
        namespaces(&[]) + &pods(&[("x/b", "pod2: updated")]) + &p,
        open().deny_into("x/a").set("x/b", "x/a", "*", true),
    );

    // should deny ingress access to updated pod
    let p = np(
        "x",
        "deny-ingress-via-label-selector",
        "  podSelector: {matchLabels: {target: isolated}}\n  policyTypes: [Ingress]\n",
    );
    step(
        "updated target (before: no pod is target=isolated)",
        base.clone() + &p,
        open(),
    );
    step(
        "should deny ingress access to updated pod (x/a labelled target=isolated)",
        namespaces(&[]) + &pods(&[("x/a", "target: isolated")]) + &p,
        open().deny_into("x/a"),
    );

    // egress re-selected by a namespace's new label
    let p = np(
        "x",
        "allow-egress-to-updated-ns",
        "  podSelector: {matchLabels: {pod: a}}\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns2: updated}}}]}]\n  policyTypes: [Egress]\n",
    );
    step(
        "egress to updated namespace (before)",
        base.clone() + &p,
        open().deny_from("x/a"),
    );
    step(
        "egress to updated namespace (z labelled ns2=updated)",
        namespaces(&[("z", "ns2: updated")]) + &pods(&[]) + &p,
        open().deny_from("x/a").set("x/a", "z", "*", true),
    );

    // should enforce updated policy
    let on = |port: &str| {
        np(
            "x",
            "allow-all-mutate-to-deny-all",
            &format!("  podSelector: {{}}\n  ingress: [{{ports: [{{port: {port}}}]}}]\n"),
        )
    };
    step(
        "updated policy (before: x open on 81/tcp)",
        base.clone() + &on("81"),
        open().deny_into("x").set("*", "x", "81/tcp", true),
    );
    step(
        "should enforce updated policy (the same policy now on 80/tcp)",
        base.clone() + &on("80"),
        open().deny_into("x").set("*", "x", "80/tcp", true),
    );

    // should stop enforcing policies after they are deleted
    step(
        "deleted policy (before: x denies all)",
        base.clone()
            + &np(
                "x",
                "deny-all",
                "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
            ),
        open().deny_into("x").deny_from("x"),
    );
    step(
        "should stop enforcing policies after they are deleted",
        base.clone(),
        open(),
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        lab.stromctl(&["policy"])["policies"]
            .as_array()
            .is_some_and(|a| a.is_empty()),
        "no policy left in stromd"
    );
}

/// Established connections that a new policy denies are cut (stromd's choice, the secure
/// one): the next packet of the connection is dropped, whether its answers would be denied
/// on their own or not. A connection the change leaves allowed keeps going, also when the
/// change isolates its own pod against its answers (they are answers, not new flows).
#[test]
fn established_connections_a_new_policy_denies_are_cut() {
    let _g = net_lock();
    let base = namespaces(&[]) + &pods(&[]);
    let lab = lab(&base, &["--workers", "2"]);
    // y/a accepts nothing (its connection's answers are denied on their own); x/a accepts y,
    // then only z.
    let y_closed = np(
        "y",
        "y-a-closed",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n",
    );
    let x_a_from = |ns: &str| {
        np(
            "x",
            "x-a-from",
            &format!(
                "  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{ns: {ns}}}}}}}]}}]\n"
            ),
        )
    };
    lab.apply(&(base.clone() + &y_closed + &x_a_from("y")));
    let _held: Vec<Proc> = ["x/a", "x/c"]
        .iter()
        .map(|p| hold_responder(&lab, p, 9000))
        .collect();
    lab.wait_listening("x/a", 9000);
    lab.wait_listening("x/c", 9000);
    let (xa, xc) = (lab.pod_ip("x/a"), lab.pod_ip("x/c"));
    let answers_denied = Held::open(&lab, "y/a", &xa, 9000, 1);
    let answers_allowed = Held::open(&lab, "y/b", &xa, 9000, 1);
    let kept = Held::open(&lab, "y/c", &xc, 9000, 1);
    let other = Held::open(&lab, "y/a", &xc, 9000, 1);
    for h in [&answers_denied, &answers_allowed, &other, &kept] {
        assert!(h.first[0].is_some(), "allowed before the change");
    }
    let before = policy_status(&lab, "x/x-a-from");
    // The change: x/a from z only, and y/c accepts nothing from now on.
    let y_c_closed = np(
        "y",
        "y-c-closed",
        "  podSelector: {matchLabels: {pod: c}}\n  policyTypes: [Ingress]\n",
    );
    lab.apply(&(base.clone() + &y_closed + &x_a_from("z") + &y_c_closed));
    let again = |h: Held| h.again().remove(0).0;
    let r = again(answers_denied);
    assert!(r.is_err(), "y/a's connection to x/a is cut: {r:?}");
    let r = again(answers_allowed);
    assert!(r.is_err(), "y/b's connection to x/a is cut: {r:?}");
    assert_eq!(
        again(kept),
        Ok("x/c".to_string()),
        "y/c's connection to x/c keeps its answers though y/c now accepts nothing"
    );
    assert_eq!(
        again(other),
        Ok("x/c".to_string()),
        "y/a to x/c is not touched"
    );
    // x/a itself still serves what is allowed now.
    let z = Held::open(&lab, "z/a", &xa, 9000, 1);
    assert_eq!(z.first[0].as_deref(), Some("x/a"), "z/a reaches x/a");
    let after = policy_status(&lab, "x/x-a-from");
    assert!(
        after["ingress_drops"].as_u64() > before["ingress_drops"].as_u64(),
        "the cut packets are counted against x/x-a-from: {before} {after}"
    );
}

/// stromd's status of policy `name` (`stromctl policy`): its drops and pods.
fn policy_status(lab: &Lab, name: &str) -> Value {
    let v = lab.stromctl(&["policy"]);
    v["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["policy"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} in stromctl policy: {v}"))
}

/// The lab's compiled policy set (strom-lab keeps what it programmed in its state).
fn programmed(lab: &Lab) -> Value {
    let st: Value =
        serde_json::from_slice(&std::fs::read(lab.dir.join("state.json")).unwrap()).unwrap();
    st["policies"].clone()
}

/// `count` connections (or UDP exchanges) from `from` to `ip:port`: how many were answered.
fn answered(
    lab: &Lab,
    from: &str,
    ip: &str,
    port: u16,
    proto: &str,
    count: usize,
    timeout_ms: u32,
) -> usize {
    let lines = connect_lines(lab, from, ip, port, proto, timeout_ms.into(), count);
    assert_eq!(lines.len(), count, "one line per connection: {lines:?}");
    lines.iter().filter(|l| l.is_ok()).count()
}

/// Policies flipped 1000 times between two sets while y/a connects to x/a (allowed by both,
/// by different rules and policies) and to x/b (denied by both, by x/b's ingress; y/a's
/// egress allows both, and its ingress nothing, so its connections are tracked for their
/// answers): every allowed connection and exchange answered, no packet of them dropped by
/// a policy, no denied one answered.
#[test]
fn policy_flips_under_traffic() {
    let _g = net_lock();
    let base = namespaces(&[]) + &pods(&[]);
    let lab = lab(&base, &["--workers", "2"]);
    let (ya, xa, xb) = (lab.pod_ip("y/a"), lab.pod_ip("x/a"), lab.pod_ip("x/b"));
    let set_a = np(
        "x",
        "a-from-y-a",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: a}}}]}]\n",
    ) + &np("x", "b-closed", "  podSelector: {matchLabels: {pod: b}}\n  policyTypes: [Ingress]\n")
        + &np(
            "y",
            "y-a-to-x",
            "  podSelector: {matchLabels: {pod: a}}\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: x}}}]}]\n  policyTypes: [Ingress, Egress]\n",
        );
    let set_b = np(
        "x",
        "a-from-address",
        &format!("  podSelector: {{matchExpressions: [{{key: pod, operator: In, values: [a]}}]}}\n  ingress: [{{from: [{{ipBlock: {{cidr: {ya}/32}}}}], ports: [{{protocol: TCP, port: 80}}, {{protocol: UDP, port: 80}}]}}]\n"),
    ) + &np(
        "x",
        "b-from-z",
        "  podSelector: {matchLabels: {pod: b}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}]}]\n",
    ) + &np(
        "y",
        "y-a-to-addresses",
        &format!("  podSelector: {{matchLabels: {{pod: a}}}}\n  egress: [{{to: [{{ipBlock: {{cidr: {xa}/32}}}}, {{ipBlock: {{cidr: {xb}/32}}}}]}}]\n  policyTypes: [Ingress, Egress]\n"),
    );
    let file = |name: &str, manifest: String| {
        lab.apply(&(base.clone() + &manifest));
        let p = std::env::temp_dir().join(format!("{}-{name}.json", lab.prefix));
        std::fs::write(&p, programmed(&lab).to_string()).unwrap();
        p
    };
    let (fa, fb) = (file("a", set_a), file("b", set_b));
    // The flips spaced by 5 ms (about 8 s in all), three streams of connections throughout.
    let done = AtomicBool::new(false);
    let stream = |ip: &str, proto: &str, batch: usize, timeout_ms: u32| {
        let (mut sent, mut answers) = (0, 0);
        while !done.load(Ordering::SeqCst) {
            answers += answered(&lab, "y/a", ip, 80, proto, batch, timeout_ms);
            sent += batch;
        }
        (sent, answers)
    };
    let (tcp, udp, denied) = std::thread::scope(|s| {
        let tcp = s.spawn(|| stream(&xa, "tcp", 32, 2000));
        let udp = s.spawn(|| stream(&xa, "udp", 32, 2000));
        let denied_tcp = s.spawn(|| stream(&xb, "tcp", 8, 200));
        let denied_udp = s.spawn(|| stream(&xb, "udp", 8, 200));
        for i in 0..1000 {
            let f = if i % 2 == 0 { &fb } else { &fa };
            let o = sh(lab.ctl().arg("set-policies").arg(f));
            if !o.status.success() {
                done.store(true, Ordering::SeqCst);
                panic!("set-policies: {}", String::from_utf8_lossy(&o.stderr));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        done.store(true, Ordering::SeqCst);
        let j = |h: std::thread::ScopedJoinHandle<'_, (usize, usize)>| h.join().expect("a stream");
        (j(tcp), j(udp), (j(denied_tcp), j(denied_udp)))
    });
    eprintln!("through the flips: TCP {tcp:?}, UDP {udp:?}, denied {denied:?} (sent, answered)");
    assert!(
        tcp.0 >= 256 && udp.0 >= 256,
        "traffic ran through the flips: TCP {tcp:?}, UDP {udp:?}"
    );
    assert_eq!(tcp.1, tcp.0, "every allowed TCP connection answered");
    assert_eq!(udp.1, udp.0, "every allowed UDP exchange answered");
    for (proto, d) in [("TCP", denied.0), ("UDP", denied.1)] {
        assert!(d.0 > 0, "denied {proto} ran");
        assert_eq!(d.1, 0, "no denied {proto} connection answered");
    }
    // A dropped SYN is sent again and may still connect: the counters tell. Each set was in
    // force while traffic ran (its own policies dropped the denied flows); no allowed packet,
    // nor an answer to y/a (whose ingress allows nothing), was dropped. The last flip left set
    // A; B once more to read its policies.
    let sets = [
        ("A", &fa, ["x/b-closed", "x/a-from-y-a", "y/y-a-to-x"]),
        (
            "B",
            &fb,
            ["x/b-from-z", "x/a-from-address", "y/y-a-to-addresses"],
        ),
    ];
    for (set, file, [to_b, to_a, from_y]) in sets {
        let o = sh(lab.ctl().arg("set-policies").arg(file));
        assert!(o.status.success());
        let b = policy_status(&lab, to_b);
        assert!(
            b["ingress_drops"].as_u64().unwrap() > 0,
            "set {set}: the denied flows met {to_b}: {b}"
        );
        let a = policy_status(&lab, to_a);
        assert_eq!(
            a["ingress_drops"], 0,
            "set {set}: no packet to x/a dropped: {a}"
        );
        let y = policy_status(&lab, from_y);
        assert_eq!(
            y["egress_drops"], 0,
            "set {set}: no packet from y/a dropped: {y}"
        );
        assert_eq!(
            y["ingress_drops"], 0,
            "set {set}: no answer to y/a dropped: {y}"
        );
    }
    let _ = std::fs::remove_file(&fa);
    let _ = std::fs::remove_file(&fb);
}

/// A malformed policy is rejected alone (reported by apply), still isolates the pods it
/// selects in the directions it names, and the valid ones stay in force; stromctl names the
/// policies selecting a pod, their drops, and the verdict and rule of a 5-tuple; traffic
/// between a pod and its node passes whatever the policies.
#[test]
fn rejected_policies_and_tools() {
    let _g = net_lock();
    let base = namespaces(&[]) + &pods(&[]);
    let lab = lab(&base, &[]);
    let policies = np(
        "x",
        "bad-cidr",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{ipBlock: {cidr: 198.18.0.0/99}}]}]\n",
    ) + &np(
        "x",
        "bad-operator",
        "  podSelector: {matchLabels: {pod: b}}\n  ingress: [{from: [{podSelector: {matchExpressions: [{key: pod, operator: Sometimes, values: [c]}]}}]}]\n  policyTypes: [Ingress]\n",
    ) + &np(
        "x",
        "bad-port",
        "  podSelector: {matchLabels: {pod: c}}\n  egress: [{ports: [{port: 70000}]}]\n  policyTypes: [Egress]\n",
    ) + &np(
        "y",
        "y-from-x-on-80",
        "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: x}}}], ports: [{port: 80}]}]\n",
    );
    let (out, err) = lab.apply(&(base.clone() + &policies));
    for bad in ["x/bad-cidr", "x/bad-operator", "x/bad-port"] {
        assert!(
            out.contains(bad) || err.contains(bad),
            "apply reports {bad} rejected: {out}{err}"
        );
    }
    let want = Reach::all(true)
        .deny_into("x/a")
        .deny_into("x/b")
        .deny_from("x/c")
        .deny_into("y")
        .set("x", "y", "80/tcp", true)
        .set("x/c", "y", "80/tcp", false);
    if let Some(f) = check(
        &lab,
        "rejected policies isolate, the valid one holds",
        &want,
    ) {
        panic!("{f}");
    }

    // The node reaches isolated pods.
    assert!(lab.probe("node", "x/a", 80, "tcp"), "node to isolated x/a");
    assert!(lab.probe("node", "y/a", 81, "udp"), "node to isolated y/a");

    // stromctl policy: who selects whom, and the drops just counted.
    let v = lab.stromctl(&["policy"]);
    let p = |name: &str| {
        v["policies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["policy"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} in stromctl policy: {v}"))
    };
    let y = p("y/y-from-x-on-80");
    assert_eq!(
        y["ingress_pods"],
        serde_json::json!(["y/a", "y/b", "y/c"]),
        "{y}"
    );
    assert!(y["ingress_drops"].as_u64().unwrap() > 0, "{y}");
    assert_eq!(p("x/bad-cidr")["ingress_pods"], serde_json::json!(["x/a"]));
    assert_eq!(p("x/bad-port")["egress_pods"], serde_json::json!(["x/c"]));

    // The denied packets are logged (at a bounded rate) with their 5-tuple, pod and policies:
    // one more, once the rate has room again.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let seen = std::fs::read_to_string(lab.dir.join("stromd.log"))
        .unwrap()
        .len();
    assert!(!lab.probe("z/a", "y/a", 80, "tcp"));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let log = std::fs::read_to_string(lab.dir.join("stromd.log")).unwrap()[seen..].to_string();
    let (from, to) = (
        format!("denied tcp {}:", lab.pod_ip("z/a")),
        format!(" -> {}:80 (protocol 6): ingress y/a", lab.pod_ip("y/a")),
    );
    assert!(
        log.lines().any(|l| l.contains(&from)
            && l.contains(&to)
            && l.contains("isolated by y/y-from-x-on-80")),
        "stromd logs the denied packet ({from}...{to}):\n{log}"
    );

    // stromctl trace: the verdict and the rule.
    let trace = |from: &str, to: &str, port: u16| {
        let o = sh(lab.ctl().args([
            "trace",
            "--src",
            &format!("{}:40000", lab.pod_ip(from)),
            "--dst",
            &format!("{}:{port}", lab.pod_ip(to)),
        ]));
        assert!(o.status.success());
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let t = trace("x/a", "y/a", 80);
    assert!(
        t.contains("allowed by y/y-from-x-on-80 ingress rule 0"),
        "{t}"
    );
    let t = trace("z/a", "y/a", 80);
    assert!(
        t.contains("isolated for ingress by y/y-from-x-on-80") && t.contains("policy_denied"),
        "{t}"
    );
    let t = trace("z/a", "z/b", 80);
    assert!(!t.contains("policy_denied"), "{t}");
}
