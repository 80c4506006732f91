//! The storage layer: one write-ahead log per shard holding the record batches of
//! every partition the shard owns, with per-partition indexes, group commit, crash
//! recovery and retention. Knows nothing of the network or of replication.
//!
//! Layout on disk (see `docs/storage.md`):
//!
//! ```text
//! <data-dir>/shard-<k>/wal/0000000001.wal   segments, pre-allocated and zero-filled
//! <data-dir>/shard-<k>/wal/checkpoint       index checkpoint (see checkpoint.rs)
//! ```

mod aligned;
mod cache;
pub mod checkpoint;
mod error;
pub mod format;
mod index;
pub mod inspect;
mod read;
mod recovery;
mod retention;
mod roll;
pub mod scan;
mod segment;
pub mod testkit;
mod wal;

pub use error::{Result, StorageError};
pub use index::{LogState, Run, WalPosition};
pub use read::ReadBatches;
pub use recovery::RecoveryReport;
pub use retention::Retention;
pub use wal::{Appended, Wal, WalConfig, WalStats};
