//! Flags become typed specs here, one file per flag group (as swarmkit's `flagparser`): the
//! agent never parses a duration, a port or a constraint. Every parser takes `what` — the
//! flag (`--restart-delay`) or the compose key (`services.web.deploy.restart_policy.delay`) —
//! so an error names what the user wrote, in the user's own terms.

mod health;
mod limits;
mod names;
mod network;
mod placement;
mod resources;
mod restart;
mod rollout;
mod security;
mod task;
mod value;

pub use health::HealthArgs;
pub use limits::{LimitsArgs, pids, within_reservations};
pub use names::{dns, dns_options, hosts, log, nameservers, search_domains};
pub use network::networks;
pub use placement::{constraints, per_node, preferences, replicas};
pub use resources::ReserveArgs;
pub use restart::RestartArgs;
pub use rollout::{ConfigWords, RolloutArgs};
pub use security::{SecurityArgs, capabilities};
pub use task::{env, env_file, file_refs, labels, ports, published_port};
pub use value::{bytes, count, duration_ms, nano_cpus, parsed};
