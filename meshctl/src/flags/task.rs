//! What the tasks run with: environment, ports, secrets and configs, labels.

use std::collections::BTreeMap;

use mesh_api::{
    spec::{FileRef, PortSpec, Protocol, parse_label},
    v1::PublishedPort,
};

/// `KEY=VALUE` pairs.
pub fn env(what: &str, raw: &[String]) -> Result<Vec<(String, String)>, String> {
    raw.iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) if !k.is_empty() && !k.contains(char::is_whitespace) => {
                Ok((k.to_owned(), v.to_owned()))
            }
            _ => Err(format!("invalid {what} {e:?}: expected KEY=VALUE")),
        })
        .collect()
}

/// `--env-file`: `KEY=VALUE` lines; `KEY` alone takes the variable from this environment;
/// blank lines and `#` comments are skipped, as Docker reads it.
pub fn env_file(
    path: &str,
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = match line.split_once('=') {
            Some((k, v)) => (k, Some(v.to_owned())),
            None => (line.trim_end(), None),
        };
        if k.is_empty() || k.contains(char::is_whitespace) {
            return Err(format!(
                "{path}:{}: {line:?} is not KEY=VALUE (a variable name has no spaces)",
                i + 1
            ));
        }
        // Docker skips a bare name that is not set here.
        if let Some(v) = v.or_else(|| lookup(k)) {
            out.push((k.to_owned(), v));
        }
    }
    Ok(out)
}

/// Docker's short (`8080:80`, `5353:53/udp`) or long (`published=8080,target=80`) syntax.
pub fn ports(what: &str, raw: &[String]) -> Result<Vec<PortSpec>, String> {
    let mut out = Vec::new();
    for p in raw {
        out.extend(PortSpec::parse_many(p).map_err(|e| format!("{what}: {e}"))?);
    }
    Ok(out)
}

/// `--publish-rm`'s `PUBLISHED[/PROTOCOL]`; a whole `--publish` spec names its published
/// port too (`8080:80`, `published=8080,target=80,protocol=udp`).
pub fn published_port(what: &str, s: &str) -> Result<PublishedPort, String> {
    let bad = || {
        format!(
            "{what} {s:?}: name the published port, PUBLISHED[/PROTOCOL], e.g. 8080 or 5353/udp"
        )
    };
    let (port, protocol) = match s.split_once('/') {
        Some((p, proto)) if !p.contains([':', '=']) => {
            (p, proto.parse::<Protocol>().map_err(|_| bad())?)
        }
        _ if !s.contains([':', '=']) => (s, Protocol::Tcp),
        _ => {
            let spec: PortSpec = s.parse().map_err(|_| bad())?;
            return Ok(PublishedPort {
                port: spec.published.ok_or_else(bad)?,
                protocol: spec.protocol,
            });
        }
    };
    Ok(PublishedPort {
        port: port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(bad)?,
        protocol,
    })
}

/// `--secret`/`--config`: `NAME` or `source=NAME[,target=T][,uid=U][,gid=G][,mode=0400]`.
pub fn file_refs(what: &str, raw: &[String], config: bool) -> Result<Vec<FileRef>, String> {
    raw.iter()
        .map(|s| FileRef::parse(s, config).map_err(|e| format!("{what}: {e}")))
        .collect()
}

/// `key=value` labels (`key` alone: an empty value).
pub fn labels(what: &str, raw: &[String]) -> Result<BTreeMap<String, String>, String> {
    raw.iter()
        .map(|l| parse_label(l).map_err(|e| format!("{what}: {e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_ports_are_named_every_way_docker_names_them() {
        for (s, port, protocol) in [
            ("8080", 8080, Protocol::Tcp),
            ("8080/tcp", 8080, Protocol::Tcp),
            ("5353/udp", 5353, Protocol::Udp),
            ("8080:80", 8080, Protocol::Tcp),
            ("published=8080,target=80", 8080, Protocol::Tcp),
        ] {
            assert_eq!(
                published_port("--publish-rm", s).unwrap(),
                PublishedPort { port, protocol },
                "{s}"
            );
        }
        for s in ["http", "8080/sctp", "0", "80:"] {
            let e = published_port("--publish-rm", s).unwrap_err();
            assert!(e.contains("name the published port"), "{s}: {e}");
        }
    }

    #[test]
    fn env_files_read_like_dockers() {
        let text = "# a comment\nA=1\n\nB=two words\nHOME_DIR\nNOT_SET\n";
        let lookup = |k: &str| (k == "HOME_DIR").then(|| "/root".to_owned());
        assert_eq!(
            env_file("f.env", text, lookup).unwrap(),
            vec![
                ("A".to_owned(), "1".to_owned()),
                ("B".to_owned(), "two words".to_owned()),
                ("HOME_DIR".to_owned(), "/root".to_owned()),
            ]
        );
        let e = env_file("f.env", "A=1\nBAD KEY=2\n", |_| None).unwrap_err();
        assert!(e.starts_with("f.env:2:"), "{e}");
    }

    #[test]
    fn env_and_ports_say_what_is_wrong_with_the_flag() {
        assert_eq!(
            env("--env", &["A=b=c".into()]).unwrap(),
            vec![("A".into(), "b=c".into())]
        );
        assert!(
            env("--env", &["=x".into()])
                .unwrap_err()
                .contains("--env \"=x\"")
        );
        let e = ports("--publish", &["80:".into()]).unwrap_err();
        assert!(e.starts_with("--publish: "), "{e}");
    }
}
