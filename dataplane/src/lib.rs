//! stromd: strom's AF_XDP dataplane.
//!
//! The crate is split by domain: [`pipeline`] is pure packet logic over byte slices (safe,
//! allocation-free, unit-tested and benchmarked without any socket); the I/O layer (AF_XDP
//! sockets and XDP programs, the only `unsafe` code) is the `strom-xdp` crate, re-exported
//! here as [`xsk`] and [`bpf`]; [`worker`] runs the pipeline to completion over batches;
//! [`api`] serves the Unix-socket contract of `strom-api`.
#![forbid(unsafe_code)]

pub mod api;
pub use strom_xdp::bpf;
pub mod config;
pub mod conntrack;
pub mod drop;
pub mod healthcheck;
pub use strom_api::mac;
pub mod netlink;
pub mod node_sockets;
pub mod pipeline;
pub mod reconcile;
pub mod state;
pub mod stats;
pub mod tables;
pub mod worker;
pub use strom_xdp::xsk;
