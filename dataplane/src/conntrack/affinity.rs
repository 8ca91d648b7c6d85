//! `sessionAffinity: ClientIP`: a client's backend per Service port, kept while the client
//! keeps coming within the timeout (kube-proxy's `recent` match, refreshed by every new
//! connection). A worker's own table, bounded like conntrack: full, a new client is balanced
//! without being remembered (counted).

use std::net::Ipv4Addr;

use hashbrown::HashMap;

use crate::tables::services::{Backend, SvcRef};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    svc: SvcRef,
    client: Ipv4Addr,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    key: Key,
    backend: Backend,
    expires_ms: u64,
    live: bool,
}

/// The longest affinity timeout a Service can give stromd (`affinity_timeout_s`, a u32 of
/// seconds; Kubernetes allows at most a day).
pub const MAX_TIMEOUT_MS: u64 = u32::MAX as u64 * 1000;

/// A worker's affinity table.
#[derive(Debug)]
pub struct Affinity {
    index: HashMap<Key, u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    max: usize,
    sweep_at: usize,
}

impl Affinity {
    /// Room for `max` clients, allocated now.
    pub fn new(max: usize) -> Self {
        Affinity {
            index: HashMap::with_capacity(max * 2),
            slots: Vec::with_capacity(max),
            free: Vec::with_capacity(max),
            max,
            sweep_at: 0,
        }
    }

    /// The backend `client` had for `svc`, if its affinity has not expired.
    #[inline]
    pub fn get(&mut self, svc: SvcRef, client: Ipv4Addr, now_ms: u64) -> Option<Backend> {
        let i = *self.index.get(&Key { svc, client })?;
        let s = self.slots[i as usize];
        if s.expires_ms <= now_ms {
            self.remove(i);
            return None;
        }
        Some(s.backend)
    }

