//! Results: the printed summary, `--json`, `--hdr-log` and `--chart`.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::load::Case;
use crate::machine::Machine;

/// Who ran where.
#[derive(Clone, Debug, Serialize)]
pub struct Placement {
    /// True when the broker ran in this process.
    pub embedded_broker: bool,
    /// Broker address.
    pub brokers: String,
    /// CPUs given to the broker's shards (embedded only).
    pub broker_cpus: Vec<usize>,
    /// CPUs given to the load generator.
    pub load_cpus: Vec<usize>,
    /// The embedded broker's tail cache per shard, bytes (0 for a running broker:
    /// unknown here).
    pub tail_cache_bytes: usize,
}

/// The whole `--json` document.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Schema version of this document.
    pub schema_version: u32,
    /// Tool and version.
    pub tool: String,
    /// Subcommand.
    pub command: String,
    /// Seconds since the epoch at the end of the run.
    pub finished_at: u64,
    /// Machine facts.
    pub machine: Machine,
    /// Core placement.
    pub placement: Placement,
    /// The workload flags as given (scaling varies partitions, producers and the
    /// in-flight settings per case; each case records its own).
    pub config: crate::load::Workload,
    /// Notes (e.g. CPU-bound caveats).
    pub notes: Vec<String>,
    /// Measured cases.
    pub cases: Vec<Case>,
}

impl Report {
    /// A report for these cases.
    pub fn new(
        command: &str,
        placement: Placement,
        config: crate::load::Workload,
        notes: Vec<String>,
        cases: Vec<Case>,
    ) -> Report {
        Report {
            schema_version: 1,
            tool: concat!("sluice-bench ", env!("CARGO_PKG_VERSION")).to_string(),
            command: command.to_string(),
            finished_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            machine: Machine::read(),
            placement,
            config,
            notes,
            cases,
        }
    }

