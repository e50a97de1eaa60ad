//! `meshctl events`: the cluster's events as they happen, in Docker's style.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use super::Format;
use mesh_api::Client;
use mesh_api::events::Event;

/// `--since`: a duration ago (`5m`, `1h30m`), an RFC 3339 time, or Unix seconds.
pub fn parse_since(s: &str, now: SystemTime) -> Result<u64> {
    let at = if let Ok(d) = humantime::parse_duration(s) {
        now.checked_sub(d).unwrap_or(UNIX_EPOCH)
    } else if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        t
    } else if let Ok(secs) = s.parse::<u64>() {
        UNIX_EPOCH + Duration::from_secs(secs)
    } else {
        bail!(
            "--since {s:?} is not a time: use a duration ago (30s, 5m, 2h), an RFC 3339 time \
             (2026-12-01T08:00:00Z) or Unix seconds"
        );
    };
    Ok(at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64)
}

pub async fn run(
    client: &Client,
    fmt: Format,
    since: Option<String>,
    filter: Vec<String>,
) -> Result<()> {
    let since_ms = since
        .as_deref()
        .map(|s| parse_since(s, SystemTime::now()))
        .transpose()?;
    // Checked here too, so a typo fails before the connection is made.
    let mut check = mesh_api::events::Filter::default();
    for f in &filter {
        check.add(f).map_err(anyhow::Error::msg)?;
    }
    let path = format!("/v1/events?{}", mesh_api::events::query(since_ms, &filter));
    client
        .get_lines(&path, |line| {
            if let Ok(err) = serde_json::from_str::<mesh_api::v1::ApiError>(line) {
                bail!("{}", err.error);
            }
            match fmt {
                Format::Json => println!("{line}"),
                Format::Table => {
                    let e: Event = serde_json::from_str(line).with_context(|| {
                        format!("the agent sent an event meshctl cannot read: {line}")
                    })?;
                    println!("{e}");
                }
            }
            Ok(())
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_durations_times_and_seconds() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(parse_since("5m", now).unwrap(), (1_000_000 - 300) * 1000);
        assert_eq!(
            parse_since("2026-12-01T08:00:00Z", now).unwrap(),
            1_796_112_000_000
        );
        assert_eq!(parse_since("1796112000", now).unwrap(), 1_796_112_000_000);
        assert!(
            parse_since("yesterday", now)
                .unwrap_err()
                .to_string()
                .contains("duration ago")
        );
    }
}
