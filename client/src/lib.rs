//! # sluice-client
//!
//! A client for the Sluice broker, in two layers:
//!
//! * a **sans-I/O protocol core** with no runtime dependency: [`frame`] (length
//!   prefixed frames), [`request`] / [`response`] (the flatbuffers envelopes as
//!   owned Rust types), [`batch`] (record batch encoding and verified decoding),
//!   [`partitioner`] (Kafka-compatible murmur2) and [`error`];
//! * an **async client on tokio**: [`Client`] (connections, shard routing, admin
//!   and consumer-group requests), [`Producer`] (batching, pipelining, retries,
//!   backpressure, idempotence), [`Consumer`] (assigned partitions, long-poll
//!   prefetching, a `Stream` of records), [`GroupConsumer`] (a consumer-group
//!   member: heartbeats, cooperative rebalances, committed offsets) and the
//!   [`dlq`] helper (retries with backoff, then a dead-letter topic).
//!
//! ```no_run
//! # async fn demo() -> sluice_client::Result<()> {
//! use sluice_client::{Client, ClientConfig, Producer, ProducerConfig, ProducerRecord};
//! let client = Client::connect(ClientConfig::new(["127.0.0.1:9440"])).await?;
//! client.create_topic("events", 3, vec![]).await?;
//! let producer = Producer::new(client.clone(), ProducerConfig::default());
//! let delivery = producer.send(ProducerRecord::new("events", "hello")).await?;
//! let metadata = delivery.await?;
//! println!("stored at {}/{:?}", metadata.partition, metadata.offset);
//! producer.close().await?;
//! # Ok(()) }
//! ```
//!
//! Wire format: `docs/protocol.md`.

#![deny(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod batch;
pub mod error;
pub mod frame;
pub mod partitioner;
pub mod request;
pub mod response;
pub mod varint;

pub mod dlq;

mod client;
mod connection;
mod consumer;
mod group;
mod groups;
mod latency;
mod producer;

pub use batch::Compression;
pub use client::{Client, ClientConfig, ListedOffset, Target, TopicRoute};
pub use consumer::{Consumer, ConsumerConfig, ConsumerRecord, ConsumerStats, FetchedBatch, SeekTo};
pub use dlq::{process_with_retry, Processed, RetryPolicy};
pub use error::{Code, Error, Result};
pub use group::{AutoOffsetReset, GroupConsumer, GroupConsumerBuilder, RebalanceHook};
pub use groups::{ProducerIdentity, TopicPartition};
pub use latency::LatencySnapshot;
pub use partitioner::NullKeyPolicy;
pub use producer::{
    Acks, DeliveryFuture, Producer, ProducerConfig, ProducerRecord, ProducerStats, RecordMetadata,
    IDEMPOTENT_BATCHES_IN_FLIGHT_MAX,
};
pub use request::{OffsetQuery, TopicPartitions};

/// Entry points of the fuzz targets in `fuzz/` (also replayed over the committed
/// corpus by `cargo test`).
#[doc(hidden)]
pub mod fuzzing {
    /// The consumer's decoder: batches back to back, then every record of each.
    pub fn record_decoder(data: &[u8]) {
        let batches = crate::batch::BatchIter::new(bytes::Bytes::copy_from_slice(data));
        for batch in batches {
            let Ok(batch) = batch else {
                return;
            };
            for record in batch.records() {
                if record.is_err() {
                    break;
                }
            }
        }
    }
}
