//! What names a task resolves: Docker's `--host` (extra /etc/hosts lines) and `--dns`,
//! `--dns-search`, `--dns-option` (its resolv.conf and the servers its resolver forwards to).
//!
//! Every value ends up as a line of a file inside the task, so each is checked to be one
//! word of the kind it claims to be: a spec written by any node must not be able to add a
//! line of its own to a task's /etc/hosts or resolv.conf.

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Serialize};

/// One `--host host:ip` entry: `ip host` in the task's /etc/hosts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ExtraHost {
    pub host: String,
    pub ip: IpAddr,
}

impl fmt::Display for ExtraHost {
    /// Docker's `host:ip`, as the flag takes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.ip)
    }
}

impl FromStr for ExtraHost {
    type Err = String;

    /// `host:ip` (split at the first `:`, so an IPv6 address may follow) or `host=ip`, as
    /// Docker's `--host` / compose `extra_hosts` take it.
    fn from_str(s: &str) -> Result<Self, String> {
        let at = s.find([':', '=']);
        let Some((host, ip)) = at.map(|i| (&s[..i], &s[i + 1..])) else {
            return Err(format!(
                "bad format for add-host: {s:?} (write host:ip, e.g. db.local:10.0.0.5)"
            ));
        };
        if host.is_empty() {
            return Err(format!(
                "bad format for add-host: {s:?} (write host:ip, e.g. db.local:10.0.0.5)"
            ));
        }
        if ip == "host-gateway" {
            return Err(format!(
                "{s:?}: mesh has no host-gateway address; name the IP address itself"
            ));
        }
        let ip = ip
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .map_err(|_| format!("invalid IP address in add-host: {ip:?}"))?;
        let h = ExtraHost {
            host: host.to_owned(),
            ip,
        };
        h.validate()?;
        Ok(h)
    }
}

impl ExtraHost {
    pub fn validate(&self) -> Result<(), String> {
        check_name("host name", &self.host).map_err(|e| format!("add-host {self}: {e}"))
    }
}

/// Docker's `DNSConfig`: the servers the task's resolver forwards to, its search domains and
/// resolver options. Empty: the node's upstreams and mesh's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl DnsConfig {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    pub fn validate(&self) -> Result<(), String> {
        for d in &self.search {
            check_name("DNS search domain", d.trim_end_matches('.'))?;
        }
        for o in &self.options {
            check_option(o)?;
        }
        for ip in &self.nameservers {
            if ip.is_unspecified() || ip.is_multicast() {
                return Err(format!(
                    "DNS server {ip} is not an address a query can be sent to"
                ));
            }
        }
        Ok(())
    }
}

/// A host name or domain: DNS labels of letters, digits, `-` and `_`, joined by dots.
fn check_name(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {what} {s:?}: use letters, digits, '-' and '_' in dot-separated labels"
        ))
    }
}

/// A resolver option as resolv.conf(5) spells one: `ndots:2`, `timeout:1`, `rotate`, …
pub fn check_option(o: &str) -> Result<(), String> {
    let (name, value) = o.split_once(':').unwrap_or((o, ""));
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && value.chars().all(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid DNS option {o:?}: write NAME or NAME:VALUE, e.g. ndots:2 or timeout:1"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_hosts_read_like_dockers() {
        let h: ExtraHost = "db.local:10.0.0.5".parse().unwrap();
        assert_eq!(h.host, "db.local");
        assert_eq!(h.ip, "10.0.0.5".parse::<IpAddr>().unwrap());
        assert_eq!(h.to_string(), "db.local:10.0.0.5");
        let h: ExtraHost = "v6:2001:db8::1".parse().unwrap();
        assert_eq!(h.ip, "2001:db8::1".parse::<IpAddr>().unwrap());
        let h: ExtraHost = "cache=192.0.2.7".parse().unwrap();
        assert_eq!(h.host, "cache");
        let e = "db.local".parse::<ExtraHost>().unwrap_err();
        assert!(e.starts_with("bad format for add-host"), "{e}");
        let e = "db:not-an-ip".parse::<ExtraHost>().unwrap_err();
        assert!(e.contains("invalid IP address"), "{e}");
        // A name that would add a line of its own to /etc/hosts.
        let bad = ExtraHost {
            host: "x\n1.2.3.4 bank".into(),
            ip: "10.0.0.1".parse().unwrap(),
        };
        assert!(bad.validate().is_err());
        assert!("host-gateway:x".parse::<ExtraHost>().is_err());
        assert!("h:host-gateway".parse::<ExtraHost>().is_err());
    }

    #[test]
    fn dns_settings_are_single_words() {
        let ok = DnsConfig {
            nameservers: vec!["192.0.2.53".parse().unwrap()],
            search: vec!["example.com".into(), "corp.example.".into()],
            options: vec!["ndots:2".into(), "rotate".into()],
        };
        assert!(ok.validate().is_ok());
        for bad in [
            DnsConfig {
                search: vec!["a b".into()],
                ..Default::default()
            },
            DnsConfig {
                options: vec!["ndots:2\nnameserver 6.6.6.6".into()],
                ..Default::default()
            },
            DnsConfig {
                nameservers: vec!["0.0.0.0".parse().unwrap()],
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
