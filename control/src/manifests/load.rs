//! Reading manifests: YAML or JSON, several documents a file, or a directory of files.
//!
//! Each document becomes a k8s-openapi object of its kind; what cannot be read is reported
//! with where it is and why (the field path serde stopped at), and the rest is used, as
//! `kubectl apply` goes on past a bad object.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{Metadata, Resource};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Whether a directory's file is read as manifests: `*.yaml`, `*.yml`, `*.json`.
pub fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// An object that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {what}: {reason}")]
pub struct ManifestError {
    /// The file (and document number) it came from.
    pub origin: String,
    /// `Kind namespace/name`, or `document N` when the document has no readable kind.
    pub what: String,
    pub reason: String,
}

/// A manifest that could not be read at all.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct LoadError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// The objects of a set of manifests, by kind, in the order given. Namespaced objects
/// without a namespace are in "default", as `kubectl apply` puts them.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub namespaces: Vec<Namespace>,
    /// Nodes (the one named as the node gives its zone; the others are not read).
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    /// As written: [`crate::policy::compile`] defaults them (or see
    /// [`crate::policy::defaulted`]).
    pub network_policies: Vec<NetworkPolicy>,
    /// Objects of other kinds (`Kind/name`), which nothing here acts on.
    pub other: Vec<String>,
    /// Objects that could not be read, with the reason.
    pub invalid: Vec<ManifestError>,
    /// `Kind namespace/name` of every object taken, to refuse one declared twice.
    seen: BTreeSet<String>,
}

impl Objects {
    /// Reads a file, or every `*.yaml`, `*.yml` and `*.json` file of a directory (sorted by
    /// name).
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let mut objects = Objects::default();
        for f in files(path)? {
            objects.add_text(&read(&f)?, &f.display().to_string());
        }
        Ok(objects)
    }

    /// Adds the objects of `other` (read from `origin`), refusing one already declared.
    pub fn append(&mut self, mut other: Objects, origin: &str) {
        self.other.append(&mut other.other);
        self.invalid.append(&mut other.invalid);
        let mut twice = Vec::new();
        self.merge(other, &mut |what| {
            twice.push(ManifestError {
                origin: origin.to_string(),
                what,
                reason: "declared twice".into(),
            })
        });
        self.invalid.extend(twice);
    }

    /// Adds the objects of `earlier` that these lack: for a file read again with a bad
    /// document, the last good state of what that document held (or, after a YAML syntax
    /// error, of every document after it), as an API server keeps an object whose update
    /// it refuses.
    pub fn keep_missing(&mut self, earlier: Objects) {
        self.merge(earlier, &mut |_| {});
    }

    /// Moves every object of `from` not declared here yet into these; `dup` hears of the
    /// others (`Kind namespace/name`).
    fn merge(&mut self, from: Objects, dup: &mut impl FnMut(String)) {
        let seen = &mut self.seen;
        merge(seen, &mut self.namespaces, from.namespaces, dup);
        merge(seen, &mut self.nodes, from.nodes, dup);
        merge(seen, &mut self.pods, from.pods, dup);
        merge(seen, &mut self.services, from.services, dup);
        merge(seen, &mut self.endpoint_slices, from.endpoint_slices, dup);
        merge(seen, &mut self.network_policies, from.network_policies, dup);
    }

    /// Adds the documents of one file (JSON is YAML too).
    pub fn add_text(&mut self, text: &str, origin: &str) {
        for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let origin = format!("{origin} document {}", i + 1);
            let doc = match <Value as serde::Deserialize>::deserialize(de) {
                Ok(Value::Null) => continue,
                Ok(d) => d,
                Err(e) => {
                    // A syntax error ends the stream: the parser cannot find the next document.
                    self.invalid.push(ManifestError {
                        origin,
                        what: "YAML".into(),
                        reason: e.to_string(),
                    });
                    break;
                }
            };
            self.add_document(doc, origin);
        }
    }

    fn add_document(&mut self, doc: Value, origin: String) {
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("?");
        let namespace = doc
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let what = match kind {
            "Namespace" | "Node" => format!("{kind} {name}"),
            _ => format!("{kind} {namespace}/{name}"),
        };
        let invalid = |reason: String| ManifestError {
            origin: origin.clone(),
            what: what.clone(),
            reason,
        };
        let object = match kind {
            "Namespace" => typed(doc).map(Object::Namespace),
            "Node" => typed(doc).map(|n| Object::Node(Box::new(n))),
            "Pod" => typed(doc)
                .map(|p| Object::Pod(Box::new(namespaced(p, |p: &mut Pod| &mut p.metadata)))),
            "Service" => typed(doc).map(|s| {
                Object::Service(Box::new(namespaced(s, |s: &mut Service| &mut s.metadata)))
            }),
            "EndpointSlice" => typed(doc).map(|s| {
                Object::EndpointSlice(namespaced(s, |s: &mut EndpointSlice| &mut s.metadata))
            }),
            "NetworkPolicy" => typed(doc).map(|p| {
                Object::NetworkPolicy(Box::new(namespaced(p, |p: &mut NetworkPolicy| {
                    &mut p.metadata
                })))
            }),
            "" => Err("no kind".into()),
            other => {
                self.other.push(format!("{other}/{name}"));
                return;
            }
        };
        match object {
            Err(reason) => self.invalid.push(invalid(reason)),
            Ok(_) if !self.seen.insert(what.clone()) => {
                self.invalid.push(invalid("declared twice".into()))
            }
            Ok(Object::Namespace(n)) => self.namespaces.push(n),
            Ok(Object::Node(n)) => self.nodes.push(*n),
            Ok(Object::Pod(p)) => self.pods.push(*p),
            Ok(Object::Service(s)) => self.services.push(*s),
            Ok(Object::EndpointSlice(s)) => self.endpoint_slices.push(s),
            Ok(Object::NetworkPolicy(p)) => self.network_policies.push(*p),
        }
    }
}

