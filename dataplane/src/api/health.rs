//! Readiness: stromd is ready only while every worker's loop is moving.
//!
//! A worker stores a heartbeat (the monotonic clock, in ms) in its upkeep: every 100 ms when
//! busy (however long its loops take), and at least once a second when it sleeps (its poll
//! times out after a second). A worker whose heartbeat is older than [`STUCK_AFTER_MS`] is
//! stuck (spinning outside its loop, blocked, or stopped by a debugger); one whose thread
//! ended, by a panic or otherwise, is dead. Either makes `status` not-ready with the reason, and CNI STATUS
//! reports it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::stats::monotonic_ms;
use crate::worker::WorkerShared;

/// How old a worker's heartbeat may be: a sleeping worker renews it once a second.
pub const STUCK_AFTER_MS: u64 = 3000;

/// Why the workers are not all moving, if they are not.
pub fn not_ready(workers: &[Arc<WorkerShared>]) -> Option<String> {
    let now = monotonic_ms();
    let reasons: Vec<String> = workers
        .iter()
        .filter_map(|w| {
            worker_problem(
                w.counters.ended.get().map(String::as_str),
                w.counters.heartbeat_ms.load(Ordering::Relaxed),
                now,
            )
            .map(|p| format!("worker {} {p}", w.id))
        })
        .collect();
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

/// What is wrong with one worker: its thread ended (`ended`), it never started (heartbeat
/// 0), or its heartbeat is older than `STUCK_AFTER_MS` at `now`.
fn worker_problem(ended: Option<&str>, heartbeat: u64, now: u64) -> Option<String> {
    if let Some(how) = ended {
        return Some(format!("ended ({how})"));
    }
    if heartbeat == 0 {
        return Some("has not started".into());
    }
    let age = now.saturating_sub(heartbeat);
    (age > STUCK_AFTER_MS).then(|| format!("has not moved for {:.1} s", age as f64 / 1e3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_is_ready_while_its_heartbeat_is_recent() {
        assert_eq!(worker_problem(None, 10_000, 12_000), None);
        assert_eq!(
            worker_problem(None, 10_000, 14_500),
            Some("has not moved for 4.5 s".into())
        );
        assert_eq!(worker_problem(None, 0, 5), Some("has not started".into()));
        assert_eq!(
            worker_problem(Some("panicked: boom"), 10_000, 10_001),
            Some("ended (panicked: boom)".into())
        );
    }
}
