//! Checkpoints: the per-log index as of a durable WAL position, so that a restart
//! scans only what was written after it.
//!
//! File `<wal-dir>/checkpoint`, replaced atomically (write `checkpoint.tmp`,
//! fdatasync, rename, fsync the directory). Layout (little-endian):
//!
//! ```text
//! u64 magic "SLWALCKP" | u32 version | u32 crc32(body) | u64 body_bytes | body
//! body: u16 shard | u64 scan_from (WalPosition) | u32 log_count | logs...
//! log:  u32 log_id | u64 log_start | u64 end_offset | u64 end_index | i64 max_timestamp_ms
//!       | u8 replicated | [replica] | u32 run_count | runs...
//! replica: u64 start_term | u64 term | u64 vote | u64 commit | u64 commit_index
//!       | u64 commit_offset | u32 term_count | (u64 first_index, u64 term)...
//! run:  u64 base_offset | u64 end_offset | u64 first_index | u32 entries | u64 position
//!       | u32 bytes | u32 span | i64 max_timestamp_ms | u8 after_truncation
//! ```

use std::collections::{HashMap, VecDeque};
use std::path::Path;

use super::control::HardState;
use super::error::{Result, StorageError};
use super::index::{LogState, Replicated, Run, WalPosition};
use super::wal::{Wal, WalConfig};
use crate::types::{LogId, ShardId};

const MAGIC: u64 = u64::from_le_bytes(*b"SLWALCKP");
const VERSION: u32 = 3;
const PREFIX_BYTES: usize = 24;
/// File name inside the WAL directory.
pub const FILE_NAME: &str = "checkpoint";

/// The durable part of a WAL's index, as of `scan_from`.
pub struct Snapshot {
    /// The shard.
    pub shard: ShardId,
    /// Recovery scans from here.
    pub scan_from: WalPosition,
    /// Per-log state; `next_offset == high_watermark` (only durable data).
    pub logs: HashMap<LogId, LogState>,
}

impl Snapshot {
    /// Takes a snapshot of what is durable. Only valid to call when every write is
    /// durable (after a drain), with `scan_from` the active write position.
    pub(super) fn take(wal: &Wal) -> Snapshot {
        let state = wal.state.borrow();
        let scan_from = WalPosition::new(state.active, state.write_byte);
        let logs = state
            .logs
            .iter()
            .map(|(log, entry)| {
                let snapshot = LogState {
                    log_start: entry.log_start,
                    next_offset: entry.end_offset,
                    next_index: entry.end_index,
                    high_watermark: entry.high_watermark,
                    durable_end: entry.end_offset,
                    runs: entry.runs.clone(),
                    end_index: entry.end_index,
                    end_offset: entry.end_offset,
                    stored_bytes: entry.stored_bytes,
                    max_timestamp_ms: entry.max_timestamp_ms,
                    replicated: entry.replicated.clone(),
                };
                (*log, snapshot)
            })
            .collect();
        Snapshot {
            shard: wal.config().shard,
            scan_from,
            logs,
        }
    }

