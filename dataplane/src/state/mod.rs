//! What a restarted stromd takes back from disk: the ports (here, so that pods are not
//! rewired) and the tables it had when it stopped ([`tables`]).

pub mod tables;

use std::path::{Path, PathBuf};

use strom_api::PortSpec;

/// The recorded ports file.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// `dir/ports.json`.
    pub fn new(dir: &Path) -> Self {
        StateFile {
            path: dir.join("ports.json"),
        }
    }

    /// The recorded ports; an unreadable or corrupt file is logged and treated as empty.
    pub fn load(&self) -> Vec<PortSpec> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(path = %self.path.display(), error = %e, "ignoring corrupt port state");
                Vec::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read port state");
                Vec::new()
            }
        }
    }

    /// Writes atomically (temporary file, then rename).
    pub fn save(&self, ports: &[PortSpec]) -> std::io::Result<()> {
        if let Some(d) = self.path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(ports).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, &self.path)
    }
}
