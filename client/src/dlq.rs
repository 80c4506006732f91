//! Retries with backoff, then a dead-letter topic.
//!
//! [`process_with_retry`] runs an async handler on a consumed record up to
//! [`RetryPolicy::max_attempts`] times, waiting an exponentially growing,
//! jittered backoff between attempts. If the last attempt fails too, the record
//! is produced (same key, value and headers) to the dead-letter topic —
//! `<topic>.DLQ` unless another is given — with these headers added:
//!
//! | header                 | value                                   |
//! |------------------------|-----------------------------------------|
//! | `dlq.error`            | the last error (at most 1 KiB of text)  |
//! | `dlq.attempts`         | attempts made, in decimal               |
//! | `dlq.source.topic`     | the record's topic                      |
//! | `dlq.source.partition` | its partition, in decimal               |
//! | `dlq.source.offset`    | its offset, in decimal                  |
//!
//! It returns once the dead-letter record is acknowledged, so committing the
//! record's offset afterwards never loses it.
//!
//! ```no_run
//! # async fn demo(producer: &sluice_client::Producer, record: sluice_client::ConsumerRecord) -> sluice_client::Result<()> {
//! use sluice_client::dlq::{process_with_retry, RetryPolicy};
//! let outcome = process_with_retry(producer, &record, &RetryPolicy::default(), None, |record| async move {
//!     match record.value.as_deref() {
//!         Some(b"") | None => Err("empty order"),
//!         Some(_) => Ok(()),
//!     }
//! })
//! .await?;
//! println!("handled: {}", outcome.is_handled());
//! # Ok(()) }
//! ```

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use crate::consumer::ConsumerRecord;
use crate::error::Result;
use crate::producer::{Producer, ProducerRecord, RecordMetadata};

/// Header with the last error.
pub const HEADER_ERROR: &str = "dlq.error";
/// Header with the number of attempts.
pub const HEADER_ATTEMPTS: &str = "dlq.attempts";
/// Header with the source topic.
pub const HEADER_SOURCE_TOPIC: &str = "dlq.source.topic";
/// Header with the source partition.
pub const HEADER_SOURCE_PARTITION: &str = "dlq.source.partition";
/// Header with the source offset.
pub const HEADER_SOURCE_OFFSET: &str = "dlq.source.offset";
/// Bytes of error text kept in [`HEADER_ERROR`].
pub const ERROR_TEXT_BYTES_MAX: usize = 1024;

/// How often and how patiently a record is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total (at least 1).
    pub max_attempts: u32,
    /// Wait after the first failure; doubles per further failure.
    pub backoff: Duration,
    /// Longest wait.
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// `max_attempts` attempts, waiting `backoff`, then twice that, ... (at most
    /// 100 × `backoff`).
    pub fn new(max_attempts: u32, backoff: Duration) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            backoff,
            backoff_max: backoff.saturating_mul(100),
        }
    }

    /// The wait after `failures` failed attempts (1 = after the first):
    /// `backoff × 2^(failures − 1)`, at most `backoff_max`, times a random
    /// factor in [0.8, 1.2).
    pub fn delay(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(20);
        let base = self
            .backoff
            .saturating_mul(1 << exponent)
            .min(self.backoff_max);
        base.mul_f64(0.8 + 0.4 * rand::random::<f64>())
    }
}

/// What became of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed {
    /// The handler succeeded.
    Handled {
        /// Attempts it took.
        attempts: u32,
    },
    /// Every attempt failed; the record went to the dead-letter topic.
    DeadLettered {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        error: String,
        /// Where the dead-letter record was stored.
        stored: RecordMetadata,
    },
}

impl Processed {
    /// `true` when the handler succeeded.
    pub fn is_handled(&self) -> bool {
        matches!(self, Processed::Handled { .. })
    }
}

/// The default dead-letter topic of `topic`: `<topic>.DLQ`.
pub fn dlq_topic(topic: &str) -> String {
    format!("{topic}.DLQ")
}

/// The dead-letter copy of `record` for `dlq_topic`: same key, value and
/// headers (earlier `dlq.*` headers replaced) plus the `dlq.*` headers.
pub fn dead_letter_record(
    record: &ConsumerRecord,
    dlq_topic: &str,
    error: &str,
    attempts: u32,
) -> ProducerRecord {
    let added = [
        HEADER_ERROR,
        HEADER_ATTEMPTS,
        HEADER_SOURCE_TOPIC,
        HEADER_SOURCE_PARTITION,
        HEADER_SOURCE_OFFSET,
    ];
    let mut headers: Vec<_> = record
        .headers
        .iter()
        .filter(|(key, _)| !added.contains(&key.as_str()))
        .cloned()
        .collect();
    let text = |value: String| Some(Bytes::from(value));
    headers.push((HEADER_ERROR.into(), text(truncate(error).to_owned())));
    headers.push((HEADER_ATTEMPTS.into(), text(attempts.to_string())));
    headers.push((HEADER_SOURCE_TOPIC.into(), text(record.topic.to_string())));
    headers.push((
        HEADER_SOURCE_PARTITION.into(),
        text(record.partition.to_string()),
    ));
    headers.push((HEADER_SOURCE_OFFSET.into(), text(record.offset.to_string())));
    ProducerRecord {
        topic: dlq_topic.into(),
        partition: None,
        key: record.key.clone(),
        value: record.value.clone(),
        headers,
        timestamp_ms: None,
    }
}

