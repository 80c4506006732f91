//! `sluice-bench`: Sluice's load generator.
//!
//! - `produce`, `consume`, `e2e`: one workload against a broker;
//! - `scaling`: 1 partition with 1 producer vs 3 partitions with 3 producers, in a
//!   latency-bound regime (one batch in flight per producer) and a saturation
//!   regime (many in flight), with the ratio;
//! - `wal`: durable appends to an in-process write-ahead log (no network).
//!
//! By default a broker is started in this process on its own pinned cores with a
//! temporary data dir under `./target`; `--brokers ADDR` targets a running one.

mod embedded;
mod group;
mod load;
mod machine;
mod recorder;
mod report;
mod wal;

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use load::{Case, Kind, Workload};
use report::{Placement, Report};

#[derive(Parser)]
#[command(
    name = "sluice-bench",
    version,
    about = "Sluice load generator with latency histograms"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Producers only; latency from send (or intended send, with --rate) to ack.
    Produce(Run),
    /// Consumers reading a pre-filled topic.
    Consume(Run),
    /// Producers and consumers; latency from send to consumption.
    E2e(Run),
    /// 1 vs 3 partitions, latency-bound and saturation regimes, with ratios.
    Scaling(Run),
    /// Durable appends to an in-process write-ahead log (group commit at work).
    Wal(wal::WalArgs),
}

