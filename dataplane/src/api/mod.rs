//! stromd's API: the controller that owns the registry (ports, XDP programs, the tables'
//! next version), its readiness, and the socket that serves `strom-api` requests.
//!
//! - [`controller`]: the registry and every change to it, one request at a time.
//! - [`health`]: whether every worker's loop is moving (`status`).
//! - [`server`]: the Unix socket, many clients at once, each in its own thread.
//! - [`metrics`]: the Prometheus endpoint, a client of the controller like the others.

mod controller;
pub mod health;
pub mod metrics;
pub mod server;

pub use controller::{Controller, MAX_PORTS};
pub use server::{bind, lock_waiting, serve, ApiLock, BindError, LOCK_PATIENCE};
