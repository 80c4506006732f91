//! The order pipeline: a producer writes orders to `orders` (keyed by
//! customer, so each customer's orders stay in order on one partition); the
//! consumer group `order-processing` reads them with manual commits and
//! "processes" each one by writing a payment to `payments` and a notification to
//! `notifications`. An order that cannot be processed (this run plants a few
//! with invalid amounts) is retried with backoff and then dead-lettered to
//! `orders.DLQ` with the error in its headers. Prints a summary at the end.
//!
//! ```text
//! cargo run -p sluice-client --example order_pipeline -- [HOST:PORT[,HOST:PORT...]]
//! ```
//!
//! The brokers come from the first argument, else `SLUICE_BROKERS`, else
//! 127.0.0.1:9440. Topics are created if missing.

#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_client::dlq::{dlq_topic, process_with_retry, Processed, RetryPolicy};
use sluice_client::{
    Client, ClientConfig, Code, ConsumerRecord, GroupConsumer, Producer, ProducerConfig,
    ProducerRecord,
};

const ORDERS: &str = "orders";
const PAYMENTS: &str = "payments";
const NOTIFICATIONS: &str = "notifications";
const GROUP: &str = "order-processing";
const ORDER_COUNT: u32 = 60;
/// Every this many orders, one has an amount that does not parse or is negative.
const INVALID_EVERY: u32 = 12;
/// Give up when no order arrives for this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
const CUSTOMERS: [&str; 6] = ["alice", "bob", "carol", "dave", "erin", "frank"];

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An order as carried in a record value: `id=..;customer=..;amount=12.34`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Order {
    id: String,
    customer: String,
    amount_cents: u64,
}

fn order_text(id: &str, customer: &str, amount: &str) -> String {
    format!("id={id};customer={customer};amount={amount}")
}

/// Parses an order; the amount must be a positive number with at most two
/// decimals.
fn parse_order(text: &str) -> Result<Order, String> {
    let mut fields: HashMap<&str, &str> = HashMap::new();
    for field in text.split(';') {
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| format!("field {field:?} is not key=value"))?;
        fields.insert(key, value);
    }
    let get = |key: &str| {
        fields
            .get(key)
            .copied()
            .ok_or_else(|| format!("order has no {key}"))
    };
    let amount = get("amount")?;
    let (units, cents) = amount.split_once('.').unwrap_or((amount, "0"));
    let invalid = || format!("invalid amount {amount:?}");
    if cents.len() > 2 || units.is_empty() {
        return Err(invalid());
    }
    let units: u64 = units.parse().map_err(|_| invalid())?;
    let cents: u64 = format!("{cents:0<2}").parse().map_err(|_| invalid())?;
    let amount_cents = units * 100 + cents;
    if amount_cents == 0 {
        return Err(invalid());
    }
    Ok(Order {
        id: get("id")?.to_owned(),
        customer: get("customer")?.to_owned(),
        amount_cents,
    })
}

/// The processing step: a payment and a notification per order, both
/// acknowledged before the order counts as done.
async fn process(producer: &Producer, record: ConsumerRecord) -> Result<(), String> {
    let text = std::str::from_utf8(record.value.as_deref().unwrap_or_default())
        .map_err(|_| "order is not UTF-8".to_owned())?;
    let order = parse_order(text)?;
    let payment = ProducerRecord::new(
        PAYMENTS,
        format!(
            "order={};customer={};cents={}",
            order.id, order.customer, order.amount_cents
        ),
    )
    .with_key(order.customer.clone());
    let notification = ProducerRecord::new(
        NOTIFICATIONS,
        format!(
            "to={}: your order {} of {}.{:02} is paid",
            order.customer,
            order.id,
            order.amount_cents / 100,
            order.amount_cents % 100
        ),
    )
    .with_key(order.customer);
    let payment = producer.send(payment).await.map_err(|e| e.to_string())?;
    let notification = producer
        .send(notification)
        .await
        .map_err(|e| e.to_string())?;
    payment.await.map_err(|e| e.to_string())?;
    notification.await.map_err(|e| e.to_string())?;
    Ok(())
}

fn header<'a>(record: &'a ConsumerRecord, key: &str) -> Option<&'a [u8]> {
    record
        .headers
        .iter()
        .find(|(name, _)| name == key)
        .and_then(|(_, value)| value.as_deref())
}

async fn create_topics(client: &Client) -> Result<(), BoxError> {
    for (topic, partitions) in [
        (ORDERS.to_owned(), 3),
        (PAYMENTS.to_owned(), 3),
        (NOTIFICATIONS.to_owned(), 3),
        (dlq_topic(ORDERS), 1),
    ] {
        match client.create_topic(&topic, partitions, Vec::new()).await {
            Ok(()) => println!("created topic {topic} ({partitions} partitions)"),
            Err(error) if error.code() == Some(Code::TopicAlreadyExists) => {}
            Err(error) => return Err(format!("creating {topic}: {error}").into()),
        }
    }
    Ok(())
}

