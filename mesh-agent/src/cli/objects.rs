//! `meshctl secret …` and `meshctl config …`: Docker's commands, spelled the same way.

use std::{collections::BTreeMap, io::Read};

use anyhow::{Context, Result, bail};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use clap::Subcommand;
use zeroize::Zeroizing;

use super::{Format, json, table};
use crate::{
    api::{ConfigInfo, FileObjectCreate, SecretInfo, client::Client},
    cluster::{MAX_FILE_OBJECT, parse_label},
};

#[derive(Subcommand, Debug)]
pub enum SecretCommand {
    /// Create a secret from a file, or from standard input with `-`; sealed under the
    /// cluster key before it is stored anywhere.
    Create {
        name: String,
        /// A file, or `-` for standard input.
        file: String,
        /// A label (key=value).
        #[arg(long, short = 'l')]
        label: Vec<String>,
    },
    /// List secrets.
    #[command(alias = "list")]
    Ls,
    /// Show secrets (never their data).
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove secrets no service uses.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Create a config from a file, or from standard input with `-`.
    Create {
        name: String,
        file: String,
        #[arg(long, short = 'l')]
        label: Vec<String>,
    },
    /// List configs.
    #[command(alias = "list")]
    Ls,
    /// Show configs, with their data (base64).
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove configs no service uses.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// The file's bytes (or stdin's), refused above the limit before anything is sent.
pub fn read_data(kind: &str, name: &str, file: &str) -> Result<Zeroizing<Vec<u8>>> {
    let mut data = Zeroizing::new(Vec::new());
    let limit = (MAX_FILE_OBJECT + 1) as u64;
    if file == "-" {
        std::io::stdin()
            .take(limit)
            .read_to_end(&mut data)
            .context("reading standard input")?;
    } else {
        std::fs::File::open(file)
            .with_context(|| format!("reading {kind} {name} from {file}"))?
            .take(limit)
            .read_to_end(&mut data)
            .with_context(|| format!("reading {file}"))?;
    }
    if data.len() > MAX_FILE_OBJECT {
        bail!(
            "{kind} {name} is larger than {MAX_FILE_OBJECT} bytes (500 KB), the limit for a {kind}"
        );
    }
    Ok(data)
}

fn labels(raw: &[String]) -> Result<BTreeMap<String, String>> {
    raw.iter()
        .map(|l| parse_label(l).map_err(anyhow::Error::msg))
        .collect()
}

fn since(ms: u64) -> String {
    let now = crate::cluster::Clock::now_ms();
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..60 => format!("{secs} seconds ago"),
        60..3600 => format!("{} minutes ago", secs / 60),
        3600..86400 => format!("{} hours ago", secs / 3600),
        _ => format!("{} days ago", secs / 86400),
    }
}

pub async fn secret(client: &Client, fmt: Format, cmd: SecretCommand) -> Result<()> {
    match cmd {
        SecretCommand::Create { name, file, label } => {
            let data = read_data("secret", &name, &file)?;
            let req = FileObjectCreate {
                name,
                data: BASE64.encode(&*data),
                labels: labels(&label)?,
            };
            let s: SecretInfo = client.post("/v1/secrets", &req).await?;
            if fmt == Format::Json {
                return json(&s);
            }
            println!("{}", s.id);
        }
        SecretCommand::Ls => {
            let all: Vec<SecretInfo> = client.get("/v1/secrets").await?;
            if fmt == Format::Json {
                return json(&all);
            }
            println!(
                "{}",
                table(
                    &["ID", "NAME", "SIZE", "CREATED", "SERVICES"],
                    all.iter().map(|s| [
                        s.id.clone(),
                        s.name.clone(),
                        s.size.to_string(),
                        since(s.created_ms),
                        s.services.join(","),
                    ])
                )
            );
        }
        SecretCommand::Inspect { names } => {
            let mut out = Vec::new();
            for n in names {
                let s: SecretInfo = client.get(&format!("/v1/secrets/{n}")).await?;
                out.push(s);
            }
            json(&out)?;
        }
        SecretCommand::Rm { names } => {
            for n in names {
                let _: serde_json::Value = client.delete(&format!("/v1/secrets/{n}")).await?;
                println!("{n}");
            }
        }
    }
    Ok(())
}

pub async fn config(client: &Client, fmt: Format, cmd: ConfigCommand) -> Result<()> {
    match cmd {
        ConfigCommand::Create { name, file, label } => {
            let data = read_data("config", &name, &file)?;
            let req = FileObjectCreate {
                name,
                data: BASE64.encode(&*data),
                labels: labels(&label)?,
            };
            let c: ConfigInfo = client.post("/v1/configs", &req).await?;
            if fmt == Format::Json {
                return json(&c);
            }
            println!("{}", c.id);
        }
        ConfigCommand::Ls => {
            let all: Vec<ConfigInfo> = client.get("/v1/configs").await?;
            if fmt == Format::Json {
                return json(&all);
            }
            println!(
                "{}",
                table(
                    &["ID", "NAME", "SIZE", "CREATED", "SERVICES"],
                    all.iter().map(|c| [
                        c.id.clone(),
                        c.name.clone(),
                        c.size.to_string(),
                        since(c.created_ms),
                        c.services.join(","),
                    ])
                )
            );
        }
        ConfigCommand::Inspect { names } => {
            let mut out = Vec::new();
            for n in names {
                let c: ConfigInfo = client.get(&format!("/v1/configs/{n}")).await?;
                out.push(c);
            }
            json(&out)?;
        }
        ConfigCommand::Rm { names } => {
            for n in names {
                let _: serde_json::Value = client.delete(&format!("/v1/configs/{n}")).await?;
                println!("{n}");
            }
        }
    }
    Ok(())
}
