//! strom's I/O layer, in a crate of its own so that every user of AF_XDP (stromd, and
//! strom-pktgen, which does not link the dataplane) shares one implementation:
//!
//! - [`xsk`]: AF_XDP sockets, each registering its worker's slice of the frames, their rings,
//!   fill-ring depths and the kernel's drop counters;
//! - [`bpf`]: the XDP programs (`bpf/strom.c`, compiled by `build.rs` with clang), loaded and
//!   attached with aya, their maps, and the links pinned so that they outlive stromd;
//! - [`socklb`]: the cgroup programs (`bpf/socklb.c`) that give the node's own sockets a
//!   Service's backend when they connect to it, and their maps.
//!
//! These modules are the only places in the workspace where `unsafe` is allowed; each
//! unsafe block says why it is sound.

pub mod bpf;
pub mod socklb;
pub mod xsk;
