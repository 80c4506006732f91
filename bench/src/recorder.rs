//! Shared counters and latency histograms, with per-second intervals for the
//! progress line, the interval log and the chart.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use sluice_client::{Producer, ProducerStats};

/// Latency bounds recorded (1 µs .. 10 min), 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// One second of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Interval {
    /// Seconds since measurement started (end of the interval).
    pub t: f64,
    /// Records per second in the interval.
    pub records_per_sec: f64,
    /// Bytes per second.
    pub bytes_per_sec: f64,
    /// Mean latency, µs.
    pub latency_avg_us: f64,
    /// Max latency, µs.
    pub latency_max_us: u64,
    /// p99 latency, µs.
    pub latency_p99_us: u64,
    #[serde(skip)]
    pub histogram: Option<Histogram<u64>>,
}

struct Inner {
    total: Histogram<u64>,
    interval: Histogram<u64>,
    records: u64,
    bytes: u64,
    interval_records: u64,
    interval_bytes: u64,
    errors: u64,
    first_error: Option<String>,
    measuring: bool,
}

/// Records completions (a record acknowledged or consumed) with their latency.
pub struct Recorder {
    inner: Mutex<Inner>,
    /// The run's producers, for their request statistics.
    producers: Mutex<Vec<Arc<Producer>>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            inner: Mutex::new(Inner {
                total: histogram(),
                interval: histogram(),
                records: 0,
                bytes: 0,
                interval_records: 0,
                interval_bytes: 0,
                errors: 0,
                first_error: None,
                measuring: false,
            }),
            producers: Mutex::new(Vec::new()),
        }
    }
}

impl Recorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts counting (after the warm-up).
    pub fn start_measuring(&self) {
        let mut inner = self.lock();
        inner.measuring = true;
        inner.total.reset();
        inner.interval.reset();
        inner.records = 0;
        inner.bytes = 0;
        inner.interval_records = 0;
        inner.interval_bytes = 0;
    }

    /// Stops counting.
    pub fn stop_measuring(&self) {
        self.lock().measuring = false;
    }

    /// Adds a producer whose request statistics count in [`Recorder::producer_stats`].
    pub fn add_producer(&self, producer: Arc<Producer>) {
        self.producers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(producer);
    }

    /// The request statistics of every producer added so far, merged.
    pub fn producer_stats(&self) -> ProducerStats {
        let producers = self
            .producers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut total = ProducerStats::default();
        for producer in producers.iter() {
            total.merge(&producer.stats());
        }
        total
    }

    /// One record done, `latency` after it was due.
    pub fn record(&self, bytes: usize, latency: Duration) {
        self.record_many(1, bytes, latency);
    }

    /// `count` records done with the same latency.
    pub fn record_many(&self, count: u64, bytes: usize, latency: Duration) {
        let mut inner = self.lock();
        if !inner.measuring {
            return;
        }
        let micros = (latency.as_micros() as u64).clamp(1, 600_000_000);
        let _ = inner.total.record_n(micros, count);
        let _ = inner.interval.record_n(micros, count);
        inner.records += count;
        inner.bytes += bytes as u64;
        inner.interval_records += count;
        inner.interval_bytes += bytes as u64;
    }

    /// An error (a failed delivery or fetch).
    pub fn error(&self, message: String) {
        let mut inner = self.lock();
        inner.errors += 1;
        inner.first_error.get_or_insert(message);
    }

    /// Closes the current interval.
    pub fn take_interval(&self, t: f64, seconds: f64) -> Interval {
        let mut inner = self.lock();
        let h = std::mem::replace(&mut inner.interval, histogram());
        let interval = Interval {
            t,
            records_per_sec: inner.interval_records as f64 / seconds,
            bytes_per_sec: inner.interval_bytes as f64 / seconds,
            latency_avg_us: if h.is_empty() { 0.0 } else { h.mean() },
            latency_max_us: h.max(),
            latency_p99_us: h.value_at_quantile(0.99),
            histogram: Some(h),
        };
        inner.interval_records = 0;
        inner.interval_bytes = 0;
        interval
    }

    /// Totals: (records, bytes, errors, first error, latency histogram).
    pub fn totals(&self) -> (u64, u64, u64, Option<String>, Histogram<u64>) {
        let inner = self.lock();
        (
            inner.records,
            inner.bytes,
            inner.errors,
            inner.first_error.clone(),
            inner.total.clone(),
        )
    }
}

/// Prints a progress line every second and collects intervals for `duration`, or
/// until `target_records` records were counted.
pub async fn progress(
    recorder: &Recorder,
    started: Instant,
    duration: Duration,
    label: &str,
    tty: bool,
    target_records: Option<u64>,
) -> Vec<Interval> {
    let mut intervals = Vec::new();
    let mut last = Instant::now();
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    while started.elapsed() < duration {
        ticker.tick().await;
        let now = Instant::now();
        let seconds = now.duration_since(last).as_secs_f64();
        last = now;
        let interval = recorder.take_interval(started.elapsed().as_secs_f64(), seconds);
        let line = format!(
            "{label}: {:>10.0} records/sec ({:>8.2} MB/sec), {:>8.1} ms avg latency, {:>8.1} ms max latency",
            interval.records_per_sec,
            interval.bytes_per_sec / 1e6,
            interval.latency_avg_us / 1000.0,
            interval.latency_max_us as f64 / 1000.0
        );
        if tty {
            let done = (started.elapsed().as_secs_f64() / duration.as_secs_f64()).min(1.0);
            let filled = (done * 20.0) as usize;
            eprint!(
                "\r[{}{}] {line}",
                "#".repeat(filled),
                " ".repeat(20 - filled)
            );
        } else {
            println!("{line}");
        }
        intervals.push(interval);
        if target_records.is_some_and(|target| recorder.totals().0 >= target) {
            break;
        }
    }
    if tty {
        eprintln!();
    }
    intervals
}
