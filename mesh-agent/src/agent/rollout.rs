//! Changing what a service's tasks run: health checks, rollout configs, rollbacks — the
//! parts of `service create/update` that decide whether and how tasks are replaced.

use mesh_planner::{FailureAction, Ratio, UpdateConfig, UpdateOrder};

use super::{Error, Result, services::duration_ms};
use mesh_api::spec::{HealthCheck, PortSpec, Probe, ServiceSpec, UpdateState, UpdateStatus};
use mesh_api::v1::{HealthFlags, RolloutFlags};

/// mesh's defaults: a node-local probe is cheap, so it runs more often than Docker's 30 s.
const HEALTH_INTERVAL_MS: u64 = 5_000;
const HEALTH_TIMEOUT_MS: u64 = 2_000;
const HEALTH_RETRIES: u32 = 3;

/// The health check after applying `flags` to `current`.
pub fn health(
    current: Option<HealthCheck>,
    flags: &HealthFlags,
    ports: &[PortSpec],
) -> Result<Option<HealthCheck>> {
    let probes = [
        flags.health_cmd.is_some(),
        flags.health_http.is_some(),
        flags.health_tcp.is_some(),
    ]
    .into_iter()
    .filter(|p| *p)
    .count();
    let tuning = flags.health_interval.is_some()
        || flags.health_timeout.is_some()
        || flags.health_retries.is_some()
        || flags.health_start_period.is_some();
    if flags.no_healthcheck {
        if probes > 0 || tuning {
            return Err(Error::Invalid(
                "--no-healthcheck conflicts with the other --health-* flags: pass one or the other"
                    .into(),
            ));
        }
        return Ok(None);
    }
    if probes > 1 {
        return Err(Error::Invalid(
            "pass one of --health-cmd, --health-http and --health-tcp".into(),
        ));
    }
    let probe = if let Some(cmd) = &flags.health_cmd {
        if cmd.trim().is_empty() {
            return Err(Error::Invalid("--health-cmd is empty".into()));
        }
        Some(Probe::Cmd(vec!["sh".into(), "-c".into(), cmd.clone()]))
    } else if let Some(h) = &flags.health_http {
        Some(http_probe(h, ports)?)
    } else if let Some(port) = flags.health_tcp {
        if port == 0 {
            return Err(Error::Invalid(
                "--health-tcp needs a port from 1 to 65535".into(),
            ));
        }
        Some(Probe::Tcp { port })
    } else {
        None
    };
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
        (None, None) if tuning => {
            return Err(Error::Invalid(
                "--health-interval/-timeout/-retries/-start-period need a probe: pass \
                 --health-cmd, --health-http or --health-tcp"
                    .into(),
            ));
        }
        (None, None) => return Ok(None),
    };
    if let Some(v) = &flags.health_interval {
        check.interval_ms = positive_ms("--health-interval", v)?;
    }
    if let Some(v) = &flags.health_timeout {
        check.timeout_ms = positive_ms("--health-timeout", v)?;
    }
    if let Some(v) = &flags.health_start_period {
        check.start_period_ms = duration_ms("--health-start-period", v)?;
    }
    if let Some(n) = flags.health_retries {
        check.retries = u32::try_from(n)
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| Error::Invalid(format!("invalid --health-retries {n}: use 1 to 100")))?;
    }
    Ok(Some(check))
}

/// `/health` (on the service's first target port) or `8000/health`.
fn http_probe(s: &str, ports: &[PortSpec]) -> Result<Probe> {
    let (port, path) = match s.split_once('/') {
        Some(("", _)) => {
            let port = ports.first().map(|p| p.target).ok_or_else(|| {
                Error::Invalid(format!(
                    "--health-http {s:?} names no port and the service publishes none: write PORT{s}"
                ))
            })?;
            (port, s.to_owned())
        }
        Some((port, path)) => (
            port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                Error::Invalid(format!(
                    "invalid port {port:?} in --health-http {s:?}: write PORT/PATH, e.g. 8000/health"
                ))
            })?,
            format!("/{path}"),
        ),
        None => {
            return Err(Error::Invalid(format!(
                "invalid --health-http {s:?}: write /PATH or PORT/PATH, e.g. /health"
            )));
        }
    };
    Ok(Probe::Http { port, path })
}

