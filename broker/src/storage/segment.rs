//! One WAL segment file: the storage I/O backend (the only storage code that names
//! glommio).
//!
//! Appends only ever go to zero-filled blocks. Writing into already-allocated,
//! already-written blocks means an `fdatasync` flushes data only, with no extent
//! conversion or size update to journal: measured on this project's reference
//! machine, fio's 4 KiB write+fdatasync rate was 10.2k/s into a zero-filled file
//! against 4.9k/s into a fallocated one (PostgreSQL zero-fills its WAL segments for
//! the same reason). Zero-filling also gives recovery a clean end-of-log marker: a
//! header of zeros.
//!
//! A segment is not zero-filled whole at creation: it starts with
//! `SEGMENT_ZERO_STEP_BYTES` and the WAL's extender task zero-fills further steps
//! ahead of the writer (each step made durable before the writer may use it), so an
//! empty broker starts at once and holds little disk. The file's size is its
//! zero-filled extent; its header records the size it may grow to (`capacity`).

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::io::{Directory, DmaFile, OpenOptions};
use std::os::fd::AsRawFd;
use zerocopy::IntoBytes;

use super::aligned::{pread_aligned, AlignedBuffer};

use super::error::{Result, StorageError};
use super::format::SegmentHeader;
use crate::limits::{SECTOR_BYTES, SEGMENT_HEADER_BYTES, SEGMENT_ZERO_STEP_BYTES};
use crate::types::{SegmentId, ShardId};

/// Zero-fill writes use buffers of this size, this many in flight.
const ZERO_FILL_CHUNK_BYTES: usize = 1 << 20;
const ZERO_FILL_DEPTH: usize = 8;

/// The file name of a segment.
pub fn file_name(id: SegmentId) -> String {
    format!("{:010}.wal", id.0)
}

/// Parses a segment file name.
pub fn parse_file_name(name: &str) -> Option<SegmentId> {
    let stem = name.strip_suffix(".wal")?;
    if stem.len() != 10 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok().map(SegmentId)
}

/// An open segment.
pub struct SegmentFile {
    /// Sequence number.
    pub id: SegmentId,
    /// Path of the file.
    pub path: PathBuf,
    /// The file, opened with O_DIRECT.
    pub file: Rc<DmaFile>,
    /// Size the segment may grow to (from its header).
    pub capacity: u64,
    /// Bytes of the file that exist and are zero-filled or written: appends stay
    /// below it, and scans stop at it.
    zeroed_end: Cell<u64>,
}

fn check_alignment(file: &DmaFile, path: &Path) -> Result<()> {
    let alignment = file.alignment();
    if alignment > SECTOR_BYTES || !SECTOR_BYTES.is_multiple_of(alignment) {
        return Err(StorageError::Incompatible {
            path: path.to_path_buf(),
            reason: format!(
                "device needs {alignment}-byte aligned direct I/O; Sluice writes {SECTOR_BYTES}-byte blocks"
            ),
        });
    }
    Ok(())
}

/// How the extender prepares the next step of a segment. Both leave blocks that
/// exist and read as zeros, so recovery treats them alike; they differ in what
/// the appends into them cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extend {
    /// Write zeros: an append into them then overwrites written blocks, and its
    /// fdatasync flushes data only. Best for small writes, whose fdatasync would
    /// otherwise also commit the conversion of an unwritten extent each time; it
    /// costs a second write of every byte and bursts of zeros that the appends
    /// queue behind.
    ZeroFill,
    /// `fallocate` (unwritten extents): no bytes written ahead; each append's
    /// fdatasync also commits its extent's conversion, a cost that large writes
    /// amortize.
    Allocate,
}

