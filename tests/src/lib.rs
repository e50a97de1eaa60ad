//! The test cluster: "hosts" are network namespaces joined by veth to an underlay bridge
//! namespace, each running a real `mesh-agent` process. Everything a cluster creates is named
//! after it (a prefix with the test process's PID) and removed on drop, also when the test
//! panics; clusters left by a killed test run are swept by the next one.

pub mod availability;
pub mod cluster;
pub mod events;
pub mod flood;
pub mod image;
pub mod membership;
pub mod netns;
pub mod overlay;
pub mod process;
pub mod sandbox;
pub mod workload;

pub use cluster::{Cluster, Host};
pub use netns::{Netns, NsRuntime};
