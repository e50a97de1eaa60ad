//! The cluster's shared state as this node sees it.
//!
//! Every agent owns a set of keys in gossip (chitchat): its node record, its endpoints (tasks),
//! its own address on each network it plumbs, and its IP block claims. Cluster-wide objects
//! (networks, services, operator settings of nodes) are replicated: every node republishes the
//! merged copy, so an object outlives the node that created it, and concurrent edits merge to
//! the same result on every node.
//!
//! [`View`] is that merge, computed from a snapshot of every node's keys. It is a pure
//! function of the snapshot so every node computes the same answer from the same data.

pub mod ipam;
pub mod record;
pub mod replicated;
pub mod view;

pub use record::*;
pub use replicated::{Clock, Replicated};
pub use view::{AttachmentView, EndpointView, NodeView, Snapshot, SnapshotNode, View};
