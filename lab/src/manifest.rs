//! Reading Kubernetes manifests (YAML, several documents per file, or a directory of files).
//!
//! The lab needs only a few fields, so it reads them from a generic value instead of linking
//! k8s-openapi (that typed model belongs to strom-control). A malformed object is reported and
//! skipped; the rest is used.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

/// A declared container port.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortDecl {
    pub port: u16,
    pub protocol: String,
}

/// The parts of a Pod the lab uses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodDecl {
    pub namespace: String,
    pub name: String,
    pub ports: Vec<PortDecl>,
    pub ip: Option<String>,
    /// `metadata.labels`: changed live by `apply` (the pod is not rewired for them).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl PodDecl {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The same pod but for its labels: what needs no rewiring to change.
    pub fn same_but_labels(&self, other: &PodDecl) -> bool {
        self.namespace == other.namespace
            && self.name == other.name
            && self.ports == other.ports
            && self.ip == other.ip
    }
}

/// What a set of manifests declares.
#[derive(Debug, Default)]
pub struct Manifests {
    pub namespaces: Vec<String>,
    pub pods: Vec<PodDecl>,
    /// Objects the lab does not act on yet (kind/name), reported to the user.
    pub ignored: Vec<String>,
    /// Objects that could not be read, with the reason.
    pub invalid: Vec<String>,
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn pod(doc: &Value) -> Result<PodDecl, String> {
    let meta = doc.get("metadata").ok_or("no metadata")?;
    let name = meta
        .get("name")
        .and_then(Value::as_str)
        .ok_or("no metadata.name")?;
    let namespace = meta
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or("default");
    if !dns_label(name) || !dns_label(namespace) {
        return Err(format!("{namespace}/{name}: names must be DNS labels"));
    }
    let mut ports = Vec::new();
    for c in doc
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for p in c
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let port = p
                .get("containerPort")
                .and_then(Value::as_u64)
                .ok_or("containerPort missing")?;
            let port = u16::try_from(port)
                .ok()
                .filter(|p| *p > 0)
                .ok_or(format!("containerPort {port} out of range"))?;
            let protocol = p
                .get("protocol")
                .and_then(Value::as_str)
                .unwrap_or("TCP")
                .to_ascii_lowercase();
            if !matches!(protocol.as_str(), "tcp" | "udp" | "sctp") {
                return Err(format!("protocol {protocol}"));
            }
            ports.push(PortDecl { port, protocol });
        }
    }
    let ip = doc
        .pointer("/status/podIP")
        .and_then(Value::as_str)
        .map(str::to_string);
    if let Some(ip) = &ip {
        ip.parse::<std::net::Ipv4Addr>()
            .map_err(|e| format!("status.podIP {ip}: {e}"))?;
    }
    let mut labels = BTreeMap::new();
    if let Some(l) = meta.get("labels").filter(|l| !l.is_null()) {
        let l = l
            .as_object()
            .ok_or("metadata.labels must map names to values")?;
        for (k, v) in l {
            let v = v
                .as_str()
                .ok_or(format!("label {k}: the value must be a string"))?;
            labels.insert(k.clone(), v.to_string());
        }
    }
    Ok(PodDecl {
        namespace: namespace.into(),
        name: name.into(),
        ports,
        ip,
        labels,
    })
}

impl Manifests {
    /// Reads a file or every *.yaml/*.yml/*.json file of a directory (sorted by name).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let mut files = Vec::new();
        if path.is_dir() {
            for e in std::fs::read_dir(path)? {
                let p = e?.path();
                if matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                ) {
                    files.push(p);
                }
            }
            files.sort();
        } else {
            files.push(path.to_path_buf());
        }
        let mut m = Manifests::default();
        for f in files {
            let text =
                std::fs::read_to_string(&f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            m.add_text(&text, &f.display().to_string());
        }
        Ok(m)
    }

    /// Adds the documents of one file.
    pub fn add_text(&mut self, text: &str, origin: &str) {
        for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let doc = match <Value as serde::Deserialize>::deserialize(de) {
                Ok(Value::Null) => continue,
                Ok(d) => d,
                Err(e) => {
                    // A syntax error ends the stream: the parser cannot find the next document.
                    self.invalid
                        .push(format!("{origin} document {}: {e}", i + 1));
                    break;
                }
            };
            let kind = doc
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let name = doc
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string();
            match kind.as_str() {
                "Namespace" => self.namespaces.push(name),
                "Pod" => match pod(&doc) {
                    Ok(p) if self.pods.iter().any(|q| q.key() == p.key()) => self
                        .invalid
                        .push(format!("{origin}: Pod {} declared twice", p.key())),
                    Ok(p) => self.pods.push(p),
                    Err(e) => self.invalid.push(format!("{origin}: Pod {name}: {e}")),
                },
                "" => self
                    .invalid
                    .push(format!("{origin} document {}: no kind", i + 1)),
                other => self.ignored.push(format!("{other}/{name}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pods_and_skips_bad_ones() {
        let mut m = Manifests::default();
        m.add_text(
            "kind: Pod\nmetadata: {name: a, namespace: x}\nspec: {containers: [{name: c, ports: [{containerPort: 80}, {containerPort: 53, protocol: UDP}]}]}\nstatus: {podIP: 198.18.16.9}\n---\nkind: Pod\nmetadata: {name: Bad_Name}\n---\nkind: Service\nmetadata: {name: s}\n---\n: : :\n",
            "t",
        );
        assert_eq!(m.pods.len(), 1);
        assert_eq!(
            m.pods[0].ports,
            vec![
                PortDecl {
                    port: 80,
                    protocol: "tcp".into()
                },
                PortDecl {
                    port: 53,
                    protocol: "udp".into()
                }
            ]
        );
        assert_eq!(m.pods[0].ip.as_deref(), Some("198.18.16.9"));
        assert_eq!(m.ignored, vec!["Service/s".to_string()]);
        assert_eq!(m.invalid.len(), 2, "{:?}", m.invalid);
    }

    #[test]
    fn labels_are_read_and_a_label_change_needs_no_rewiring() {
        let mut m = Manifests::default();
        m.add_text(
            "kind: Pod\nmetadata: {name: a, labels: {app: web, tier: front}}\n---\nkind: Pod\nmetadata: {name: b, labels: {app: 3}}\n---\nkind: Pod\nmetadata: {name: c, labels: [x]}\n",
            "t",
        );
        assert_eq!(m.pods.len(), 1, "{:?}", m.invalid);
        let a = &m.pods[0];
        assert_eq!(a.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(a.labels.len(), 2);
        assert_eq!(m.invalid.len(), 2, "{:?}", m.invalid);
        assert!(m.invalid[0].contains("label app"), "{:?}", m.invalid);
        let mut relabelled = a.clone();
        relabelled.labels.insert("app".into(), "api".into());
        assert!(a.same_but_labels(&relabelled) && *a != relabelled);
        let mut moved = a.clone();
        moved.ip = Some("198.18.16.9".into());
        assert!(!a.same_but_labels(&moved));
    }
}
