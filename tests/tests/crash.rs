//! kill -9 the broker while the CLI produces with an ack log: after a restart,
//! every acknowledged record is there, at its offset, with its key and value.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_tests::{bin, Broker};

#[test]
fn kill_9_loses_no_acknowledged_record() {
    let mut broker = Broker::start("kill9", &["--shards", "2"]);
    broker.cli_ok(&["topic", "create", "orders", "--partitions", "3"], None);
    let dir = sluice_tests::scratch("kill9-acks");
    let ack_log = dir.join("acks.log");
    let mut producer = Command::new(bin("sluice"))
        .args([
            "--brokers",
            &broker.brokers(),
            "produce",
            "orders",
            "--key-separator",
            ":",
            "--acks",
            "all",
        ])
        .args(["--delivery-timeout-ms", "3000"])
        .arg("--ack-log")
        .arg(&ack_log)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = producer.stdin.take().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_writing = stop.clone();
    let writer = std::thread::spawn(move || {
        for i in 0.. {
            let stopped = stop_writing.load(std::sync::atomic::Ordering::SeqCst);
            if stopped || writeln!(stdin, "order-{}:event-{i}", i % 50).is_err() {
                return i;
            }
            if i % 100 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        unreachable!()
    });
    // Let acknowledgements pile up, then crash the broker mid-stream.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&ack_log)
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < 2000
    {
        assert!(
            Instant::now() < deadline,
            "the producer is not getting acks"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    broker.kill9();
    // End the input; the producer gives up on what was not acknowledged.
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer.join().unwrap();
    let output = producer.wait_with_output().unwrap();
    assert!(
        !output.status.success(),
        "the producer reports the lost broker"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("error: ") && !stderr.contains("panicked"),
        "{stderr}"
    );

    let broker = broker.start_again();
    let acked: Vec<(u32, u64, String)> = std::fs::read_to_string(&ack_log)
        .unwrap()
        .lines()
        .map(|line| {
            let mut parts = line.splitn(4, ' ');
            let partition = parts.next().unwrap().parse().unwrap();
            let offset = parts.next().unwrap().parse().unwrap();
            let key = parts.next().unwrap();
            let value = parts.next().unwrap();
            (partition, offset, format!("{key}:{value}"))
        })
        .collect();
    assert!(
        acked.len() >= 2000 && acked.len() as u64 <= written,
        "{} acks of {written} lines",
        acked.len()
    );
    let consumed = broker.cli_ok(
        &[
            "consume",
            "orders",
            "--exit-at-end",
            "--format",
            "%p %o %k:%v\\n",
        ],
        None,
    );
    let stored: HashMap<(u32, u64), String> = consumed
        .lines()
        .map(|line| {
            let mut parts = line.splitn(3, ' ');
            let partition = parts.next().unwrap().parse().unwrap();
            let offset = parts.next().unwrap().parse().unwrap();
            ((partition, offset), parts.next().unwrap().to_string())
        })
        .collect();
    for (partition, offset, record) in &acked {
        assert_eq!(
            stored.get(&(*partition, *offset)),
            Some(record),
            "acknowledged record at partition {partition} offset {offset}"
        );
    }
    // Offsets are dense per partition: nothing invented, nothing skipped.
    for partition in 0..3u32 {
        let mut offsets: Vec<u64> = stored
            .keys()
            .filter(|(p, _)| *p == partition)
            .map(|(_, o)| *o)
            .collect();
        offsets.sort();
        assert!(
            offsets.iter().enumerate().all(|(i, o)| *o == i as u64),
            "partition {partition} offsets are dense"
        );
    }
}