impl SegmentFile {
    /// Creates a new segment: zero-fills its first step, writes its header block
    /// last, syncs it, then syncs the directory so the file's name is durable too.
    pub async fn create(
        dir: &Path,
        shard: ShardId,
        id: SegmentId,
        capacity: u64,
        now_ms: i64,
    ) -> Result<SegmentFile> {
        debug_assert!(capacity.is_multiple_of(SECTOR_BYTES));
        let path = dir.join(file_name(id));
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .dma_open(&path)
            .await
            .map_err(|e| StorageError::glommio("create segment", &path, e))?;
        check_alignment(&file, &path)?;
        let segment = SegmentFile {
            id,
            path: path.clone(),
            file: Rc::new(file),
            capacity,
            zeroed_end: Cell::new(SEGMENT_HEADER_BYTES),
        };
        if let Err(error) = segment.initialize(shard, now_ms).await {
            // Leave no half-made segment behind: recovery would refuse it.
            let _ = std::fs::remove_file(&path);
            return Err(error);
        }
        sync_directory(dir).await?;
        Ok(segment)
    }

    async fn initialize(&self, shard: ShardId, now_ms: i64) -> Result<()> {
        let first_step = self.capacity.min(SEGMENT_ZERO_STEP_BYTES);
        self.zero_fill(SEGMENT_HEADER_BYTES, first_step).await?;
        let mut block = self.file.alloc_dma_buffer(SEGMENT_HEADER_BYTES as usize);
        block.as_bytes_mut().fill(0);
        let header = SegmentHeader::new(shard, self.id, self.capacity, now_ms);
        block.as_bytes_mut()[..std::mem::size_of::<SegmentHeader>()]
            .copy_from_slice(header.as_bytes());
        self.write(block, 0).await?;
        self.sync().await?;
        self.zeroed_end.set(first_step);
        Ok(())
    }

    /// Bytes that exist and may be written (see the field).
    pub fn zeroed_end(&self) -> u64 {
        self.zeroed_end.get()
    }

    /// Prepares the next step (up to `capacity`) and makes it durable, so that
    /// appends into it never change the file's size: by zero-filling it or by
    /// allocating it (see [`Extend`]). Returns the new extent.
    pub async fn extend(&self, how: Extend) -> Result<u64> {
        let from = self.zeroed_end.get();
        let to = (from + SEGMENT_ZERO_STEP_BYTES).min(self.capacity);
        if to <= from {
            return Ok(from);
        }
        match how {
            Extend::ZeroFill => self.zero_fill(from, to).await?,
            Extend::Allocate => self
                .file
                .pre_allocate(to, false)
                .await
                .map_err(|e| StorageError::glommio("fallocate segment", &self.path, e))?,
        }
        self.sync().await?;
        self.zeroed_end.set(to);
        Ok(to)
    }

    /// Cuts the file after `end` (rounded up to a block): an old segment gives its
    /// unused zero-filled tail back once appends moved on.
    pub async fn shrink_to(&self, end: u64) -> Result<()> {
        let end = end.div_ceil(SECTOR_BYTES) * SECTOR_BYTES;
        if end >= self.zeroed_end.get() {
            return Ok(());
        }
        self.file
            .truncate(end)
            .await
            .map_err(|e| StorageError::glommio("truncate segment", &self.path, e))?;
        self.zeroed_end.set(end);
        self.sync().await
    }

    /// Writes zeros over `[from, to)` (both sector-aligned) with several writes in
    /// flight, logging progress when it takes long (a slow disk at first start).
    pub async fn zero_fill(&self, from: u64, to: u64) -> Result<()> {
        debug_assert!(from.is_multiple_of(SECTOR_BYTES) && to.is_multiple_of(SECTOR_BYTES));
        let started = Instant::now();
        let mut reported = started;
        let mut position = from;
        while position < to {
            if reported.elapsed() >= Duration::from_secs(1) {
                reported = Instant::now();
                let percent = (position - from) * 100 / (to - from).max(1);
                tracing::info!(path = %self.path.display(), "preparing WAL segment: {percent}% zero-filled");
            }
            let mut writes = Vec::with_capacity(ZERO_FILL_DEPTH);
            for _ in 0..ZERO_FILL_DEPTH {
                if position >= to {
                    break;
                }
                let bytes = (to - position).min(ZERO_FILL_CHUNK_BYTES as u64) as usize;
                let mut buffer = self.file.alloc_dma_buffer(bytes);
                buffer.as_bytes_mut().fill(0);
                writes.push(self.write(buffer, position));
                position += bytes as u64;
            }
            for result in futures::future::join_all(writes).await {
                result?;
            }
        }
        Ok(())
    }

