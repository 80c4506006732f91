//! `sluice consume TOPIC`: print records.
//!
//! `--format` takes a template with `%t` topic, `%p` partition, `%o` offset,
//! `%k` key, `%v` value, `%T` timestamp (ms), `%%`, and the escapes `\n`, `\t`,
//! `\\`. The default prints the value and a newline. With the global
//! `--format json` (and no template) each record is a JSON line.
//!
//! `--exit-at-end` stops once every assigned partition has been read up to the
//! high watermark it had when the command started ("end of log" = the offset the
//! next record would have got at start).
//!
//! `--group G` consumes as a member of consumer group G instead: the group
//! assigns the partitions (so `--partition`, `--offset` and `--exit-at-end` do
//! not apply), each starts at the group's committed offset (or
//! `--auto-offset-reset` when none), and the positions of the printed records
//! are committed every 5 s. It runs until stopped: on SIGINT or SIGTERM (or after
//! `--max-messages`) it commits what it printed, leaves the group and exits 0.

use std::io::Write;

use clap::{Args, ValueEnum};
use serde_json::json;
use sluice_client::{
    AutoOffsetReset, Consumer, ConsumerConfig, ConsumerRecord, GroupConsumer, OffsetQuery, SeekTo,
};
use tokio::signal::unix::{signal, SignalKind};

use crate::output::OutputFormat;
use crate::{connect, CliResult};

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Topic to read.
    topic: String,
    /// Read only this partition (default: all).
    #[arg(long)]
    partition: Option<u32>,
    /// Where to start: beginning, end, or an offset.
    #[arg(long, default_value = "beginning", value_parser = parse_start)]
    offset: Start,
    /// Stop after this many records.
    #[arg(long)]
    max_messages: Option<u64>,
    /// Stop at the end of the log (the high watermark seen at start).
    #[arg(long)]
    exit_at_end: bool,
    /// Consume as a member of this consumer group (it assigns the partitions;
    /// positions are committed).
    #[arg(long, value_name = "GROUP", conflicts_with_all = ["partition", "offset", "exit_at_end"])]
    group: Option<String>,
    /// With --group: where a partition without a committed offset starts.
    #[arg(long, value_enum, requires = "group")]
    auto_offset_reset: Option<Reset>,
    /// With --group: a static member id (comes back to its partitions without a
    /// rebalance within its session timeout).
    #[arg(long, requires = "group")]
    instance_id: Option<String>,
    /// With --group: the session timeout to ask for, in ms (default: the
    /// broker's).
    #[arg(long, value_name = "MS", requires = "group")]
    session_timeout_ms: Option<u64>,
    /// Record template (see `%t %p %o %k %v %T`, `\n`, `\t`).
    #[arg(long = "format", value_name = "FMT")]
    template: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Reset {
    /// The log start offset.
    Earliest,
    /// The high watermark (only new records).
    Latest,
}

#[derive(Debug, Clone, Copy)]
enum Start {
    Beginning,
    End,
    Offset(u64),
}

