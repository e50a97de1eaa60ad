//! `--with-registry-auth`: the caller's credentials for an image's registry, read where
//! `podman login` and `docker login` keep them, for that one registry only.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use mesh_api::{
    spec::{registry_of, same_registry},
    v1::RegistryAuth,
};

/// Where credentials are looked for, in podman's order, then Docker's.
fn auth_files() -> Vec<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let mut files = Vec::new();
    if let Some(f) = env("REGISTRY_AUTH_FILE") {
        files.push(PathBuf::from(f));
    }
    match env("XDG_RUNTIME_DIR") {
        Some(d) => files.push(PathBuf::from(d).join("containers/auth.json")),
        None => files.push(PathBuf::from(format!(
            "/run/containers/{}/auth.json",
            nix::unistd::getuid()
        ))),
    }
    let home = env("HOME").map(PathBuf::from);
    if let Some(h) = &home {
        files.push(h.join(".config/containers/auth.json"));
    }
    match (env("DOCKER_CONFIG"), &home) {
        (Some(d), _) => files.push(PathBuf::from(d).join("config.json")),
        (None, Some(h)) => files.push(h.join(".docker/config.json")),
        (None, None) => {}
    }
    files
}

/// The credentials stored for `image`'s registry, if any (Docker's CLI sends none then, and
/// so does this). A credential helper cannot be read here: that is an error saying so.
pub fn for_image(image: &str) -> Result<Option<RegistryAuth>> {
    let registry = registry_of(image);
    for file in auth_files() {
        let text = match std::fs::read(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
        };
        if let Some(auth) = in_file(&text, registry)
            .with_context(|| format!("reading credentials from {}", file.display()))?
        {
            return Ok(Some(auth));
        }
    }
    Ok(None)
}

/// `registry`'s entry of one auth file (podman's auth.json and Docker's config.json share the
/// `auths` layout).
fn in_file(text: &[u8], registry: &str) -> Result<Option<RegistryAuth>> {
    let v: serde_json::Value = serde_json::from_slice(text).context("not JSON")?;
    let helper = v["credHelpers"]
        .as_object()
        .is_some_and(|h| h.keys().any(|k| same_registry(k, registry)));
    let Some((server, entry)) = v["auths"]
        .as_object()
        .and_then(|a| a.iter().find(|(k, _)| same_registry(k, registry)))
    else {
        if helper || v["credsStore"].is_string() {
            bail!(
                "the credentials for {registry} are kept by a credential helper, which meshctl \
                 cannot read: log in with `podman login {registry}` (or docker login without a \
                 credsStore)"
            );
        }
        return Ok(None);
    };
    let (username, password) = match entry["auth"].as_str().filter(|a| !a.is_empty()) {
        Some(token) => {
            let pair = BASE64
                .decode(token)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .context("its auth entry is not base64 of user:password")?;
            let (u, p) = pair
                .split_once(':')
                .context("its auth entry is not base64 of user:password")?;
            (u.to_owned(), p.to_owned())
        }
        None => (
            entry["username"].as_str().unwrap_or_default().to_owned(),
            entry["password"].as_str().unwrap_or_default().to_owned(),
        ),
    };
    if username.is_empty() {
        return Ok(None);
    }
    Ok(Some(RegistryAuth {
        username,
        password,
        server_address: server.clone(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_images_registry_entry_is_read_from_podmans_or_dockers_file() {
        let file = format!(
            r#"{{"auths": {{"10.0.0.1:5000": {{"auth": "{}"}},
                "https://index.docker.io/v1/": {{"auth": "{}"}}}}}}"#,
            BASE64.encode("alice:s3cret:x"),
            BASE64.encode("bob:hub")
        );
        let a = in_file(file.as_bytes(), "10.0.0.1:5000").unwrap().unwrap();
        assert_eq!(
            (a.username.as_str(), a.password.as_str()),
            ("alice", "s3cret:x")
        );
        assert_eq!(a.server_address, "10.0.0.1:5000");
        let hub = in_file(file.as_bytes(), "docker.io").unwrap().unwrap();
        assert_eq!(hub.username, "bob");
        assert!(in_file(file.as_bytes(), "quay.io").unwrap().is_none());
    }

    #[test]
    fn a_credential_helper_is_an_error_that_says_so() {
        let e = in_file(br#"{"auths": {}, "credsStore": "desktop"}"#, "docker.io")
            .unwrap_err()
            .to_string();
        assert!(e.contains("credential helper"), "{e}");
        assert!(in_file(b"not json", "docker.io").is_err());
    }
}