    /// Opens an existing segment and checks its header.
    pub async fn open(
        dir: &Path,
        shard: ShardId,
        id: SegmentId,
    ) -> Result<(SegmentFile, SegmentHeader)> {
        let path = dir.join(file_name(id));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .dma_open(&path)
            .await
            .map_err(|e| StorageError::glommio("open segment", &path, e))?;
        check_alignment(&file, &path)?;
        let size = file
            .file_size()
            .await
            .map_err(|e| StorageError::glommio("stat segment", &path, e))?;
        let block = file
            .read_at_aligned(0, SEGMENT_HEADER_BYTES as usize)
            .await
            .map_err(|e| StorageError::glommio("read segment header", &path, e))?;
        let header = SegmentHeader::parse(&block).map_err(|reason| StorageError::Corrupt {
            path: path.clone(),
            position: 0,
            reason,
        })?;
        if header.shard.get() != shard.0 || header.segment_id.get() != id.0 {
            return Err(StorageError::Incompatible {
                path,
                reason: format!(
                    "segment header says shard {} segment {}, expected shard {} segment {}",
                    header.shard.get(),
                    header.segment_id.get(),
                    shard.0,
                    id.0
                ),
            });
        }
        let capacity = header.segment_bytes.get() / SECTOR_BYTES * SECTOR_BYTES;
        let zeroed_end = size.min(capacity) / SECTOR_BYTES * SECTOR_BYTES;
        Ok((
            SegmentFile {
                id,
                path,
                file: Rc::new(file),
                capacity,
                zeroed_end: Cell::new(zeroed_end.max(SEGMENT_HEADER_BYTES)),
            },
            header,
        ))
    }

    /// One aligned write of a whole buffer.
    pub async fn write(&self, buffer: glommio::io::DmaBuffer, position: u64) -> Result<()> {
        let bytes = buffer.len();
        debug_assert!(
            position.is_multiple_of(SECTOR_BYTES) && (bytes as u64).is_multiple_of(SECTOR_BYTES)
        );
        debug_assert!(position + bytes as u64 <= self.capacity.max(SEGMENT_HEADER_BYTES));

        let written = self
            .file
            .write_at(buffer, position)
            .await
            .map_err(|e| StorageError::glommio("write segment", &self.path, e))?;
        if written != bytes {
            return Err(StorageError::Io {
                op: "write segment",
                path: self.path.clone(),
                message: format!("short write: {written} of {bytes} bytes at {position}"),
                errno: None,
            });
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub async fn sync(&self) -> Result<()> {
        self.file
            .fdatasync()
            .await
            .map_err(|e| StorageError::glommio("fdatasync segment", &self.path, e))
    }

    /// Aligned direct read of `[position, position + bytes)`; may return fewer bytes
    /// at EOF. Runs on the blocking pool (see `aligned.rs` for why not io_uring).
    pub async fn read(&self, position: u64, bytes: usize) -> Result<AlignedBuffer> {
        debug_assert!(
            position.is_multiple_of(SECTOR_BYTES) && (bytes as u64).is_multiple_of(SECTOR_BYTES)
        );
        let fd = self.file.as_raw_fd();
        // The Rc<DmaFile> held by `self` keeps the descriptor open until we return.
        let result = glommio::executor()
            .spawn_blocking(move || pread_aligned(fd, position, bytes))
            .await;
        result.map_err(|e| StorageError::std("read segment", &self.path, e))
    }
}

/// fsyncs a directory so that created, renamed or removed names in it are durable.
pub async fn sync_directory(dir: &Path) -> Result<()> {
    let directory = Directory::open(dir)
        .await
        .map_err(|e| StorageError::glommio("open directory", dir, e))?;
    directory
        .sync()
        .await
        .map_err(|e| StorageError::glommio("fsync directory", dir, e))?;
    let _ = directory.close().await;
    Ok(())
}
