//! A directory of manifests as the source (what runs without an API server): the objects of
//! every `*.yaml`, `*.yml` and `*.json` file in it, with what the cluster's controllers
//! would add ([`crate::manifests::resolve`]: defaulting, ClusterIPs and NodePorts kept from
//! one reading to the next, EndpointSlices derived from the pods for Services that have
//! none). The directory is read again whenever a file in it changes; each reading replaces
//! every kind at once, as a relist does, so only what changed reaches stromd.
//!
//! Changes are noticed by looking at the files' names, sizes and modification times every
//! `interval` rather than through inotify: a Kubernetes ConfigMap volume (the way a
//! DaemonSet gets such a directory) replaces its files by swapping a symlink, which
//! inotify watches on the files do not see, and a look at a few files costs nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{Change, Driver, Report};
use crate::cluster::{Kind, Object};
use crate::manifests::load::{self, files, LoadError};
use crate::manifests::{resolve, Allocations, Objects, Settings};

/// One reading's view of the directory: (file, size, modified).
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn fingerprint(dir: &Path) -> Result<Fingerprint, LoadError> {
    let mut prints = Vec::new();
    for p in files(dir)? {
        // Follows symlinks: a ConfigMap volume's files are links into its data.
        let m = std::fs::metadata(&p).map_err(|source| LoadError {
            path: p.clone(),
            source,
        })?;
        prints.push((p, m.len(), m.modified().ok()));
    }
    Ok(prints)
}

/// What one reading of the directory carries to the next.
#[derive(Debug, Default)]
pub struct Carried {
    /// The addresses and ports given to Services.
    pub allocations: Allocations,
    /// Each file's objects as of its last reading without a bad document.
    good: BTreeMap<PathBuf, Objects>,
}

/// The directory's objects. A file with a bad document (a YAML syntax error hides every
/// document after it) adds what its last good reading had that this one lacks: a mistake in
/// one object does not remove others, or the object's last good state, from the tables.
fn load(dir: &Path, carried: &mut Carried) -> Result<Objects, LoadError> {
    let files = files(dir)?;
    let mut all = Objects::default();
    let mut kept = Vec::new();
    for f in &files {
        let origin = f.display().to_string();
        let mut one = Objects::default();
        one.add_text(&load::read(f)?, &origin);
        if one.invalid.is_empty() {
            carried.good.insert(f.clone(), one.clone());
        } else if let Some(earlier) = carried.good.get(f) {
            kept.push(earlier.clone());
        }
        all.append(one, &origin);
    }
    // After every file: an object declared now in any file wins over a kept copy.
    for earlier in kept {
        all.keep_missing(earlier);
    }
    carried.good.retain(|f, _| files.contains(f));
    Ok(all)
}

/// Reads the directory into changes, one full list per kind; what cannot be read is
/// reported and left out (keeping its last good state, see [`load`]).
pub fn read<R: Report>(
    dir: &Path,
    settings: &Settings,
    carried: &mut Carried,
    report: &mut R,
) -> Result<Vec<Change>, LoadError> {
    let objects = load(dir, carried)?;
    for bad in &objects.invalid {
        report.rejected(kind_of(&bad.what), &bad.to_string());
    }
    let r = resolve(
        &objects.services,
        &objects.endpoint_slices,
        &objects.pods,
        settings,
        &carried.allocations,
    );
    for e in &r.skipped {
        report.rejected(Kind::Service, &e.to_string());
    }
    carried.allocations = r.allocations;
    Ok(vec![
        Change::Listed(
            Kind::Node,
            objects
                .nodes
                .into_iter()
                .map(|o| Object::Node(Box::new(o)))
                .collect(),
        ),
        Change::Listed(
            Kind::Namespace,
            objects
                .namespaces
                .into_iter()
                .map(|o| Object::Namespace(Box::new(o)))
                .collect(),
        ),
        Change::Listed(
            Kind::Pod,
            objects
                .pods
                .into_iter()
                .map(|p| Object::Pod(p.into()))
                .collect(),
        ),
        Change::Listed(
            Kind::NetworkPolicy,
            objects
                .network_policies
                .into_iter()
                .map(|o| Object::NetworkPolicy(Box::new(o)))
                .collect(),
        ),
        Change::Listed(
            Kind::EndpointSlice,
            r.endpoint_slices
                .into_iter()
                .map(|o| Object::EndpointSlice(Box::new(o)))
                .collect(),
        ),
        Change::Listed(
            Kind::Service,
            r.services
                .into_iter()
                .map(|o| Object::Service(Box::new(o)))
                .collect(),
        ),
    ])
}

/// The kind an unreadable object was meant to be (`Kind namespace/name`), for the report.
fn kind_of(what: &str) -> Kind {
    let name = what.split_whitespace().next().unwrap_or_default();
    Kind::ALL
        .into_iter()
        .find(|k| k.name() == name)
        .unwrap_or(Kind::Service)
}

/// Feeds `driver` from `dir` forever: read now, then again whenever its files change. An
/// unreadable directory is reported and tried again; the last good reading stays in force.
pub fn run<R: Report>(
    dir: &Path,
    settings: &Settings,
    driver: &mut Driver<R>,
    interval: Duration,
) -> ! {
    let mut carried = Carried::default();
    let mut seen: Option<Fingerprint> = None;
    loop {
        match fingerprint(dir) {
            Ok(f) if seen.as_ref() != Some(&f) => {
                match read(dir, settings, &mut carried, driver.report()) {
                    Ok(changes) => {
                        for c in changes {
                            driver.change(c);
                        }
                        driver.flush();
                        seen = Some(f);
                    }
                    Err(e) => driver.report().unreadable(&e.to_string()),
                }
            }
            Ok(_) => {}
            Err(e) => driver.report().unreadable(&e.to_string()),
        }
        std::thread::sleep(interval);
    }
}
