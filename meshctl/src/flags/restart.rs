//! `--restart-*`.

use clap::Args;
use mesh_api::spec::RestartChange;

use super::{count, duration_ms, parsed};

#[derive(Args, Debug, Default, Clone)]
pub struct RestartArgs {
    /// none, on-failure or any (default any).
    #[arg(long = "restart-condition")]
    pub restart_condition: Option<String>,
    /// Wait between a task's end and its restart (default 5s).
    #[arg(long = "restart-delay", allow_hyphen_values = true)]
    pub restart_delay: Option<String>,
    /// Restarts before giving up (0: no limit).
    #[arg(long = "restart-max-attempts", allow_negative_numbers = true)]
    pub restart_max_attempts: Option<i64>,
    /// The window the attempts count in (default: unbounded).
    #[arg(long = "restart-window", allow_hyphen_values = true)]
    pub restart_window: Option<String>,
}

impl RestartArgs {
    pub fn change(&self) -> Result<RestartChange, String> {
        Ok(RestartChange {
            condition: self
                .restart_condition
                .as_deref()
                .map(|c| parsed("--restart-condition", c))
                .transpose()?,
            delay_ms: self
                .restart_delay
                .as_deref()
                .map(|d| duration_ms("--restart-delay", d))
                .transpose()?,
            max_attempts: self
                .restart_max_attempts
                .map(|n| count("--restart-max-attempts", n, u32::MAX, "no limit"))
                .transpose()?,
            window_ms: self
                .restart_window
                .as_deref()
                .map(|w| duration_ms("--restart-window", w))
                .transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_planner::RestartCondition;

    #[test]
    fn restart_flags_become_a_change_or_name_the_flag() {
        let c = RestartArgs {
            restart_condition: Some("on-failure".into()),
            restart_delay: Some("1m30s".into()),
            restart_max_attempts: Some(3),
            restart_window: None,
        }
        .change()
        .unwrap();
        assert_eq!(c.condition, Some(RestartCondition::OnFailure));
        assert_eq!((c.delay_ms, c.max_attempts), (Some(90_000), Some(3)));
        let bad = |f: fn(&mut RestartArgs)| {
            let mut a = RestartArgs::default();
            f(&mut a);
            a.change().unwrap_err()
        };
        assert!(bad(|a| a.restart_condition = Some("always".into())).contains("on-failure"));
        assert!(bad(|a| a.restart_delay = Some("soon".into())).contains("--restart-delay"));
        assert!(bad(|a| a.restart_max_attempts = Some(-1)).contains("--restart-max-attempts"));
    }
}
