//! Single values: durations, counts, and anything with Docker's spelling in its `FromStr`.

use std::{str::FromStr, time::Duration};

/// `5s`, `1m30s`, `250ms`; a bare number is seconds, as Docker's flags take it.
pub fn duration_ms(what: &str, s: &str) -> Result<u64, String> {
    let d = match s.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s.trim()).map_err(|e| {
            format!("invalid {what} {s:?}: {e}; write a duration such as 5s, 1m30s or 250ms")
        })?,
    };
    if d > Duration::from_secs(365 * 24 * 3600) {
        return Err(format!("{what} {s:?} is longer than a year"));
    }
    Ok(d.as_millis() as u64)
}

/// A value whose type spells itself as Docker does (a constraint, an update order, …).
pub fn parsed<T: FromStr<Err = String>>(what: &str, s: &str) -> Result<T, String> {
    s.trim().parse().map_err(|e| format!("{what}: {e}"))
}

/// A count from 0 to `max`; `zero` says what 0 means, for the error's hint.
pub fn count(what: &str, n: i64, max: u32, zero: &str) -> Result<u32, String> {
    if n < 0 {
        return Err(format!(
            "invalid {what} {n}: use a number from 0 to {max} (0: {zero})"
        ));
    }
    u32::try_from(n)
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| format!("{what} {n} is more than mesh allows: use a number from 0 to {max}"))
}

/// Docker's memory sizes (`512m`, `1.5g`, `268435456`): binary units b, k, m, g, t, p, an
/// optional trailing `b`, any case.
pub fn bytes(what: &str, s: &str) -> Result<u64, String> {
    mesh_api::spec::bytes(what, s)
}

/// Docker's CPUs (`0.5`, `2`) as billionths of a CPU; at most nine decimals.
pub fn nano_cpus(what: &str, s: &str) -> Result<u64, String> {
    mesh_api::spec::nano_cpus(what, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_dockers() {
        assert_eq!(bytes("--x", "512m").unwrap(), 512 << 20);
        assert_eq!(bytes("--x", "512M").unwrap(), 512 << 20);
        assert_eq!(bytes("--x", "1.5g").unwrap(), 3 << 29);
        assert_eq!(bytes("--x", "256MB").unwrap(), 256 << 20);
        assert_eq!(bytes("--x", "4096").unwrap(), 4096);
        assert_eq!(bytes("--x", "10b").unwrap(), 10);
        assert_eq!(bytes("--x", "1k").unwrap(), 1024);
        for bad in ["512Q", "", "m", "-1m", "1.2.3g", "99999999999p"] {
            assert!(bytes("--limit-memory", bad).is_err(), "{bad:?}");
        }
        assert!(
            bytes("--limit-memory", "512Q")
                .unwrap_err()
                .contains("--limit-memory")
        );
    }

    #[test]
    fn cpus_read_like_dockers() {
        assert_eq!(nano_cpus("--x", "0.5").unwrap(), 500_000_000);
        assert_eq!(nano_cpus("--x", "2").unwrap(), 2_000_000_000);
        assert_eq!(nano_cpus("--x", ".25").unwrap(), 250_000_000);
        assert_eq!(nano_cpus("--x", "1.000000001").unwrap(), 1_000_000_001);
        for bad in ["", ".", "-1", "1.5x", "half", "1.0000000001"] {
            assert!(nano_cpus("--reserve-cpu", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_read_like_dockers_and_bad_ones_name_the_flag() {
        assert_eq!(duration_ms("--x", "5s").unwrap(), 5_000);
        assert_eq!(duration_ms("--x", "1m30s").unwrap(), 90_000);
        assert_eq!(duration_ms("--x", "250ms").unwrap(), 250);
        assert_eq!(duration_ms("--x", "7").unwrap(), 7_000);
        let e = duration_ms("--restart-delay", "soon").unwrap_err();
        assert!(
            e.contains("--restart-delay") && e.contains("duration"),
            "{e}"
        );
        assert!(duration_ms("--x", "-1s").is_err());
        assert!(
            duration_ms("--x", "400d")
                .unwrap_err()
                .contains("longer than a year")
        );
    }

    #[test]
    fn counts_are_bounded_and_say_what_zero_means() {
        assert_eq!(count("--replicas", 3, 10, "none").unwrap(), 3);
        let e = count("--replicas", -1, 10, "none").unwrap_err();
        assert!(e.contains("from 0 to 10 (0: none)"), "{e}");
        assert!(
            count("--replicas", 11, 10, "none")
                .unwrap_err()
                .contains("more than mesh allows")
        );
    }
}
