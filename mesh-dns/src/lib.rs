//! mesh-dns: the resolver every task uses for service names.
//!
//! One [`DnsServer`] per node holds the current [`Snapshot`] of the service table, the
//! upstream resolvers and the [`Counters`]. The agent binds a UDP socket and a TCP listener
//! inside each task's network namespace (127.0.0.11:53, as Docker does) and hands them to
//! [`DnsServer::serve`] with the task's [`Scope`]; every listener answers from the same
//! snapshot, which [`DnsServer::update`] replaces whenever the gossiped table changes.
//!
//! # What a task can resolve
//!
//! For each network in its scope (first network that knows the name wins), names matched
//! case-insensitively:
//!
//! | question | answer |
//! | --- | --- |
//! | `web`, `web.<network>` (A) | the VIP in vip mode; every task IP, shuffled, in dnsrr mode |
//! | `tasks.web`, `tasks.web.<network>` (A) | every task IP, shuffled |
//! | `<task name>`, `<task name>.<network>` (A) | the task's IP |
//! | `_<port>._<tcp\|udp>.web[.<network>]` (SRV) | see below |
//! | PTR of a VIP or task IP | `web.<network>.` or `<task name>.<network>.` |
//! | any other type (AAAA…) for a name above | NOERROR with no records, never forwarded |
//! | an unknown name under `<network>` | NXDOMAIN, never forwarded (NODATA if names exist below it) |
//! | everything else | forwarded to the upstreams |
//!
//! SRV names use the port number, since a port has no name in the table:
//! `_<port>._<proto>.<service>`, where `<port>` is a target port or a published port of the
//! service (both name the same mapping). The SRV record's port is always the target port, the
//! one that answers inside the overlay: in vip mode one record pointing at
//! `<service>.<network>.`, in dnsrr mode one per task pointing at `<task>.<network>.`, with the
//! targets' A records in the additional section.
//!
//! Records carry a short TTL ([`DEFAULT_TTL`], and why), names are IPv4 only (AAAA answers
//! are empty), and a name under a network the task is not on is treated like any foreign name:
//! a task cannot tell other networks exist.
//!
//! # Forwarding
//!
//! Foreign names go to [`Config::upstreams`] in order, with failover on timeout, SERVFAIL or
//! REFUSED and a TCP retry for truncated UDP answers; when none answers, the client gets
//! SERVFAIL. Queries leave from the agent's own network namespace, where the node's resolvers
//! are reachable. See the `forward` module.
//!
//! Malformed messages (not DNS, responses, not exactly one question) are dropped and counted,
//! never answered; the `fuzz/` crate at the repository root and a proptest in this crate feed
//! arbitrary bytes through [`DnsServer::answer`], the same path the listeners use.

mod answer;
mod counters;
mod forward;
mod listener;
mod request;
mod server;
mod snapshot;
mod zone;

pub use answer::Transport;
pub use counters::{AnswerCount, Counters};
pub use listener::ServeHandle;
pub use request::Scope;
pub use server::{Config, ConfigError, DEFAULT_TTL, DEFAULT_UPSTREAM_TIMEOUT, DnsServer};
pub use snapshot::{EndpointMode, Network, Port, Protocol, Service, Snapshot, Task};
