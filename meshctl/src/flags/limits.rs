//! `--limit-cpu`, `--limit-memory`, `--limit-pids`: what the kernel holds a task to.

use clap::Args;
use mesh_api::spec::{Limits, LimitsChange, TaskResources, bytes_size};

use super::value::{bytes, nano_cpus};

#[derive(Args, Debug, Default, Clone)]
pub struct LimitsArgs {
    /// Limit CPUs (e.g. 0.5 or 2; 0 on update removes the limit).
    #[arg(long = "limit-cpu")]
    pub limit_cpu: Option<String>,
    /// Limit memory (e.g. 512m or 1g): the task is OOM-killed above it (0 on update removes it).
    #[arg(long = "limit-memory")]
    pub limit_memory: Option<String>,
    /// Limit the task's processes and threads (0: no limit).
    #[arg(long = "limit-pids", allow_negative_numbers = true)]
    pub limit_pids: Option<i64>,
}

impl LimitsArgs {
    pub fn is_empty(&self) -> bool {
        self.limit_cpu.is_none() && self.limit_memory.is_none() && self.limit_pids.is_none()
    }

    /// The flags given, as a change of a service's limits.
    pub fn change(&self) -> Result<LimitsChange, String> {
        Ok(LimitsChange {
            nano_cpus: self
                .limit_cpu
                .as_deref()
                .map(|c| nano_cpus("--limit-cpu", c))
                .transpose()?,
            memory_bytes: self
                .limit_memory
                .as_deref()
                .map(|m| bytes("--limit-memory", m))
                .transpose()?,
            pids: self
                .limit_pids
                .map(|n| pids("--limit-pids", n))
                .transpose()?,
        })
    }

    /// A new service's limits (unset: none).
    pub fn limits(&self) -> Result<Limits, String> {
        let mut l = Limits::default();
        self.change()?.apply(&mut l);
        Ok(l)
    }
}

/// A PID limit: Docker takes -1 or 0 for none; anything else below that is a mistake.
pub fn pids(what: &str, n: i64) -> Result<u64, String> {
    match n {
        -1 | 0 => Ok(0),
        n if n > 0 => Ok(n as u64),
        _ => Err(format!(
            "invalid {what} {n}: give the most processes a task may have, or 0 for no limit"
        )),
    }
}

/// A limit below the matching reservation can never be met: caught before anything is sent
/// (the agent checks again, for specs that come from elsewhere).
pub fn within_reservations(r: &TaskResources) -> Result<(), String> {
    let (l, res) = (&r.limits, &r.reservations);
    if l.memory_bytes > 0 && l.memory_bytes < res.memory_bytes {
        return Err(format!(
            "--limit-memory {} is below --reserve-memory {}: a task could never get what it \
             reserves; raise the limit or lower the reservation",
            bytes_size(l.memory_bytes),
            bytes_size(res.memory_bytes)
        ));
    }
    if l.nano_cpus > 0 && l.nano_cpus < res.nano_cpus {
        return Err(format!(
            "--limit-cpu {} is below --reserve-cpu {}: raise the limit or lower the reservation",
            l.nano_cpus as f64 / 1e9,
            res.nano_cpus as f64 / 1e9
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_flags_become_limits_or_name_the_flag() {
        let a = LimitsArgs {
            limit_cpu: Some("1.5".into()),
            limit_memory: Some("512M".into()),
            limit_pids: Some(200),
        };
        assert_eq!(
            a.limits().unwrap(),
            Limits {
                nano_cpus: 1_500_000_000,
                memory_bytes: 512 << 20,
                pids: 200
            }
        );
        let only_memory = LimitsArgs {
            limit_memory: Some("0".into()),
            ..Default::default()
        };
        assert_eq!(
            only_memory.change().unwrap(),
            LimitsChange {
                memory_bytes: Some(0),
                ..Default::default()
            },
            "0 on update removes the limit"
        );
        let bad = |f: fn(&mut LimitsArgs)| {
            let mut a = LimitsArgs::default();
            f(&mut a);
            a.change().unwrap_err()
        };
        assert!(bad(|a| a.limit_memory = Some("512Q".into())).contains("--limit-memory"));
        assert!(bad(|a| a.limit_cpu = Some("half".into())).contains("--limit-cpu"));
        assert!(bad(|a| a.limit_pids = Some(-5)).contains("--limit-pids"));
    }

    #[test]
    fn a_limit_below_its_reservation_is_refused() {
        let mut r = TaskResources::default();
        r.limits.memory_bytes = 256 << 20;
        r.reservations.memory_bytes = 512 << 20;
        assert_eq!(
            within_reservations(&r).unwrap_err(),
            "--limit-memory 256MiB is below --reserve-memory 512MiB: a task could never get \
             what it reserves; raise the limit or lower the reservation"
        );
        r.reservations.memory_bytes = 128 << 20;
        r.limits.nano_cpus = 500_000_000;
        r.reservations.nano_cpus = 1_000_000_000;
        assert!(
            within_reservations(&r)
                .unwrap_err()
                .contains("--limit-cpu 0.5")
        );
        r.reservations.nano_cpus = 0;
        assert!(
            within_reservations(&r).is_ok(),
            "no reservation: nothing to compare"
        );
    }
}
