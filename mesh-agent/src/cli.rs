//! meshctl: Docker-style commands that talk to the local agent's API.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use comfy_table::{Table, presets::NOTHING};

use crate::api::{DEFAULT_SOCKET, PortStats, client::Client};

#[derive(Parser, Debug)]
#[command(
    name = "meshctl",
    version,
    about = "Control a mesh cluster through the local agent"
)]
pub struct Cli {
    /// Path of the local agent's API socket.
    #[arg(long, global = true, env = "MESH_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Inspect the node's eBPF dataplane.
    #[command(subcommand)]
    Dataplane(DataplaneCommand),
}

#[derive(Subcommand, Debug)]
pub enum DataplaneCommand {
    /// Packets seen on the underlay interface, per destination port.
    Ports,
}

/// A table in Docker's style: upper-case headers, no borders, columns aligned.
pub fn table<I, R>(headers: &[&str], rows: I) -> String
where
    I: IntoIterator<Item = R>,
    R: IntoIterator<Item = String>,
{
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(headers.iter().map(|h| h.to_string()));
    for r in rows {
        t.add_row(r.into_iter().collect::<Vec<_>>());
    }
    // comfy-table pads the first column with a leading space; Docker's tables start flush.
    t.to_string()
        .lines()
        .map(|l| l.strip_prefix(' ').unwrap_or(l).trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

pub async fn run(cli: Cli) -> Result<()> {
    let client = Client::new(&cli.socket);
    match cli.command {
        Command::Dataplane(DataplaneCommand::Ports) => {
            let stats: Vec<PortStats> = client.get("/v1/dataplane/ports").await?;
            match cli.format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&stats)?),
                Format::Table => println!(
                    "{}",
                    table(
                        &["PORT", "PACKETS", "BYTES"],
                        stats.iter().map(|s| {
                            [
                                s.port.to_string(),
                                s.packets.to_string(),
                                s.bytes.to_string(),
                            ]
                        })
                    )
                ),
            }
        }
    }
    Ok(())
}