fn truncate(text: &str) -> &str {
    if text.len() <= ERROR_TEXT_BYTES_MAX {
        return text;
    }
    let mut end = ERROR_TEXT_BYTES_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Runs `handler` on `record` up to `policy.max_attempts` times (with backoff in
/// between); if every attempt fails, produces the record to `dlq_topic`
/// (default `<topic>.DLQ`) and waits for its acknowledgement. `Err` only when
/// dead-lettering failed (then the record is neither handled nor stored: do not
/// commit past it).
pub async fn process_with_retry<F, Fut, E>(
    producer: &Producer,
    record: &ConsumerRecord,
    policy: &RetryPolicy,
    dlq_topic: Option<&str>,
    mut handler: F,
) -> Result<Processed>
where
    F: FnMut(ConsumerRecord) -> Fut,
    Fut: Future<Output = std::result::Result<(), E>>,
    E: Display,
{
    let max_attempts = policy.max_attempts.max(1);
    let mut attempts = 0;
    let last_error = loop {
        attempts += 1;
        match handler(record.clone()).await {
            Ok(()) => return Ok(Processed::Handled { attempts }),
            Err(error) if attempts >= max_attempts => break error.to_string(),
            Err(error) => {
                tracing::debug!(
                    topic = %record.topic, partition = record.partition, offset = record.offset,
                    attempts, %error, "handler failed; retrying"
                );
                tokio::time::sleep(policy.delay(attempts)).await;
            }
        }
    };
    let topic = dlq_topic.map_or_else(|| self::dlq_topic(&record.topic), str::to_owned);
    tracing::warn!(
        topic = %record.topic, partition = record.partition, offset = record.offset,
        attempts, error = %last_error, dlq = %topic, "dead-lettering a record"
    );
    let copy = dead_letter_record(record, &topic, &last_error, attempts);
    let stored = producer.send(copy).await?.await?;
    Ok(Processed::DeadLettered {
        attempts,
        error: last_error,
        stored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn record() -> ConsumerRecord {
        ConsumerRecord {
            topic: Arc::from("orders"),
            partition: 2,
            offset: 41,
            timestamp_ms: 5,
            key: Some(Bytes::from_static(b"alice")),
            value: Some(Bytes::from_static(b"amount=-3")),
            headers: vec![
                ("trace".into(), Some(Bytes::from_static(b"t-1"))),
                (HEADER_ATTEMPTS.into(), Some(Bytes::from_static(b"9"))),
            ],
        }
    }

    fn header<'a>(record: &'a ProducerRecord, key: &str) -> Vec<&'a [u8]> {
        record
            .headers
            .iter()
            .filter(|(k, _)| k == key)
            .filter_map(|(_, v)| v.as_deref())
            .collect()
    }

    #[test]
    fn dead_letter_copy_keeps_the_record_and_adds_headers() {
        let copy = dead_letter_record(&record(), &dlq_topic("orders"), "bad amount", 3);
        assert_eq!(&*copy.topic, "orders.DLQ");
        assert_eq!(copy.key.as_deref(), Some(&b"alice"[..]));
        assert_eq!(copy.value.as_deref(), Some(&b"amount=-3"[..]));
        assert_eq!(header(&copy, "trace"), vec![&b"t-1"[..]]);
        assert_eq!(header(&copy, HEADER_ERROR), vec![&b"bad amount"[..]]);
        assert_eq!(
            header(&copy, HEADER_ATTEMPTS),
            vec![&b"3"[..]],
            "old one replaced"
        );
        assert_eq!(header(&copy, HEADER_SOURCE_TOPIC), vec![&b"orders"[..]]);
        assert_eq!(header(&copy, HEADER_SOURCE_PARTITION), vec![&b"2"[..]]);
        assert_eq!(header(&copy, HEADER_SOURCE_OFFSET), vec![&b"41"[..]]);
        assert_eq!(copy.partition, None);
    }

    #[test]
    fn long_errors_are_cut_at_a_char_boundary() {
        let text = "é".repeat(ERROR_TEXT_BYTES_MAX);
        let cut = truncate(&text);
        assert!(cut.len() <= ERROR_TEXT_BYTES_MAX && cut.len() >= ERROR_TEXT_BYTES_MAX - 1);
        assert_eq!(truncate("short"), "short");
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let policy = RetryPolicy {
            max_attempts: 5,
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_millis(350),
        };
        let first = policy.delay(1);
        assert!(first >= Duration::from_millis(80) && first < Duration::from_millis(120));
        let second = policy.delay(2);
        assert!(second >= Duration::from_millis(160) && second < Duration::from_millis(240));
        let capped = policy.delay(10);
        assert!(capped >= Duration::from_millis(280) && capped < Duration::from_millis(420));
        assert_eq!(
            RetryPolicy::new(2, Duration::from_millis(1)).backoff_max,
            Duration::from_millis(100)
        );
    }
}
