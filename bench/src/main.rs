//! `sluice-bench`: Sluice's load generator.
//!
//! Available now: `wal`, a durable-append load against a storage engine started in
//! this process (no network), with per-second progress and an hdrhistogram latency
//! summary. The broker-level scenarios (`produce`, `consume`, `e2e`, `scaling`) come
//! with the broker's network front end.

mod wal;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sluice-bench", version, about = "Sluice load generator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Durable appends to an in-process write-ahead log (group commit at work).
    Wal(wal::WalArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Wal(args) => wal::run(args),
    };
    if let Err(error) = result {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}