    /// Records (or refreshes) `client`'s backend for `svc` until `now + timeout`. Returns
    /// false when the table is full.
    pub fn set(
        &mut self,
        svc: SvcRef,
        client: Ipv4Addr,
        backend: Backend,
        timeout_ms: u64,
        now_ms: u64,
    ) -> bool {
        let key = Key { svc, client };
        let slot = Slot {
            key,
            backend,
            expires_ms: now_ms + timeout_ms,
            live: true,
        };
        if let Some(&i) = self.index.get(&key) {
            self.slots[i as usize] = slot;
            return true;
        }
        if self.free.is_empty() && self.slots.len() >= self.max {
            self.sweep(now_ms, 256);
        }
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None if self.slots.len() < self.max => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
            None => return false,
        };
        self.index.insert(key, i);
        true
    }

    fn remove(&mut self, i: u32) {
        let s = &mut self.slots[i as usize];
        if s.live {
            s.live = false;
            let k = s.key;
            self.index.remove(&k);
            self.free.push(i);
        }
    }

    /// Removes expired clients among the next `n` slots.
    pub fn sweep(&mut self, now_ms: u64, n: usize) {
        let len = self.slots.len();
        for _ in 0..n.min(len) {
            if self.sweep_at >= len {
                self.sweep_at = 0;
            }
            let i = self.sweep_at;
            self.sweep_at += 1;
            if self.slots[i].live && self.slots[i].expires_ms <= now_ms {
                self.remove(i as u32);
            }
        }
    }

    /// Forgets every client of `svc` (its Service was flushed).
    pub fn forget(&mut self, mut f: impl FnMut(SvcRef) -> bool) {
        for i in 0..self.slots.len() {
            if self.slots[i].live && f(self.slots[i].key.svc) {
                self.remove(i as u32);
            }
        }
    }

    /// The live clients at `now_ms`, for the next start of stromd; `svc` names a Service
    /// port by its index in the snapshot (`None`: gone, its clients are not saved).
    pub fn save(
        &self,
        now_ms: u64,
        mut svc: impl FnMut(SvcRef) -> Option<u32>,
    ) -> Vec<super::persist::SavedClient> {
        self.slots
            .iter()
            .filter(|s| s.live && s.expires_ms > now_ms)
            .filter_map(|s| {
                Some(super::persist::SavedClient {
                    svc: svc(s.key.svc)?,
                    client: s.key.client,
                    backend: s.backend,
                    left_ms: s.expires_ms - now_ms,
                })
            })
            .collect()
    }

    /// Takes up saved clients at `now_ms`, each with `elapsed_ms` less time left; `svc`
    /// gives a saved Service port's slot now (`None`: not set, its clients are dropped).
    /// Returns how many were taken up. A client whose backend has left the Service is
    /// balanced anew on its next connection, as it would have been.
    pub fn restore(
        &mut self,
        clients: &[super::persist::SavedClient],
        elapsed_ms: u64,
        now_ms: u64,
        mut svc: impl FnMut(u32) -> Option<SvcRef>,
    ) -> usize {
        let mut taken = 0;
        for c in clients {
            let (Some(left), Some(svc)) = (
                c.left_ms.checked_sub(elapsed_ms).filter(|&l| l > 0),
                svc(c.svc),
            ) else {
                continue;
            };
            // Never more than a Service can give (the file is data from disk).
            let left = left.min(MAX_TIMEOUT_MS);
            if self.set(svc, c.client, c.backend, left, now_ms) {
                taken += 1;
            }
        }
        taken
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Bytes the table holds (allocated when it was made).
    pub fn memory_bytes(&self) -> usize {
        self.index.allocation_size()
            + self.slots.capacity() * std::mem::size_of::<Slot>()
            + self.free.capacity() * std::mem::size_of::<u32>()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_keeps_its_backend_until_the_timeout_and_the_table_stays_bounded() {
        let mut a = Affinity::new(2);
        let svc = SvcRef::default();
        let b = Backend {
            ip: "198.18.16.3".parse().unwrap(),
            port: 80,
        };
        let c: Ipv4Addr = "198.18.16.2".parse().unwrap();
        assert!(a.set(svc, c, b, 1000, 0));
        assert_eq!(a.get(svc, c, 999), Some(b));
        assert!(a.set(svc, c, b, 1000, 999), "refreshed");
        assert_eq!(a.get(svc, c, 1998), Some(b));
        assert_eq!(a.get(svc, c, 1999), None);
        assert!(a.set(svc, "198.18.16.4".parse().unwrap(), b, 10, 2000));
        assert!(a.set(svc, "198.18.16.5".parse().unwrap(), b, 10, 2000));
        assert!(
            !a.set(svc, "198.18.16.6".parse().unwrap(), b, 10, 2000),
            "full"
        );
        assert!(
            a.set(svc, "198.18.16.6".parse().unwrap(), b, 10, 2010),
            "expired made room"
        );
        assert!(a.len() <= 2);
    }

    #[test]
    fn saved_clients_come_back_under_the_new_slot_with_their_time_left() {
        let mut a = Affinity::new(4);
        let (old, new) = (
            SvcRef {
                slot: 2,
                incarnation: 1,
            },
            SvcRef {
                slot: 0,
                incarnation: 1,
            },
        );
        let b = Backend {
            ip: "198.18.16.3".parse().unwrap(),
            port: 80,
        };
        let (c, d): (Ipv4Addr, Ipv4Addr) = (
            "198.18.16.2".parse().unwrap(),
            "198.18.16.4".parse().unwrap(),
        );
        a.set(old, c, b, 10_000, 0);
        a.set(old, d, b, 1_000, 0);
        let saved = a.save(400, |s| (s == old).then_some(5));
        assert_eq!(saved.len(), 2);
        let mut next = Affinity::new(4);
        // 700 ms gone: d's affinity has expired meanwhile.
        assert_eq!(
            next.restore(&saved, 700, 50, |i| (i == 5).then_some(new)),
            1
        );
        assert_eq!(next.get(new, c, 50 + 10_000 - 400 - 700 - 1), Some(b));
        assert_eq!(next.get(new, d, 50), None);
        assert_eq!(next.get(new, c, 50 + 10_000 - 400 - 700), None, "expired");
        assert_eq!(Affinity::new(4).restore(&saved, 0, 0, |_| None), 0);
    }
}
