//! The CNI plugin `mesh-cni` (CNI spec 1.0.0): ADD, DEL, CHECK and VERSION, from the CNI
//! environment and the network config on stdin. The plugin is a thin client: the local
//! agent does the work (`POST /v1/cni/{add,del,check}` on its socket), so a container of any
//! runtime gets what a task gets — overlay address, egress, DNS at 127.0.0.11, VIP balancing
//! and, as a service's backend, its share of the routing mesh.
//!
//! Network config keys besides the spec's: `network` (the mesh network, required), `socket`
//! (the agent's API socket, default /run/mesh/agent.sock), `service` (make every container
//! on this config a backend of it). Per container: `MESH_SERVICE=<service>` in CNI_ARGS (podman
//! forwards its own CNI_ARGS environment variable), or a network alias naming a service of
//! the network (podman's `--network-alias`, with the `aliases` capability the conflist that
//! `meshctl network cni` writes declares). `K8S_POD_NAME` (podman sends the container's name)
//! names the endpoint; without it the name comes from the container id.
//!
//! Error codes: the spec's 1 (incompatible version), 4 (invalid environment), 6 (stdin is not
//! JSON), 7 (invalid config), 11 (agent unreachable: try again later); ours: 100 the agent
//! failed, 101 the network, service or attachment is unknown, 102 a name is taken, 103 the
//! agent refused the request as invalid.

use std::{collections::BTreeMap, path::Path, time::Duration};

use serde::Deserialize;
use serde_json::{Value, json};

use mesh_api::client;
use mesh_api::v1::{CniAdd, CniInfo, CniRef, DEFAULT_SOCKET};

/// What this plugin speaks; results are written in the version the config asks for.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.1", "0.4.0", "1.0.0"];
pub const PLUGIN_TYPE: &str = mesh_api::v1::CNI_PLUGIN_TYPE;

pub const ERR_INCOMPATIBLE_VERSION: u32 = 1;
pub const ERR_INVALID_ENV: u32 = 4;
pub const ERR_DECODING: u32 = 6;
pub const ERR_INVALID_CONFIG: u32 = 7;
pub const ERR_TRY_AGAIN_LATER: u32 = 11;
pub const ERR_AGENT: u32 = 100;
pub const ERR_NOT_FOUND: u32 = 101;
pub const ERR_CONFLICT: u32 = 102;
pub const ERR_REFUSED: u32 = 103;

/// A CNI error, printed as the spec's error JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// The keys of the network config this plugin reads.
#[derive(Debug, Deserialize)]
struct NetConf {
    #[serde(rename = "cniVersion")]
    cni_version: String,
    name: String,
    #[serde(rename = "type")]
    kind: String,
    network: Option<String>,
    socket: Option<String>,
    service: Option<String>,
    #[serde(rename = "runtimeConfig", default)]
    runtime_config: RuntimeConfig,
}

#[derive(Debug, Default, Deserialize)]
struct RuntimeConfig {
    /// The `aliases` capability: network name → aliases (podman's `--network-alias`).
    #[serde(default)]
    aliases: BTreeMap<String, Vec<String>>,
}

/// What the plugin prints and how it exits.
pub struct Outcome {
    pub stdout: String,
    pub code: i32,
}

/// Runs one CNI command: `env` reads the environment, `stdin` is the config.
pub fn run(env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    // Errors are written in the version the config asks for when it can be read at all.
    let version = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.0.0".to_owned());
    match command(&env, stdin) {
        Ok(Some(v)) => Outcome {
            stdout: v.to_string(),
            code: 0,
        },
        Ok(None) => Outcome {
            stdout: String::new(),
            code: 0,
        },
        Err(e) => Outcome {
            stdout: e.to_json(&version).to_string(),
            code: 1,
        },
    }
}

