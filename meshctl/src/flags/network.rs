//! `--network` / `--network-add`: `NAME`, or Docker's long form
//! `name=NAME[,alias=ALIAS]...`.

use mesh_api::spec::NetworkAttachment;

/// Every `--network` the user gave, in order (the first is the tasks' first network).
pub fn networks(what: &str, raw: &[String]) -> Result<Vec<NetworkAttachment>, String> {
    raw.iter()
        .map(|s| network(s).map_err(|e| format!("{what} {s:?}: {e}")))
        .collect()
}

fn network(s: &str) -> Result<NetworkAttachment, String> {
    if !s.contains('=') {
        if s.is_empty() {
            return Err("name the network, e.g. --network backend".into());
        }
        return Ok(NetworkAttachment::new(s));
    }
    let mut a = NetworkAttachment::default();
    for field in s.split(',') {
        let (k, v) = field
            .split_once('=')
            .ok_or_else(|| format!("{field:?} is not key=value: use name=NET,alias=ALIAS"))?;
        match k.trim().to_ascii_lowercase().as_str() {
            "name" | "target" => a.target = v.to_owned(),
            "alias" if v.is_empty() => return Err("alias= is empty: name the alias".into()),
            "alias" => a.aliases.push(v.to_owned()),
            "driver-opt" | "ip" | "ip6" | "mac-address" | "link-local-ip" | "gw-priority" => {
                return Err(format!(
                    "{k} is not supported: mesh assigns addresses from the network's subnet \
                     and its networks have no driver options"
                ));
            }
            // Docker's words.
            other => return Err(format!("invalid field key {other}")),
        }
    }
    if a.target.is_empty() {
        // Docker's words.
        return Err("network name/id is not specified: add name=NETWORK".into());
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> Result<NetworkAttachment, String> {
        networks("--network", &[s.to_owned()]).map(|mut v| v.remove(0))
    }

    #[test]
    fn a_network_is_named_alone_or_with_aliases_as_docker_names_it() {
        assert_eq!(one("frontend").unwrap(), NetworkAttachment::new("frontend"));
        assert_eq!(
            one("name=backend,alias=jobs,alias=queue").unwrap(),
            NetworkAttachment {
                target: "backend".into(),
                aliases: vec!["jobs".into(), "queue".into()],
                vip: None,
            }
        );
        assert_eq!(one("alias=a,name=n").unwrap().target, "n");
    }

    #[test]
    fn a_bad_network_flag_says_what_is_wrong() {
        for (s, want) in [
            ("alias=jobs", "network name/id is not specified"),
            ("name=b,colour=red", "invalid field key colour"),
            ("name=b,jobs", "is not key=value"),
            ("name=b,alias=", "alias= is empty"),
            ("name=b,ip=10.0.0.9", "ip is not supported"),
            ("", "name the network"),
        ] {
            let e = one(s).unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
            assert!(e.starts_with("--network"), "{s}: {e}");
        }
    }
}
