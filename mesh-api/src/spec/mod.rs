//! Specs: what a user asks the cluster to run and how, as every side (CLI, compose, the
//! agent's API, the Docker API) hands it to the agent: typed, already parsed.

mod change;
mod dns;
mod endpoint;
mod file;
mod image;
mod logging;
mod mount;
mod network;
mod node;
mod port;
mod resources;
mod security;
mod service;
mod size;
pub mod template;

pub use change::{
    HEALTH_INTERVAL_MS, HEALTH_RETRIES, HEALTH_TIMEOUT_MS, HealthChange, MAX_HEALTH_RETRIES,
    ProbeChange, RestartChange, UpdateConfigChange,
};
pub use dns::{DnsConfig, ExtraHost, check_option as check_dns_option};
pub use endpoint::EndpointState;
pub use file::FileRef;
pub use image::{check_reference, registry_of, same_registry};
pub use logging::{LOG_DRIVERS, LogDriver, capped as capped_log};
pub use mount::{Mount, MountType, VOLUME_NAME_CHARS, validate_mounts, validate_volume_name};
pub use network::NetworkAttachment;
pub use node::{Availability, NodeStatus, parse_label};
pub use port::{DYNAMIC_PORTS, PortSpec, Protocol, PublishMode};
pub use resources::{Limits, LimitsChange, Resources, Security, TaskResources, Ulimit, bytes_size};
pub use security::{
    CAPABILITIES, Capability, ULIMITS, capability, capability_set, check_sysctl, check_ulimit,
    sysctl, ulimit,
};
pub use service::{
    DRIVER_PODMAN, DRIVER_PROCESS, EndpointMode, Expanded, HealthCheck, Probe, RunOptions,
    SealedRegistryAuth, ServiceSpec, TaskTemplate, UpdateState, UpdateStatus,
};
pub use size::{bytes, nano_cpus};

/// The label that names the stack an object belongs to (Docker's own, so tools that read
/// Swarm labels read ours).
pub const STACK_LABEL: &str = "com.docker.stack.namespace";

/// The largest secret or config Docker accepts (500 KB); gossip carries every one to every
/// node, so the limit is also what keeps a state file and a sync round bounded.
pub const MAX_FILE_OBJECT: usize = 500 * 1024;

/// Names end up in DNS (`web.app`), so they must be DNS labels.
pub fn validate_name(kind: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !name.starts_with(['-', '_'])
        && !name.ends_with(['-', '_']);
    if !ok {
        return Err(format!(
            "invalid {kind} name {name:?}: use 1-63 letters, digits, dashes and underscores (a stack's objects are <stack>_<name>), not starting or ending with either"
        ));
    }
    if name.eq_ignore_ascii_case("tasks") {
        return Err(format!(
            "{kind} name \"tasks\" is reserved for DNS (tasks.<service>)"
        ));
    }
    Ok(())
}