fn command(env: &impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let require = |name: &str| -> Result<String, CniError> {
        env(name).filter(|v| !v.is_empty()).ok_or_else(|| {
            CniError::new(
                ERR_INVALID_ENV,
                format!("{name} is not set"),
                "the runtime must set CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS (ADD, CHECK) and CNI_IFNAME",
            )
        })
    };
    let cmd = require("CNI_COMMAND")?;
    if cmd == "VERSION" {
        return Ok(Some(json!({
            "cniVersion": "1.0.0",
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        let code = if serde_json::from_slice::<Value>(stdin).is_ok() {
            ERR_INVALID_CONFIG
        } else {
            ERR_DECODING
        };
        CniError::new(
            code,
            "cannot read the network config on stdin",
            format!("{e} (expected a CNI network config with cniVersion, name, type and network)"),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            ERR_INCOMPATIBLE_VERSION,
            format!("cniVersion {} is not supported", conf.cni_version),
            format!("mesh-cni supports {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    if conf.kind != PLUGIN_TYPE {
        return Err(CniError::new(
            ERR_INVALID_CONFIG,
            format!("type {:?} is not {PLUGIN_TYPE}", conf.kind),
            "the runtime called mesh-cni for another plugin's config",
        ));
    }
    let network = conf.network.clone().filter(|n| !n.is_empty()).ok_or_else(|| {
        CniError::new(
            ERR_INVALID_CONFIG,
            format!("network config {} names no mesh network", conf.name),
            "add \"network\": \"<mesh network>\" to the plugin's config (meshctl network cni <network> writes one)",
        )
    })?;
    let container_id = require("CNI_CONTAINERID")?;
    let ifname = require("CNI_IFNAME")?;
    let socket = conf
        .socket
        .clone()
        .unwrap_or_else(|| DEFAULT_SOCKET.to_owned());
    let args = parse_args(env("CNI_ARGS").as_deref().unwrap_or_default());
    match cmd.as_str() {
        "ADD" => {
            let netns = require("CNI_NETNS")?;
            if !Path::new(&netns).exists() {
                return Err(CniError::new(
                    ERR_INVALID_ENV,
                    format!("CNI_NETNS {netns} does not exist"),
                    "the runtime must create the container's network namespace before ADD",
                ));
            }
            let req = CniAdd {
                container_id,
                netns: netns.clone(),
                ifname,
                service: args.get("MESH_SERVICE").cloned().or(conf.service.clone()),
                task: args.get("K8S_POD_NAME").cloned(),
                aliases: conf
                    .runtime_config
                    .aliases
                    .get(&conf.name)
                    .cloned()
                    .unwrap_or_default(),
                network,
            };
            let info: CniInfo = call(&socket, "/v1/cni/add", &req)?;
            Ok(Some(result(&conf.cni_version, &info, &netns)))
        }
        "DEL" => {
            let _: Value = call(
                &socket,
                "/v1/cni/del",
                &CniRef {
                    container_id,
                    ifname,
                },
            )?;
            Ok(None)
        }
        "CHECK" => {
            if conf.cni_version.starts_with("0.3") {
                return Err(CniError::new(
                    ERR_INCOMPATIBLE_VERSION,
                    "CHECK needs cniVersion 0.4.0 or later",
                    format!("the config says {}", conf.cni_version),
                ));
            }
            require("CNI_NETNS")?;
            let _: CniInfo = call(
                &socket,
                "/v1/cni/check",
                &CniRef {
                    container_id,
                    ifname,
                },
            )?;
            Ok(None)
        }
        other => Err(CniError::new(
            ERR_INVALID_ENV,
            format!("CNI_COMMAND {other} is not one of ADD, DEL, CHECK, VERSION"),
            "",
        )),
    }
}

/// `K=V;K=V` (CNI_ARGS).
fn parse_args(s: &str) -> BTreeMap<String, String> {
    s.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The CNI result of an ADD in `version`'s format.
pub fn result(version: &str, info: &CniInfo, netns: &str) -> Value {
    let pre_1 = version != "1.0.0";
    let interfaces: Vec<Value> = info
        .interfaces
        .iter()
        .map(|i| json!({ "name": i.name, "mac": i.mac, "sandbox": netns }))
        .collect();
    let ips: Vec<Value> = info
        .interfaces
        .iter()
        .enumerate()
        .map(|(n, i)| {
            let mut ip = json!({ "address": i.address, "gateway": i.gateway, "interface": n });
            if pre_1 {
                ip["version"] = json!("4");
            }
            ip
        })
        .collect();
    let routes: Vec<Value> = info
        .default_gateway
        .iter()
        .map(|gw| json!({ "dst": "0.0.0.0/0", "gw": gw }))
        .collect();
    json!({
        "cniVersion": version,
        "interfaces": interfaces,
        "ips": ips,
        "routes": routes,
        "dns": {
            "nameservers": info.nameservers,
            "options": ["ndots:0"],
        },
    })
}

/// One API call on a current-thread runtime; agent failures become CNI errors.
fn call<B: serde::Serialize, T: serde::de::DeserializeOwned>(
    socket: &str,
    path: &str,
    body: &B,
) -> Result<T, CniError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            CniError::new(
                ERR_AGENT,
                "cannot start the plugin's runtime",
                e.to_string(),
            )
        })?;
    if !Path::new(socket).exists() {
        return Err(CniError::new(
            ERR_TRY_AGAIN_LATER,
            format!("the mesh agent is not running (no socket at {socket})"),
            "start mesh-agent on this host, or set \"socket\" in the network config to its --socket",
        ));
    }
    let c = client::Client::new(socket);
    // An ADD may wait for an address block to settle in gossip (about a second); a minute
    // means the agent is stuck, and the runtime may retry.
    let answer = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), c.post::<B, T>(path, body)).await
    });
    match answer {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(match e.downcast_ref::<client::Refused>() {
            Some(r) => CniError::new(
                match r.status {
                    404 => ERR_NOT_FOUND,
                    409 => ERR_CONFLICT,
                    400 | 403 => ERR_REFUSED,
                    _ => ERR_AGENT,
                },
                r.message.clone(),
                format!("the mesh agent at {socket} answered {}", r.status),
            ),
            None => CniError::new(
                ERR_TRY_AGAIN_LATER,
                format!("cannot reach the mesh agent at {socket}"),
                format!("{e:#}"),
            ),
        }),
        Err(_) => Err(CniError::new(
            ERR_TRY_AGAIN_LATER,
            format!("the mesh agent at {socket} did not answer within 60 s"),
            "",
        )),
    }
}

