//! `meshctl volume …`: Docker's `docker volume` commands. Volumes are local to their node
//! (Swarm's `local` driver): `create` and `rm` act on the node of the agent addressed, `ls`
//! and `inspect` show every node's, with the node that holds each.

use anyhow::Result;
use clap::Subcommand;
use mesh_api::{
    client::Client,
    spec::validate_volume_name,
    v1::{Volume, VolumeCreate},
};
use serde_json::json;

use crate::{Format, filters, objects::labels, table};

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a volume on this node (tasks also create theirs on first use).
    Create {
        name: String,
        /// Set metadata for a volume (key=value).
        #[arg(long)]
        label: Vec<String>,
        /// Specify volume driver name (only `local`).
        #[arg(long, short = 'd', default_value = mesh_api::v1::VOLUME_DRIVER)]
        driver: String,
    },
    /// List volumes of every node.
    #[command(alias = "list")]
    Ls {
        /// Only display volume names.
        #[arg(long, short = 'q')]
        quiet: bool,
        /// Filter output based on conditions provided (name=, label=, driver=, node=).
        #[arg(long, short = 'f')]
        filter: Vec<String>,
    },
    /// Display detailed information on one or more volumes.
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove one or more volumes of this node; a volume in use by a task is refused.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

pub async fn run(client: &Client, fmt: Format, cmd: VolumeCommand) -> Result<()> {
    match cmd {
        VolumeCommand::Create {
            name,
            label,
            driver,
        } => {
            if driver != mesh_api::v1::VOLUME_DRIVER {
                anyhow::bail!(
                    "plugin \"{driver}\" not found: mesh has the local volume driver only"
                );
            }
            let req = VolumeCreate {
                name,
                labels: labels(&label)?,
            };
            let v: Volume = client.post("/v1/volumes", &req).await?;
            if fmt == Format::Json {
                return crate::json(&v);
            }
            println!("{}", v.name);
        }
        VolumeCommand::Ls { quiet, filter } => {
            let filters = filters::Filters::parse(&filter, filters::VOLUME_KEYS)?;
            let all: Vec<Volume> = client.get("/v1/volumes").await?;
            let shown: Vec<&Volume> = all.iter().filter(|v| filters.volume(v)).collect();
            if fmt == Format::Json {
                return crate::json(&shown);
            }
            if quiet {
                for v in shown {
                    println!("{}", v.name);
                }
                return Ok(());
            }
            println!(
                "{}",
                table(
                    &["DRIVER", "VOLUME NAME", "NODE"],
                    shown
                        .iter()
                        .map(|v| [v.driver.clone(), v.name.clone(), v.node.clone()])
                )
            );
        }
        VolumeCommand::Inspect { names } => {
            let mut out = Vec::new();
            for n in names {
                // A name is part of the request's path: never one that could change it.
                validate_volume_name(&n).map_err(anyhow::Error::msg)?;
                let found: Vec<Volume> = client.get(&format!("/v1/volumes/{n}")).await?;
                out.extend(found.iter().map(docker_shape));
            }
            crate::json(&out)?;
        }
        VolumeCommand::Rm { names } => {
            for n in names {
                validate_volume_name(&n).map_err(anyhow::Error::msg)?;
                let _: serde_json::Value = client.delete(&format!("/v1/volumes/{n}")).await?;
                println!("{n}");
            }
        }
    }
    Ok(())
}

/// `docker volume inspect`'s fields, and the node that holds the volume.
fn docker_shape(v: &Volume) -> serde_json::Value {
    let created = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(v.created_ms),
    );
    json!({
        "CreatedAt": created.to_string(),
        "Driver": v.driver,
        "Labels": v.labels,
        "Mountpoint": v.mountpoint,
        "Name": v.name,
        "Node": v.node,
        "Options": {},
        "Scope": "local",
    })
}
