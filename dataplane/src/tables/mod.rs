//! The tables the workers read, without locks: one module per table ([`node`], [`routes`],
//! [`services`], [`policy`]), each published on its own.
//!
//! The reconciler ([`crate::reconcile`]) builds the next version of a table from the desired
//! state and publishes it with one atomic pointer swap; a change to one table does not copy
//! the others. A worker loads each table once per loop ([`TableHandle::view`]), so a change
//! is never seen half-applied. The version a swap replaces goes back to the reconciler, which
//! frees it once every worker has moved past it: never on a worker's path.

pub mod maglev;
pub mod node;
pub mod policy;
pub mod routes;
pub mod services;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

pub use node::NodeTable;
pub use policy::PolicyTable;
pub use routes::{Next, RouteTable};
pub use services::ServiceTable;

/// Every table, each behind its own atomic pointer.
struct Inner {
    node: ArcSwap<NodeTable>,
    routes: ArcSwap<RouteTable>,
    services: ArcSwap<ServiceTable>,
    policy: ArcSwap<PolicyTable>,
    /// Bumped on every publish of any table (for `stromctl tables`).
    generation: AtomicU64,
}

/// Shared handle to the current tables.
#[derive(Clone)]
pub struct TableHandle(Arc<Inner>);

/// One loop's snapshot of every table, held by a worker while it processes a batch.
pub struct Loaded {
    node: Guard<Arc<NodeTable>>,
    routes: Guard<Arc<RouteTable>>,
    services: Guard<Arc<ServiceTable>>,
    policy: Guard<Arc<PolicyTable>>,
}

impl Loaded {
    /// What the pipeline reads.
    #[inline]
    pub fn view(&self) -> View<'_> {
        View {
            node: &self.node,
            routes: &self.routes,
            services: &self.services,
            policy: &self.policy,
        }
    }
}

/// The tables as the pipeline reads them.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub node: &'a NodeTable,
    pub routes: &'a RouteTable,
    pub services: &'a ServiceTable,
    pub policy: &'a PolicyTable,
}

impl View<'_> {
    /// Where `dst` goes ([`RouteTable::route`]).
    #[inline]
    pub fn route(&self, dst: IpAddr) -> Option<&Next> {
        self.routes.route(dst, self.node.pod_cidr)
    }
}

/// Owned tables, for tests and benchmarks that run the pipeline without a reconciler.
#[derive(Debug, Clone)]
pub struct Tables {
    pub node: NodeTable,
    pub routes: RouteTable,
    pub services: ServiceTable,
    pub policy: PolicyTable,
}

impl Tables {
    pub fn view(&self) -> View<'_> {
        View {
            node: &self.node,
            routes: &self.routes,
            services: &self.services,
            policy: &self.policy,
        }
    }
}

impl TableHandle {
    /// Starts with a node table and no routes.
    pub fn new(node: NodeTable) -> Self {
        TableHandle(Arc::new(Inner {
            node: ArcSwap::from_pointee(node),
            routes: ArcSwap::from_pointee(RouteTable::default()),
            services: ArcSwap::from_pointee(ServiceTable::default()),
            policy: ArcSwap::from_pointee(PolicyTable::default()),
            generation: AtomicU64::new(0),
        }))
    }

    /// Loads every table (workers: once per loop).
    #[inline]
    pub fn load(&self) -> Loaded {
        Loaded {
            node: self.0.node.load(),
            routes: self.0.routes.load(),
            services: self.0.services.load(),
            policy: self.0.policy.load(),
        }
    }

    /// The current node table.
    pub fn node(&self) -> Arc<NodeTable> {
        self.0.node.load_full()
    }

    /// The current route table.
    pub fn routes(&self) -> Arc<RouteTable> {
        self.0.routes.load_full()
    }

    /// Publishes the next route table; returns the one it replaces, to be retired.
    pub fn publish_routes(&self, t: RouteTable) -> Arc<RouteTable> {
        self.0.generation.fetch_add(1, Ordering::Relaxed);
        self.0.routes.swap(Arc::new(t))
    }

    /// The current Service table.
    pub fn services(&self) -> Arc<ServiceTable> {
        self.0.services.load_full()
    }

    /// Publishes the next Service table; returns the one it replaces, to be retired.
    pub fn publish_services(&self, t: ServiceTable) -> Arc<ServiceTable> {
        self.0.generation.fetch_add(1, Ordering::Relaxed);
        self.0.services.swap(Arc::new(t))
    }

    /// The current policy table.
    pub fn policy(&self) -> Arc<PolicyTable> {
        self.0.policy.load_full()
    }

    /// Publishes the next policy table; returns the one it replaces, to be retired.
    pub fn publish_policy(&self, t: PolicyTable) -> Arc<PolicyTable> {
        self.0.generation.fetch_add(1, Ordering::Relaxed);
        self.0.policy.swap(Arc::new(t))
    }

    /// Publishes the next node table; returns the one it replaces, to be retired.
    pub fn publish_node(&self, t: NodeTable) -> Arc<NodeTable> {
        self.0.generation.fetch_add(1, Ordering::Relaxed);
        self.0.node.swap(Arc::new(t))
    }

    /// How many versions have been published.
    pub fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::Relaxed)
    }
}
