//! What a `service update` (or a compose redeploy) changes, already parsed: each field left
//! `None` keeps what the service has. The same changes, applied to a default spec, build the
//! spec of a `service create`, so the two can never disagree about defaults.
//!
//! Errors here are about the spec, not about how it was written: the caller (a flag, a compose
//! key, a Docker API field) knows its own words and says which one.

use mesh_planner::{
    FailureAction, Ratio, RestartCondition, RestartPolicy, UpdateConfig, UpdateOrder,
};
use serde::{Deserialize, Serialize};

use super::{HealthCheck, PortSpec, Probe};

/// mesh's health-check defaults: a node-local probe is cheap, so it runs more often than
/// Docker's 30 s.
pub const HEALTH_INTERVAL_MS: u64 = 5_000;
pub const HEALTH_TIMEOUT_MS: u64 = 2_000;
pub const HEALTH_RETRIES: u32 = 3;
/// The most consecutive failures a health check may wait for.
pub const MAX_HEALTH_RETRIES: u32 = 100;

/// `--restart-*`, compose's `deploy.restart_policy`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<RestartCondition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// 0: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// 0: the slot's whole life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_ms: Option<u64>,
}

impl RestartChange {
    pub fn apply(&self, mut policy: RestartPolicy) -> RestartPolicy {
        if let Some(c) = self.condition {
            policy.condition = c;
        }
        if let Some(d) = self.delay_ms {
            policy.delay_ms = d;
        }
        if let Some(n) = self.max_attempts {
            policy.max_attempts = (n > 0).then_some(n);
        }
        if let Some(w) = self.window_ms {
            policy.window_ms = (w > 0).then_some(w);
        }
        policy
    }
}

/// `--update-*` or `--rollback-*`, compose's `deploy.update_config` / `rollback_config`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateConfigChange {
    /// 0: all at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<UpdateOrder>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_action: Option<FailureAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failure_ratio: Option<Ratio>,
}

impl UpdateConfigChange {
    pub fn apply(&self, mut c: UpdateConfig) -> UpdateConfig {
        if let Some(p) = self.parallelism {
            c.parallelism = p;
        }
        if let Some(d) = self.delay_ms {
            c.delay_ms = d;
        }
        if let Some(o) = self.order {
            c.order = o;
        }
        if let Some(a) = self.failure_action {
            c.failure_action = a;
        }
        if let Some(m) = self.monitor_ms {
            c.monitor_ms = m;
        }
        if let Some(r) = self.max_failure_ratio {
            c.max_failure_ratio = r;
        }
        c
    }
}

/// A probe as a change names it: an HTTP probe may leave its port to the service's first
/// target port, which only the spec it is applied to knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeChange {
    /// Run in the task; healthy when it exits 0.
    Cmd(Vec<String>),
    Http {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        path: String,
    },
    Tcp {
        port: u16,
    },
}

/// `--health-*`, compose's `healthcheck`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeChange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_period_ms: Option<u64>,
    /// No health check at all (`--no-healthcheck`, compose's `test: [NONE]`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disable: bool,
}

impl HealthChange {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    fn tunes(&self) -> bool {
        self.interval_ms.is_some()
            || self.timeout_ms.is_some()
            || self.retries.is_some()
            || self.start_period_ms.is_some()
    }

    /// The health check after this change; `ports` are the service's, for an HTTP probe
    /// without a port.
    pub fn apply(
        &self,
        current: Option<HealthCheck>,
        ports: &[PortSpec],
    ) -> Result<Option<HealthCheck>, String> {
        if self.disable {
            if self.probe.is_some() || self.tunes() {
                return Err(
                    "a disabled health check takes no probe, interval, timeout, retries or \
                     start period"
                        .into(),
                );
            }
            return Ok(None);
        }
        let probe = self.probe.as_ref().map(|p| probe(p, ports)).transpose()?;
        let mut check = match (probe, current) {
            (Some(probe), Some(c)) => HealthCheck { probe, ..c },
            (Some(probe), None) => HealthCheck {
                probe,
                interval_ms: HEALTH_INTERVAL_MS,
                timeout_ms: HEALTH_TIMEOUT_MS,
                retries: HEALTH_RETRIES,
                start_period_ms: 0,
            },
            (None, Some(c)) => c,
            (None, None) if self.tunes() => {
                return Err(
                    "a health check's interval, timeout, retries or start period need a probe: \
                     a command, an HTTP path or a TCP port"
                        .into(),
                );
            }
            (None, None) => return Ok(None),
        };
        if let Some(v) = self.interval_ms {
            check.interval_ms = positive(v, "interval")?;
        }
        if let Some(v) = self.timeout_ms {
            check.timeout_ms = positive(v, "timeout")?;
        }
        if let Some(v) = self.start_period_ms {
            check.start_period_ms = v;
        }
        if let Some(n) = self.retries {
            if !(1..=MAX_HEALTH_RETRIES).contains(&n) {
                return Err(format!(
                    "a health check's retries must be 1 to {MAX_HEALTH_RETRIES}, not {n}"
                ));
            }
            check.retries = n;
        }
        Ok(Some(check))
    }
}

