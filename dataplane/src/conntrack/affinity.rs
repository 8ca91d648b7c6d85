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
}
