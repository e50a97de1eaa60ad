//! `--health-*`.

use clap::Args;
use mesh_api::spec::{HealthChange, MAX_HEALTH_RETRIES, ProbeChange};

use super::{count, duration_ms};

#[derive(Args, Debug, Default, Clone)]
pub struct HealthArgs {
    /// Health check: a command run inside the task (healthy when it exits 0).
    #[arg(long = "health-cmd")]
    pub health_cmd: Option<String>,
    /// Health check: HTTP GET of /PATH (first target port) or PORT/PATH; 2xx/3xx is healthy.
    #[arg(long = "health-http")]
    pub health_http: Option<String>,
    /// Health check: a TCP connect to this port of the task.
    #[arg(long = "health-tcp")]
    pub health_tcp: Option<u16>,
    /// Time between checks (default 5s).
    #[arg(long = "health-interval", allow_hyphen_values = true)]
    pub health_interval: Option<String>,
    /// Time a check may take (default 2s).
    #[arg(long = "health-timeout", allow_hyphen_values = true)]
    pub health_timeout: Option<String>,
    /// Consecutive failures that make a task unhealthy (default 3).
    #[arg(long = "health-retries", allow_negative_numbers = true)]
    pub health_retries: Option<i64>,
    /// Failures in this first stretch do not count (default 0s).
    #[arg(long = "health-start-period", allow_hyphen_values = true)]
    pub health_start_period: Option<String>,
    /// No health check: a task serves as soon as it starts.
    #[arg(long = "no-healthcheck")]
    pub no_healthcheck: bool,
}

impl HealthArgs {
    pub fn change(&self) -> Result<HealthChange, String> {
        let probes = [
            self.health_cmd.is_some(),
            self.health_http.is_some(),
            self.health_tcp.is_some(),
        ]
        .into_iter()
        .filter(|p| *p)
        .count();
        let tuning = self.health_interval.is_some()
            || self.health_timeout.is_some()
            || self.health_retries.is_some()
            || self.health_start_period.is_some();
        if self.no_healthcheck && (probes > 0 || tuning) {
            return Err(
                "--no-healthcheck conflicts with the other --health-* flags: pass one or the other"
                    .into(),
            );
        }
        if probes > 1 {
            return Err("pass one of --health-cmd, --health-http and --health-tcp".into());
        }
        let probe = if let Some(cmd) = &self.health_cmd {
            if cmd.trim().is_empty() {
                return Err("--health-cmd is empty".into());
            }
            Some(ProbeChange::Cmd(vec![
                "sh".into(),
                "-c".into(),
                cmd.clone(),
            ]))
        } else if let Some(h) = &self.health_http {
            Some(http_probe("--health-http", h)?)
        } else if let Some(port) = self.health_tcp {
            if port == 0 {
                return Err("--health-tcp needs a port from 1 to 65535".into());
            }
            Some(ProbeChange::Tcp { port })
        } else {
            None
        };
        let positive = |flag: &str, v: &Option<String>| -> Result<Option<u64>, String> {
            match v.as_deref().map(|v| duration_ms(flag, v)).transpose()? {
                Some(0) => Err(format!("{flag} must be longer than 0")),
                ms => Ok(ms),
            }
        };
        Ok(HealthChange {
            probe,
            interval_ms: positive("--health-interval", &self.health_interval)?,
            timeout_ms: positive("--health-timeout", &self.health_timeout)?,
            retries: match self.health_retries {
                Some(0) => return Err("invalid --health-retries 0: use 1 to 100".into()),
                n => n
                    .map(|n| count("--health-retries", n, MAX_HEALTH_RETRIES, "invalid"))
                    .transpose()?,
            },
            start_period_ms: self
                .health_start_period
                .as_deref()
                .map(|v| duration_ms("--health-start-period", v))
                .transpose()?,
            disable: self.no_healthcheck,
        })
    }
}

/// `/PATH` (on the service's first target port) or `PORT/PATH`.
pub fn http_probe(what: &str, s: &str) -> Result<ProbeChange, String> {
    match s.split_once('/') {
        Some(("", _)) => Ok(ProbeChange::Http {
            port: None,
            path: s.to_owned(),
        }),
        Some((port, path)) => Ok(ProbeChange::Http {
            port: Some(port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                format!("invalid port {port:?} in {what} {s:?}: write PORT/PATH, e.g. 8000/health")
            })?),
            path: format!("/{path}"),
        }),
        None => Err(format!(
            "invalid {what} {s:?}: write /PATH or PORT/PATH, e.g. /health"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(f: impl FnOnce(&mut HealthArgs)) -> Result<HealthChange, String> {
        let mut a = HealthArgs::default();
        f(&mut a);
        a.change()
    }

    #[test]
    fn health_flags_become_probes_or_say_what_conflicts() {
        let h = args(|a| {
            a.health_http = Some("8000/health".into());
            a.health_interval = Some("1s".into());
        })
        .unwrap();
        assert_eq!(
            h.probe,
            Some(ProbeChange::Http {
                port: Some(8000),
                path: "/health".into()
            })
        );
        assert_eq!(h.interval_ms, Some(1_000));
        let cmd = args(|a| a.health_cmd = Some("curl -f localhost".into())).unwrap();
        assert_eq!(
            cmd.probe,
            Some(ProbeChange::Cmd(vec![
                "sh".into(),
                "-c".into(),
                "curl -f localhost".into()
            ]))
        );
        for (f, says) in [
            (
                args(|a| {
                    a.health_cmd = Some("x".into());
                    a.health_tcp = Some(80);
                }),
                "pass one of",
            ),
            (
                args(|a| {
                    a.no_healthcheck = true;
                    a.health_interval = Some("1s".into());
                }),
                "--no-healthcheck conflicts",
            ),
            (
                args(|a| a.health_http = Some("health".into())),
                "/PATH or PORT/PATH",
            ),
            (
                args(|a| a.health_http = Some("x/health".into())),
                "invalid port",
            ),
            (args(|a| a.health_retries = Some(0)), "--health-retries"),
            (
                args(|a| a.health_timeout = Some("0s".into())),
                "longer than 0",
            ),
            (args(|a| a.health_tcp = Some(0)), "--health-tcp"),
        ] {
            let e = f.unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }
}
