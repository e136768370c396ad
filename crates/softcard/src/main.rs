//! `softcard`: the card daemon, its CLI and its benchmarks. A thin layer
//! over `softcard-storage` (the storage function) and `softcard-control`
//! (configuration and management API).

mod bench;
mod bench_cells;
mod bench_cpu;
mod bench_qos;
mod bench_rdma;
mod bench_spdk;
mod bench_upgrade;
mod bench_verbs;
mod bench_wake;
mod cli;
mod daemon;
mod gpu;
mod gpu_bench;
mod gpu_region;
mod rdma;
mod region_bench;
mod region_cli;
mod up;
mod upgrade;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("softcard: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
