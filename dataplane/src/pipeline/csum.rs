//! Incremental Internet checksum update (RFC 1624, eqn. 3): HC' = ~(~HC + ~m + m').
//! Hand-written because smoltcp only recomputes whole checksums; a TTL decrement must not
//! touch the rest of the header.

/// Updates checksum `check` for one 16-bit word changing from `old` to `new`.
#[inline]
pub fn update16(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use smoltcp::wire::checksum;

    proptest! {
        #[test]
        fn incremental_equals_full_recompute(mut words in proptest::collection::vec(any::<u16>(), 2..40), idx in any::<usize>(), new in any::<u16>()) {
            let bytes = |w: &[u16]| w.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>();
            let i = idx % words.len();
            let before = !checksum::data(&bytes(&words));
            let old = words[i];
            words[i] = new;
            let after = !checksum::data(&bytes(&words));
            let inc = update16(before, old, new);
            // 0x0000 and 0xffff are the same value in one's complement.
            prop_assert!(inc == after || (inc == 0xffff && after == 0) || (inc == 0 && after == 0xffff));
        }
    }
}
