//! The storage layer: one write-ahead log per shard holding the record batches of
//! every partition the shard owns, with per-partition indexes, group commit, crash
//! recovery and retention. Knows nothing of the network; for replicated logs it
//! stores what the replica layer hands it (Raft entries, truncations, hard state:
//! see `control.rs`) and serves reads up to the commit point it is told.
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
pub mod control;
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

pub use control::{Anchor, Control, HardState};
pub use error::{Result, StorageError};
pub use index::{IndexedFrame, LogState, Replicated, Run, WalPosition};
pub use read::{ReadBatches, ReadRange};
pub use recovery::RecoveryReport;
pub use retention::Retention;
pub use wal::{
    now_ms, Appended, EntryFrame, LogWrite, ReplicatedView, Wal, WalConfig, WalStages, WalStats,
};
