//! Docker's spelling of sizes and CPUs (`512m`, `0.5`), read the same way by the CLI's flags,
//! the compose loader and the agent's own config. `what` names the flag or key in errors.

/// Docker's memory sizes (`512m`, `1.5g`, `268435456`): binary units b, k, m, g, t, p, an
/// optional trailing `b`, any case.
pub fn bytes(what: &str, s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let hint =
        || format!("invalid {what} {s:?}: write a size such as 512m, 1.5g or a number of bytes");
    let digits = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: f64 = number.parse().map_err(|_| hint())?;
    // Docker's units (go-units' RAMInBytes): a letter, then an optional `i` and `b`, so what
    // mesh prints (`10MiB`) reads back.
    let u = unit.trim();
    let u = u.strip_suffix('b').unwrap_or(u);
    let u = u.strip_suffix('i').unwrap_or(u);
    let shift = match u {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ if unit.trim() == "b" => 0,
        _ => return Err(hint()),
    };
    let value = number * (1u64 << shift) as f64;
    if !value.is_finite() || value >= u64::MAX as f64 {
        return Err(format!("{what} {s:?} is larger than mesh can count"));
    }
    Ok(value as u64)
}

/// Docker's CPUs (`0.5`, `2`) as billionths of a CPU; at most nine decimals.
pub fn nano_cpus(what: &str, s: &str) -> Result<u64, String> {
    let hint = || format!("invalid {what} {s:?}: write a number of CPUs such as 0.5 or 2");
    let t = s.trim();
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits = |p: &str| p.chars().all(|c| c.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !digits(whole) || !digits(frac) {
        return Err(hint());
    }
    if frac.len() > 9 {
        return Err(format!(
            "{what} {s:?} is more precise than a billionth of a CPU"
        ));
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| hint())?
    };
    let frac: u64 = format!("{frac:0<9}").parse().map_err(|_| hint())?;
    whole
        .checked_mul(1_000_000_000)
        .and_then(|w| w.checked_add(frac))
        .ok_or_else(|| format!("{what} {s:?} is larger than mesh can count"))
}
