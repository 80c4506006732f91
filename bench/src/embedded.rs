//! The broker started in this process by default: its own pinned cores and a
//! temporary data dir on a real filesystem, removed afterwards.

use std::net::SocketAddr;
use std::path::PathBuf;

use sluice_broker::runtime::{self, BrokerConfig, BrokerHandle};

/// A running embedded broker.
pub struct Embedded {
    handle: Option<BrokerHandle>,
    /// Its data dir.
    pub data_dir: PathBuf,
    /// Where clients connect.
    pub addr: SocketAddr,
}

/// The metrics of the first broker started in this process (for the produce
/// stage breakdown).
pub static METRICS: std::sync::OnceLock<sluice_broker::metrics::NodeMetrics> =
    std::sync::OnceLock::new();

/// Produce stage totals of the embedded broker: (stage, count, seconds).
pub fn stage_totals() -> Option<Vec<(&'static str, u64, f64)>> {
    METRICS.get().map(|metrics| metrics.produce_stage_totals())
}

/// `f_type` of tmpfs in statfs(2).
const TMPFS_MAGIC: i64 = 0x0102_1994;

impl Embedded {
    /// Starts a broker with one shard per CPU in `cpus`.
    pub fn start(
        data_root: &std::path::Path,
        cpus: &[usize],
        tail_cache_mib: Option<usize>,
    ) -> Result<Embedded, String> {
        let data_dir = data_root.join(format!("sluice-bench-data-{}", std::process::id()));
        std::fs::create_dir_all(&data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
        if is_tmpfs(&data_dir) {
            eprintln!(
                "warning: {} is on tmpfs, where O_DIRECT is silently off; durable figures will be wrong. Use --data-dir on a real filesystem.",
                data_dir.display()
            );
        }
        let listen: SocketAddr = "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?;
        let mut config = BrokerConfig::new(&data_dir, listen);
        config.shards = cpus.len();
        config.cpus = Some(cpus.to_vec());
        config.segment_bytes = 256 << 20;
        if let Some(mib) = tail_cache_mib {
            config.tail_cache_bytes = mib << 20;
        }
        let handle = runtime::start(config)?;
        let _ = METRICS.set(handle.metrics.clone());
        let addr = handle.addr;
        Ok(Embedded {
            handle: Some(handle),
            data_dir,
            addr,
        })
    }

    /// Stops the broker and removes its data.
    pub fn stop(mut self) -> Result<(), String> {
        let result = self
            .handle
            .take()
            .map(BrokerHandle::shutdown)
            .unwrap_or(Ok(()));
        let _ = std::fs::remove_dir_all(&self.data_dir);
        result
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = handle.shutdown();
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

fn is_tmpfs(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == TMPFS_MAGIC
    }
}
