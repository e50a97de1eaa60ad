//! `meshctl secret …` and `meshctl config …`: Docker's commands, spelled the same way.

use std::{collections::BTreeMap, io::Read};

use anyhow::{Context, Result, bail};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use clap::Subcommand;
use zeroize::Zeroizing;

use super::{Format, json, table};
use mesh_api::Client;
use mesh_api::spec::{MAX_FILE_OBJECT, parse_label};
use mesh_api::v1::{ConfigInfo, FileObjectCreate, SecretInfo};

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

pub(crate) fn labels(raw: &[String]) -> Result<BTreeMap<String, String>> {
    raw.iter()
        .map(|l| parse_label(l).map_err(anyhow::Error::msg))
        .collect()
}

fn since(ms: u64) -> String {
    let now = mesh_api::id::now_ms();
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..60 => format!("{secs} seconds ago"),
        60..3600 => format!("{} minutes ago", secs / 60),
        3600..86400 => format!("{} hours ago", secs / 3600),
        _ => format!("{} days ago", secs / 86400),
    }
}

pub async fn secret(client: &Client, fmt: Format, cmd: SecretCommand) -> Result<()> {
    let action = match cmd {
        SecretCommand::Create { name, file, label } => Action::Create { name, file, label },
        SecretCommand::Ls => Action::Ls,
        SecretCommand::Inspect { names } => Action::Inspect { names },
        SecretCommand::Rm { names } => Action::Rm { names },
    };
    file_objects::<SecretInfo>(client, fmt, "secret", action).await
}

pub async fn config(client: &Client, fmt: Format, cmd: ConfigCommand) -> Result<()> {
    let action = match cmd {
        ConfigCommand::Create { name, file, label } => Action::Create { name, file, label },
        ConfigCommand::Ls => Action::Ls,
        ConfigCommand::Inspect { names } => Action::Inspect { names },
        ConfigCommand::Rm { names } => Action::Rm { names },
    };
    file_objects::<ConfigInfo>(client, fmt, "config", action).await
}

/// A `secret` or `config` command once parsed: the two differ only in their help texts and
/// in what the agent keeps (sealed or plain).
enum Action {
    Create {
        name: String,
        file: String,
        label: Vec<String>,
    },
    Ls,
    Inspect {
        names: Vec<String>,
    },
    Rm {
        names: Vec<String>,
    },
}

/// What `ls` shows of a secret or config.
trait Listed: serde::de::DeserializeOwned + serde::Serialize {
    fn row(&self) -> [String; 5];
}

impl Listed for SecretInfo {
    fn row(&self) -> [String; 5] {
        listed(
            &self.id,
            &self.name,
            self.size,
            self.created_ms,
            &self.services,
        )
    }
}

impl Listed for ConfigInfo {
    fn row(&self) -> [String; 5] {
        listed(
            &self.id,
            &self.name,
            self.size,
            self.created_ms,
            &self.services,
        )
    }
}

fn listed(id: &str, name: &str, size: usize, created_ms: u64, services: &[String]) -> [String; 5] {
    [
        id.to_owned(),
        name.to_owned(),
        size.to_string(),
        since(created_ms),
        services.join(","),
    ]
}

/// `kind` is `secret` or `config`: the API's `/v1/{kind}s` and the words of the messages.
async fn file_objects<T: Listed>(
    client: &Client,
    fmt: Format,
    kind: &str,
    action: Action,
) -> Result<()> {
    let path = format!("/v1/{kind}s");
    match action {
        Action::Create { name, file, label } => {
            let data = read_data(kind, &name, &file)?;
            let req = FileObjectCreate {
                name,
                data: BASE64.encode(&*data),
                labels: labels(&label)?,
            };
            let created: T = client.post(&path, &req).await?;
            if fmt == Format::Json {
                return json(&created);
            }
            println!("{}", created.row()[0]);
        }
        Action::Ls => {
            let all: Vec<T> = client.get(&path).await?;
            if fmt == Format::Json {
                return json(&all);
            }
            println!(
                "{}",
                table(
                    &["ID", "NAME", "SIZE", "CREATED", "SERVICES"],
                    all.iter().map(Listed::row)
                )
            );
        }
        Action::Inspect { names } => {
            let mut out: Vec<T> = Vec::new();
            for n in names {
                out.push(client.get(&format!("{path}/{n}")).await?);
            }
            json(&out)?;
        }
        Action::Rm { names } => {
            for n in names {
                let _: serde_json::Value = client.delete(&format!("{path}/{n}")).await?;
                println!("{n}");
            }
        }
    }
    Ok(())
}
