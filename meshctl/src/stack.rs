//! `meshctl stack …`: Docker's stack commands over compose files (see `compose`).

use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use super::{Format, json, or_dash, table};
use mesh_api::Client;
use mesh_api::spec::STACK_LABEL;
use mesh_api::v1::{ServiceInfo, ServiceTaskInfo, StackReport};

#[derive(Subcommand, Debug)]
pub enum StackCommand {
    /// Deploy or update a stack from a compose file: objects named <stack>_<name>; a
    /// redeploy changes only what differs.
    #[command(alias = "up")]
    Deploy {
        /// The compose file; repeat to merge several, later ones overriding earlier ones.
        #[arg(long = "compose-file", short = 'c', required = true)]
        compose_file: Vec<String>,
        /// Remove the stack's services the file no longer has.
        #[arg(long)]
        prune: bool,
        /// Send registry authentication details to swarm agents (your podman or docker
        /// login for each image's registry, sealed; nodes use it only to pull).
        #[arg(long = "with-registry-auth")]
        with_registry_auth: bool,
        name: String,
    },
    /// List stacks.
    #[command(alias = "list")]
    Ls,
    /// The stack's services.
    Services { name: String },
    /// The tasks of the stack's services.
    Ps { name: String },
    /// Remove everything the stack made (services, networks, secrets, configs).
    #[command(alias = "remove", alias = "down")]
    Rm { name: String },
}

async fn stack_services(client: &Client, name: &str) -> Result<Vec<ServiceInfo>> {
    let all: Vec<ServiceInfo> = client.get("/v1/services").await?;
    let mine: Vec<ServiceInfo> = all
        .into_iter()
        .filter(|s| s.spec.labels.get(STACK_LABEL).map(String::as_str) == Some(name))
        .collect();
    if mine.is_empty() {
        bail!("nothing found in stack {name} (see `meshctl stack ls`)");
    }
    Ok(mine)
}

pub async fn run(client: &Client, fmt: Format, cmd: StackCommand) -> Result<()> {
    match cmd {
        StackCommand::Deploy {
            compose_file,
            prune,
            with_registry_auth,
            name,
        } => {
            let sources = compose_file
                .iter()
                .map(|f| {
                    Ok(crate::compose::Source {
                        name: f.clone(),
                        text: std::fs::read_to_string(f).with_context(|| format!("reading {f}"))?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            // Relative paths in the files resolve against the first file's directory.
            let dir = Path::new(&compose_file[0])
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let env = |k: &str| std::env::var(k).ok();
            let mut parsed = crate::compose::load(&name, &sources, dir, &env, prune)
                .map_err(anyhow::Error::msg)?;
            if with_registry_auth {
                for s in &mut parsed.deploy.services {
                    if let Some(image) = s.spec.task.as_ref().and_then(|t| t.image.as_deref()) {
                        s.registry_auth = crate::registry_auth::for_image(image)?;
                    }
                }
            }
            for w in &parsed.warnings {
                eprintln!("{w}");
            }
            let report: StackReport = client.post("/v1/stacks", &parsed.deploy).await?;
            if fmt == Format::Json {
                return json(&report);
            }
            for s in &report.created {
                println!("Creating service {s}");
            }
            for s in &report.updated {
                println!("Updating service {s}");
            }
            for s in &report.removed {
                println!("Removing service {s}");
            }
        }
        StackCommand::Ls => {
            let stacks: Vec<(String, usize)> = client.get("/v1/stacks").await?;
            if fmt == Format::Json {
                return json(&stacks);
            }
            println!(
                "{}",
                table(
                    &["NAME", "SERVICES"],
                    stacks.iter().map(|(n, c)| [n.clone(), c.to_string()])
                )
            );
        }
        StackCommand::Services { name } => {
            let mine = stack_services(client, &name).await?;
            if fmt == Format::Json {
                return json(&mine);
            }
            println!(
                "{}",
                table(
                    &["ID", "NAME", "MODE", "REPLICAS", "PORTS"],
                    mine.iter().map(|s| [
                        s.id.clone(),
                        s.name.clone(),
                        s.mode.display().into(),
                        match s.desired {
                            Some(_) => super::service::replicas(s),
                            None => format!("{}/{}", s.running, or_dash(s.desired)),
                        },
                        s.ports
                            .iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                    ])
                )
            );
        }
        StackCommand::Ps { name } => {
            let mut rows: Vec<ServiceTaskInfo> = Vec::new();
            for s in stack_services(client, &name).await? {
                let tasks: Vec<ServiceTaskInfo> = client
                    .get(&format!("/v1/services/{}/tasks", s.name))
                    .await?;
                rows.extend(tasks);
            }
            if fmt == Format::Json {
                return json(&rows);
            }
            println!(
                "{}",
                table(
                    &[
                        "ID",
                        "NAME",
                        "NODE",
                        "DESIRED STATE",
                        "CURRENT STATE",
                        "ERROR"
                    ],
                    rows.iter().map(|t| [
                        t.id.clone(),
                        if t.history {
                            format!(" \\_ {}", t.name)
                        } else {
                            t.name.clone()
                        },
                        or_dash(t.node.clone()),
                        t.desired.clone(),
                        t.state.clone(),
                        or_dash(t.error.clone()),
                    ])
                )
            );
        }
        StackCommand::Rm { name } => {
            let removed: Vec<String> = client.delete(&format!("/v1/stacks/{name}")).await?;
            if fmt == Format::Json {
                return json(&removed);
            }
            for r in removed {
                println!("Removing {r}");
            }
        }
    }
    Ok(())
}
