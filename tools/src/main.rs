//! `sluice`: command-line tool for Sluice brokers.
//!
//! Each subcommand lives in its own module with an `Args` struct (clap derive)
//! and an async `run`; adding a subcommand is one module, one `Command` variant
//! and one match arm in [`run`].

mod cluster;
mod consume;
mod group;
mod output;
mod produce;
mod topic;
mod wal;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice_client::{Client, ClientConfig};

use crate::output::OutputFormat;

/// Error type of every subcommand: printed as one `error: ...` line.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;
/// Result of a subcommand.
pub type CliResult<T = ()> = Result<T, CliError>;

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "Command-line tool for Sluice brokers"
)]
struct Cli {
    /// Brokers to bootstrap from (comma-separated host:port).
    #[arg(
        long,
        env = "SLUICE_BROKERS",
        default_value = "127.0.0.1:9440",
        value_delimiter = ',',
        global = true
    )]
    brokers: Vec<String>,
    /// Output format of listings (table or json).
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    format: OutputFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list, describe and delete topics.
    Topic {
        #[command(subcommand)]
        command: topic::TopicCommand,
    },
    /// Cluster state: nodes, controller, leaders, under-replicated partitions.
    Cluster {
        #[command(subcommand)]
        command: cluster::ClusterCommand,
    },
    /// Send stdin lines as records.
    Produce(produce::ProduceArgs),
    /// Print records of a topic (alone, or as a consumer-group member).
    Consume(consume::ConsumeArgs),
    /// Consumer groups: list, describe (with lag), reset offsets, delete.
    Group {
        #[command(subcommand)]
        command: group::GroupCommand,
    },
    /// Inspect a stopped broker's write-ahead log.
    Wal {
        #[command(subcommand)]
        command: wal::WalCommand,
    },
}

/// Connects to the brokers given on the command line.
pub async fn connect(brokers: &[String]) -> CliResult<Client> {
    let mut config = ClientConfig::new(brokers.iter().cloned());
    config.client_id = "sluice-cli".into();
    Ok(Client::connect(config).await?)
}

async fn run(cli: Cli) -> CliResult {
    match cli.command {
        Command::Topic { command } => topic::run(&cli.brokers, cli.format, command).await,
        Command::Cluster { command } => cluster::run(&cli.brokers, cli.format, command).await,
        Command::Produce(args) => produce::run(&cli.brokers, args).await,
        Command::Consume(args) => consume::run(&cli.brokers, cli.format, args).await,
        Command::Group { command } => group::run(&cli.brokers, cli.format, command).await,
        Command::Wal { command } => wal::run(cli.format, command),
    }
}

fn main() -> ExitCode {
    // Like any Unix tool: a closed pipe downstream ends the process quietly.
    // SAFETY: restoring the default disposition of SIGPIPE has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Client diagnostics on stderr when asked for: SLUICE_LOG=debug.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if output::is_broken_pipe(&*error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
