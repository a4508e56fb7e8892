//! This replica's counters (GetStats, and what it reports to the others) and its metrics:
//!
//! - `csp_collab_connections_active` (gauge): Join and Session streams open here (the seed's
//!   `csp_websocket_connections_active`);
//! - `csp_collab_sessions` (gauge): live sessions across the cluster;
//! - `csp_collab_joins_total`, `csp_collab_events_sent_total` (the seed's
//!   `csp_websocket_messages_total`), `csp_collab_presence_updates_total`,
//!   `csp_collab_presence_coalesced_total`, `csp_collab_resyncs_total`,
//!   `csp_collab_send_queue_dropped_total`, `csp_collab_malformed_entries_total` (counters);
//! - `csp_collab_fanout_latency_seconds` (histogram): from an event's append to the log to its
//!   hand-over to a client's stream.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// Seconds over which the event rate is averaged.
const WINDOW: usize = 60;

/// This replica's counters.
pub(crate) struct Stats {
    connections: AtomicI64,
    events_total: AtomicU64,
    /// Events sent per second, by second (`second % WINDOW`).
    seconds: Mutex<[(u64, u64); WINDOW]>,
}

/// What a replica reports to the others.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct Report {
    pub(crate) connections: i64,
    pub(crate) events_per_second: f64,
    pub(crate) events_total: u64,
}

fn now_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(crate) fn describe() {
    metrics::describe_gauge!(
        "csp_collab_connections_active",
        "Join and Session streams open on this replica"
    );
    // Present (at zero) before the first stream opens.
    metrics::gauge!("csp_collab_connections_active").increment(0.0);
    metrics::counter!("csp_collab_joins_total").increment(0);
    metrics::counter!("csp_collab_events_sent_total").increment(0);
    metrics::describe_gauge!("csp_collab_sessions", "Live collaboration sessions across the cluster");
    metrics::describe_counter!("csp_collab_joins_total", "Sessions joined or resumed through this replica");
    metrics::describe_counter!("csp_collab_events_sent_total", "Events sent to clients by this replica");
    metrics::describe_counter!(
        "csp_collab_presence_updates_total",
        "Presence updates received by this replica"
    );
    metrics::describe_counter!(
        "csp_collab_presence_coalesced_total",
        "Presence updates replaced by a later one of the same session before they went out"
    );
    metrics::describe_counter!(
        "csp_collab_resyncs_total",
        "Fresh snapshots sent to clients that fell behind"
    );
    metrics::describe_counter!(
        "csp_collab_send_queue_dropped_total",
        "Events dropped from the send queues of clients that fell behind (a resync replaced them)"
    );
    metrics::describe_counter!(
        "csp_collab_malformed_entries_total",
        "Entries of a session log or source stream that could not be read and were skipped"
    );
    metrics::describe_histogram!(
        "csp_collab_fanout_latency_seconds",
        metrics::Unit::Seconds,
        "Time from an event's append to the session log to its hand-over to a client stream"
    );
}

impl Stats {
    pub(crate) fn new() -> Self {
        Self {
            connections: AtomicI64::new(0),
            events_total: AtomicU64::new(0),
            seconds: Mutex::new([(0, 0); WINDOW]),
        }
    }

    /// A stream opened (+1) or closed (-1).
    pub(crate) fn connected(&self, delta: i64) {
        let now = self.connections.fetch_add(delta, Ordering::SeqCst) + delta;
        metrics::gauge!("csp_collab_connections_active").set(now as f64);
    }

    /// An event was handed to a client stream, `latency` after it entered the log.
    pub(crate) fn sent(&self, latency: Duration) {
        self.events_total.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("csp_collab_events_sent_total").increment(1);
        metrics::histogram!("csp_collab_fanout_latency_seconds").record(latency.as_secs_f64());
        let second = now_seconds();
        let mut seconds = self.seconds.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let slot = &mut seconds[(second % WINDOW as u64) as usize];
        if slot.0 != second {
            *slot = (second, 0);
        }
        slot.1 += 1;
    }

    /// Events dropped from a client's queue.
    pub(crate) fn dropped(&self, n: usize) {
        metrics::counter!("csp_collab_send_queue_dropped_total").increment(n as u64);
    }

    /// The counters now.
    pub(crate) fn report(&self) -> Report {
        let now = now_seconds();
        let seconds = *self.seconds.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // The last full minute: the current second is still filling.
        let sent: u64 = seconds
            .iter()
            .filter(|(second, _)| *second < now && now - *second <= WINDOW as u64)
            .map(|(_, n)| n)
            .sum();
        Report {
            connections: self.connections.load(Ordering::SeqCst),
            events_per_second: sent as f64 / WINDOW as f64,
            events_total: self.events_total.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_connections_and_events() {
        let stats = Stats::new();
        stats.connected(1);
        stats.connected(1);
        stats.connected(-1);
        for _ in 0..5 {
            stats.sent(Duration::from_millis(1));
        }
        let report = stats.report();
        assert_eq!((report.connections, report.events_total), (1, 5));
        assert!(report.events_per_second <= 5.0 / 60.0 + f64::EPSILON);
    }
}
