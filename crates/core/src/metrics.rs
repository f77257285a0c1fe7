//! The instruments `stats()` and the Prometheus collectors read (issue 31): counters and latency histograms
//! that the write path updates without a lock or an allocation. Each is a few relaxed atomics; a snapshot reads
//! them one by one, so it is consistent per instrument, not across instruments.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A count that only grows.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Buckets of a [`Histogram`]: bucket `i` counts samples in `[2^(i-1), 2^i)` nanoseconds (bucket 0: under 1 ns),
/// so 2^63 ns (292 years) is the last bound.
const BUCKETS: usize = 64;

/// A latency histogram with power-of-two buckets, in nanoseconds: recording is three relaxed atomic adds.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram { buckets: std::array::from_fn(|_| AtomicU64::new(0)), count: AtomicU64::new(0), sum_ns: AtomicU64::new(0) }
    }
}

impl Histogram {
    /// Records one sample.
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let bucket = (u64::BITS - ns.leading_zeros()) as usize;
        self.buckets[bucket.min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// What it holds now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let last = counts.iter().rposition(|&c| c > 0).map_or(0, |i| i + 1);
        HistogramSnapshot {
            count: self.count.load(Ordering::Relaxed),
            sum: Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed)),
            buckets: counts[..last].iter().enumerate().map(|(i, &c)| (upper_bound(i), c)).collect(),
        }
    }
}

/// The exclusive upper bound of bucket `i`.
fn upper_bound(i: usize) -> Duration {
    Duration::from_nanos(1u64.checked_shl(i as u32).unwrap_or(u64::MAX))
}

/// A histogram as read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Samples recorded.
    pub count: u64,
    /// Their sum.
    pub sum: Duration,
    /// Each bucket's exclusive upper bound and its samples (not cumulative), up to the last one with any.
    pub buckets: Vec<(Duration, u64)>,
}

impl HistogramSnapshot {
    /// The upper bound of the bucket that holds the `q` quantile (`0.0..=1.0`): at most twice the true value.
    /// `None` without samples.
    pub fn quantile_bound(&self, q: f64) -> Option<Duration> {
        let total: u64 = self.buckets.iter().map(|(_, c)| c).sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        self.buckets.iter().find(|(_, c)| {
            seen += c;
            seen >= rank
        })
        .map(|(bound, _)| *bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn samples_land_in_their_power_of_two_bucket() {
        let h = Histogram::default();
        for ns in [0u64, 1, 2, 3, 4, 1023, 1024, 1_000_000] {
            h.record(Duration::from_nanos(ns));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 8);
        assert_eq!(s.sum, Duration::from_nanos(1 + 2 + 3 + 4 + 1023 + 1024 + 1_000_000));
        let at = |bound_ns: u64| s.buckets.iter().find(|(b, _)| *b == Duration::from_nanos(bound_ns)).map_or(0, |(_, c)| *c);
        // [0, 1): 0; [1, 2): 1; [2, 4): 2 and 3; [4, 8): 4; [512, 1024): 1023; [1024, 2048): 1024; 1 ms: [2^19, 2^20).
        assert_eq!((at(1), at(2), at(4), at(8), at(1024), at(2048), at(1 << 20)), (1, 1, 2, 1, 1, 1, 1));
        assert_eq!(s.buckets.last().unwrap().0, Duration::from_nanos(1 << 20), "nothing past the last sample");
        // A duration past u64 nanoseconds goes to the last bucket.
        h.record(Duration::MAX);
        assert_eq!(h.snapshot().buckets.len(), BUCKETS);
    }

    #[test]
    fn quantiles_are_bounded_by_their_bucket() {
        let h = Histogram::default();
        assert_eq!(h.snapshot().quantile_bound(0.5), None);
        for _ in 0..99 {
            h.record(Duration::from_micros(10));
        }
        h.record(Duration::from_millis(5));
        let s = h.snapshot();
        // 10 µs is in [8.192, 16.384) µs; 5 ms in [4.194, 8.389) ms.
        assert_eq!(s.quantile_bound(0.5), Some(Duration::from_nanos(16_384)));
        assert_eq!(s.quantile_bound(0.99), Some(Duration::from_nanos(16_384)));
        assert_eq!(s.quantile_bound(1.0), Some(Duration::from_nanos(1 << 23)));
    }

    #[test]
    fn counts_from_many_threads_add_up_exactly() {
        let (c, h) = (Arc::new(Counter::default()), Arc::new(Histogram::default()));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (c, h) = (c.clone(), h.clone());
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        c.add(3);
                        h.record(Duration::from_nanos(i));
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(c.get(), 4 * 10_000 * 3);
        let s = h.snapshot();
        assert_eq!(s.count, 40_000);
        assert_eq!(s.buckets.iter().map(|(_, n)| n).sum::<u64>(), 40_000);
        assert_eq!(s.sum, Duration::from_nanos(4 * (0..10_000u64).sum::<u64>()));
    }
}
