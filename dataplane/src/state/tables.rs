//! stromd's tables saved when it stops and taken up by its next start (docs/design.md,
//! "Across a restart of stromd"): the Services and NetworkPolicies it was given, which worker
//! served each port, and each worker's flows and ClientIP affinities.
//!
//! Written to `state_dir/tables.cbor` once the workers have stopped, and removed by the next
//! start as it reads it: a snapshot is taken up once, by the start that follows the stop
//! that wrote it. CBOR through serde (ciborium), the flows in it as fixed-size records
//! (`conntrack::persist`): a million flows are 55 MiB.

use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use strom_api::{PolicySet, ServiceSpec};

use crate::conntrack::persist::SavedTables;

/// The snapshot's format; a snapshot of another is not taken up (logged).
pub const VERSION: u32 = 2;
/// The oldest format still taken up: version 1's flow records lack their owner.
const OLDEST: u32 = 1;

/// What a stopping stromd leaves to its next start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    /// The boot it was written in (`/proc/sys/kernel/random/boot_id`): flows do not outlive
    /// a reboot, and a snapshot of another boot is not taken up.
    pub boot_id: String,
    /// When it was written, in ms on CLOCK_BOOTTIME (steady across suspend and clock
    /// changes): the next start takes the time it was gone off every flow's and client's
    /// time left.
    pub saved_boot_ms: u64,
    /// The SNAT port range its flows were translated within (each worker's share of it).
    pub snat_ports: (u16, u16),
    /// The Services as last set.
    pub services: Vec<ServiceSpec>,
    /// The NetworkPolicies as last set (None: never set).
    pub policies: Option<PolicySet>,
    /// The Service ports flows and clients name, by index: key (`namespace/name:port`) and
    /// protocol.
    pub svc_ports: Vec<(String, u8)>,
    /// The worker each pod port was on, by interface name: the next start puts them back
    /// there, where their flows are.
    pub port_workers: BTreeMap<String, usize>,
    /// Each worker's flows and clients, by worker.
    pub workers: Vec<SavedTables>,
}

impl Snapshot {
    /// This format's snapshot from an older one's (version 1's flow records lack their
    /// owner: none).
    fn upgraded(mut self) -> Snapshot {
        if self.version == 1 {
            for w in &mut self.workers {
                w.flows = w.flows.upgraded(crate::conntrack::persist::V1_RECORD_LEN);
            }
        }
        self.version = VERSION;
        self
    }
}

/// This boot's identity (empty if it cannot be read).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Milliseconds on CLOCK_BOOTTIME.
pub fn boot_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// Why a snapshot could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("encoding: {0}")]
    Encode(String),
}

/// `state_dir/tables.cbor`.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    path: PathBuf,
}

