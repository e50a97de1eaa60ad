//! `--update-*` and `--rollback-*`: the same shape twice.

use clap::Args;
use mesh_api::spec::UpdateConfigChange;

use super::{count, duration_ms, parsed};

#[derive(Args, Debug, Default, Clone)]
pub struct RolloutArgs {
    /// Tasks replaced at once (0: all; default 1).
    #[arg(long = "update-parallelism", allow_negative_numbers = true)]
    pub update_parallelism: Option<i64>,
    /// Wait after a replaced task runs before the next (default 0s).
    #[arg(long = "update-delay", allow_hyphen_values = true)]
    pub update_delay: Option<String>,
    /// stop-first (default) or start-first.
    #[arg(long = "update-order")]
    pub update_order: Option<String>,
    /// pause (default), continue or rollback.
    #[arg(long = "update-failure-action")]
    pub update_failure_action: Option<String>,
    /// How long a new task is watched for failure (default 5s).
    #[arg(long = "update-monitor", allow_hyphen_values = true)]
    pub update_monitor: Option<String>,
    /// Share of failed tasks tolerated (default 0).
    #[arg(long = "update-max-failure-ratio", allow_hyphen_values = true)]
    pub update_max_failure_ratio: Option<String>,
    #[arg(long = "rollback-parallelism", allow_negative_numbers = true)]
    pub rollback_parallelism: Option<i64>,
    #[arg(long = "rollback-delay", allow_hyphen_values = true)]
    pub rollback_delay: Option<String>,
    #[arg(long = "rollback-order")]
    pub rollback_order: Option<String>,
    #[arg(long = "rollback-failure-action")]
    pub rollback_failure_action: Option<String>,
    #[arg(long = "rollback-monitor", allow_hyphen_values = true)]
    pub rollback_monitor: Option<String>,
    #[arg(long = "rollback-max-failure-ratio", allow_hyphen_values = true)]
    pub rollback_max_failure_ratio: Option<String>,
}

/// One config's values as written, with the prefix (`--update` or
/// `services.web.deploy.update_config`) and separator its words take.
pub struct ConfigWords<'a> {
    pub prefix: &'a str,
    pub sep: &'a str,
    pub parallelism: Option<i64>,
    pub delay: Option<&'a str>,
    pub order: Option<&'a str>,
    pub failure_action: Option<&'a str>,
    pub monitor: Option<&'a str>,
    pub max_failure_ratio: Option<&'a str>,
}

impl ConfigWords<'_> {
    pub fn change(&self) -> Result<UpdateConfigChange, String> {
        // Flags spell keys with dashes (--update-max-failure-ratio), compose with underscores.
        let what = |k: &str| {
            let k = if self.sep == "-" {
                k.replace('_', "-")
            } else {
                k.to_owned()
            };
            format!("{}{}{k}", self.prefix, self.sep)
        };
        Ok(UpdateConfigChange {
            parallelism: self
                .parallelism
                .map(|n| count(&what("parallelism"), n, u32::MAX, "all at once"))
                .transpose()?,
            delay_ms: self
                .delay
                .map(|d| duration_ms(&what("delay"), d))
                .transpose()?,
            order: self.order.map(|o| parsed(&what("order"), o)).transpose()?,
            failure_action: self
                .failure_action
                .map(|a| parsed(&what("failure_action"), a))
                .transpose()?,
            monitor_ms: self
                .monitor
                .map(|m| duration_ms(&what("monitor"), m))
                .transpose()?,
            max_failure_ratio: self
                .max_failure_ratio
                .map(|r| parsed(&what("max_failure_ratio"), r))
                .transpose()?,
        })
    }
}

