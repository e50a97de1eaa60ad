//! What a node does when one of its tasks ends: Swarm's restart policy, as a pure function so
//! that it is tested without processes.

use crate::{
    spec::{RestartCondition, RestartPolicy},
    task::Task,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterExit {
    /// Start a new task in the same slot, no earlier than `not_before_ms`.
    Restart {
        attempt: u32,
        window_start_ms: u64,
        not_before_ms: u64,
    },
    /// Leave the slot to the finished task; `why` says so in `service ps`.
    Hold { why: Option<String> },
}

/// `failed`: the task exited non-zero, was killed, or could not start.
pub fn after_exit(policy: &RestartPolicy, task: &Task, failed: bool, now_ms: u64) -> AfterExit {
    match policy.condition {
        RestartCondition::None => return AfterExit::Hold { why: None },
        RestartCondition::OnFailure if !failed => return AfterExit::Hold { why: None },
        _ => {}
    }
    // Attempts count within the window; once it has passed they start again from zero.
    let (mut attempts, mut window_start_ms) = (task.attempt, task.window_start_ms);
    if let Some(window) = policy.window_ms
        && now_ms.saturating_sub(window_start_ms) > window
    {
        attempts = 0;
        window_start_ms = now_ms;
    }
    if let Some(max) = policy.max_attempts
        && attempts >= max
    {
        return AfterExit::Hold {
            why: Some(format!(
                "not restarted: {max} restart attempt{} used (--restart-max-attempts)",
                if max == 1 { "" } else { "s" }
            )),
        };
    }
    AfterExit::Restart {
        attempt: attempts + 1,
        window_start_ms,
        // Saturating: the delay comes from a user's spec, and an overflow would panic (debug)
        // or wrap into the past and restart at once (release).
        not_before_ms: now_ms.saturating_add(policy.delay_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{DesiredState, Slot, TaskState};

    fn task(attempt: u32, window_start_ms: u64) -> Task {
        Task {
            id: "t".into(),
            service: "web".into(),
            slot: Slot::Replica(1),
            node: "n1".into(),
            spec_version: 1,
            template: 1,
            desired: DesiredState::Running,
            state: TaskState::Failed,
            created_ms: 0,
            since_ms: 0,
            error: None,
            exit_code: Some(1),
            attempt,
            window_start_ms,
            not_before_ms: None,
            holds_slot: false,
            running_ms: None,
            reservation: Default::default(),
        }
    }

    #[test]
    fn conditions_decide_whether_to_restart() {
        let any = RestartPolicy::default();
        assert!(matches!(
            after_exit(&any, &task(0, 0), false, 10),
            AfterExit::Restart {
                attempt: 1,
                not_before_ms: 5010,
                ..
            }
        ));
        let on_failure = RestartPolicy {
            condition: RestartCondition::OnFailure,
            ..any
        };
        assert_eq!(
            after_exit(&on_failure, &task(0, 0), false, 10),
            AfterExit::Hold { why: None }
        );
        assert!(matches!(
            after_exit(&on_failure, &task(0, 0), true, 10),
            AfterExit::Restart { .. }
        ));
        let none = RestartPolicy {
            condition: RestartCondition::None,
            ..any
        };
        assert_eq!(
            after_exit(&none, &task(0, 0), true, 10),
            AfterExit::Hold { why: None }
        );
    }

    #[test]
    fn max_attempts_count_within_the_window() {
        let p = RestartPolicy {
            max_attempts: Some(2),
            window_ms: Some(1_000),
            delay_ms: 0,
            ..RestartPolicy::default()
        };
        assert!(matches!(
            after_exit(&p, &task(1, 0), true, 500),
            AfterExit::Restart { attempt: 2, .. }
        ));
        assert!(matches!(
            after_exit(&p, &task(2, 0), true, 500),
            AfterExit::Hold { why: Some(_) }
        ));
        // The window passed: counting starts again.
        assert_eq!(
            after_exit(&p, &task(2, 0), true, 5_000),
            AfterExit::Restart {
                attempt: 1,
                window_start_ms: 5_000,
                not_before_ms: 5_000
            }
        );
        let forever = RestartPolicy {
            max_attempts: Some(1),
            ..RestartPolicy::default()
        };
        assert!(matches!(
            after_exit(&forever, &task(1, 0), true, 1 << 40),
            AfterExit::Hold { .. }
        ));
    }
}
