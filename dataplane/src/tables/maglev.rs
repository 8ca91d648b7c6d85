//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, §3.4): a lookup table of `M` slots
//! (`M` prime) filled by each backend's own permutation in turn, so that every backend gets
//! `M/N` slots, give or take one, and a backend that comes or goes moves about `1/N` of the
//! slots. A flow's hash picks a slot: new flows spread evenly, and most keep their backend
//! across changes (established ones keep theirs through conntrack anyway).
//!
//! Hand-written: the algorithm is a dozen lines, and the crates that offer it allocate per
//! lookup or hash with a per-process random key (stromd's workers must agree on a choice).

use std::net::Ipv4Addr;

/// Table sizes: primes, each about twice the last. A pool of `n` backends gets the smallest
/// at least `SLOTS_PER_BACKEND * n` (at least the first): more slots, a smaller imbalance and
/// a disruption closer to `1/N`, at two bytes a slot.
const PRIMES: [u32; 12] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071, 262139, 524287,
];
const SLOTS_PER_BACKEND: usize = 32;

/// A pool's lookup table: slot → backend index.
#[derive(Debug, Clone, Default)]
pub struct Maglev {
    slots: Box<[u16]>,
}

/// A 64-bit mix of a backend's address and port (the two permutation hashes come from it).
/// splitmix64's finalizer: cheap, and good enough that neighbouring addresses spread.
#[inline]
pub fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn backend_key(ip: Ipv4Addr, port: u16) -> u64 {
    (u64::from(u32::from(ip)) << 16) | u64::from(port)
}

impl Maglev {
    /// The table for `backends` (in any order: the result depends only on the set).
    pub fn build(backends: &[(Ipv4Addr, u16)]) -> Self {
        let n = backends.len();
        if n == 0 {
            return Maglev::default();
        }
        let want = (SLOTS_PER_BACKEND * n) as u32;
        let m = PRIMES
            .iter()
            .copied()
            .find(|&p| p >= want)
            .unwrap_or(PRIMES[PRIMES.len() - 1]) as u64;
        // Backends take turns in the order of their keys, so the table depends only on the
        // set. Each one's permutation: offset + j * skip (mod m), skip in 1..m.
        let mut order: Vec<(u64, usize)> = backends
            .iter()
            .enumerate()
            .map(|(i, &(ip, port))| (backend_key(ip, port), i))
            .collect();
        order.sort_unstable();
        let perms: Vec<(u64, u64, usize)> = order
            .iter()
            .map(|&(k, i)| {
                let h1 = mix64(k ^ 0x6d61_676c_6576_3031);
                let h2 = mix64(k ^ 0x6d61_676c_6576_3032);
                (h1 % m, h2 % (m - 1) + 1, i)
            })
            .collect();
        let mut next = vec![0u64; n];
        let mut slots = vec![u16::MAX; m as usize];
        let mut filled = 0u64;
        'fill: loop {
            for (i, &(offset, skip, backend)) in perms.iter().enumerate() {
                let mut c = (offset + next[i] * skip) % m;
                while slots[c as usize] != u16::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                slots[c as usize] = backend as u16;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Maglev {
            slots: slots.into_boxed_slice(),
        }
    }

    /// The backend index for a flow hash; None for an empty pool.
    #[inline]
    pub fn pick(&self, hash: u64) -> Option<u16> {
        if self.slots.is_empty() {
            return None;
        }
        Some(self.slots[(hash % self.slots.len() as u64) as usize])
    }

    /// Slots in the table (0 for an empty pool).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Bytes the table takes.
    pub fn bytes(&self) -> usize {
        self.slots.len() * 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: usize) -> Vec<(Ipv4Addr, u16)> {
        (0..n)
            .map(|i| (Ipv4Addr::new(198, 18, 16, 2 + i as u8), 8080))
            .collect()
    }

    #[test]
    fn every_backend_gets_its_share_of_slots() {
        for n in [1, 2, 3, 7, 50] {
            let b = backends(n);
            let m = Maglev::build(&b);
            let mut count = vec![0usize; n];
            for h in 0..m.len() as u64 {
                count[m.pick(h).unwrap() as usize] += 1;
            }
            let (lo, hi) = (m.len() / n, m.len().div_ceil(n));
            for c in &count {
                // Maglev's fill gives each backend M/N slots, within one turn of the loop.
                assert!(*c + 1 >= lo && *c <= hi + 1, "n={n}: {count:?}");
            }
        }
        assert_eq!(Maglev::build(&[]).pick(7), None);
    }

    #[test]
    fn removing_one_of_n_backends_moves_about_one_nth_of_the_slots() {
        let b = backends(10);
        let before = Maglev::build(&b);
        let mut fewer = b.clone();
        fewer.remove(3);
        let after = Maglev::build(&fewer);
        assert_eq!(before.len(), after.len(), "same table size");
        let mut moved = 0;
        for h in 0..before.len() as u64 {
            let was = b[before.pick(h).unwrap() as usize];
            let now = fewer[after.pick(h).unwrap() as usize];
            if was != now && was != b[3] {
                moved += 1;
            }
        }
        // Slots of the removed backend must move; of the others' slots, few do.
        let others = before.len() - before.len() / 10;
        assert!(
            (moved as f64) < 0.1 * others as f64,
            "{moved} of {others} slots of remaining backends moved"
        );
    }

    #[test]
    fn the_table_depends_on_the_set_not_the_order() {
        let b = backends(5);
        let mut r = b.clone();
        r.reverse();
        let (x, y) = (Maglev::build(&b), Maglev::build(&r));
        for h in 0..x.len() as u64 {
            assert_eq!(
                b[x.pick(h).unwrap() as usize],
                r[y.pick(h).unwrap() as usize]
            );
        }
    }
}
