//! Machine facts and CPU accounting for benchmark reports.

use serde::Serialize;

/// What the benchmark ran on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// Online CPUs.
    pub cpus: usize,
    /// CPU model name.
    pub cpu_model: String,
    /// Kernel release.
    pub kernel: String,
    /// Memory, GiB.
    pub memory_gib: f64,
}

impl Machine {
    /// Reads /proc.
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map(|kb| (kb / 1024.0 / 1024.0 * 10.0).round() / 10.0)
            .unwrap_or(0.0);
        Machine {
            cpus: crate::machine::online_cpus(),
            cpu_model,
            kernel,
            memory_gib,
        }
    }
}

/// CPU seconds used so far by this process's threads, split into the embedded
/// broker's shard threads and everything else (the load generator).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSplit {
    /// Broker shard threads (and their blocking helpers).
    pub broker_seconds: f64,
    /// Every other thread.
    pub load_seconds: f64,
}

impl CpuSplit {
    /// Reads /proc/self/task/*/stat.
    pub fn now() -> CpuSplit {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let mut split = CpuSplit::default();
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return split;
        };
        for task in tasks.flatten() {
            let path = task.path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
                continue;
            };
            // Fields after the parenthesised command name; utime and stime are the
            // 14th and 15th fields overall.
            let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let (Some(utime), Some(stime)) = (fields.get(11), fields.get(12)) else {
                continue;
            };
            let seconds =
                (utime.parse::<f64>().unwrap_or(0.0) + stime.parse::<f64>().unwrap_or(0.0)) / ticks;
            if comm.starts_with("sluice-shard") || comm.starts_with("blocking") {
                split.broker_seconds += seconds;
            } else {
                split.load_seconds += seconds;
            }
        }
        split
    }

    /// Usage between two readings.
    pub fn since(self, earlier: CpuSplit) -> CpuSplit {
        CpuSplit {
            broker_seconds: self.broker_seconds - earlier.broker_seconds,
            load_seconds: self.load_seconds - earlier.load_seconds,
        }
    }
}

/// Pins the calling thread to `cpu`; false if that failed.
pub fn pin_current_thread(cpu: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id: cpu })
}

/// CPUs online (not the calling thread's affinity, which pinning narrows).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        1
    }
}