impl RolloutArgs {
    /// Whether any `--update-*` or `--rollback-*` flag was given.
    pub fn is_set(&self) -> bool {
        self.update_parallelism.is_some()
            || self.update_delay.is_some()
            || self.update_order.is_some()
            || self.update_failure_action.is_some()
            || self.update_monitor.is_some()
            || self.update_max_failure_ratio.is_some()
            || self.rollback_parallelism.is_some()
            || self.rollback_delay.is_some()
            || self.rollback_order.is_some()
            || self.rollback_failure_action.is_some()
            || self.rollback_monitor.is_some()
            || self.rollback_max_failure_ratio.is_some()
    }

    /// The update config's change and the rollback config's.
    pub fn changes(&self) -> Result<(UpdateConfigChange, UpdateConfigChange), String> {
        let update = ConfigWords {
            prefix: "--update",
            sep: "-",
            parallelism: self.update_parallelism,
            delay: self.update_delay.as_deref(),
            order: self.update_order.as_deref(),
            failure_action: self.update_failure_action.as_deref(),
            monitor: self.update_monitor.as_deref(),
            max_failure_ratio: self.update_max_failure_ratio.as_deref(),
        }
        .change()?;
        let rollback = ConfigWords {
            prefix: "--rollback",
            sep: "-",
            parallelism: self.rollback_parallelism,
            delay: self.rollback_delay.as_deref(),
            order: self.rollback_order.as_deref(),
            failure_action: self.rollback_failure_action.as_deref(),
            monitor: self.rollback_monitor.as_deref(),
            max_failure_ratio: self.rollback_max_failure_ratio.as_deref(),
        }
        .change()?;
        if rollback.failure_action == Some(mesh_planner::FailureAction::Rollback) {
            return Err(
                "--rollback-failure-action rollback would roll back a rollback: use pause or \
                 continue"
                    .into(),
            );
        }
        Ok((update, rollback))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_planner::{FailureAction, UpdateOrder};

    #[test]
    fn rollout_flags_become_changes_or_name_the_flag() {
        let (u, r) = RolloutArgs {
            update_parallelism: Some(2),
            update_delay: Some("10s".into()),
            update_order: Some("start-first".into()),
            update_failure_action: Some("rollback".into()),
            update_max_failure_ratio: Some("0.2".into()),
            rollback_monitor: Some("1s".into()),
            ..Default::default()
        }
        .changes()
        .unwrap();
        assert_eq!((u.parallelism, u.delay_ms), (Some(2), Some(10_000)));
        assert_eq!(u.order, Some(UpdateOrder::StartFirst));
        assert_eq!(u.failure_action, Some(FailureAction::Rollback));
        assert_eq!(u.max_failure_ratio.unwrap().to_string(), "0.2");
        assert_eq!(r.monitor_ms, Some(1_000));
        for (f, says) in [
            (
                RolloutArgs {
                    update_order: Some("random".into()),
                    ..Default::default()
                },
                "stop-first or start-first",
            ),
            (
                RolloutArgs {
                    update_failure_action: Some("explode".into()),
                    ..Default::default()
                },
                "pause, continue or rollback",
            ),
            (
                RolloutArgs {
                    update_delay: Some("-1s".into()),
                    ..Default::default()
                },
                "--update-delay",
            ),
            (
                RolloutArgs {
                    update_parallelism: Some(-1),
                    ..Default::default()
                },
                "--update-parallelism",
            ),
            (
                RolloutArgs {
                    update_max_failure_ratio: Some("1.5".into()),
                    ..Default::default()
                },
                "from 0 to 1",
            ),
            (
                RolloutArgs {
                    rollback_failure_action: Some("rollback".into()),
                    ..Default::default()
                },
                "roll back a rollback",
            ),
        ] {
            let e = f.changes().unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn compose_keys_name_their_path() {
        let e = ConfigWords {
            prefix: "services.web.deploy.update_config",
            sep: ".",
            parallelism: None,
            delay: None,
            order: None,
            failure_action: None,
            monitor: Some("soon"),
            max_failure_ratio: None,
        }
        .change()
        .unwrap_err();
        assert!(
            e.contains("services.web.deploy.update_config.monitor"),
            "{e}"
        );
    }
}