/// The manifest files of `path`: itself, or a directory's `*.yaml`, `*.yml` and `*.json`
/// files sorted by name.
pub fn files(path: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let err = |source| LoadError {
        path: path.to_path_buf(),
        source,
    };
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for e in std::fs::read_dir(path).map_err(err)? {
        let p = e.map_err(err)?.path();
        if is_manifest(&p) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// A manifest file's text.
pub fn read(file: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(file).map_err(|source| LoadError {
        path: file.to_path_buf(),
        source,
    })
}

/// `Kind namespace/name` (a Namespace or a Node: `Kind name`), as [`ManifestError::what`]
/// says.
fn what<K: Resource + Metadata<Ty = ObjectMeta>>(o: &K) -> String {
    let m = o.metadata();
    let name = m.name.as_deref().unwrap_or("?");
    if K::KIND == "Namespace" || K::KIND == "Node" {
        format!("{} {name}", K::KIND)
    } else {
        let namespace = m.namespace.as_deref().unwrap_or("default");
        format!("{} {namespace}/{name}", K::KIND)
    }
}

/// Moves the objects of `from` not in `seen` into `into`; `dup` hears of the others.
fn merge<K: Resource + Metadata<Ty = ObjectMeta>>(
    seen: &mut BTreeSet<String>,
    into: &mut Vec<K>,
    from: Vec<K>,
    dup: &mut impl FnMut(String),
) {
    for o in from {
        let w = what(&o);
        if seen.insert(w.clone()) {
            into.push(o);
        } else {
            dup(w);
        }
    }
}

/// One object of a kind read here.
enum Object {
    Namespace(Namespace),
    Node(Box<Node>),
    Pod(Box<Pod>),
    Service(Box<Service>),
    EndpointSlice(EndpointSlice),
    NetworkPolicy(Box<NetworkPolicy>),
}

/// The document as a `T`, or the field path and problem.
fn typed<T: DeserializeOwned>(doc: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })
}

/// `o` with its namespace set ("default" when the manifest gives none).
fn namespaced<T>(mut o: T, meta: impl Fn(&mut T) -> &mut ObjectMeta) -> T {
    let m = meta(&mut o);
    if m.namespace.as_deref().unwrap_or("").is_empty() {
        m.namespace = Some("default".into());
    }
    o
}