/// Writes this run's orders; returns their ids.
async fn produce_orders(producer: &Producer, run: &str) -> Result<Vec<String>, BoxError> {
    let mut deliveries = Vec::new();
    let mut ids = Vec::new();
    for index in 0..ORDER_COUNT {
        let customer = CUSTOMERS[index as usize % CUSTOMERS.len()];
        let id = format!("{run}-{index:03}");
        let amount = match index % INVALID_EVERY {
            5 => "-12.00".to_owned(),
            8 => "twelve".to_owned(),
            _ => format!("{}.{:02}", 5 + index % 40, (index * 7) % 100),
        };
        let record = ProducerRecord::new(ORDERS, order_text(&id, customer, &amount))
            .with_key(customer)
            .with_header("run", Some(run.to_owned().into()));
        deliveries.push(producer.send(record).await?);
        ids.push(id);
    }
    for delivery in deliveries {
        delivery.await?;
    }
    Ok(ids)
}

#[derive(Debug, Default)]
struct Summary {
    produced: u32,
    processed: u32,
    dead_lettered: u32,
    retries: u32,
    earlier_runs: u32,
}

async fn run(brokers: String) -> Result<Summary, BoxError> {
    let mut config = ClientConfig::new(brokers.split(',').map(str::trim));
    config.client_id = "order-pipeline".into();
    let client = Client::connect(config).await?;
    create_topics(&client).await?;

    let run = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis())
        .to_string();
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let ids = produce_orders(&producer, &run).await?;
    let mut summary = Summary {
        produced: ids.len() as u32,
        ..Summary::default()
    };
    println!("produced {} orders (run {run})", ids.len());

    let mut consumer = GroupConsumer::builder(client.clone())
        .group(GROUP)
        .subscribe([ORDERS])
        .auto_commit(false)
        .on_assigned(|partitions| println!("assigned: {partitions:?}"))
        .on_revoked(|partitions| println!("revoked: {partitions:?}"))
        .build()
        .await?;
    let policy = RetryPolicy {
        max_attempts: 3,
        backoff: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
    };
    let mut remaining: std::collections::HashSet<String> = ids.into_iter().collect();
    let producer_ref = &producer;
    while !remaining.is_empty() {
        let record = match tokio::time::timeout(IDLE_TIMEOUT, consumer.recv()).await {
            Err(_) => {
                eprintln!(
                    "no order for {IDLE_TIMEOUT:?}; {} of this run's orders never arrived",
                    remaining.len()
                );
                break;
            }
            Ok(None) => break,
            Ok(Some(record)) => record?,
        };
        let this_run = header(&record, "run") == Some(run.as_bytes());
        let outcome =
            process_with_retry(producer_ref, &record, &policy, None, |record| async move {
                process(producer_ref, record).await
            })
            .await?;
        // Handled or safely in the DLQ: the order is done; commit past it.
        consumer
            .commit_offsets([(
                (record.topic.to_string(), record.partition),
                record.offset + 1,
            )])
            .await?;
        if !this_run {
            summary.earlier_runs += 1;
            continue;
        }
        let text =
            String::from_utf8_lossy(record.value.as_deref().unwrap_or_default()).into_owned();
        if let Some(id) = text.split(';').find_map(|field| field.strip_prefix("id=")) {
            remaining.remove(id);
        }
        match outcome {
            Processed::Handled { attempts } => {
                summary.processed += 1;
                summary.retries += attempts - 1;
            }
            Processed::DeadLettered {
                attempts,
                error,
                stored,
            } => {
                summary.dead_lettered += 1;
                summary.retries += attempts - 1;
                println!(
                    "dead-lettered {}/{}@{} after {attempts} attempts ({error}) -> {}/{}@{}",
                    record.topic,
                    record.partition,
                    record.offset,
                    stored.topic,
                    stored.partition,
                    stored
                        .offset
                        .map_or_else(|| "?".to_owned(), |o| o.to_string())
                );
            }
        }
    }
    consumer.close().await?;
    producer.close().await?;
    Ok(summary)
}

#[tokio::main]
async fn main() -> ExitCode {
    let brokers = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("SLUICE_BROKERS").ok())
        .unwrap_or_else(|| "127.0.0.1:9440".to_owned());
    match run(brokers).await {
        Ok(summary) => {
            println!();
            println!("orders produced:           {}", summary.produced);
            println!("orders processed:          {}", summary.processed);
            println!(
                "orders dead-lettered:      {} (in {})",
                summary.dead_lettered,
                dlq_topic(ORDERS)
            );
            println!("payments written:          {}", summary.processed);
            println!("notifications written:     {}", summary.processed);
            println!("handler retries:           {}", summary.retries);
            println!("orders from earlier runs:  {}", summary.earlier_runs);
            if summary.processed + summary.dead_lettered == summary.produced {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_parse_and_bad_amounts_fail() {
        let order = parse_order(&order_text("r-1", "alice", "12.5")).unwrap();
        assert_eq!(order.amount_cents, 1250);
        assert_eq!(order.customer, "alice");
        assert_eq!(
            parse_order("id=x;customer=y;amount=3")
                .unwrap()
                .amount_cents,
            300
        );
        for bad in ["-12.00", "twelve", "1.234", "0", ".5", ""] {
            assert!(parse_order(&order_text("r", "c", bad)).is_err(), "{bad}");
        }
        assert!(parse_order("garbage").is_err());
    }
}
