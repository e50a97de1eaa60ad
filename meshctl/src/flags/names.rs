//! What a task resolves and how its output is kept: `--host`, `--dns`, `--dns-search`,
//! `--dns-option`, `--log-driver`, `--log-opt` (and their `service update` forms).

use std::net::IpAddr;

use mesh_api::spec::{DnsConfig, ExtraHost, LogDriver, check_dns_option};

/// `--host host:ip` (or compose's `host=ip`), each.
pub fn hosts(what: &str, raw: &[String]) -> Result<Vec<ExtraHost>, String> {
    raw.iter()
        .map(|h| {
            h.trim()
                .parse::<ExtraHost>()
                .map_err(|e| format!("invalid argument {h:?} for {what:?} flag: {e}"))
        })
        .collect()
}

/// `--dns IP`, each.
pub fn nameservers(what: &str, raw: &[String]) -> Result<Vec<IpAddr>, String> {
    raw.iter()
        .map(|s| {
            s.trim().parse::<IpAddr>().map_err(|_| {
                format!("invalid argument {s:?} for {what:?} flag: {s} is not an ip address")
            })
        })
        .collect()
}

/// `--dns-search DOMAIN`, each.
pub fn search_domains(what: &str, raw: &[String]) -> Result<Vec<String>, String> {
    let list: Vec<String> = raw.iter().map(|d| d.trim().to_owned()).collect();
    DnsConfig {
        search: list.clone(),
        ..Default::default()
    }
    .validate()
    .map_err(|e| format!("{what}: {e}"))?;
    Ok(list)
}

/// `--dns-option OPTION`, each (resolv.conf's `ndots:2`, `timeout:1`, `rotate`, …).
pub fn dns_options(what: &str, raw: &[String]) -> Result<Vec<String>, String> {
    raw.iter()
        .map(|o| {
            check_dns_option(o.trim())
                .map(|()| o.trim().to_owned())
                .map_err(|e| format!("{what}: {e}"))
        })
        .collect()
}

/// The three DNS flags of `service create` as one setting.
pub fn dns(servers: &[String], search: &[String], options: &[String]) -> Result<DnsConfig, String> {
    let dns = DnsConfig {
        nameservers: nameservers("--dns", servers)?,
        search: search_domains("--dns-search", search)?,
        options: dns_options("--dns-option", options)?,
    };
    dns.validate()?;
    Ok(dns)
}

/// `--log-driver` and `--log-opt KEY=VALUE` (a comma also separates options:
/// `max-size=10m,max-file=3`). None when neither is given.
pub fn log(driver: Option<&str>, opts: &[String]) -> Result<Option<LogDriver>, String> {
    let mut pairs = Vec::new();
    for raw in opts {
        for o in raw.split(',').filter(|o| !o.trim().is_empty()) {
            let Some((k, v)) = o.split_once('=') else {
                return Err(format!(
                    "invalid --log-opt {o:?}: expected KEY=VALUE, e.g. max-size=10m"
                ));
            };
            pairs.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let what = if driver.is_some() && opts.is_empty() {
        "--log-driver"
    } else {
        "--log-opt"
    };
    LogDriver::parse(what, driver, &pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn dns_and_host_flags_read_like_dockers() {
        let h = hosts("--host", &v(&["db.local:10.0.0.5"])).unwrap();
        assert_eq!(h[0].to_string(), "db.local:10.0.0.5");
        let e = hosts("--host", &v(&["db.local"])).unwrap_err();
        assert!(
            e.contains("\"--host\" flag") && e.contains("bad format for add-host"),
            "{e}"
        );
        let d = dns(&v(&["192.0.2.53"]), &v(&["corp.example"]), &v(&["ndots:2"])).unwrap();
        assert_eq!(d.nameservers, ["192.0.2.53".parse::<IpAddr>().unwrap()]);
        assert!(dns(&v(&["nine"]), &[], &[]).unwrap_err().contains("--dns"));
        assert!(dns(&[], &v(&["a b"]), &[]).is_err());
        assert!(dns(&[], &[], &v(&["nd ots"])).is_err());
    }

    #[test]
    fn log_options_take_commas_and_refuse_other_drivers() {
        let l = log(None, &v(&["max-size=10m,max-file=3"]))
            .unwrap()
            .unwrap();
        assert_eq!((l.max_size, l.max_file), (Some(10 << 20), Some(3)));
        let l = log(Some("json-file"), &v(&["max-size=1k", "max-file=2"]))
            .unwrap()
            .unwrap();
        assert_eq!(l.name, "json-file");
        let e = log(Some("syslog"), &[]).unwrap_err();
        assert!(e.starts_with("--log-driver: log driver \"syslog\""), "{e}");
        assert!(log(None, &v(&["max-size"])).is_err());
        assert_eq!(log(None, &[]).unwrap(), None);
    }
}