fn positive_ms(flag: &str, v: &str) -> Result<u64> {
    match duration_ms(flag, v)? {
        0 => Err(Error::Invalid(format!("{flag} must be longer than 0"))),
        ms => Ok(ms),
    }
}

/// The update and rollback configs after applying `flags`.
pub fn configs(spec: &mut ServiceSpec, flags: &RolloutFlags) -> Result<()> {
    apply(
        &mut spec.update,
        "update",
        [
            &flags.update_delay,
            &flags.update_order,
            &flags.update_failure_action,
            &flags.update_monitor,
            &flags.update_max_failure_ratio,
        ],
        flags.update_parallelism,
    )?;
    apply(
        &mut spec.rollback,
        "rollback",
        [
            &flags.rollback_delay,
            &flags.rollback_order,
            &flags.rollback_failure_action,
            &flags.rollback_monitor,
            &flags.rollback_max_failure_ratio,
        ],
        flags.rollback_parallelism,
    )?;
    if spec.rollback.failure_action == FailureAction::Rollback {
        return Err(Error::Invalid(
            "--rollback-failure-action rollback would roll back a rollback: use pause or continue"
                .into(),
        ));
    }
    Ok(())
}

fn apply(
    c: &mut UpdateConfig,
    which: &str,
    [delay, order, action, monitor, ratio]: [&Option<String>; 5],
    parallelism: Option<i64>,
) -> Result<()> {
    if let Some(p) = parallelism {
        c.parallelism = u32::try_from(p).map_err(|_| {
            Error::Invalid(format!(
                "invalid --{which}-parallelism {p}: use 0 (all at once) or more"
            ))
        })?;
    }
    if let Some(d) = delay {
        c.delay_ms = duration_ms(&format!("--{which}-delay"), d)?;
    }
    if let Some(o) = order {
        c.order = o
            .parse::<UpdateOrder>()
            .map_err(|e| Error::Invalid(format!("--{which}-order: {e}")))?;
    }
    if let Some(a) = action {
        c.failure_action = a
            .parse::<FailureAction>()
            .map_err(|e| Error::Invalid(format!("--{which}-failure-action: {e}")))?;
    }
    if let Some(m) = monitor {
        c.monitor_ms = duration_ms(&format!("--{which}-monitor"), m)?;
    }
    if let Some(r) = ratio {
        c.max_failure_ratio = r
            .parse::<Ratio>()
            .map_err(|e| Error::Invalid(format!("--{which}-max-failure-ratio: {e}")))?;
    }
    Ok(())
}

/// A template change: tasks are replaced, and what they ran is kept for a rollback.
pub fn start_rollout(spec: &mut ServiceSpec, current: &ServiceSpec, now_ms: u64) {
    let mut previous = current.clone();
    previous.previous = None;
    previous.update_status = None;
    spec.previous = Some(Box::new(previous));
    spec.template_version = current.version + 1;
    spec.update_status = Some(UpdateStatus {
        state: UpdateState::Updating,
        started_ms: now_ms,
        completed_ms: None,
        message: "update in progress".into(),
    });
}

