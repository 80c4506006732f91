//! `sluice wal inspect DIR`: offline WAL inspection (segments, frames, checksums,
//! every bad region). Run it on a stopped broker's data directory.

use std::path::PathBuf;

use clap::Subcommand;
use sluice_broker::storage::inspect;

use crate::output::{print_json, print_table, OutputFormat};
use crate::CliResult;

/// `sluice wal ...`
#[derive(Debug, Subcommand)]
pub enum WalCommand {
    /// List segments, verify every frame's checksums, report every bad region.
    Inspect {
        /// A data dir, a `shard-<k>` dir, or a `wal` dir.
        dir: PathBuf,
        /// Also list every frame.
        #[arg(long)]
        frames: bool,
    },
}

/// Runs a `wal` subcommand. Exits non-zero when a bad frame is found.
pub fn run(format: OutputFormat, command: WalCommand) -> CliResult {
    let WalCommand::Inspect { dir, frames } = command;
    let segments = inspect::inspect_dir(&dir, frames)?;
    let bad: Vec<_> = segments
        .iter()
        .flat_map(|s| {
            s.bad_frames
                .iter()
                .map(|(position, reason)| (s.path.clone(), *position, reason.clone()))
        })
        .collect();
    match format {
        OutputFormat::Json => print_json(&serde_json::to_value(&segments)?)?,
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = segments
                .iter()
                .map(|s| {
                    vec![
                        s.path.display().to_string(),
                        s.shard.to_string(),
                        s.segment_id.to_string(),
                        s.frames.to_string(),
                        s.frame_bytes.to_string(),
                        s.end.to_string(),
                        s.capacity.to_string(),
                        check_column(s),
                    ]
                })
                .collect();
            print_table(
                &[
                    "SEGMENT",
                    "SHARD",
                    "ID",
                    "FRAMES",
                    "FRAME_BYTES",
                    "END",
                    "SIZE",
                    "CHECK",
                ],
                &rows,
            )?;
            if frames {
                let rows: Vec<Vec<String>> = segments
                    .iter()
                    .flat_map(|s| {
                        s.frame_list.iter().map(move |f| {
                            vec![
                                s.segment_id.to_string(),
                                f.position.to_string(),
                                f.log_id.to_string(),
                                f.base_offset.to_string(),
                                f.end_offset.to_string(),
                                f.epoch.to_string(),
                                if f.control { "control" } else { "batch" }.to_string(),
                                f.records.to_string(),
                                f.bytes.to_string(),
                                f.max_timestamp_ms.to_string(),
                            ]
                        })
                    })
                    .collect();
                println!();
                print_table(
                    &[
                        "SEGMENT", "POSITION", "LOG", "BASE", "END", "EPOCH", "KIND", "RECORDS",
                        "BYTES", "MAX_TS",
                    ],
                    &rows,
                )?;
            }
        }
    }
    // A bad frame at the end of the newest segment is usually a torn tail that
    // recovery cuts; elsewhere it is corruption. Either way, say where and fail.
    if !bad.is_empty() {
        let lines: Vec<String> = bad
            .iter()
            .map(|(path, position, reason)| {
                format!(
                    "bad frame in {} at byte {position}: {reason}",
                    path.display()
                )
            })
            .collect();
        return Err(lines.join("\n").into());
    }
    Ok(())
}

fn check_column(segment: &inspect::SegmentSummary) -> String {
    if segment.unfinished {
        return "unfinished spare (its creation did not finish; recovery removes it)".into();
    }
    match segment.bad_frames.as_slice() {
        [] => "ok".into(),
        [(position, reason)] => format!("at {position}: {reason}"),
        [(position, reason), rest @ ..] => {
            format!("at {position}: {reason} (and {} more)", rest.len())
        }
    }
}
