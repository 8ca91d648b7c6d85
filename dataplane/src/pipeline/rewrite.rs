//! Layer-2 rewrite for a routed packet.

use crate::tables::Next;

/// Writes the next hop's destination and source MACs.
#[inline]
pub fn macs(frame: &mut [u8], next: &Next) {
    frame[0..6].copy_from_slice(&next.dst_mac);
    frame[6..12].copy_from_slice(&next.src_mac);
}
