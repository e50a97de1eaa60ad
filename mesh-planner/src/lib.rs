//! Planning for mesh services: where each task of a service runs, decided the same way on
//! every node from the same gossiped view, without a manager.
//!
//! Swarm keeps one Raft leader that alone schedules; mesh has no leader. Instead every node
//! runs [`plan`] over the view it has and carries out only its own part: it starts the
//! tasks the plan puts on it and stops its tasks the plan stops. While views disagree (a
//! gossip round, a partition) two nodes may both fill a slot; once they agree, the plan's
//! ranking keeps one and the other stops. See `plan.rs` for the rules.
//!
//! Nothing here does I/O or reads a clock: the agent passes the view (and the time, for the
//! restart policy) in, and property tests hold the rules to account.

mod index;
pub mod job;
pub mod plan;
pub mod resources;
pub mod restart;
pub mod rollout;
pub mod schedule;
pub mod spec;
pub mod task;

pub use job::JobProgress;
pub use plan::{Cluster, Plan, Service, SlotPlacement, SlotPlan, Stop};
pub use resources::{bytes_size, cpus, reserved_by_node};
pub use restart::{AfterExit, after_exit};
pub use rollout::{Failure, Progress, coordinator, progress};
pub use schedule::{plan, plan_all};
pub use spec::{
    Constraint, FailureAction, Field, MAX_REPLICAS, Node, Op, Placement, Platform, Ratio,
    Resources, RestartCondition, RestartPolicy, Role, ServiceMode, Spread, UpdateConfig,
    UpdateOrder,
};
pub use task::{DesiredState, Slot, Task, TaskState};
