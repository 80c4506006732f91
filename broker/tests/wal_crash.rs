//! kill -9 a process that appends batches of random sizes at a random moment, many
//! times over the same WAL; after each crash every acknowledged batch must be
//! present with identical bytes and offsets, and nothing that was never appended
//! may appear.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use sluice_broker::storage::{format, Wal};
use sluice_broker::types::LogId;
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

const LOGS: u32 = 4;
const APPENDERS: u64 = 8;
const ROUNDS: u64 = 24;
const SEGMENT_BYTES: u64 = 2 << 20;

/// The batch an appender sends for a seed: deterministic, so the parent can rebuild it.
fn batch_for(seed: u64) -> bytes::Bytes {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let records = rng.gen_range(1..=8);
    let value_bytes = rng.gen_range(1..=4_000);
    batch(records, value_bytes, seed)
}

/// The child: appends forever from several tasks, printing each attempt before it
/// starts and each acknowledgement after it completes.
#[test]
#[ignore = "run by crash_recovery_keeps_every_acknowledged_batch as a child process"]
fn crash_child() {
    let Ok(dir) = std::env::var("SLUICE_CRASH_DIR") else {
        return;
    };
    let round: u64 = std::env::var("SLUICE_CRASH_ROUND")
        .unwrap()
        .parse()
        .unwrap();
    let config = config(std::path::Path::new(&dir), SEGMENT_BYTES);
    run(move || async move {
        let (wal, _) = Wal::open(config).await.unwrap();
        for log in 0..LOGS {
            wal.create_log(LogId(log));
        }
        println!("READY");
        let mut tasks = Vec::new();
        for task in 0..APPENDERS {
            let wal = wal.clone();
            tasks.push(glommio::spawn_local(async move {
                for i in 0.. {
                    let seed = round * 1_000_000_000 + task * 1_000_000 + i;
                    let log = (seed % u64::from(LOGS)) as u32;
                    let frame = batch_for(seed);
                    println!("T {log} {seed}");
                    let appended = append(&wal, log, &frame).await;
                    println!(
                        "A {log} {seed} {} {}",
                        appended.base_offset, appended.last_offset
                    );
                    std::io::stdout().flush().unwrap();
                }
            }));
        }
        for task in tasks {
            task.await;
        }
    });
}

#[test]
fn crash_recovery_keeps_every_acknowledged_batch() {
    let dir = scratch("crash");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xc0ffee);
    // Every batch ever attempted and every acknowledged one, by a fingerprint of
    // its client bytes (CRC-32 and length); acknowledgements of the latest round are
    // also compared byte for byte.
    let mut attempted: HashMap<u32, HashSet<(u32, usize)>> = HashMap::new();
    let mut acked: Vec<Ack> = Vec::new();
    for round in 0..ROUNDS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SLUICE_CRASH_DIR", &dir)
            .env("SLUICE_CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (lines_tx, lines_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Wait until the child is appending, then kill it at a random moment.
        loop {
            let line = lines_rx
                .recv_timeout(Duration::from_secs(30))
                .expect("child starts appending");
            if line.contains("READY") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(5..250)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        let mut round_acks = 0;
        for line in lines_rx.try_iter() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                ["T", log, seed] => {
                    let (log, seed): (u32, u64) = (log.parse().unwrap(), seed.parse().unwrap());
                    attempted
                        .entry(log)
                        .or_default()
                        .insert(fingerprint(&batch_for(seed)));
                }
                ["A", log, seed, base, last] => {
                    let seed: u64 = seed.parse().unwrap();
                    acked.push(Ack {
                        log: log.parse().unwrap(),
                        seed,
                        base: base.parse().unwrap(),
                        last: last.parse().unwrap(),
                        fingerprint: fingerprint(&batch_for(seed)),
                        round,
                    });
                    round_acks += 1;
                }
                _ => {} // test-harness chatter
            }
        }
        verify(&dir, &attempted, &acked, round, round_acks);
    }
    assert!(
        acked.len() > 100,
        "the crash test must acknowledge a meaningful number of batches: {}",
        acked.len()
    );
}

/// An acknowledged batch, with a fingerprint of its client bytes.
#[derive(Clone, Copy)]
struct Ack {
    log: u32,
    seed: u64,
    base: u64,
    last: u64,
    fingerprint: (u32, usize),
    round: u64,
}

/// CRC-32 and length of a frame's client-owned bytes.
fn fingerprint(frame: &[u8]) -> (u32, usize) {
    (crc32fast::hash(&client_bytes(frame)), frame.len())
}

fn verify(
    dir: &std::path::Path,
    attempted: &HashMap<u32, HashSet<(u32, usize)>>,
    acked: &[Ack],
    round: u64,
    round_acks: usize,
) {
    let config = config(dir, SEGMENT_BYTES);
    let acked = acked.to_vec();
    let attempted = attempted.clone();
    run(move || async move {
        let (wal, report) = Wal::open(config)
            .await
            .unwrap_or_else(|e| panic!("round {round}: recovery failed: {e}"));
        let mut stored: HashMap<(u32, u64), bytes::Bytes> = HashMap::new();
        for log in 0..LOGS {
            if wal.log_offsets(LogId(log)).is_err() {
                continue;
            }
            let mut expected_next = 0;
            for frame in read_all(&wal, log, 0).await {
                let header = format::header(&frame).unwrap();
                let base = header.base_offset.get();
                assert_eq!(
                    base, expected_next,
                    "round {round}: log {log} offsets are contiguous"
                );
                expected_next = base + u64::from(header.last_offset_delta.get()) + 1;
                let known = attempted
                    .get(&log)
                    .is_some_and(|set| set.contains(&fingerprint(&frame)));
                assert!(
                    known,
                    "round {round}: log {log} offset {base} holds a batch that was never appended"
                );
                stored.insert((log, base), frame);
            }
        }
        for ack in &acked {
            let (log, base) = (ack.log, ack.base);
            let frame = stored.get(&(log, base)).unwrap_or_else(|| {
                panic!(
                    "round {round}: acknowledged batch log {log} offset {base} lost ({report:?})"
                )
            });
            assert_eq!(
                fingerprint(frame),
                ack.fingerprint,
                "round {round}: bytes differ at log {log} offset {base}"
            );
            if ack.round == round {
                let sent = batch_for(ack.seed);
                assert_eq!(
                    client_bytes(frame),
                    client_bytes(&sent),
                    "round {round}: bytes differ at log {log} offset {base}"
                );
            }
            let header = format::header(frame).unwrap();
            assert_eq!(
                header.base_offset.get() + u64::from(header.last_offset_delta.get()),
                ack.last
            );
        }
        wal.close().await;
        eprintln!(
            "round {round}: {round_acks} acks this round, {} total, recovery {:?}",
            acked.len(),
            report.duration
        );
    });
}