#[derive(clap::Args, Clone)]
struct Run {
    #[command(flatten)]
    workload: Workload,
    /// Target a running broker instead of starting one in this process.
    #[arg(long)]
    brokers: Option<String>,
    /// CPUs for the embedded broker (one shard each). Default: the first half.
    #[arg(long, value_delimiter = ',')]
    broker_cpus: Option<Vec<usize>>,
    /// CPUs for the load generator. Default: the other half.
    #[arg(long, value_delimiter = ',')]
    load_cpus: Option<Vec<usize>>,
    /// Where the embedded broker's temporary data dir goes (a real filesystem).
    #[arg(long, default_value = "target")]
    data_dir: PathBuf,
    /// The embedded broker's tail cache per shard, MiB (the broker's default:
    /// 64). A consume run whose prefill fits in it is served from memory.
    #[arg(long)]
    tail_cache_mib: Option<usize>,
    /// Write results, configuration and machine facts as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write per-second latency histograms as an HdrHistogram interval log.
    #[arg(long)]
    hdr_log: Option<PathBuf>,
    /// Write an SVG chart: latency percentile curves and throughput over time.
    #[arg(long)]
    chart: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Wal(args) => wal::run(args),
        Command::Produce(run) => execute("produce", run, Kind::Produce),
        Command::Consume(run) => execute("consume", run, Kind::Consume),
        Command::E2e(run) => execute("e2e", run, Kind::E2e),
        Command::Scaling(run) => execute("scaling", run, Kind::Produce),
    };
    if let Err(error) = result {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

/// Splits the online CPUs: the broker gets the first half, the load generator the rest.
fn default_cpus(run: &Run) -> (Vec<usize>, Vec<usize>) {
    let cpus = crate::machine::online_cpus();
    let broker = run
        .broker_cpus
        .clone()
        .unwrap_or_else(|| (0..(cpus / 2).max(1)).collect());
    let load = run.load_cpus.clone().unwrap_or_else(|| {
        let rest: Vec<usize> = (0..cpus).filter(|c| !broker.contains(c)).collect();
        if rest.is_empty() {
            vec![0]
        } else {
            rest
        }
    });
    (broker, load)
}

fn execute(command: &str, run: Run, kind: Kind) -> Result<(), String> {
    let (broker_cpus, load_cpus) = default_cpus(&run);
    let embedded = match &run.brokers {
        Some(_) => None,
        None => Some(embedded::Embedded::start(
            &run.data_dir,
            &broker_cpus,
            run.tail_cache_mib,
        )?),
    };
    let brokers = run.brokers.clone().unwrap_or_else(|| {
        embedded
            .as_ref()
            .map(|e| e.addr.to_string())
            .unwrap_or_default()
    });
    let placement = Placement {
        embedded_broker: embedded.is_some(),
        brokers: brokers.clone(),
        broker_cpus: if embedded.is_some() {
            broker_cpus.clone()
        } else {
            Vec::new()
        },
        load_cpus: load_cpus.clone(),
        tail_cache_bytes: match (&embedded, run.tail_cache_mib) {
            (None, _) => 0,
            (Some(_), Some(mib)) => mib << 20,
            (Some(_), None) => sluice_broker::limits::TAIL_CACHE_BYTES_DEFAULT,
        },
    };
    let runtime = runtime(&load_cpus)?;
    let tty = std::io::stderr().is_terminal();
    let is_embedded = embedded.is_some();
    if let (Kind::Consume, Some(group)) = (kind, run.workload.group.clone()) {
        let result = runtime.block_on(group::run(&brokers, &run.workload, &group));
        drop(runtime);
        if let Some(embedded) = embedded {
            embedded.stop()?;
        }
        let steps = result?;
        for note in notes(command, &placement) {
            println!("note: {note}");
        }
        if let Some(path) = &run.json {
            group::write_json(path, &placement, &run.workload, &steps)?;
        }
        return Ok(());
    }
    let cases = runtime.block_on(async {
        if command == "scaling" {
            scaling(&brokers, &run.workload, is_embedded, tty).await
        } else {
            let name = format!("{command}-{}p", run.workload.partitions);
            let case = load::run_case(
                &brokers,
                kind,
                &run.workload,
                &name,
                "as configured",
                is_embedded,
                tty,
            )
            .await?;
            report::print_summary(&case);
            Ok(vec![case])
        }
    });
    drop(runtime);
    if let Some(embedded) = embedded {
        embedded.stop()?;
    }
    let cases = cases?;
    let mut notes = notes(command, &placement);
    notes.extend(cpu_notes(&cases, &placement));
    for note in &notes {
        println!("note: {note}");
    }
    let report = Report::new(command, placement, run.workload.clone(), notes, cases);
    if let Some(path) = &run.json {
        report.write_json(path)?;
    }
    if let Some(path) = &run.hdr_log {
        report::write_hdr_log(path, &report.cases)?;
    }
    if let Some(path) = &run.chart {
        report::write_chart(path, &format!("sluice-bench {command}"), &report.cases)?;
    }
    let failed: u64 = report.cases.iter().map(|c| c.errors).sum();
    if failed > 0 {
        return Err(format!("{failed} records failed (see the summary above)"));
    }
    Ok(())
}

/// A tokio runtime whose threads are pinned to `cpus`.
fn runtime(cpus: &[usize]) -> Result<tokio::runtime::Runtime, String> {
    if cpus.len() <= 1 {
        let cpu = cpus.first().copied().unwrap_or(0);
        machine::pin_current_thread(cpu);
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string());
    }
    let cpus = cpus.to_vec();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cpus.len())
        .enable_all()
        .on_thread_start(move || {
            let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            machine::pin_current_thread(cpus[index % cpus.len()]);
        })
        .build()
        .map_err(|e| e.to_string())
}

fn notes(command: &str, placement: &Placement) -> Vec<String> {
    let cpus = crate::machine::online_cpus();
    let mut notes = Vec::new();
    if placement.embedded_broker {
        notes.push(format!(
            "broker: {} shard(s) pinned to CPU {:?}; load generator pinned to CPU {:?}; {} CPUs online",
            placement.broker_cpus.len(),
            placement.broker_cpus,
            placement.load_cpus,
            cpus
        ));
    } else {
        notes.push(format!(
            "external broker at {}; load generator pinned to CPU {:?}",
            placement.brokers, placement.load_cpus
        ));
    }
    if command == "scaling" && cpus < 3 + 1 {
        notes.push(format!(
            "only {cpus} CPUs for 3 partitions plus the load generator: the saturation ratio is bounded by CPU, not by the broker's design (the per-case notes below say which cases ran out of CPU)"
        ));
    }
    notes
}