/// The spec that goes back to `current.previous`, rolled out with `current`'s rollback config.
pub fn rolled_back(current: &ServiceSpec, message: &str, now_ms: u64) -> Option<ServiceSpec> {
    let previous = current.previous.as_ref()?;
    let mut spec = (**previous).clone();
    // Identity and addressing stay: it is the same service.
    spec.name = current.name.clone();
    spec.network = current.network.clone();
    spec.vip = current.vip;
    spec.ports = current.ports.clone();
    spec.rollback = current.rollback;
    let mut before = current.clone();
    before.previous = None;
    before.update_status = None;
    spec.previous = Some(Box::new(before));
    spec.version = current.version;
    spec.template_version = current.version + 1;
    spec.update_status = Some(UpdateStatus {
        state: UpdateState::RollbackStarted,
        started_ms: now_ms,
        completed_ms: None,
        message: message.to_owned(),
    });
    Some(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::spec::TaskTemplate;

    fn flags(f: impl FnOnce(&mut HealthFlags)) -> HealthFlags {
        let mut h = HealthFlags::default();
        f(&mut h);
        h
    }

    #[test]
    fn health_flags_become_probes_or_say_what_conflicts() {
        let ports = ["8080:80".parse::<PortSpec>().unwrap()];
        let h = health(
            None,
            &flags(|f| f.health_http = Some("/health".into())),
            &ports,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            h.probe,
            Probe::Http {
                port: 80,
                path: "/health".into()
            }
        );
        assert_eq!(h.interval_ms, HEALTH_INTERVAL_MS);
        let h = health(
            Some(h),
            &flags(|f| {
                f.health_interval = Some("2s".into());
                f.health_retries = Some(5);
            }),
            &ports,
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.interval_ms, h.retries), (2_000, 5));
        assert_eq!(
            health(Some(h), &flags(|f| f.no_healthcheck = true), &ports).unwrap(),
            None
        );
        for (f, says) in [
            (
                flags(|f| {
                    f.no_healthcheck = true;
                    f.health_cmd = Some("true".into());
                }),
                "conflicts",
            ),
            (
                flags(|f| {
                    f.health_cmd = Some("true".into());
                    f.health_tcp = Some(80);
                }),
                "one of",
            ),
            (
                flags(|f| f.health_interval = Some("1s".into())),
                "need a probe",
            ),
            (
                flags(|f| f.health_http = Some("/x".into())),
                "publishes none",
            ),
            (
                flags(|f| {
                    f.health_tcp = Some(80);
                    f.health_retries = Some(0);
                }),
                "1 to 100",
            ),
        ] {
            let ports: &[PortSpec] = if says == "publishes none" {
                &[]
            } else {
                &ports
            };
            let e = health(None, &f, ports).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn rollout_flags_are_checked() {
        let mut spec = ServiceSpec::default();
        configs(
            &mut spec,
            &RolloutFlags {
                update_parallelism: Some(2),
                update_delay: Some("10s".into()),
                update_order: Some("start-first".into()),
                update_failure_action: Some("rollback".into()),
                update_max_failure_ratio: Some("0.2".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(spec.update.parallelism, 2);
        assert_eq!(spec.update.delay_ms, 10_000);
        assert_eq!(spec.update.order, UpdateOrder::StartFirst);
        assert_eq!(spec.update.failure_action, FailureAction::Rollback);
        assert_eq!(spec.update.max_failure_ratio.to_string(), "0.2");
        for (f, says) in [
            (
                RolloutFlags {
                    update_order: Some("random".into()),
                    ..Default::default()
                },
                "stop-first or start-first",
            ),
            (
                RolloutFlags {
                    update_failure_action: Some("explode".into()),
                    ..Default::default()
                },
                "pause, continue or rollback",
            ),
            (
                RolloutFlags {
                    update_delay: Some("-1s".into()),
                    ..Default::default()
                },
                "--update-delay",
            ),
            (
                RolloutFlags {
                    update_parallelism: Some(-1),
                    ..Default::default()
                },
                "--update-parallelism",
            ),
            (
                RolloutFlags {
                    update_max_failure_ratio: Some("1.5".into()),
                    ..Default::default()
                },
                "from 0 to 1",
            ),
        ] {
            let e = configs(&mut ServiceSpec::default(), &f)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn a_rollback_goes_back_to_the_previous_template_and_replaces_every_task() {
        let v1 = ServiceSpec {
            name: "web".into(),
            version: 1,
            template_version: 1,
            task: Some(TaskTemplate {
                command: vec!["v1".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut v2 = v1.clone();
        v2.task.as_mut().unwrap().command = vec!["v2".into()];
        start_rollout(&mut v2, &v1, 100);
        v2.version = 2;
        assert_eq!(v2.template_version, 2);
        assert_eq!(
            v2.update_status.as_ref().unwrap().state,
            UpdateState::Updating
        );
        let back = rolled_back(&v2, "manually requested rollback", 200).unwrap();
        assert_eq!(back.task.as_ref().unwrap().command, vec!["v1"]);
        assert_eq!(
            back.template_id(),
            v1.template_id(),
            "v1's tasks match again"
        );
        assert_eq!(
            back.update_status.as_ref().unwrap().state,
            UpdateState::RollbackStarted
        );
        assert_eq!(
            back.previous
                .as_ref()
                .unwrap()
                .task
                .as_ref()
                .unwrap()
                .command,
            vec!["v2"]
        );
        assert!(rolled_back(&v1, "x", 0).is_none(), "nothing to go back to");
    }
}
