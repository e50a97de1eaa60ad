//! Image references as Docker reads them (distribution's reference grammar):
//! `[domain[:port]/]path[:tag][@algorithm:hex]`, checked where a spec is made, so a typo is
//! refused by the command that made it rather than failing on every node later.

/// Docker's limit on a repository name (domain and path).
const MAX_NAME: usize = 255;
const MAX_TAG: usize = 128;

/// Checks `reference` as `docker service create` does; errors in Docker's words.
pub fn check_reference(reference: &str) -> Result<(), String> {
    let invalid = || "invalid reference format".to_owned();
    if reference.is_empty() {
        return Err(invalid());
    }
    let (rest, digest) = match reference.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (reference, None),
    };
    if let Some(d) = digest {
        check_digest(d).map_err(|_| invalid())?;
    }
    // A tag follows the last ':' after the last '/' (a ':' before it is a registry's port).
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        check_tag(t).map_err(|_| invalid())?;
    }
    if name.is_empty() {
        return Err(invalid());
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "invalid reference format: repository name must not be more than {MAX_NAME} characters"
        ));
    }
    let (domain, path) = split_domain(name);
    if let Some(d) = domain {
        check_domain(d).map_err(|_| invalid())?;
    }
    if path.chars().any(|c| c.is_ascii_uppercase()) {
        return Err("invalid reference format: repository name must be lowercase".into());
    }
    if path.split('/').all(|c| check_path_component(c).is_ok()) {
        Ok(())
    } else {
        Err(invalid())
    }
}

/// The registry an image is pulled from, as credentials are filed under it: the reference's
/// domain, or `docker.io` for Docker Hub's names.
pub fn registry_of(reference: &str) -> &str {
    let name = reference.split_once('@').map_or(reference, |(n, _)| n);
    split_domain(name).0.unwrap_or("docker.io")
}

/// Whether an auth file's or AuthConfig's server address names `registry`: with or without a
/// scheme and path, Docker Hub under any of its names (`https://index.docker.io/v1/`).
pub fn same_registry(server_address: &str, registry: &str) -> bool {
    fn canonical(server: &str) -> String {
        let host = server
            .trim()
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let host = host
            .split('/')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        match host.as_str() {
            "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
                "docker.io".into()
            }
            _ => host,
        }
    }
    canonical(server_address) == canonical(registry)
}

/// Docker's rule: the first component is a registry if it has a '.' or a ':', or is
/// `localhost`; otherwise the name is on Docker Hub.
fn split_domain(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (Some(first), rest)
        }
        _ => (None, name),
    }
}

fn check_domain(domain: &str) -> Result<(), ()> {
    let (host, port) = match domain.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || domain.starts_with('[') => (h, Some(p)),
        _ => (domain, None),
    };
    if let Some(p) = port
        && (p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(());
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().map(|_| ()).map_err(|_| ());
    }
    if host.is_empty() {
        return Err(());
    }
    for c in host.split('.') {
        let ok = !c.is_empty()
            && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !c.starts_with('-')
            && !c.ends_with('-');
        if !ok {
            return Err(());
        }
    }
    Ok(())
}

/// `[a-z0-9]+` separated by `.`, `_`, `__` or any number of `-`.
fn check_path_component(c: &str) -> Result<(), ()> {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = c.as_bytes();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(());
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return Err(());
        }
    }
    Ok(())
}

/// `[\w][\w.-]{0,127}`.
fn check_tag(t: &str) -> Result<(), ()> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = t.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_TAG || !word(bytes[0]) {
        return Err(());
    }
    if bytes[1..]
        .iter()
        .all(|&b| word(b) || b == b'.' || b == b'-')
    {
        Ok(())
    } else {
        Err(())
    }
}

/// `algorithm:hex`, the hex at least 32 digits (sha256's is 64).
fn check_digest(d: &str) -> Result<(), ()> {
    let (alg, hex) = d.split_once(':').ok_or(())?;
    let alg_ok = alg.split(['+', '.', '-', '_']).all(|c| {
        let b = c.as_bytes();
        !b.is_empty() && b[0].is_ascii_alphabetic() && b.iter().all(u8::is_ascii_alphanumeric)
    });
    if alg_ok && hex.len() >= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_is_the_domain_or_docker_hub() {
        assert_eq!(registry_of("nginx:1.25"), "docker.io");
        assert_eq!(registry_of("library/nginx"), "docker.io");
        assert_eq!(registry_of("10.0.0.1:5000/team/api:2"), "10.0.0.1:5000");
        assert_eq!(registry_of("localhost/web@sha256:abc"), "localhost");
        assert_eq!(registry_of("quay.io/podman/hello"), "quay.io");
    }

    #[test]
    fn what_docker_accepts() {
        for ok in [
            "nginx",
            "nginx:latest",
            "nginx:1.11",
            "library/nginx",
            "docker.io/library/nginx:1.25-alpine",
            "localhost/demo-web:1",
            "localhost:5000/team/app:v2.1_rc-3",
            "registry.example.com:443/a/b/c",
            "[::1]:5000/app",
            "my-registry.io/my__app.x/y--z",
            "redis@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "redis:7@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(check_reference(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn what_docker_refuses_in_its_words() {
        for bad in [
            "",
            "nginx:",
            ":latest",
            "nginx:la test",
            "nginx:-x",
            "my_/app",
            "-app",
            "app-",
            "a/b//c",
            "a..b",
            "a___b",
            "host:port/app",
            "nginx@sha256:abc",
            "nginx@sha256",
            "nginx latest",
            "web:1:2",
        ] {
            assert_eq!(
                check_reference(bad),
                Err("invalid reference format".to_owned()),
                "{bad:?}"
            );
        }
        assert_eq!(
            check_reference("Nginx:1"),
            Err("invalid reference format: repository name must be lowercase".to_owned())
        );
        assert_eq!(
            check_reference("registry.example.com/Team/app"),
            Err("invalid reference format: repository name must be lowercase".to_owned())
        );
        let long = "a".repeat(256);
        assert!(check_reference(&long).unwrap_err().contains("255"));
    }
}
