//! walbust benchmarks against the physical limit: `pg_recvlogical` draining the same WAL.
//!
//! `cargo run --release --example bench -- all` starts a throwaway Postgres and Redis
//! (`walbust::offline::throwaway`), runs every scenario, and prints one results table per scenario.
//! See `bench/README.md` for what each scenario measures and how.

use anyhow::{Context, ensure};
use clap::{Parser, ValueEnum};
use std::path::{Path, PathBuf};

mod consistency;
mod cost;
mod drain;
mod env;
mod instructions;
mod large_txn;
mod latency;
mod measure;
mod pgbench;
mod soak;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Drain pre-written WAL: walbust against pg_recvlogical.
    Drain,
    /// Commit-to-invalidation latency at paced commit rates.
    Latency,
    /// walbust CPU per change, RSS, and pgbench throughput with and without walbust.
    Cost,
    /// One very large transaction: bounded RSS, every key invalidated.
    LargeTxn,
    /// Drain, latency, cost and large-txn, in that order.
    All,
    /// Committed writes under a seeded schedule of faults; fails if an invalidation is lost.
    Soak,
    /// The consistency oracle (stale keys, on and off) and the cost of never-stale.
    Consistency,
    /// Instructions per change under callgrind, beside `--baseline` when given.
    Instructions,
}

/// walbust benchmarks; every scenario starts its own throwaway Postgres and Redis.
#[derive(Debug, Parser)]
#[command(name = "bench")]
struct Cli {
    /// Which scenario to run.
    pub(crate) scenario: Scenario,
    /// Repetitions of each measurement; medians are quoted.
    #[arg(long, default_value_t = 3)]
    pub(crate) runs: usize,
    /// Drain variants to run, by number: 1 (1 row/txn), 2 (10), 3 (100), 4 (mixed, 10 rows/txn).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    pub(crate) variants: Vec<usize>,
    /// Changes pre-written per drain variant.
    #[arg(long, default_value_t = 200_000)]
    pub(crate) changes: i64,
    /// Commit rates for the latency scenario (commits per second).
    #[arg(long, value_delimiter = ',', default_value = "500,5000")]
    pub(crate) rates: Vec<u32>,
    /// Seconds of paced writing per latency run.
    #[arg(long, default_value_t = 10)]
    pub(crate) latency_secs: u64,
    /// Changes written while walbust's CPU time is measured.
    #[arg(long, default_value_t = 200_000)]
    pub(crate) cost_changes: i64,
    /// Seconds per pgbench run; 0 skips pgbench.
    #[arg(long, default_value_t = 20)]
    pub(crate) pgbench_secs: u64,
    /// pgbench clients.
    #[arg(long, default_value_t = 4)]
    pub(crate) pgbench_clients: u32,
    /// pgbench scale factor (100,000 accounts per unit).
    #[arg(long, default_value_t = 10)]
    pub(crate) pgbench_scale: u32,
    /// Rows updated by the one large transaction.
    #[arg(long, default_value_t = 10_000_000)]
    pub(crate) large_rows: i64,
    /// Runs of the large-transaction scenario (it is long; one by default).
    #[arg(long, default_value_t = 1)]
    pub(crate) large_runs: usize,
    /// Wait before each measurement until the 1-minute load average is below this.
    #[arg(long, default_value_t = 0.7)]
    pub(crate) load_below: f64,
    /// Longest wait for the load to settle, in seconds; then measure anyway and say so.
    #[arg(long, default_value_t = 600)]
    pub(crate) load_wait_secs: u64,
    /// Drain also into a throwaway Redis Cluster (three primaries), beside the single node.
    #[arg(long)]
    pub(crate) cluster: bool,
    /// A walbust binary built from another commit, counted beside this build on the same
    /// WAL (instructions scenario).
    #[arg(long)]
    pub(crate) baseline: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) soak: soak::SoakArgs,
    #[command(flatten)]
    pub(crate) consistency: consistency::ConsistencyArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let walbust_bin = build_walbust()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if cli.scenario == Scenario::Soak {
        if !runtime.block_on(soak::run(&cli.soak, &walbust_bin))? {
            std::process::exit(1);
        }
        return Ok(());
    }
    runtime.block_on(run(cli, walbust_bin))
}

async fn run(cli: Cli, walbust_bin: PathBuf) -> anyhow::Result<()> {
    let all = cli.scenario == Scenario::All;
    println!(
        "# walbust benchmarks\n\nmachine: {} cores, {}; runs per figure: {}; figures are median (min-max).",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        first_line("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown cpu".into()),
        cli.runs
    );
    println!(
        "Postgres: throwaway cluster with fsync=off and full_page_writes=off (both consumers drain the same WAL), synchronous_commit=on, autovacuum=off.\n"
    );
    let env = env::Env::start().await?;
    if all || cli.scenario == Scenario::Drain {
        drain::drain(&cli, &env).await?;
    }
    if all || cli.scenario == Scenario::Latency {
        latency::latency(&cli, &env, &walbust_bin).await?;
    }
    if all || cli.scenario == Scenario::Cost {
        cost::cost(&cli, &env, &walbust_bin).await?;
    }
    if all || cli.scenario == Scenario::LargeTxn {
        large_txn::large_txn(&cli, &env, &walbust_bin).await?;
    }
    if cli.scenario == Scenario::Consistency {
        consistency::consistency(&cli, &env, &walbust_bin).await?;
    }
    if cli.scenario == Scenario::Instructions {
        instructions::instructions(&cli, &env, &walbust_bin).await?;
    }
    Ok(())
}

/// Builds the release binary the child-process scenarios run, and returns its path.
fn build_walbust() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    // Built together with this example, so both share one feature resolution: the binary
    // alone would resolve dependencies without the dev-dependencies' features and rebuild
    // most of them a second time.
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "--quiet", "--bin", "walbust", "--example", "bench", "--manifest-path"])
        .arg(&manifest)
        .status()
        .context("running cargo build for the walbust binary")?;
    ensure!(status.success(), "cargo build --release --bin walbust failed");
    // This example runs from target/release/examples/bench; the binary sits in target/release.
    let exe = std::env::current_exe()?;
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("walbust")).context("locating target/release")?;
    ensure!(bin.is_file(), "{} is missing after the build", bin.display());
    Ok(bin)
}

fn first_line(path: &str, prefix: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(prefix))?;
    Some(line.split_once(':').map_or(line, |(_, v)| v).trim().to_string())
}