fn parse_start(text: &str) -> Result<Start, String> {
    match text {
        "beginning" => Ok(Start::Beginning),
        "end" => Ok(Start::End),
        number => number
            .parse()
            .map(Start::Offset)
            .map_err(|_| format!("expected beginning, end or an offset, got {number:?}")),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(Vec<u8>),
    Topic,
    Partition,
    Offset,
    Key,
    Value,
    Timestamp,
}

fn parse_template(template: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut literal = Vec::new();
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        let token = match (c, chars.clone().next()) {
            ('%', Some(next @ ('t' | 'p' | 'o' | 'k' | 'v' | 'T'))) => Some(match next {
                't' => Token::Topic,
                'p' => Token::Partition,
                'o' => Token::Offset,
                'k' => Token::Key,
                'v' => Token::Value,
                _ => Token::Timestamp,
            }),
            ('%', Some('%')) => Some(Token::Literal(b"%".to_vec())),
            ('\\', Some('n')) => Some(Token::Literal(b"\n".to_vec())),
            ('\\', Some('t')) => Some(Token::Literal(b"\t".to_vec())),
            ('\\', Some('\\')) => Some(Token::Literal(b"\\".to_vec())),
            _ => None,
        };
        match token {
            Some(Token::Literal(bytes)) => {
                literal.extend_from_slice(&bytes);
                chars.next();
            }
            Some(token) => {
                if !literal.is_empty() {
                    tokens.push(Token::Literal(std::mem::take(&mut literal)));
                }
                tokens.push(token);
                chars.next();
            }
            None => literal.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    if !literal.is_empty() {
        tokens.push(Token::Literal(literal));
    }
    tokens
}

fn render(tokens: &[Token], record: &ConsumerRecord, out: &mut Vec<u8>) {
    for token in tokens {
        match token {
            Token::Literal(bytes) => out.extend_from_slice(bytes),
            Token::Topic => out.extend_from_slice(record.topic.as_bytes()),
            Token::Partition => out.extend_from_slice(record.partition.to_string().as_bytes()),
            Token::Offset => out.extend_from_slice(record.offset.to_string().as_bytes()),
            Token::Key => out.extend_from_slice(record.key.as_deref().unwrap_or_default()),
            Token::Value => out.extend_from_slice(record.value.as_deref().unwrap_or_default()),
            Token::Timestamp => out.extend_from_slice(record.timestamp_ms.to_string().as_bytes()),
        }
    }
}

fn render_json(record: &ConsumerRecord, out: &mut Vec<u8>) {
    let text = |bytes: &Option<bytes::Bytes>| {
        bytes
            .as_deref()
            .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
    };
    let value = json!({
        "topic": &*record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp_ms,
        "key": text(&record.key),
        "value": text(&record.value),
    });
    out.extend_from_slice(value.to_string().as_bytes());
    out.push(b'\n');
}

/// How records are printed.
struct Printer {
    tokens: Vec<Token>,
    json: bool,
    out: Vec<u8>,
}

impl Printer {
    fn new(template: Option<&str>, format: OutputFormat) -> Printer {
        let tokens = template.map(parse_template);
        let json = tokens.is_none() && format == OutputFormat::Json;
        let tokens = tokens.unwrap_or_else(|| vec![Token::Value, Token::Literal(b"\n".to_vec())]);
        Printer {
            tokens,
            json,
            out: Vec::with_capacity(4096),
        }
    }

    fn print(&mut self, record: &ConsumerRecord, stdout: &mut impl Write) -> CliResult {
        self.out.clear();
        if self.json {
            render_json(record, &mut self.out);
        } else {
            render(&self.tokens, record, &mut self.out);
        }
        stdout.write_all(&self.out)?;
        stdout.flush()?;
        Ok(())
    }
}

pub async fn run(brokers: &[String], format: OutputFormat, args: ConsumeArgs) -> CliResult {
    if let Some(group) = args.group.clone() {
        return run_group(brokers, format, args, group).await;
    }
    let client = connect(brokers).await?;
    let route = client.topic_route(&args.topic, true).await?;
    let partitions: Vec<u32> = match args.partition {
        Some(partition) => vec![partition],
        None => (0..route.partition_count()).collect(),
    };
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer.assign(&args.topic, &partitions).await?;
    let mut ends = Vec::new();
    for &partition in &partitions {
        let start = match args.offset {
            Start::Offset(offset) => offset,
            Start::Beginning => {
                client
                    .list_offsets(&args.topic, partition, OffsetQuery::Earliest)
                    .await?
                    .offset
            }
            Start::End => {
                client
                    .list_offsets(&args.topic, partition, OffsetQuery::Latest)
                    .await?
                    .offset
            }
        };
        consumer.seek(&args.topic, partition, SeekTo::Offset(start))?;
        if args.exit_at_end {
            let end = client
                .list_offsets(&args.topic, partition, OffsetQuery::Latest)
                .await?
                .offset;
            ends.push((partition, end));
        }
    }
    let mut printer = Printer::new(args.template.as_deref(), format);
    let mut printed = 0u64;
    let mut stdout = std::io::stdout().lock();
    loop {
        if args.max_messages.is_some_and(|max| printed >= max)
            || at_end(&consumer, &args.topic, &ends)?
        {
            return Ok(());
        }
        let Some(record) = consumer.recv().await else {
            return Ok(());
        };
        let record = record?;
        printer.print(&record, &mut stdout)?;
        printed += 1;
    }
}

/// `--group`: consume as a group member until stopped, then commit what was
/// printed and leave.
async fn run_group(
    brokers: &[String],
    format: OutputFormat,
    args: ConsumeArgs,
    group: String,
) -> CliResult {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let client = connect(brokers).await?;
    let reset = match args.auto_offset_reset {
        Some(Reset::Latest) => AutoOffsetReset::Latest,
        Some(Reset::Earliest) | None => AutoOffsetReset::Earliest,
    };
    let mut builder = GroupConsumer::builder(client)
        .group(group)
        .subscribe([args.topic.clone()])
        .auto_offset_reset(reset);
    if let Some(instance_id) = &args.instance_id {
        builder = builder.instance_id(instance_id.clone());
    }
    if let Some(ms) = args.session_timeout_ms {
        builder = builder.session_timeout(std::time::Duration::from_millis(ms));
    }
    let mut consumer = builder.build().await?;
    let mut printer = Printer::new(args.template.as_deref(), format);
    let mut printed = 0u64;
    let outcome: CliResult = loop {
        if args.max_messages.is_some_and(|max| printed >= max) {
            break Ok(());
        }
        let next = tokio::select! {
            _ = terminate.recv() => break Ok(()),
            _ = interrupt.recv() => break Ok(()),
            next = consumer.recv() => next,
        };
        let record = match next {
            None => break Ok(()),
            Some(Ok(record)) => record,
            Some(Err(error)) => break Err(error.into()),
        };
        // Delivered records are committed; one that could not be printed must
        // not be: leave without committing (the group redelivers from the last
        // auto-commit).
        if let Err(error) = printer.print(&record, &mut std::io::stdout().lock()) {
            drop(consumer);
            return Err(error);
        }
        printed += 1;
    };
    // Every delivered record was printed: close commits them and leaves.
    let closed = consumer.close().await;
    outcome?;
    closed?;
    Ok(())
}

fn at_end(consumer: &Consumer, topic: &str, ends: &[(u32, u64)]) -> CliResult<bool> {
    if ends.is_empty() {
        return Ok(false);
    }
    for &(partition, end) in ends {
        let position = consumer.position(topic, partition)?.unwrap_or(0);
        if position < end {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_renders_all_escapes() {
        let record = ConsumerRecord {
            topic: "t".into(),
            partition: 2,
            offset: 9,
            timestamp_ms: 77,
            key: Some("k".into()),
            value: Some("v".into()),
            headers: Vec::new(),
        };
        let mut out = Vec::new();
        render(
            &parse_template(r"%t|%p|%o|%k|%v|%T|%%|%x\t\n"),
            &record,
            &mut out,
        );
        assert_eq!(out, b"t|2|9|k|v|77|%|%x\t\n");
    }
}
