//! `bench`: see `bench --help` and the crate doc.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = chat_bench::cli::Cli::parse();
    // On Ctrl-C or SIGTERM the run is dropped, and with it every process it started.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = chat_bench::run(cli) => r,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
        _ = term.recv() => anyhow::bail!("terminated"),
    }
}