fn positive(ms: u64, what: &str) -> Result<u64, String> {
    match ms {
        0 => Err(format!("a health check's {what} must be longer than 0")),
        ms => Ok(ms),
    }
}

fn probe(p: &ProbeChange, ports: &[PortSpec]) -> Result<Probe, String> {
    Ok(match p {
        ProbeChange::Cmd(cmd) if cmd.iter().all(|w| w.trim().is_empty()) => {
            return Err("a health check's command is empty".into());
        }
        ProbeChange::Cmd(cmd) => Probe::Cmd(cmd.clone()),
        ProbeChange::Tcp { port: 0 } | ProbeChange::Http { port: Some(0), .. } => {
            return Err("a health check's port must be from 1 to 65535".into());
        }
        ProbeChange::Tcp { port } => Probe::Tcp { port: *port },
        ProbeChange::Http { port, path } => {
            if !path.starts_with('/') {
                return Err(format!(
                    "a health check's HTTP path {path:?} must start with /"
                ));
            }
            let port = match port {
                Some(p) => *p,
                None => ports.first().map(|p| p.target).ok_or_else(|| {
                    format!(
                        "the HTTP health check {path} names no port and the service has none: \
                         give its port, e.g. 8000{path}"
                    )
                })?,
            };
            Probe::Http {
                port,
                path: path.clone(),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports() -> Vec<PortSpec> {
        vec!["8080:80".parse().unwrap()]
    }

    #[test]
    fn a_probe_gets_the_defaults_and_keeps_tuning_it_is_given() {
        let h = HealthChange {
            probe: Some(ProbeChange::Http {
                port: None,
                path: "/health".into(),
            }),
            retries: Some(5),
            ..Default::default()
        };
        let c = h.apply(None, &ports()).unwrap().unwrap();
        assert_eq!(
            c.probe,
            Probe::Http {
                port: 80,
                path: "/health".into()
            }
        );
        assert_eq!(
            (c.interval_ms, c.timeout_ms, c.retries),
            (HEALTH_INTERVAL_MS, HEALTH_TIMEOUT_MS, 5)
        );
        // A later change of the interval alone keeps the probe.
        let later = HealthChange {
            interval_ms: Some(1_000),
            ..Default::default()
        }
        .apply(Some(c.clone()), &[])
        .unwrap()
        .unwrap();
        assert_eq!((later.probe, later.interval_ms), (c.probe, 1_000));
    }

    #[test]
    fn health_changes_that_cannot_be_say_why() {
        let tuning_only = HealthChange {
            timeout_ms: Some(1_000),
            ..Default::default()
        };
        assert!(
            tuning_only
                .apply(None, &[])
                .unwrap_err()
                .contains("need a probe")
        );
        let no_port = HealthChange {
            probe: Some(ProbeChange::Http {
                port: None,
                path: "/h".into(),
            }),
            ..Default::default()
        };
        assert!(
            no_port
                .apply(None, &[])
                .unwrap_err()
                .contains("names no port")
        );
        let disabled_with_probe = HealthChange {
            disable: true,
            probe: Some(ProbeChange::Tcp { port: 80 }),
            ..Default::default()
        };
        assert!(disabled_with_probe.apply(None, &[]).is_err());
        let zero = HealthChange {
            probe: Some(ProbeChange::Tcp { port: 80 }),
            interval_ms: Some(0),
            ..Default::default()
        };
        assert!(zero.apply(None, &[]).unwrap_err().contains("longer than 0"));
        let retries = HealthChange {
            probe: Some(ProbeChange::Tcp { port: 80 }),
            retries: Some(0),
            ..Default::default()
        };
        assert!(retries.apply(None, &[]).unwrap_err().contains("1 to 100"));
    }

    #[test]
    fn zero_attempts_and_window_mean_no_limit() {
        let limited = RestartChange {
            max_attempts: Some(3),
            window_ms: Some(60_000),
            ..Default::default()
        }
        .apply(RestartPolicy::default());
        assert_eq!(
            (limited.max_attempts, limited.window_ms),
            (Some(3), Some(60_000))
        );
        let unlimited = RestartChange {
            max_attempts: Some(0),
            window_ms: Some(0),
            ..Default::default()
        }
        .apply(limited);
        assert_eq!((unlimited.max_attempts, unlimited.window_ms), (None, None));
        assert_eq!(unlimited.delay_ms, RestartPolicy::default().delay_ms);
    }
}