fn main() {
    use std::io::{Read, Write};
    let mut stdin = Vec::new();
    // VERSION may come with an empty stdin; anything unreadable is reported as a decoding
    // failure by the config parser.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let out = run(|k| std::env::var(k).ok(), &stdin);
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.stdout.as_bytes());
    let _ = stdout.flush();
    std::process::exit(out.code);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with(vars: &[(&str, &str)], stdin: &str) -> (Value, i32) {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let out = run(|k| vars.get(k).cloned(), stdin.as_bytes());
        (
            serde_json::from_str(&out.stdout).unwrap_or(Value::Null),
            out.code,
        )
    }

    #[test]
    fn version_lists_what_the_plugin_speaks() {
        let (v, code) = run_with(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
        assert_eq!(code, 0);
        assert_eq!(v["supportedVersions"], json!(SUPPORTED_VERSIONS));
    }

    #[test]
    fn bad_input_gets_the_spec_codes() {
        let env = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/nonexistent/netns"),
        ];
        let conf = r#"{"cniVersion":"1.0.0","name":"app","type":"mesh-cni","network":"app"}"#;
        let (v, code) = run_with(&env, "{not json");
        assert_eq!((v["code"].as_u64(), code), (Some(6), 1), "{v}");
        let (v, _) = run_with(
            &env,
            r#"{"cniVersion":"1.0.0","name":"app","type":"mesh-cni"}"#,
        );
        assert_eq!(v["code"], 7, "{v}");
        let (v, _) = run_with(&env, &conf.replace("1.0.0", "9.9.9"));
        assert_eq!(v["code"], 1, "{v}");
        let (v, _) = run_with(&env, conf);
        assert_eq!(v["code"], 4, "{v}");
        assert!(v["msg"].as_str().unwrap().contains("/nonexistent/netns"));
        let (v, _) = run_with(&env[..2], conf);
        assert_eq!(v["code"], 4, "{v}");
        assert_eq!(v["cniVersion"], "1.0.0");
    }

    #[test]
    fn results_follow_the_requested_version() {
        let info = CniInfo {
            task: "c1".into(),
            network: "app".into(),
            service: None,
            netns: "/run/netns/x".into(),
            interfaces: vec![mesh_api::v1::CniInterface {
                name: "eth0".into(),
                host_veth: "mve0".into(),
                network: "app".into(),
                mac: "02:42:0a:00:00:05".into(),
                address: "10.0.0.5/24".into(),
                gateway: "10.0.0.2".parse().unwrap(),
                mtu: 1450,
            }],
            default_gateway: Some("172.18.0.1".parse().unwrap()),
            nameservers: vec!["127.0.0.11".parse().unwrap()],
        };
        let r = result("1.0.0", &info, "/run/netns/x");
        assert_eq!(r["ips"][0]["address"], "10.0.0.5/24");
        assert!(r["ips"][0].get("version").is_none());
        assert_eq!(r["routes"][0]["gw"], "172.18.0.1");
        assert_eq!(r["dns"]["nameservers"], json!(["127.0.0.11"]));
        assert_eq!(
            result("0.4.0", &info, "/run/netns/x")["ips"][0]["version"],
            "4"
        );
    }
}