impl SnapshotFile {
    pub fn new(dir: &Path) -> Self {
        SnapshotFile {
            path: dir.join("tables.cbor"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `s` atomically (temporary file, then rename); returns its size in bytes.
    pub fn save(&self, s: &Snapshot) -> Result<u64, SnapshotError> {
        let io = |e| SnapshotError::Io(self.path.display().to_string(), e);
        if let Some(d) = self.path.parent() {
            std::fs::create_dir_all(d).map_err(io)?;
        }
        let tmp = self.path.with_extension("cbor.tmp");
        // Only root reads it: it lists the node's flows.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        let mut w = BufWriter::new(f);
        ciborium::into_writer(s, &mut w).map_err(|e| SnapshotError::Encode(e.to_string()))?;
        w.flush().map_err(io)?;
        let size = w.get_ref().metadata().map_err(io)?.len();
        drop(w);
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        Ok(size)
    }

    /// The snapshot the last stop left, removed from disk as it is read. None when there is
    /// none; an unreadable, corrupt or other version's snapshot is logged and not taken up.
    pub fn take(&self) -> Option<Snapshot> {
        let f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read saved tables");
                return None;
            }
        };
        // Taken up once: one that cannot be removed would be taken up again by a start that
        // follows a crash, stale.
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "cannot remove saved tables, not taken up"
            );
            return None;
        }
        match ciborium::from_reader::<Snapshot, _>(BufReader::new(f)) {
            Ok(s) if (OLDEST..=VERSION).contains(&s.version) && s.boot_id == boot_id() => {
                Some(s.upgraded())
            }
            Ok(s) if (OLDEST..=VERSION).contains(&s.version) => {
                tracing::warn!(saved = %s.boot_id, "saved tables of another boot, not taken up");
                None
            }
            Ok(s) => {
                tracing::warn!(
                    version = s.version,
                    want = VERSION,
                    "saved tables of another format, not taken up"
                );
                None
            }
            Err(e) => {
                tracing::warn!(
                    path = %self.path.display(),
                    error = %e,
                    "saved tables not readable (corrupt, or of another format), not taken up"
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::persist::SavedClient;
    use crate::tables::services::Backend;

    fn snapshot() -> Snapshot {
        let services = vec![serde_json::from_str(
            r#"{"namespace": "t", "name": "web", "cluster_ips": ["198.19.0.10"],
                "ports": [{"name": "http", "protocol": "tcp", "port": 80, "node_port": 30080,
                           "endpoints": [{"ip": "198.18.16.3", "port": 8080, "ready": true,
                                          "serving": true, "terminating": false,
                                          "local": true, "in_topology": false,
                                          "target": "t/a"}]}],
                "affinity_timeout_s": 60, "external_local": true}"#,
        )
        .unwrap()];
        let policies = serde_json::from_str(
            r#"{"peers": [{"ip": "198.18.16.3", "identity": 1}],
                "pods": [{"pod": "t/a", "ips": ["198.18.16.3"], "ingress": 0}],
                "groups": [{"direction": "ingress", "policies": ["t/p"],
                            "rules": [{"policy": "t/p", "index": 0,
                                       "peers": {"some": {"identities": [1],
                                                 "blocks": [{"cidr": "198.18.0.0/15",
                                                             "except": ["198.18.1.0/24"]}]}},
                                       "ports": [{"protocol": "udp", "first": 53, "last": 53}]},
                                      {"policy": "t/p", "index": 1, "peers": "any"}]}]}"#,
        )
        .unwrap();
        Snapshot {
            version: VERSION,
            boot_id: boot_id(),
            saved_boot_ms: 123_456,
            snat_ports: (61000, 65535),
            services,
            policies: Some(policies),
            svc_ports: vec![("t/web:http".into(), 6)],
            port_workers: [("sa1b2c3".to_string(), 1)].into_iter().collect(),
            workers: vec![
                SavedTables::default(),
                SavedTables {
                    flows: Default::default(),
                    clients: vec![SavedClient {
                        svc: 0,
                        client: "198.18.16.2".parse().unwrap(),
                        backend: Backend {
                            ip: "198.18.16.3".parse().unwrap(),
                            port: 8080,
                        },
                        left_ms: 5000,
                    }],
                },
            ],
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("strom-tables-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_snapshot_is_read_back_as_written_and_only_once() {
        let d = dir("once");
        let f = SnapshotFile::new(&d);
        assert_eq!(f.take(), None, "none yet");
        let s = snapshot();
        assert!(f.save(&s).unwrap() > 0);
        assert_eq!(f.take(), Some(s));
        assert!(!f.path().exists(), "removed as it is read");
        assert_eq!(f.take(), None, "taken up once");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_version_1_snapshot_is_taken_up_with_its_flows_of_no_other_owner() {
        let d = dir("v1");
        let f = SnapshotFile::new(&d);
        let mut s = snapshot();
        s.version = 1;
        let mut flow = [0u8; crate::conntrack::persist::RECORD_LEN];
        crate::conntrack::persist::SavedFlow {
            orig: crate::conntrack::FlowKey {
                src: "198.18.16.2".parse().unwrap(),
                dst: "198.18.0.9".parse().unwrap(),
                sport: 4000,
                dport: 53,
                proto: 17,
            },
            reply: crate::conntrack::FlowKey {
                src: "198.18.0.9".parse().unwrap(),
                dst: "198.18.0.1".parse().unwrap(),
                sport: 53,
                dport: 61000,
                proto: 17,
            },
            svc: None,
            backend: Backend {
                ip: "198.18.0.9".parse().unwrap(),
                port: 53,
            },
            state: crate::conntrack::FlowState::Datagram {
                replied: true,
                closed: false,
            },
            fins: 0,
            left_ms: 9000,
            packets: 3,
            owner: None,
        }
        .emit(&mut flow);
        s.workers[0].flows = crate::conntrack::persist::FlowRecords::from_bytes(
            flow[..crate::conntrack::persist::V1_RECORD_LEN].to_vec(),
        );
        f.save(&s).unwrap();
        let taken = f.take().expect("taken up");
        assert_eq!(taken.version, VERSION);
        let read: Vec<_> = taken.workers[0].flows.iter().collect();
        assert_eq!(read.len(), 1);
        let got = read[0].clone().expect("a flow");
        assert_eq!((got.owner, got.packets, got.left_ms), (None, 3, 9000));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_corrupt_other_format_or_other_boot_snapshot_is_not_taken_up() {
        let d = dir("bad");
        let f = SnapshotFile::new(&d);
        let mut s = snapshot();
        s.version = VERSION + 1;
        f.save(&s).unwrap();
        assert_eq!(f.take(), None);
        assert!(!f.path().exists());
        let mut s = snapshot();
        s.boot_id = "another boot".into();
        f.save(&s).unwrap();
        assert_eq!(f.take(), None);
        assert!(!f.path().exists());
        std::fs::write(f.path(), b"\xa1not cbor at all").unwrap();
        assert_eq!(f.take(), None);
        assert!(!f.path().exists(), "a corrupt one goes too");
        let _ = std::fs::remove_dir_all(&d);
    }
}