/// Says which cases ran out of CPU (either side at >= 90% of its cores).
fn cpu_notes(cases: &[Case], placement: &Placement) -> Vec<String> {
    let mut notes = Vec::new();
    for case in cases {
        let load_cores = placement.load_cpus.len().max(1) as f64;
        let mut bound = Vec::new();
        if case.cpu.load_cores >= 0.9 * load_cores {
            bound.push(format!(
                "load generator {:.2} of {load_cores} cores",
                case.cpu.load_cores
            ));
        }
        if let Some(broker) = case.cpu.broker_cores {
            let broker_cores = placement.broker_cpus.len().max(1) as f64;
            if broker >= 0.9 * broker_cores {
                bound.push(format!("broker {broker:.2} of {broker_cores} cores"));
            }
        }
        if !bound.is_empty() {
            notes.push(format!(
                "{} ({}) is CPU-bound: {}",
                case.name,
                case.regime,
                bound.join(", ")
            ));
        }
    }
    notes
}

/// 1 vs 3 partitions in both regimes.
async fn scaling(
    brokers: &str,
    base: &Workload,
    embedded: bool,
    tty: bool,
) -> Result<Vec<Case>, String> {
    let mut cases = Vec::new();
    let saturation_in_flight = base.max_in_flight.max(8);
    // Latency-bound: each producer holds one batch: send it, wait for the ack, send
    // the next (the seed's regime). Saturation: many batches in flight and a deep
    // buffer.
    for (regime, in_flight, buffered) in [
        ("latency-bound", 1usize, Some(1usize)),
        ("saturation", saturation_in_flight, None),
    ] {
        for partitions in [1u32, 3] {
            let workload = Workload {
                partitions,
                producers: partitions as usize,
                max_in_flight: in_flight,
                max_buffered_batches: buffered,
                // With one batch buffered, the batch goes out as soon as the
                // previous one is acknowledged; lingering would only add delay.
                linger_ms: if buffered.is_some() {
                    0
                } else {
                    base.linger_ms
                },
                ..base.clone()
            };
            let name = format!(
                "{partitions}-partition{}",
                if partitions == 1 { "" } else { "s" }
            );
            let case = load::run_case(
                brokers,
                Kind::Produce,
                &workload,
                &name,
                regime,
                embedded,
                tty,
            )
            .await?;
            report::print_summary(&case);
            cases.push(case);
        }
    }
    print_scaling_table(&cases);
    Ok(cases)
}

fn print_scaling_table(cases: &[Case]) {
    println!();
    println!(
        "{:<14} {:>10} {:>9} {:>12} {:>9} {:>8} {:>8} {:>8} {:>11}",
        "regime",
        "partitions",
        "producers",
        "records/s",
        "MB/s",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "ratio 3p/1p"
    );
    for case in cases {
        let one = cases
            .iter()
            .find(|c| c.regime == case.regime && c.partitions == 1);
        let ratio = match (case.partitions, one) {
            (3, Some(one)) if one.records_per_sec > 0.0 => {
                format!("{:.2}x", case.records_per_sec / one.records_per_sec)
            }
            _ => String::new(),
        };
        println!(
            "{:<14} {:>10} {:>9} {:>12.0} {:>9.1} {:>8} {:>8} {:>8} {:>11}",
            case.regime,
            case.partitions,
            case.producers,
            case.records_per_sec,
            case.bytes_per_sec / 1e6,
            case.latency_us.p50,
            case.latency_us.p99,
            case.latency_us.p999,
            ratio
        );
    }
    println!(
        "seed documents: 1 partition ~100000 records/s, 3 partitions ~300000 records/s (3.00x). Durability: {}",
        cases.first().map(|c| c.durability.as_str()).unwrap_or("")
    );
}