    /// The checkpoint file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let put = |body: &mut Vec<u8>, bytes: &[u8]| body.extend_from_slice(bytes);
        put(&mut body, &self.shard.0.to_le_bytes());
        put(&mut body, &self.scan_from.0.to_le_bytes());
        put(&mut body, &(self.logs.len() as u32).to_le_bytes());
        let mut logs: Vec<_> = self.logs.iter().collect();
        logs.sort_by_key(|(log, _)| **log);
        for (log, entry) in logs {
            put(&mut body, &log.0.to_le_bytes());
            put(&mut body, &entry.log_start.to_le_bytes());
            put(&mut body, &entry.end_offset.to_le_bytes());
            put(&mut body, &entry.end_index.to_le_bytes());
            put(&mut body, &entry.max_timestamp_ms.to_le_bytes());
            match &entry.replicated {
                None => put(&mut body, &[0]),
                Some(replica) => {
                    put(&mut body, &[1]);
                    put(&mut body, &replica.start_term.to_le_bytes());
                    put(&mut body, &replica.hard_state.term.to_le_bytes());
                    put(&mut body, &replica.hard_state.vote.to_le_bytes());
                    put(&mut body, &replica.hard_state.commit.to_le_bytes());
                    put(&mut body, &replica.commit_index.to_le_bytes());
                    put(&mut body, &replica.commit_offset.to_le_bytes());
                    put(&mut body, &(replica.terms.len() as u32).to_le_bytes());
                    for (first, term) in &replica.terms {
                        put(&mut body, &first.to_le_bytes());
                        put(&mut body, &term.to_le_bytes());
                    }
                }
            }
            put(&mut body, &(entry.runs.len() as u32).to_le_bytes());
            for run in &entry.runs {
                put(&mut body, &run.base_offset.to_le_bytes());
                put(&mut body, &run.end_offset.to_le_bytes());
                put(&mut body, &run.first_index.to_le_bytes());
                put(&mut body, &run.entries.to_le_bytes());
                put(&mut body, &run.position.0.to_le_bytes());
                put(&mut body, &run.bytes.to_le_bytes());
                put(&mut body, &run.span.to_le_bytes());
                put(&mut body, &run.max_timestamp_ms.to_le_bytes());
                put(&mut body, &[u8::from(run.after_truncation)]);
            }
        }
        let mut out = Vec::with_capacity(PREFIX_BYTES + body.len());
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Parses a checkpoint file's bytes.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Snapshot, String> {
        let mut reader = Reader { bytes, at: 0 };
        if reader.u64()? != MAGIC {
            return Err("not a WAL checkpoint (bad magic)".into());
        }
        let version = reader.u32()?;
        if version != VERSION {
            return Err(format!(
                "checkpoint version {version}, this build reads {VERSION}"
            ));
        }
        let crc = reader.u32()?;
        let body_bytes = reader.u64()? as usize;
        let body = bytes
            .get(PREFIX_BYTES..PREFIX_BYTES.saturating_add(body_bytes))
            .ok_or("checkpoint truncated")?;
        if crc32fast::hash(body) != crc {
            return Err("checkpoint CRC mismatch".into());
        }
        let mut reader = Reader { bytes: body, at: 0 };
        let shard = ShardId(reader.u16()?);
        let scan_from = WalPosition(reader.u64()?);
        let log_count = reader.u32()? as usize;
        let mut logs = HashMap::with_capacity(log_count.min(1 << 20));
        for _ in 0..log_count {
            let log = LogId(reader.u32()?);
            let log_start = reader.u64()?;
            let end_offset = reader.u64()?;
            let end_index = reader.u64()?;
            let max_timestamp_ms = reader.u64()? as i64;
            let replicated = match reader.u8()? {
                0 => None,
                1 => Some(read_replica(&mut reader)?),
                other => return Err(format!("checkpoint log {log}: replicated flag {other}")),
            };
            let run_count = reader.u32()? as usize;
            let mut runs = VecDeque::with_capacity(run_count.min(1 << 20));
            let mut stored_bytes = 0;
            for _ in 0..run_count {
                let run = Run {
                    base_offset: reader.u64()?,
                    end_offset: reader.u64()?,
                    first_index: reader.u64()?,
                    entries: reader.u32()?,
                    position: WalPosition(reader.u64()?),
                    bytes: reader.u32()?,
                    span: reader.u32()?,
                    max_timestamp_ms: reader.u64()? as i64,
                    after_truncation: reader.u8()? != 0,
                };
                check_run(&run, runs.back())?;
                stored_bytes += u64::from(run.bytes);
                runs.push_back(run);
            }
            if runs
                .back()
                .is_some_and(|r: &Run| r.end_index() != end_index || r.end_offset != end_offset)
            {
                return Err(format!(
                    "checkpoint log {log}: its runs do not end where the log does"
                ));
            }
            let entry = LogState {
                log_start,
                next_offset: end_offset,
                next_index: end_index,
                high_watermark: 0,
                durable_end: end_offset,
                runs,
                end_index,
                end_offset,
                stored_bytes,
                max_timestamp_ms,
                replicated,
            };
            logs.insert(log, entry);
        }
        Ok(Snapshot {
            shard,
            scan_from,
            logs,
        })
    }

    /// Writes the checkpoint atomically.
    pub async fn write(&self, config: &WalConfig) -> Result<()> {
        let bytes = self.encode();
        let dir = config.dir.clone();
        let tmp = dir.join(format!("{FILE_NAME}.tmp"));
        let target = dir.join(FILE_NAME);
        let io = |op: &'static str, path: &Path, e: std::io::Error| StorageError::std(op, path, e);
        {
            use std::io::Write;
            let mut file =
                std::fs::File::create(&tmp).map_err(|e| io("create checkpoint", &tmp, e))?;
            file.write_all(&bytes)
                .map_err(|e| io("write checkpoint", &tmp, e))?;
            file.sync_data()
                .map_err(|e| io("sync checkpoint", &tmp, e))?;
        }
        std::fs::rename(&tmp, &target).map_err(|e| io("rename checkpoint", &target, e))?;
        super::segment::sync_directory(&dir).await
    }

    /// Reads `<wal-dir>/checkpoint`, if present. A damaged checkpoint is not fatal:
    /// recovery then scans the whole WAL.
    pub fn read(dir: &Path) -> Option<std::result::Result<Snapshot, String>> {
        let path = dir.join(FILE_NAME);
        match std::fs::read(&path) {
            Ok(bytes) => Some(Snapshot::decode(&bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => Some(Err(error.to_string())),
        }
    }
}

/// A run from a checkpoint must be well formed and follow the previous one; the
/// frames it names are verified when first read (see read.rs).
fn check_run(run: &Run, previous: Option<&Run>) -> std::result::Result<(), String> {
    let well_formed = run.end_offset >= run.base_offset
        && run.entries > 0
        && run.bytes > 0
        && run.span >= run.bytes
        && run.span
            <= crate::limits::INDEX_SPAN_BYTES_MAX.max(crate::limits::BATCH_BYTES_MAX as u32)
        && run.position.byte() >= crate::limits::SEGMENT_HEADER_BYTES
        && run.end().byte() <= crate::limits::SEGMENT_BYTES_MAX;
    let follows = previous.is_none_or(|p| {
        p.end_offset == run.base_offset
            && p.end_index() == run.first_index
            && p.end() <= run.position
    });
    if well_formed && follows {
        Ok(())
    } else {
        Err(format!("checkpoint holds an impossible index run {run:?}"))
    }
}

fn read_replica(reader: &mut Reader<'_>) -> std::result::Result<Replicated, String> {
    let start_term = reader.u64()?;
    let hard_state = HardState {
        term: reader.u64()?,
        vote: reader.u64()?,
        commit: reader.u64()?,
    };
    let commit_index = reader.u64()?;
    let commit_offset = reader.u64()?;
    let count = reader.u32()? as usize;
    let mut terms = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let entry = (reader.u64()?, reader.u64()?);
        if terms
            .last()
            .is_some_and(|(first, term): &(u64, u64)| entry.0 <= *first || entry.1 <= *term)
        {
            return Err("checkpoint holds terms out of order".into());
        }
        terms.push(entry);
    }
    Ok(Replicated {
        start_term,
        terms,
        hard_state,
        commit_index,
        commit_offset,
        // What preceded the checkpoint may end in a truncation: start a new run.
        sealed: true,
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        let slice = self
            .bytes
            .get(self.at..self.at + N)
            .ok_or("checkpoint truncated")?;
        self.at += N;
        let mut out = [0; N];
        out.copy_from_slice(slice);
        Ok(out)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        self.take().map(u8::from_le_bytes)
    }
    fn u16(&mut self) -> std::result::Result<u16, String> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        self.take().map(u64::from_le_bytes)
    }
}

impl Wal {
    /// Writes a checkpoint of everything durable. Call when idle (after close, or
    /// when `is_idle`); otherwise it captures nothing newer than the last drain.
    pub async fn checkpoint(&self) -> Result<()> {
        self.drain().await?;
        Snapshot::take(self).write(self.config()).await?;
        if self.is_closed() {
            // Closed and checkpointed: the next open may skip zeroing past the tail.
            let path = self.config.dir.join(super::recovery::CLEAN_MARKER);
            std::fs::write(&path, b"clean\n")
                .map_err(|e| StorageError::std("write clean-shutdown marker", &path, e))?;
            super::segment::sync_directory(&self.config.dir).await?;
        }
        Ok(())
    }
}
