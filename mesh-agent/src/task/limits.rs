//! A process task's cgroup leaf: named after the task's namespace (unique on the kernel, even
//! with several agents on it), below the agent's task cgroup in the v2 hierarchy and at the
//! same relative path in each v1 hierarchy that holds a controller the task is limited by
//! (a hybrid host). Made before the process starts, read when it ends (was it OOM-killed?),
//! removed with the task. Image tasks get the same limits as podman flags (`container`).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use mesh_api::spec::Limits;

use super::{ProcessState, TaskConfig, TaskRecord, process::Exit};
use crate::cgroup::Leaf;

/// Where leaves go below each hierarchy's root: the agent's task cgroup, relative to the v2
/// root (`mesh/tasks` by default; one dir per node in the test harness; v1 hierarchies drop
/// the final `tasks`, see `cgroup::Leaf`). A task cgroup outside the v2 mount (an unusual
/// configuration) is treated as `mesh/tasks`.
fn relative(config: &TaskConfig) -> Option<PathBuf> {
    let dir = config.cgroup.as_ref()?;
    let root = config.cgroup_layout.as_ref()?.unified.as_ref()?;
    Some(
        dir.strip_prefix(root)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| PathBuf::from("mesh/tasks")),
    )
}

/// Makes the task's leaf with its limits written, and returns the directories its process
/// joins. Without a discovered layout (an agent run without cgroups) tasks join the task
/// cgroup as they are, and a limit is refused rather than ignored.
pub(super) fn create(config: &TaskConfig, netns: &str, limits: &Limits) -> Result<Vec<PathBuf>> {
    let (Some(rel), Some(layout)) = (relative(config), config.cgroup_layout.as_ref()) else {
        if !limits.is_empty() {
            bail!("this agent runs tasks without cgroups, so it cannot enforce resource limits");
        }
        return Ok(config.cgroup.iter().cloned().collect());
    };
    let leaf = Leaf::plan(layout, &rel, netns, limits)?;
    leaf.create(limits)?;
    Ok(leaf.dirs.into_iter().map(|d| d.path).collect())
}

/// The directories a running task's leaf has, for a command run inside it (`exec`): a task
/// started before leaves existed is in the task cgroup itself.
pub(super) fn joined(config: &TaskConfig, netns: &str) -> Vec<PathBuf> {
    let existing = every(config, netns).existing();
    if existing.dirs.is_empty() {
        return config.cgroup.iter().cloned().collect();
    }
    existing.dirs.into_iter().map(|d| d.path).collect()
}

fn every(config: &TaskConfig, netns: &str) -> Leaf {
    match (relative(config), &config.cgroup_layout) {
        (Some(rel), Some(layout)) => Leaf::every(layout, &rel, netns),
        _ => Leaf::default(),
    }
}

/// Kills what is left in the leaf and removes it.
pub(super) fn remove(config: &TaskConfig, netns: &str) -> Result<()> {
    every(config, netns).remove()
}

/// How a process task ended, with the kernel's word on whether it went over its memory
/// limit (read before the leaf is removed).
pub(super) fn exited(config: &TaskConfig, record: &TaskRecord, exit: Exit) -> ProcessState {
    let limit = record.spec.limits.memory_bytes;
    // The task's init reports a program killed by signal N as exit 128 + N.
    let killed = exit.signal == Some(libc::SIGKILL) || exit.code == Some(128 + libc::SIGKILL);
    let oom = limit > 0
        && match (relative(config), &config.cgroup_layout) {
            (Some(rel), Some(layout)) => {
                Leaf::plan(layout, &rel, &record.netns, &record.spec.limits)
                    .is_ok_and(|leaf| leaf.out_of_memory(killed))
            }
            _ => false,
        };
    ProcessState::Exited {
        code: exit.code,
        signal: exit.signal,
        out_of_memory: oom.then_some(limit),
    }
}
