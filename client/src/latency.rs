//! A lock-free latency histogram for the client's own statistics
//! ([`crate::ProducerStats`]): microseconds in log-linear buckets, 16 per
//! power of two (a quantile is off by at most 1/16 of its value), from 1 µs to
//! ~71 minutes. Recording is three relaxed atomic adds; a snapshot can be
//! merged with others (several producers) and asked for quantiles.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Sub-buckets per power of two (2^`SUB_BITS`).
const SUB_BITS: u32 = 4;
const SUB: usize = 1 << SUB_BITS;
/// Powers of two covered: values up to 2^`OCTAVES` µs.
const OCTAVES: usize = 32;
/// Values below `SUB` µs get a bucket each; every octave above gets `SUB`.
const BUCKETS: usize = SUB + (OCTAVES - SUB_BITS as usize) * SUB;

/// Bucket of `us` microseconds.
fn bucket(us: u64) -> usize {
    if us < SUB as u64 {
        return us as usize;
    }
    let exponent = 63 - us.leading_zeros(); // ≥ SUB_BITS
    let sub = (us >> (exponent - SUB_BITS)) as usize & (SUB - 1);
    let index = SUB + (exponent - SUB_BITS) as usize * SUB + sub;
    index.min(BUCKETS - 1)
}

/// Largest value (µs) that falls in bucket `index`.
fn bucket_high(index: usize) -> u64 {
    if index < SUB {
        return index as u64;
    }
    let octave = ((index - SUB) / SUB) as u32;
    let sub = ((index - SUB) % SUB) as u64;
    let exponent = octave + SUB_BITS;
    let low = (1u64 << exponent) + (sub << (exponent - SUB_BITS));
    low + (1u64 << (exponent - SUB_BITS)) - 1
}

/// Latencies recorded from any thread.
#[derive(Debug)]
pub(crate) struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
    sum_us: AtomicU64,
    max_us: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    /// Records one latency.
    pub(crate) fn record(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket(us)].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
        self.max_us.fetch_max(us, Relaxed);
    }

    /// The counts so far.
    pub(crate) fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            sum_us: self.sum_us.load(Relaxed),
            max_us: self.max_us.load(Relaxed),
        }
    }
}

/// A latency histogram read at one moment (see [`crate::ProducerStats`]).
#[derive(Clone, PartialEq, Eq)]
pub struct LatencySnapshot {
    buckets: Vec<u64>,
    sum_us: u64,
    max_us: u64,
}

impl Default for LatencySnapshot {
    fn default() -> Self {
        LatencySnapshot {
            buckets: vec![0; BUCKETS],
            sum_us: 0,
            max_us: 0,
        }
    }
}

impl std::fmt::Debug for LatencySnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencySnapshot")
            .field("count", &self.count())
            .field("mean", &self.mean())
            .field("p50", &self.quantile(0.5))
            .field("p99", &self.quantile(0.99))
            .field("max", &self.max())
            .finish()
    }
}

impl LatencySnapshot {
    /// Latencies recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Their mean (zero when none).
    pub fn mean(&self) -> Duration {
        match self.count() {
            0 => Duration::ZERO,
            count => Duration::from_micros(self.sum_us / count),
        }
    }

    /// The largest.
    pub fn max(&self) -> Duration {
        Duration::from_micros(self.max_us)
    }

    /// The latency at or below which a fraction `q` (0..=1) of them lie: the top
    /// of that value's bucket, never above the largest seen; zero when none.
    pub fn quantile(&self, q: f64) -> Duration {
        let count = self.count();
        if count == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Duration::from_micros(bucket_high(index).min(self.max_us));
            }
        }
        self.max()
    }

    /// Adds `other`'s latencies to these.
    pub fn merge(&mut self, other: &LatencySnapshot) {
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            *mine += theirs;
        }
        self.sum_us += other.sum_us;
        self.max_us = self.max_us.max(other.max_us);
    }

    /// The latencies recorded since `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &LatencySnapshot) -> LatencySnapshot {
        LatencySnapshot {
            buckets: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .map(|(now, then)| now.saturating_sub(*then))
                .collect(),
            sum_us: self.sum_us.saturating_sub(earlier.sum_us),
            // The maximum cannot be taken apart: the largest in the window is at
            // most the top of the highest bucket that gained a value.
            max_us: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .rposition(|(now, then)| now > then)
                .map_or(0, |index| bucket_high(index).min(self.max_us)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_within_a_sixteenth() {
        let mut previous_high = None;
        for index in 0..BUCKETS {
            let high = bucket_high(index);
            if let Some(previous) = previous_high {
                assert_eq!(bucket(previous + 1), index, "value {}", previous + 1);
            }
            assert_eq!(bucket(high), index);
            previous_high = Some(high);
        }
        for us in [
            1u64,
            15,
            16,
            17,
            100,
            999,
            1_000,
            4_321,
            1_000_000,
            123_456_789,
        ] {
            let high = bucket_high(bucket(us));
            assert!(
                high >= us && (high - us) as f64 <= us as f64 / 16.0,
                "{us} → {high}"
            );
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_mean_max_merge_and_since() {
        let histogram = LatencyHistogram::default();
        assert_eq!(histogram.snapshot().quantile(0.99), Duration::ZERO);
        for us in 1..=1000u64 {
            histogram.record(Duration::from_micros(us));
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count(), 1000);
        assert_eq!(snapshot.mean(), Duration::from_micros(500));
        assert_eq!(snapshot.max(), Duration::from_micros(1000));
        let p50 = snapshot.quantile(0.5).as_micros() as f64;
        assert!((500.0..=500.0 * 17.0 / 16.0).contains(&p50), "p50 {p50}");
        let p99 = snapshot.quantile(0.99).as_micros() as f64;
        assert!((990.0..=1000.0).contains(&p99), "p99 {p99}");
        assert_eq!(snapshot.quantile(1.0), Duration::from_micros(1000));

        let before = histogram.snapshot();
        histogram.record(Duration::from_millis(50));
        let window = histogram.snapshot().since(&before);
        assert_eq!(window.count(), 1);
        assert_eq!(window.quantile(0.5), Duration::from_millis(50));

        let mut merged = snapshot.clone();
        merged.merge(&window);
        assert_eq!(merged.count(), 1001);
        assert_eq!(merged.max(), Duration::from_millis(50));
    }
}
