//! `/_ping`, `/version`, `/info` and `/swarm`: what a client asks before anything else. The
//! docker client negotiates its API version from `/_ping`'s `API-Version` header, and
//! `docker stack deploy` and `docker node ls` read `/info`'s `Swarm` part.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, HeaderValue},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};

use super::{API_VERSION, MIN_API_VERSION, nodes::node_id, timestamp};
use crate::{agent::Agent, cluster::View};

pub fn routes() -> Router<Arc<Agent>> {
    Router::new()
        .route("/_ping", get(ping).head(ping))
        .route("/version", get(version))
        .route("/info", get(info))
        .route("/swarm", get(swarm))
        .route("/events", get(super::events::follow))
}

/// The headers dockerd puts on `/_ping` (and the client reads to negotiate).
fn ping_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("API-Version", HeaderValue::from_static(API_VERSION));
    h.insert("OSType", HeaderValue::from_static("linux"));
    h.insert("Docker-Experimental", HeaderValue::from_static("false"));
    // The client uses it to pick swarm-aware defaults (`docker stack` talks to swarm).
    h.insert("Swarm", HeaderValue::from_static("active/manager"));
    h.insert(
        "Cache-Control",
        HeaderValue::from_static("no-cache, no-store, must-revalidate"),
    );
    h.insert("Pragma", HeaderValue::from_static("no-cache"));
    h
}

async fn ping() -> Response {
    (ping_headers(), "OK").into_response()
}

fn agent_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

fn kernel() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn arch() -> &'static str {
    // Docker (Go) spells architectures GOARCH's way.
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

async fn version() -> Json<Value> {
    let v = agent_version();
    Json(json!({
        "Platform": { "Name": format!("mesh {v}") },
        "Components": [{
            "Name": "Engine",
            "Version": v,
            "Details": {
                "ApiVersion": API_VERSION,
                "MinAPIVersion": MIN_API_VERSION,
                "Os": "linux",
                "Arch": arch(),
                "KernelVersion": kernel(),
            }
        }],
        "Version": v,
        "ApiVersion": API_VERSION,
        "MinAPIVersion": MIN_API_VERSION,
        "GitCommit": "",
        "GoVersion": "",
        "Os": "linux",
        "Arch": arch(),
        "KernelVersion": kernel(),
        "BuildTime": "",
    }))
}

/// The cluster's ID: mesh has no cluster object, so it is derived from the cluster's name.
fn cluster_id(agent: &Agent) -> String {
    node_id(&format!("cluster:{}", agent.config.cluster))
}

/// The oldest node's join: when the cluster began, as far as anyone can tell.
fn cluster_created_ms(view: &View) -> u64 {
    view.networks
        .values()
        .map(|n| n.created.ms)
        .chain(view.services.values().map(|s| s.created.ms))
        .min()
        .unwrap_or(0)
}

fn cluster(agent: &Agent, view: &View) -> Value {
    let created = timestamp(cluster_created_ms(view));
    json!({
        "ID": cluster_id(agent),
        "Version": { "Index": 1 },
        "CreatedAt": created,
        "UpdatedAt": created,
        "Spec": {
            "Name": agent.config.cluster,
            "Labels": {},
            "Orchestration": { "TaskHistoryRetentionLimit": 5 },
            "Raft": { "SnapshotInterval": 0, "LogEntriesForSlowFollowers": 0,
                      "ElectionTick": 0, "HeartbeatTick": 0 },
            "Dispatcher": { "HeartbeatPeriod": agent.config.gossip_interval_ms * 1_000_000 },
            "CAConfig": {},
            "TaskDefaults": {},
            "EncryptionConfig": { "AutoLockManagers": false },
        },
        "TLSInfo": {},
        "RootRotationInProgress": false,
        "DefaultAddrPool": [],
        "SubnetSize": 24,
        "DataPathPort": crate::overlay::VXLAN_PORT,
    })
}

async fn info(State(agent): State<Arc<Agent>>) -> Json<Value> {
    let view = agent.refresh().await;
    let me = agent.node_name();
    let nodes = view.nodes.len();
    let tasks = agent.local().map(|l| l.tasks.list()).unwrap_or_default();
    let running = tasks
        .iter()
        .filter(|t| t.state.label() == "running")
        .count();
    let managers: Vec<Value> = view
        .nodes
        .values()
        .filter(|n| n.role == crate::roles::Role::Admin)
        .filter_map(|n| {
            let r = n.record.as_ref()?;
            Some(json!({
                "NodeID": node_id(&n.name),
                "Addr": format!("{}:{}", r.address, agent.config.gossip_port),
            }))
        })
        .collect();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| me.to_owned());
    let mut v = json!({
        "ID": node_id(me),
        "Name": hostname,
        "Containers": tasks.len(),
        "ContainersRunning": running,
        "ContainersPaused": 0,
        "ContainersStopped": tasks.len() - running,
        "Images": 0,
        "Driver": "mesh",
        "DriverStatus": [],
        "Plugins": { "Volume": [], "Network": ["overlay"], "Authorization": null, "Log": [] },
        "MemoryLimit": true,
        "SwapLimit": false,
        "CpuCfsPeriod": true,
        "CpuCfsQuota": true,
        "IPv4Forwarding": true,
        "Debug": false,
        "NFd": 0,
        "NGoroutines": 0,
        "SystemTime": timestamp(mesh_api::id::now_ms()),
        "LoggingDriver": "mesh",
        "CgroupDriver": "cgroupfs",
        "NEventsListener": 0,
        "KernelVersion": kernel(),
        "OperatingSystem": "mesh",
        "OSType": "linux",
        "Architecture": std::env::consts::ARCH,
        "IndexServerAddress": "https://index.docker.io/v1/",
        "NCPU": cpus,
        "MemTotal": 0,
        "DockerRootDir": agent.config.state_dir.display().to_string(),
        "Labels": [],
        "ExperimentalBuild": false,
        "ServerVersion": agent_version(),
        "Runtimes": {},
        "DefaultRuntime": "runc",
        "LiveRestoreEnabled": true,
        "Isolation": "",
        "InitBinary": "",
        "SecurityOptions": [],
        "Warnings": [],
    });
    v["Swarm"] = json!({
            "NodeID": node_id(me),
            "NodeAddr": agent.config.advertise.to_string(),
            "LocalNodeState": "active",
            // Admins are Swarm's managers, without a quorum to join.
            "ControlAvailable": agent.role() == crate::roles::Role::Admin,
            "Error": "",
            "Managers": managers.len(),
            "RemoteManagers": managers,
            "Nodes": nodes,
            "Cluster": cluster(&agent, &view),
    });
    Json(v)
}

async fn swarm(State(agent): State<Arc<Agent>>) -> Json<Value> {
    let view = agent.refresh().await;
    let mut c = cluster(&agent, &view);
    // The join token carries the cluster key: `mesh-agent join-token` as root shows it.
    c["JoinTokens"] = json!({ "Worker": "", "Manager": "" });
    Json(c)
}
