//! `cargo xtask <task>`: the project's developer tasks.

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod dist;
mod layout;

#[derive(Parser)]
#[command(name = "xtask")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Format check, clippy with warnings denied, the layout check, then every unit and
    /// scenario test.
    Ci,
    /// No cycle between a crate's top-level modules; meshctl, mesh-cni and mesh-api do not
    /// depend on the kernel, gossip or DNS-server crates nor on the agent.
    Layout,
    /// A 3-host cluster in namespaces on this machine: a published service, its round robin
    /// and its DNS names; cleaned up at the end (also on Ctrl-C).
    Demo {
        /// Keep the cluster (and the visualizer) up after the last step, until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Benchmarks side by side with their baselines (`bench all` writes bench/results/);
    /// `--quick` for a short run.
    Bench {
        target: bench::Target,
        #[arg(long)]
        quick: bool,
    },
    /// A Debian package (mesh-agent, meshctl, mesh-cni, the systemd unit, a default
    /// agent.toml) in target/dist/, built from a release build.
    Dist {
        /// Package the debug binaries already built (`cargo build --bins`) instead.
        #[arg(long)]
        debug: bool,
        /// The directory the package is written to (default: target/dist).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

fn main() -> Result<()> {
    match Args::parse().task {
        Task::Ci => ci(),
        Task::Layout => layout::run(),
        Task::Demo { keep } => demo::run(keep),
        Task::Bench { target, quick } => bench::run(target, quick),
        Task::Dist { debug, out } => dist::run(debug, out),
    }
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("==> cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn ci() -> Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    layout::run()?;
    cargo(&["build", "--workspace", "--bins"])?;
    cargo(&["test", "--workspace", "--no-fail-fast"])?;
    Ok(())
}