    /// Writes the JSON document.
    pub fn write_json(&self, path: &Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Prints a case's final summary.
pub fn print_summary(case: &Case) {
    let l = &case.latency_us;
    println!(
        "{} ({}): {} records, {:.0} records/sec ({:.2} MB/sec), latency us p50 {} p90 {} p99 {} p99.9 {} p99.99 {} max {}{}",
        case.name,
        case.regime,
        case.records,
        case.records_per_sec,
        case.bytes_per_sec / 1e6,
        l.p50,
        l.p90,
        l.p99,
        l.p999,
        l.p9999,
        l.max,
        if case.errors > 0 {
            format!(", {} errors (first: {})", case.errors, case.first_error.as_deref().unwrap_or(""))
        } else {
            String::new()
        }
    );
    let broker = case
        .cpu
        .broker_cores
        .map(|c| format!("{c:.2} cores"))
        .unwrap_or_else(|| "n/a (external)".into());
    println!(
        "    CPU: broker {broker}, load generator {:.2} cores; {}",
        case.cpu.load_cores, case.durability
    );
    if let Some(stages) = &case.broker_stages {
        let line: Vec<String> = stages
            .iter()
            .map(|s| format!("{} {:.0}", s.stage, s.mean_us))
            .collect();
        println!("    broker produce stages, mean us: {}", line.join(", "));
    }
    if let Some(requests) = &case.requests {
        let l = &requests.latency_us;
        println!(
            "    produce requests: {} ({} failed), latency us p50 {} p90 {} p99 {} p99.9 {} max {} mean {:.0}; sealed batch waited p50 {} p99 {} us",
            requests.count,
            requests.failed,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            l.mean,
            requests.queue_p50_us,
            requests.queue_p99_us
        );
        if requests.batches_retried > 0 {
            println!(
                "    batches retried: {} (latest error: {})",
                requests.batches_retried,
                requests.last_retry_error.as_deref().unwrap_or("")
            );
        }
    }
}

/// Writes every case's per-second histograms as an HdrHistogram interval log.
pub fn write_hdr_log(path: &Path, cases: &[Case]) -> Result<(), String> {
    use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
    use hdrhistogram::serialization::V2DeflateSerializer;
    let mut file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut serializer = V2DeflateSerializer::new();
    let mut writer = IntervalLogWriterBuilder::new()
        .add_comment("sluice-bench latency intervals, microseconds; tag = case name")
        .with_start_time(SystemTime::now())
        .begin_log_with(&mut file, &mut serializer)
        .map_err(|e| e.to_string())?;
    for case in cases {
        let tag_text: String = case
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let mut previous = 0.0;
        for interval in &case.per_second {
            if let Some(histogram) = &interval.histogram {
                let tag = Tag::new(&tag_text);
                writer
                    .write_histogram(
                        histogram,
                        Duration::from_secs_f64(previous),
                        Duration::from_secs_f64(interval.t - previous),
                        tag,
                    )
                    .map_err(|e| format!("{e:?}"))?;
            }
            previous = interval.t;
        }
    }
    drop(writer);
    file.flush().map_err(|e| e.to_string())
}

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// Writes an SVG with the latency percentile curves and throughput over time.
pub fn write_chart(path: &Path, title: &str, cases: &[Case]) -> Result<(), String> {
    let (width, height) = (960.0, 420.0);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="18" text-anchor="middle" font-size="14">{}</text>
"#,
        width / 2.0,
        escape(title)
    );
    // Left: latency by percentile (x: 0, 90, 99, 99.9, 99.99, 99.999 equally spaced).
    let (lx, ly, lw, lh) = (60.0, 40.0, 400.0, 320.0);
    let max_latency = cases
        .iter()
        .filter_map(|c| c.histogram.as_ref())
        .map(|h| h.max())
        .max()
        .unwrap_or(1)
        .max(10) as f64;
    let y_of = |us: f64| ly + lh - (us.max(1.0).log10() / max_latency.log10()) * lh;
    svg += &axes(lx, ly, lw, lh, "percentile", "latency (µs, log)");
    for (label, nines) in [
        ("50", std::f64::consts::LOG10_2),
        ("90", 1.0),
        ("99", 2.0),
        ("99.9", 3.0),
        ("99.99", 4.0),
        ("99.999", 5.0),
    ] {
        let x = lx + nines / 5.0 * lw;
        svg += &format!(
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>\n",
            ly + lh + 14.0
        );
    }
    let mut decade = 1.0;
    while decade <= max_latency * 1.01 {
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{decade}</text>\n",
            lx - 4.0,
            y_of(decade) + 4.0
        );
        decade *= 10.0;
    }
    for (index, case) in cases.iter().enumerate() {
        let Some(histogram) = case.histogram.as_ref().filter(|h| !h.is_empty()) else {
            continue;
        };
        let color = COLORS[index % COLORS.len()];
        let points: Vec<String> = (0..=100)
            .map(|i| {
                let nines = std::f64::consts::LOG10_2
                    + (5.0 - std::f64::consts::LOG10_2) * i as f64 / 100.0;
                let quantile = 1.0 - 10f64.powf(-nines);
                let us = histogram.value_at_quantile(quantile) as f64;
                format!("{:.1},{:.1}", lx + nines / 5.0 * lw, y_of(us))
            })
            .collect();
        svg += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
            points.join(" ")
        );
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\">{}</text>\n",
            lx + 6.0,
            ly + 12.0 + 13.0 * index as f64,
            escape(&format!("{} ({})", case.name, case.regime))
        );
    }
    // Right: throughput over time.
    let (rx, ry, rw, rh) = (540.0, 40.0, 380.0, 320.0);
    let max_rate = cases
        .iter()
        .flat_map(|c| c.per_second.iter().map(|i| i.records_per_sec))
        .fold(1.0, f64::max);
    let max_t = cases
        .iter()
        .flat_map(|c| c.per_second.iter().map(|i| i.t))
        .fold(1.0, f64::max);
    svg += &axes(rx, ry, rw, rh, "seconds", "records/s");
    svg += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.0}</text>\n",
        rx - 4.0,
        ry + 4.0,
        max_rate
    );
    svg += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.0}</text>\n",
        rx + rw,
        ry + rh + 14.0,
        max_t
    );
    for (index, case) in cases.iter().enumerate() {
        let color = COLORS[index % COLORS.len()];
        let points: Vec<String> = case
            .per_second
            .iter()
            .map(|i| {
                format!(
                    "{:.1},{:.1}",
                    rx + i.t / max_t * rw,
                    ry + rh - i.records_per_sec / max_rate * rh
                )
            })
            .collect();
        if !points.is_empty() {
            svg += &format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
                points.join(" ")
            );
        }
    }
    svg += "</svg>\n";
    std::fs::write(path, svg).map_err(|e| format!("{}: {e}", path.display()))
}

fn axes(x: f64, y: f64, w: f64, h: f64, x_label: &str, y_label: &str) -> String {
    format!(
        "<rect x=\"{x}\" y=\"{y}\" width=\"{w}\" height=\"{h}\" fill=\"none\" stroke=\"#888\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{x_label}</text>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 {:.1} {:.1})\">{y_label}</text>\n",
        x + w / 2.0,
        y + h + 30.0,
        x - 45.0,
        y + h / 2.0,
        x - 45.0,
        y + h / 2.0
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
