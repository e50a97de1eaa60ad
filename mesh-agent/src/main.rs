use std::{path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mesh_agent::{
    api::{self, AppState, DEFAULT_SOCKET},
    dataplane::Dataplane,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Mutex,
};
use tracing::info;

#[derive(Parser, Debug)]
#[command(name = "mesh-agent", version, about = "The mesh per-node agent")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent in the foreground.
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Underlay interface the routing mesh listens on.
    #[arg(long, default_value = "eth0")]
    interface: String,
    /// Path of the local API socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// bpffs directory holding this node's pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/mesh")]
    bpffs: PathBuf,
    /// On exit, detach the dataplane and remove its pins instead of leaving it forwarding.
    #[arg(long)]
    cleanup: bool,
}

#[tokio::main]
async fn main() {
    mesh_agent::logging::init("info");
    let args = Args::parse();
    let result = match args.command {
        Command::Run(run) => run_agent(run).await,
    };
    if let Err(e) = result {
        tracing::error!("{e:#}");
        std::process::exit(1);
    }
}

async fn run_agent(args: RunArgs) -> Result<()> {
    let dataplane = Dataplane::start(&args.bpffs, &args.interface)?;
    let state = Arc::new(AppState {
        dataplane: Mutex::new(dataplane),
    });
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    info!(socket = %args.socket.display(), "agent ready");
    tokio::select! {
        r = api::serve(&args.socket, state.clone()) => r?,
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
    }
    let _ = std::fs::remove_file(&args.socket);
    if args.cleanup {
        let dp = Arc::try_unwrap(state)
            .map_err(|_| anyhow::anyhow!("dataplane still in use at shutdown"))?
            .dataplane
            .into_inner();
        dp.remove_pins()?;
        info!("dataplane detached and unpinned");
    }
    Ok(())
}
