//! `sluice produce TOPIC`: one record per stdin line.
//!
//! With `--ack-log FILE`, a line `partition offset key value` is appended to FILE
//! (and flushed) as each record's acknowledgement arrives, in input order; a null
//! key is written as an empty field. `--ack-log` needs acknowledgements, so it is
//! refused with `--acks 0`.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use bytes::Bytes;
use clap::Args;
use sluice_client::{Acks, Compression, DeliveryFuture, Producer, ProducerConfig, ProducerRecord};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::{connect, CliResult};

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Topic to produce to.
    topic: String,
    /// Split each line at the first SEP into key and value (no SEP: null key).
    #[arg(long, value_name = "SEP")]
    key_separator: Option<String>,
    /// Acknowledgements: 0 (none), 1 (leader) or all.
    #[arg(long, default_value = "all", value_parser = parse_acks)]
    acks: Acks,
    /// Send every record to this partition.
    #[arg(long)]
    partition: Option<u32>,
    /// Append `partition offset key value` per acknowledged record to FILE.
    #[arg(long, value_name = "FILE")]
    ack_log: Option<PathBuf>,
    /// Batch linger in milliseconds.
    #[arg(long, default_value_t = 1)]
    linger_ms: u64,
    /// Give up on a record not acknowledged within this many milliseconds
    /// (retries included).
    #[arg(long, default_value_t = 120_000)]
    delivery_timeout_ms: u64,
    /// Compress each batch: none, snappy, lz4 or zstd.
    #[arg(long, default_value = "none")]
    compression: Compression,
}

fn parse_acks(text: &str) -> Result<Acks, String> {
    match text {
        "0" => Ok(Acks::None),
        "1" => Ok(Acks::Leader),
        "all" | "-1" => Ok(Acks::All),
        other => Err(format!("expected 0, 1 or all, got {other:?}")),
    }
}

struct Pending {
    delivery: DeliveryFuture,
    key: Option<Bytes>,
    value: Bytes,
}

#[derive(Default)]
struct AckSummary {
    acknowledged: u64,
    failed: u64,
    first_error: Option<String>,
}

pub async fn run(brokers: &[String], args: ProduceArgs) -> CliResult {
    if args.ack_log.is_some() && args.acks == Acks::None {
        return Err(
            "--ack-log needs acknowledgements, but --acks 0 gets none; use --acks 1 or all".into(),
        );
    }
    let ack_log = match &args.ack_log {
        Some(path) => Some(
            File::create(path)
                .map_err(|error| format!("cannot create {}: {error}", path.display()))?,
        ),
        None => None,
    };
    let client = connect(brokers).await?;
    client.topic_route(&args.topic, true).await?;
    let config = ProducerConfig {
        acks: args.acks,
        linger: std::time::Duration::from_millis(args.linger_ms),
        delivery_timeout: std::time::Duration::from_millis(args.delivery_timeout_ms.max(1)),
        compression: args.compression,
        ..ProducerConfig::default()
    };
    let producer = Producer::new(client, config);
    let (pending_tx, pending_rx) = mpsc::unbounded_channel();
    let acks = tokio::spawn(track_acks(pending_rx, ack_log));
    let sent = read_and_send(&producer, &args, pending_tx).await;
    let closed = producer.close().await;
    let summary = acks
        .await
        .map_err(|error| format!("ack tracking failed: {error}"))??;
    let sent = sent?;
    closed?;
    if summary.failed > 0 {
        let first = summary.first_error.unwrap_or_default();
        return Err(format!(
            "{} of {sent} records failed; first error: {first}",
            summary.failed
        )
        .into());
    }
    debug_assert_eq!(summary.acknowledged, sent);
    Ok(())
}

async fn read_and_send(
    producer: &Producer,
    args: &ProduceArgs,
    pending: mpsc::UnboundedSender<Pending>,
) -> CliResult<u64> {
    let topic: std::sync::Arc<str> = args.topic.as_str().into();
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut line = Vec::new();
    let mut sent = 0;
    loop {
        line.clear();
        if stdin.read_until(b'\n', &mut line).await? == 0 {
            return Ok(sent);
        }
        let (key, value) = split_line(strip_newline(&line), args.key_separator.as_deref());
        let record = ProducerRecord {
            topic: topic.clone(),
            partition: args.partition,
            key: key.clone(),
            value: Some(value.clone()),
            ..ProducerRecord::default()
        };
        let delivery = producer.send(record).await?;
        sent += 1;
        if sent % 256 == 0 {
            // Buffered stdin is always ready under a steady stream: let the
            // producer's tasks and the ack tracker run on this one-thread runtime.
            tokio::task::yield_now().await;
        }
        pending.send(Pending {
            delivery,
            key,
            value,
        })?;
    }
}

fn strip_newline(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn split_line(line: &[u8], separator: Option<&str>) -> (Option<Bytes>, Bytes) {
    let Some(separator) = separator
        .map(str::as_bytes)
        .filter(|separator| !separator.is_empty())
    else {
        return (None, Bytes::copy_from_slice(line));
    };
    match line
        .windows(separator.len())
        .position(|window| window == separator)
    {
        Some(at) => (
            Some(Bytes::copy_from_slice(&line[..at])),
            Bytes::copy_from_slice(&line[at + separator.len()..]),
        ),
        None => (None, Bytes::copy_from_slice(line)),
    }
}

async fn track_acks(
    mut pending: mpsc::UnboundedReceiver<Pending>,
    mut ack_log: Option<File>,
) -> CliResult<AckSummary> {
    let mut summary = AckSummary::default();
    while let Some(record) = pending.recv().await {
        match record.delivery.await {
            Ok(metadata) => {
                summary.acknowledged += 1;
                if let (Some(file), Some(offset)) = (ack_log.as_mut(), metadata.offset) {
                    let mut line = format!("{} {offset} ", metadata.partition).into_bytes();
                    line.extend_from_slice(record.key.as_deref().unwrap_or_default());
                    line.push(b' ');
                    line.extend_from_slice(&record.value);
                    line.push(b'\n');
                    file.write_all(&line)?;
                    file.flush()?;
                }
            }
            Err(error) => {
                summary.failed += 1;
                summary.first_error.get_or_insert_with(|| error.to_string());
            }
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_first_separator() {
        let (key, value) = split_line(b"k:v:w", Some(":"));
        assert_eq!(key.as_deref(), Some(&b"k"[..]));
        assert_eq!(&value[..], b"v:w");
        let (key, value) = split_line(b"novalue", Some("::"));
        assert_eq!(key, None);
        assert_eq!(&value[..], b"novalue");
        assert_eq!(strip_newline(b"a\r\n"), b"a");
    }
}
