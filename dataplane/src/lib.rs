//! stromd: strom's AF_XDP dataplane.
//!
//! The crate is split by domain: [`pipeline`] is pure packet logic over byte slices (safe,
//! allocation-free, unit-tested and benchmarked without any socket); [`xsk`] and [`bpf`] are the
//! only I/O layer and the only place `unsafe` is allowed; [`worker`] runs the pipeline to
//! completion over batches; [`api`] serves the Unix-socket contract of `strom-api`.
#![deny(unsafe_code)]

pub mod api;
pub mod bpf;
pub mod config;
pub mod drop;
pub use strom_api::mac;
pub mod netlink;
pub mod pipeline;
pub mod state;
pub mod stats;
pub mod tables;
pub mod worker;
pub mod xsk;
