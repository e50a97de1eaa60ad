//! `--reserve-cpu` and `--reserve-memory`: what each task reserves of its node (placement
//! only puts it where that much is free). Docker's spelling: `0.5`, `256M`.

use clap::Args;

/// Shared by `service create` and `service update` (Docker's update takes the same flags).
#[derive(Args, Debug, Clone, Default)]
pub struct ReserveArgs {
    /// CPUs each task reserves of its node, e.g. 0.5 (0: none).
    #[arg(long = "reserve-cpu", allow_hyphen_values = true)]
    reserve_cpu: Option<String>,
    /// Memory each task reserves of its node, e.g. 256M (0: none).
    #[arg(long = "reserve-memory", allow_hyphen_values = true)]
    reserve_memory: Option<String>,
}

impl ReserveArgs {
    /// `--reserve-cpu` in billionths of a CPU, if given.
    pub fn cpu(&self) -> Result<Option<u64>, String> {
        self.reserve_cpu
            .as_deref()
            .map(|s| {
                not_negative("--reserve-cpu", s)?;
                mesh_api::spec::nano_cpus("--reserve-cpu", s)
            })
            .transpose()
    }

    /// `--reserve-memory` in bytes, if given.
    pub fn memory(&self) -> Result<Option<u64>, String> {
        self.reserve_memory
            .as_deref()
            .map(|s| {
                not_negative("--reserve-memory", s)?;
                mesh_api::spec::bytes("--reserve-memory", s)
            })
            .transpose()
    }

    /// Both, for a new service (left out: none).
    pub fn reservations(&self) -> Result<mesh_api::spec::Resources, String> {
        Ok(mesh_api::spec::Resources {
            nano_cpus: self.cpu()?.unwrap_or(0),
            memory_bytes: self.memory()?.unwrap_or(0),
        })
    }
}

fn not_negative(what: &str, s: &str) -> Result<(), String> {
    if s.trim().starts_with('-') {
        return Err(format!(
            "invalid {what} {s:?}: a reservation cannot be negative (0 reserves nothing)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cpu: &str, memory: &str) -> ReserveArgs {
        ReserveArgs {
            reserve_cpu: Some(cpu.into()),
            reserve_memory: Some(memory.into()),
        }
    }

    #[test]
    fn reservations_read_like_dockers_and_bad_ones_name_the_flag() {
        let r = args("0.5", "256M").reservations().unwrap();
        assert_eq!((r.nano_cpus, r.memory_bytes), (500_000_000, 256 << 20));
        assert_eq!(
            ReserveArgs::default().reservations().unwrap(),
            Default::default()
        );
        let e = args("0.5", "512Q").reservations().unwrap_err();
        assert!(e.starts_with("invalid --reserve-memory \"512Q\""), "{e}");
        let e = args("-1", "1m").reservations().unwrap_err();
        assert!(
            e.contains("--reserve-cpu \"-1\": a reservation cannot be negative"),
            "{e}"
        );
        let e = args("1", "-1m").reservations().unwrap_err();
        assert!(e.contains("--reserve-memory"), "{e}");
        let e = args("lots", "1m").reservations().unwrap_err();
        assert!(e.contains("invalid --reserve-cpu \"lots\""), "{e}");
    }
}
