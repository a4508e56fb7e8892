//! Per-node counters and processing-time histograms, updated once per batch.
//!
//! Processing time is measured per batch and recorded as the batch's mean per message, weighted
//! by its size: exact when messages move one at a time (low load), a close estimate under load,
//! at the cost of two clock reads per batch instead of per message.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use csp_proto::executor::v1 as pb;

/// Sub-buckets per power of two: buckets are about 9% wide.
const SUB: u32 = 8;
const BUCKETS: usize = 64 * SUB as usize;

/// One node's metrics.
#[derive(Debug)]
pub(crate) struct NodeStats {
    pub(crate) messages_in: AtomicU64,
    pub(crate) messages_out: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) retries: AtomicU64,
    total_ns: AtomicU64,
    max_ns: AtomicU64,
    histogram: Box<[AtomicU64]>,
}

impl Default for NodeStats {
    fn default() -> Self {
        Self {
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            total_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
            histogram: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bucket(ns: u64) -> usize {
    if ns < SUB as u64 {
        return ns as usize;
    }
    let power = 63 - ns.leading_zeros();
    let shift = power.saturating_sub(SUB.trailing_zeros());
    let sub = ((ns >> shift) as u32) & (SUB - 1);
    ((power - SUB.trailing_zeros() + 1) * SUB + sub) as usize
}

/// The smallest value of a bucket.
fn bucket_floor(index: usize) -> u64 {
    let index = index as u32;
    if index < SUB {
        return index as u64;
    }
    let power = index / SUB - 1 + SUB.trailing_zeros();
    let sub = index % SUB;
    (1u64 << power) + ((sub as u64) << (power - SUB.trailing_zeros()))
}

impl NodeStats {
    /// Records a timed batch that stands for `weight` batches like it: the total time is
    /// scaled, the distribution is not (a uniform sample has the same quantiles).
    pub(crate) fn record_sample(&self, count: u64, elapsed_ns: u64, weight: u64) {
        self.record(count, elapsed_ns);
        self.total_ns.fetch_add(elapsed_ns * weight.saturating_sub(1), Relaxed);
    }

    /// Records `count` messages processed in `elapsed_ns` in total.
    pub(crate) fn record(&self, count: u64, elapsed_ns: u64) {
        if count == 0 {
            return;
        }
        self.total_ns.fetch_add(elapsed_ns, Relaxed);
        let mean = elapsed_ns / count;
        self.max_ns.fetch_max(mean, Relaxed);
        self.histogram[bucket(mean).min(BUCKETS - 1)].fetch_add(count, Relaxed);
    }

    fn quantile(&self, q: f64) -> f64 {
        let counts: Vec<u64> = self.histogram.iter().map(|c| c.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                // The middle of the bucket.
                let low = bucket_floor(i) as f64;
                let high = bucket_floor(i + 1) as f64;
                return (low + high) / 2.0 / 1000.0;
            }
        }
        0.0
    }

    /// As the API reports them.
    pub(crate) fn to_pb(&self) -> pb::NodeMetrics {
        pb::NodeMetrics {
            messages_in: self.messages_in.load(Relaxed) as i64,
            messages_out: self.messages_out.load(Relaxed) as i64,
            errors: self.errors.load(Relaxed) as i64,
            retries: self.retries.load(Relaxed) as i64,
            processing_p50_us: self.quantile(0.5),
            processing_p99_us: self.quantile(0.99),
            processing_max_us: self.max_ns.load(Relaxed) as f64 / 1000.0,
            processing_total_us: self.total_ns.load(Relaxed) as f64 / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_narrow() {
        let mut last = 0;
        for ns in [1u64, 7, 8, 9, 15, 16, 100, 1_000, 12_345, 1_000_000, 987_654_321] {
            let b = bucket(ns);
            assert!(b >= last, "{ns}");
            last = b;
            assert!(
                bucket_floor(b) <= ns && ns < bucket_floor(b + 1),
                "{ns} in [{}, {})",
                bucket_floor(b),
                bucket_floor(b + 1)
            );
            let width = bucket_floor(b + 1) - bucket_floor(b);
            assert!(ns < 16 || width * 8 <= bucket_floor(b) + 1, "{ns}: width {width}");
        }
    }

    #[test]
    fn quantiles_come_from_the_histogram() {
        let stats = NodeStats::default();
        stats.record(99, 99 * 1_000);
        stats.record(1, 1_000_000);
        let m = stats.to_pb();
        assert!((m.processing_p50_us - 1.0).abs() < 0.1, "{m:?}");
        assert!(m.processing_p99_us < 1.1, "99 of 100 took 1 µs: {m:?}");
        assert!((m.processing_max_us - 1000.0).abs() < 1e-9);
    }
}
