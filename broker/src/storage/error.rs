//! Storage errors: typed, cloneable (one failure completes many waiting appends),
//! and saying which file and position when data is at fault.

use std::path::PathBuf;

use crate::types::{LogId, Offset};

/// A storage failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// An I/O call failed.
    #[error("{op} {path}: {message}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error, as text.
        message: String,
        /// The raw errno, if any.
        errno: Option<i32>,
    },
    /// The device is out of space; nothing of the failed append was acknowledged.
    #[error("disk full: {path}: {message}")]
    DiskFull {
        /// The file that could not be written or created.
        path: PathBuf,
        /// Details.
        message: String,
    },
    /// An invalid frame where only valid frames may be: the log is corrupt there and
    /// nothing past it is served.
    #[error("corrupt WAL: {path} at byte {position}: {reason}")]
    Corrupt {
        /// Segment file.
        path: PathBuf,
        /// Byte position in it.
        position: u64,
        /// What is wrong.
        reason: String,
    },
    /// The data directory was written by an incompatible build or configuration.
    #[error("incompatible data directory {path}: {reason}")]
    Incompatible {
        /// The directory or file.
        path: PathBuf,
        /// What does not match, and what to do.
        reason: String,
    },
    /// Read position below the log start or above the high watermark.
    #[error("offset {offset} out of range [{log_start}, {high_watermark}]")]
    OffsetOutOfRange {
        /// Requested offset.
        offset: Offset,
        /// First offset still stored.
        log_start: Offset,
        /// Offset the next record will get.
        high_watermark: Offset,
    },
    /// A batch larger than a WAL segment can hold.
    #[error("batch of {bytes} bytes exceeds the WAL's limit of {limit} bytes per batch")]
    BatchTooLarge {
        /// Batch size.
        bytes: usize,
        /// Largest batch a segment holds.
        limit: usize,
    },
    /// No such partition log on this shard.
    #[error("unknown log {0}")]
    UnknownLog(LogId),
    /// The WAL failed earlier (fsync error or similar) and refuses further appends
    /// until the broker restarts and recovers.
    #[error("WAL unavailable after an earlier failure: {0}")]
    Failed(String),
    /// The WAL is closing.
    #[error("WAL is shutting down")]
    ShuttingDown,
}

impl StorageError {
    /// Builds an I/O error, classifying ENOSPC/EDQUOT as [`StorageError::DiskFull`].
    pub fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
        error: &dyn std::fmt::Display,
        errno: Option<i32>,
    ) -> Self {
        let path = path.into();
        let message = error.to_string();
        match errno {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => StorageError::DiskFull { path, message },
            _ => StorageError::Io {
                op,
                path,
                message,
                errno,
            },
        }
    }

    /// From a glommio error.
    pub fn glommio(
        op: &'static str,
        path: impl Into<PathBuf>,
        error: glommio::GlommioError<()>,
    ) -> Self {
        let errno = match &error {
            glommio::GlommioError::IoError(e) => e.raw_os_error(),
            glommio::GlommioError::EnhancedIoError { source, .. } => source.raw_os_error(),
            _ => None,
        };
        Self::io(op, path, &error, errno)
    }

    /// From a std I/O error.
    pub fn std(op: &'static str, path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        let errno = error.raw_os_error();
        Self::io(op, path, &error, errno)
    }
}

/// Storage result.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
