//! The built-in per-node address allocator.
//!
//! Leases live in `<dataDir>/<network>/leases.json`, rewritten atomically under an exclusive
//! `flock` on `<dataDir>/<network>/lock`, so separate plugin processes never hand out the same
//! address and a crash never leaves a half-written file.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::error::{code, CniError};

/// Who holds a lease.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Owner {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Leases {
    /// Last address handed out (allocation continues after it, round robin).
    last: Option<Ipv4Addr>,
    leases: BTreeMap<Ipv4Addr, Owner>,
}

/// An allocator over one subnet.
pub struct Ipam {
    dir: PathBuf,
    subnet: Ipv4Net,
    reserved: Vec<Ipv4Addr>,
}

fn io(what: &str, p: &Path, e: std::io::Error) -> CniError {
    CniError::new(
        code::IO,
        format!("ipam: {what}"),
        format!("{}: {e}", p.display()),
    )
}

impl Ipam {
    /// The subnet addresses come from (the node's pod CIDR).
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// An allocator for `network` over `subnet`; `reserved` are never handed out.
    pub fn new(
        data_dir: &Path,
        network: &str,
        subnet: Ipv4Net,
        reserved: Vec<Ipv4Addr>,
    ) -> Result<Self, CniError> {
        if network.is_empty() || network.contains('/') || network.starts_with('.') {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "invalid network name",
                network.to_string(),
            ));
        }
        Ok(Ipam {
            dir: data_dir.join(network),
            subnet,
            reserved,
        })
    }

    fn with_leases<T>(
        &self,
        f: impl FnOnce(&mut Leases) -> Result<T, CniError>,
    ) -> Result<T, CniError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io("create data dir", &self.dir, e))?;
        let lock_path = self.dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io("open lock", &lock_path, e))?;
        File::lock(&lock).map_err(|e| io("lock", &lock_path, e))?;
        let path = self.dir.join("leases.json");
        let mut leases: Leases = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                CniError::new(
                    code::IO,
                    "ipam: corrupt lease file",
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Leases::default(),
            Err(e) => return Err(io("read leases", &path, e)),
        };
        let out = f(&mut leases)?;
        let tmp = self.dir.join("leases.json.tmp");
        let bytes = serde_json::to_vec_pretty(&leases)
            .map_err(|e| CniError::new(code::IO, "ipam: encode", e.to_string()))?;
        std::fs::write(&tmp, bytes).map_err(|e| io("write leases", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io("rename leases", &path, e))?;
        drop(lock);
        Ok(out)
    }

    fn usable(&self, a: Ipv4Addr) -> bool {
        self.subnet.contains(&a)
            && (self.subnet.prefix_len() >= 31
                || (a != self.subnet.network() && a != self.subnet.broadcast()))
            && !self.reserved.contains(&a)
    }

    /// Allocates an address for `owner`: `requested` if given (it must be free or already
    /// the owner's), otherwise the next free one. The same owner gets its existing lease back.
    pub fn allocate(
        &self,
        owner: &Owner,
        requested: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, CniError> {
        self.with_leases(|l| {
            if let Some(r) = requested {
                if !self.usable(r) {
                    return Err(CniError::new(
                        code::IPAM_EXHAUSTED,
                        "requested address not usable",
                        format!("{r} is outside {} or reserved", self.subnet),
                    ));
                }
                return match l.leases.get(&r) {
                    Some(o) if o == owner => Ok(r),
                    Some(o) => Err(CniError::new(
                        code::IPAM_EXHAUSTED,
                        "requested address is taken",
                        format!("{r} is leased to {}", o.container_id),
                    )),
                    None => {
                        l.leases.insert(r, owner.clone());
                        Ok(r)
                    }
                };
            }
            if let Some((a, _)) = l.leases.iter().find(|(_, o)| *o == owner) {
                return Ok(*a);
            }
            let first = u32::from(self.subnet.network());
            let size = 1u64 << (32 - self.subnet.prefix_len());
            let start = l
                .last
                .map(|a| u32::from(a).wrapping_sub(first) as u64 + 1)
                .unwrap_or(0);
            for i in 0..size {
                let a = Ipv4Addr::from(first + ((start + i) % size) as u32);
                if self.usable(a) && !l.leases.contains_key(&a) {
                    l.leases.insert(a, owner.clone());
                    l.last = Some(a);
                    return Ok(a);
                }
            }
            Err(CniError::new(
                code::IPAM_EXHAUSTED,
                "no free address",
                format!("{} is full", self.subnet),
            ))
        })
    }

    /// Releases the owner's lease(s). Releasing nothing is fine.
    pub fn release(&self, owner: &Owner) -> Result<Vec<Ipv4Addr>, CniError> {
        self.with_leases(|l| {
            let gone: Vec<Ipv4Addr> = l
                .leases
                .iter()
                .filter(|(_, o)| *o == owner)
                .map(|(a, _)| *a)
                .collect();
            for a in &gone {
                l.leases.remove(a);
            }
            Ok(gone)
        })
    }

    /// The owner's leases.
    pub fn lookup(&self, owner: &Owner) -> Result<Vec<Ipv4Addr>, CniError> {
        self.with_leases(|l| {
            Ok(l.leases
                .iter()
                .filter(|(_, o)| *o == owner)
                .map(|(a, _)| *a)
                .collect())
        })
    }

    /// Drops every lease whose owner is not `keep`. Returns what was removed.
    pub fn retain(
        &self,
        keep: impl Fn(&Owner) -> bool,
    ) -> Result<Vec<(Ipv4Addr, Owner)>, CniError> {
        self.with_leases(|l| {
            let gone: Vec<(Ipv4Addr, Owner)> = l
                .leases
                .iter()
                .filter(|(_, o)| !keep(o))
                .map(|(a, o)| (*a, o.clone()))
                .collect();
            for (a, _) in &gone {
                l.leases.remove(a);
            }
            Ok(gone)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(c: &str) -> Owner {
        Owner {
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "strom-ipam-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        d
    }

    fn rand_suffix() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    }

    #[test]
    fn skips_network_broadcast_and_reserved_and_is_idempotent() {
        let d = tmp();
        let ipam = Ipam::new(
            &d,
            "n",
            "198.18.16.0/30".parse().unwrap(),
            vec!["198.18.16.1".parse().unwrap()],
        )
        .unwrap();
        let a = ipam.allocate(&owner("a"), None).unwrap();
        assert_eq!(a, "198.18.16.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(ipam.allocate(&owner("a"), None).unwrap(), a);
        let e = ipam.allocate(&owner("b"), None).unwrap_err();
        assert_eq!(e.code, code::IPAM_EXHAUSTED);
        assert_eq!(ipam.release(&owner("a")).unwrap(), vec![a]);
        assert_eq!(ipam.allocate(&owner("b"), None).unwrap(), a);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn honours_requested_address_and_refuses_taken_or_outside() {
        let d = tmp();
        let ipam = Ipam::new(&d, "n", "198.18.16.0/24".parse().unwrap(), vec![]).unwrap();
        let r: Ipv4Addr = "198.18.16.77".parse().unwrap();
        assert_eq!(ipam.allocate(&owner("a"), Some(r)).unwrap(), r);
        assert_eq!(
            ipam.allocate(&owner("b"), Some(r)).unwrap_err().code,
            code::IPAM_EXHAUSTED
        );
        assert!(ipam
            .allocate(&owner("b"), Some("198.18.17.1".parse().unwrap()))
            .is_err());
        let gone = ipam.retain(|o| o.container_id != "a").unwrap();
        assert_eq!(gone.len(), 1);
        assert!(ipam.lookup(&owner("a")).unwrap().is_empty());
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn concurrent_allocations_are_distinct() {
        let d = tmp();
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let d = d.clone();
                std::thread::spawn(move || {
                    let ipam =
                        Ipam::new(&d, "n", "198.18.16.0/24".parse().unwrap(), vec![]).unwrap();
                    ipam.allocate(&owner(&format!("c{i}")), None).unwrap()
                })
            })
            .collect();
        let mut got: Vec<Ipv4Addr> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 16);
        std::fs::remove_dir_all(d).unwrap();
    }
}
