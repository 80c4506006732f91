//! What a new user trips over first: a CLI run before the broker listens, and
//! `sluice wal inspect` on a data dir with an unfinished spare and damage.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use sluice_broker::storage::inspect;
use sluice_tests::{bin, free_port, Broker};

#[test]
fn the_cli_says_the_broker_may_still_be_starting_when_nothing_listens() {
    let addr = format!("127.0.0.1:{}", free_port());
    let output = Command::new(bin("sluice"))
        .args(["--brokers", &addr, "topic", "list"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&addr), "{stderr}");
    assert!(
        stderr.contains("is the broker running? (it may still be starting)"),
        "{stderr}"
    );
}

#[test]
fn inspect_reports_an_unfinished_spare_and_every_bad_frame() {
    let mut broker = Broker::start("inspect", &["--shards", "1", "--segment-mib", "4"]);
    broker.cli_ok(&["topic", "create", "t", "--partitions", "1"], None);
    // One CLI run per batch: at least a dozen frames to damage and walk past.
    for run in 0..12 {
        let lines: String = (0..30)
            .map(|i| format!("run {run} record {i} {}\n", "x".repeat(200)))
            .collect();
        broker.cli_ok(&["produce", "t", "--acks", "1"], Some(&lines));
    }
    assert!(broker.terminate());
    let wal = broker.data_dir.join("shard-0/wal");
    let mut segments: Vec<_> = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segments.sort();
    let with_frames = segments
        .iter()
        .find(|p| inspect::inspect_segment(p, false).unwrap().frames > 0)
        .unwrap()
        .clone();
    // A spare whose creation was interrupted: its header block is still zero.
    let last_id: u32 = segments
        .last()
        .unwrap()
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let spare = wal.join(format!("{:010}.wal", last_id + 1));
    std::fs::write(&spare, vec![0u8; 1 << 20]).unwrap();
    // Two damaged batches with intact frames around them.
    let frames = inspect::inspect_segment(&with_frames, true)
        .unwrap()
        .frame_list;
    assert!(frames.len() >= 10);
    let mut bytes = std::fs::read(&with_frames).unwrap();
    for victim in [&frames[2], &frames[6]] {
        bytes[victim.position as usize + 90] ^= 0x40;
    }
    std::fs::write(&with_frames, &bytes).unwrap();
    let output = broker.cli(&["wal", "inspect", broker.data_dir.to_str().unwrap()], None);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "damage makes inspect fail");
    assert!(stdout.contains("unfinished spare"), "{stdout}");
    assert!(stdout.contains("(and 1 more)"), "{stdout}");
    for victim in [&frames[2], &frames[6]] {
        assert!(
            stderr.contains(&format!("at byte {}", victim.position)),
            "{stderr}"
        );
    }
    // Every other frame was still verified: inspection went on past the damage.
    let summary = inspect::inspect_segment(&with_frames, false).unwrap();
    assert_eq!(summary.frames as usize, frames.len() - 2);
}
