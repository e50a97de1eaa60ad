//! Mounts in a task, as Docker's `--mount` spells them: a named volume of the task's node
//! (Swarm's `local` driver), a host directory (bind) or a tmpfs.

use std::{collections::BTreeMap, fmt, path::Path};

use serde::{Deserialize, Serialize};

/// Docker's `--mount type=`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountType {
    /// A named volume of the task's node, created on first use and kept after the task.
    #[default]
    Volume,
    /// A host path of the task's node.
    Bind,
    /// A fresh tmpfs, gone with the task.
    Tmpfs,
}

impl fmt::Display for MountType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Volume => "volume",
            Self::Bind => "bind",
            Self::Tmpfs => "tmpfs",
        })
    }
}

/// One mount of a task (Docker's `mount.Mount`, the options mesh honours).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Mount {
    #[serde(rename = "type")]
    pub kind: MountType,
    /// The volume's name, or the host path of a bind mount; empty for tmpfs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// The absolute path inside the task.
    pub target: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// Labels a volume gets when a task creates it (`volume-label`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volume_labels: BTreeMap<String, String>,
    /// Do not copy the image's files at the target into a new volume (`volume-nocopy`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub volume_nocopy: bool,
    /// `tmpfs-size` in bytes (unset: the kernel's default, half the RAM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmpfs_size: Option<u64>,
    /// `tmpfs-mode`, permission bits (unset: 1777).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmpfs_mode: Option<u32>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The characters Docker allows in a local volume's name (its `RestrictedNamePattern`).
pub const VOLUME_NAME_CHARS: &str = "[a-zA-Z0-9][a-zA-Z0-9_.-]";

/// Docker's rule for local volume names: `^[a-zA-Z0-9][a-zA-Z0-9_.-]+$`. With it no name is
/// `.`, `..` or holds a `/`, so a name never leaves the volumes directory.
pub fn validate_volume_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() >= 2
        && name.len() <= 255
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} includes invalid characters for a local volume name, only \"{VOLUME_NAME_CHARS}\" are allowed. If you intended to pass a host directory, use absolute path"
        ))
    }
}

impl Mount {
    /// Docker's `--mount` value: comma-separated `key=value` fields (CSV, so a field may be
    /// quoted), `type` defaulting to `volume`. The words of the errors are Docker's.
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut m = Mount::default();
        let (mut volume_opts, mut tmpfs_opts) = (false, false);
        for field in csv_fields(value)? {
            let (key, val) = match field.split_once('=') {
                Some((k, v)) => (k.to_ascii_lowercase(), Some(v)),
                None => (field.to_ascii_lowercase(), None),
            };
            let Some(val) = val else {
                match key.as_str() {
                    "readonly" | "ro" => m.read_only = true,
                    "volume-nocopy" => {
                        m.volume_nocopy = true;
                        volume_opts = true;
                    }
                    _ => return Err(format!("invalid field '{field}' must be a key=value pair")),
                }
                continue;
            };
            let invalid = || format!("invalid value for {key}: {val}");
            match key.as_str() {
                "type" => {
                    m.kind = match val.to_ascii_lowercase().as_str() {
                        "volume" => MountType::Volume,
                        "bind" => MountType::Bind,
                        "tmpfs" => MountType::Tmpfs,
                        other => {
                            return Err(format!(
                                "invalid mount type {other:?}: mesh mounts volume, bind or tmpfs"
                            ));
                        }
                    }
                }
                "source" | "src" => m.source = val.to_owned(),
                "target" | "dst" | "destination" => m.target = val.to_owned(),
                "readonly" | "ro" => m.read_only = parse_bool(val).ok_or_else(invalid)?,
                "volume-nocopy" => {
                    m.volume_nocopy = parse_bool(val)
                        .ok_or_else(|| format!("invalid value for volume-nocopy: {val}"))?;
                    volume_opts = true;
                }
                "volume-label" => {
                    let (k, v) = val.split_once('=').unwrap_or((val, ""));
                    m.volume_labels.insert(k.to_owned(), v.to_owned());
                    volume_opts = true;
                }
                "volume-driver" => {
                    if val != "local" {
                        return Err(format!(
                            "volume driver {val:?} is not available: mesh has the local driver only"
                        ));
                    }
                    volume_opts = true;
                }
                "tmpfs-size" => {
                    m.tmpfs_size = Some(super::bytes("tmpfs-size", val).map_err(|_| invalid())?);
                    tmpfs_opts = true;
                }
                "tmpfs-mode" => {
                    let mode = u32::from_str_radix(val, 8).map_err(|_| invalid())?;
                    if mode > 0o7777 {
                        return Err(invalid());
                    }
                    m.tmpfs_mode = Some(mode);
                    tmpfs_opts = true;
                }
                "bind-propagation" | "bind-nonrecursive" | "bind-recursive" => {
                    return Err(format!(
                        "{key} is not supported by mesh: bind mounts are private and not recursive"
                    ));
                }
                "consistency" => {}
                _ => return Err(format!("unexpected key '{key}' in '{field}'")),
            }
        }
        if m.target.is_empty() {
            return Err("target is required".into());
        }
        for (set, prefix, kind) in [
            (volume_opts, "volume", MountType::Volume),
            (tmpfs_opts, "tmpfs", MountType::Tmpfs),
        ] {
            if set && m.kind != kind {
                return Err(format!(
                    "cannot mix '{prefix}-*' options with mount type '{}'",
                    m.kind
                ));
            }
        }
        m.validate()?;
        Ok(m)
    }

    /// What holds whatever the mount came from: Docker's daemon-side checks, in its words.
    pub fn validate(&self) -> Result<(), String> {
        let config = |e: String| format!("invalid mount config for type \"{}\": {e}", self.kind);
        if self.target.is_empty() {
            return Err(config("field Target must not be empty".into()));
        }
        if !self.target.starts_with('/') {
            return Err(config(format!(
                "invalid mount target, must be an absolute path: {}",
                self.target
            )));
        }
        if self.target.split('/').any(|c| c == "..") {
            return Err(config(format!(
                "invalid mount target {}: it must not contain '..'",
                self.target
            )));
        }
        if clean(&self.target) == "/" {
            return Err("invalid specification: destination can't be '/'".into());
        }
        match self.kind {
            MountType::Volume => {
                if self.source.is_empty() {
                    return Err(config(
                        "field Source must not be empty: name the volume (source=NAME); mesh has no anonymous volumes"
                            .into(),
                    ));
                }
                validate_volume_name(&self.source).map_err(config)?;
            }
            MountType::Bind => {
                if self.source.is_empty() {
                    return Err(config("field Source must not be empty".into()));
                }
                if !Path::new(&self.source).is_absolute() {
                    return Err(config(format!(
                        "invalid mount path: '{}' mount path must be absolute",
                        self.source
                    )));
                }
                if self.source.split('/').any(|c| c == "..") {
                    return Err(config(format!(
                        "invalid mount path: '{}' must not contain '..'",
                        self.source
                    )));
                }
            }
            MountType::Tmpfs => {
                if !self.source.is_empty() {
                    return Err(config("field Source must not be specified".into()));
                }
            }
        }
        Ok(())
    }

    /// The target without a trailing `/` or doubled slashes: what two mounts compare by.
    pub fn clean_target(&self) -> String {
        clean(&self.target)
    }
}

/// Mounts of one task: each valid, no two on one target (Docker: "Duplicate mount point").
pub fn validate_mounts(mounts: &[Mount]) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for m in mounts {
        m.validate()?;
        if !seen.insert(m.clean_target()) {
            return Err(format!("Duplicate mount point: {}", m.clean_target()));
        }
    }
    Ok(())
}

fn clean(path: &str) -> String {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

fn parse_bool(s: &str) -> Option<bool> {
    // Go's strconv.ParseBool.
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// One CSV record, as Go's encoding/csv reads Docker's flag: fields split on commas, a field
/// may be double-quoted (`""` is a quote inside it).
fn csv_fields(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => return Err(format!("invalid --mount {s:?}: a quote is not closed")),
                }
            }
            match chars.next() {
                None => {
                    out.push(field);
                    return Ok(out);
                }
                Some(',') => out.push(field),
                Some(_) => return Err(format!("invalid --mount {s:?}: text after a quoted field")),
            }
        } else {
            loop {
                match chars.next() {
                    Some(',') => break,
                    Some(c) => field.push(c),
                    None => {
                        out.push(field);
                        return Ok(out);
                    }
                }
            }
            out.push(field);
        }
    }
}

/// A CSV field, quoted when it holds a comma or a quote.
fn quoted(field: &str) -> String {
    if field.contains([',', '"']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}

impl fmt::Display for Mount {
    /// Back to `--mount` syntax (what `service inspect` and errors show).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "type={}", self.kind)?;
        if !self.source.is_empty() {
            write!(f, ",{}", quoted(&format!("source={}", self.source)))?;
        }
        write!(f, ",{}", quoted(&format!("target={}", self.target)))?;
        if self.read_only {
            f.write_str(",readonly")?;
        }
        for (k, v) in &self.volume_labels {
            write!(f, ",volume-label={k}={v}")?;
        }
        if self.volume_nocopy {
            f.write_str(",volume-nocopy")?;
        }
        if let Some(s) = self.tmpfs_size {
            write!(f, ",tmpfs-size={s}")?;
        }
        if let Some(m) = self.tmpfs_mode {
            write!(f, ",tmpfs-mode={m:o}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_parse_as_docker_parses_them() {
        let m = Mount::parse("type=volume,source=pgdata,target=/var/lib/postgresql/data").unwrap();
        assert_eq!(
            (m.kind, m.source.as_str(), m.target.as_str(), m.read_only),
            (
                MountType::Volume,
                "pgdata",
                "/var/lib/postgresql/data",
                false
            )
        );
        // type defaults to volume; src/dst/ro spellings; readonly without a value.
        let m = Mount::parse("src=data,dst=/data,ro").unwrap();
        assert_eq!((m.kind, m.read_only), (MountType::Volume, true));
        let m = Mount::parse("type=bind,source=/srv/site,target=/usr/share/nginx/html,readonly")
            .unwrap();
        assert_eq!((m.kind, m.read_only), (MountType::Bind, true));
        let m = Mount::parse("type=bind,src=/srv,destination=/srv,readonly=false").unwrap();
        assert!(!m.read_only);
        let m = Mount::parse("type=tmpfs,target=/tmp,tmpfs-size=64m,tmpfs-mode=1770").unwrap();
        assert_eq!(m.tmpfs_size, Some(64 << 20));
        assert_eq!(m.tmpfs_mode, Some(0o1770));
        let m = Mount::parse("source=v1,target=/v,volume-label=a=b,volume-label=c,volume-nocopy")
            .unwrap();
        assert_eq!(m.volume_labels.get("a").map(String::as_str), Some("b"));
        assert_eq!(m.volume_labels.get("c").map(String::as_str), Some(""));
        assert!(m.volume_nocopy);
        // A quoted CSV field may hold a comma.
        let m = Mount::parse("type=bind,\"source=/srv/a,b\",target=/x").unwrap();
        assert_eq!(m.source, "/srv/a,b");
        // What it shows is what parses back.
        assert_eq!(Mount::parse(&m.to_string()).unwrap(), m);
    }

    #[test]
    fn bad_mounts_are_refused_in_dockers_words() {
        let e = |s: &str| Mount::parse(s).unwrap_err();
        assert_eq!(e("type=volume,source=a1"), "target is required");
        assert_eq!(
            e("source=a1,target=/x,foo"),
            "invalid field 'foo' must be a key=value pair"
        );
        assert_eq!(
            e("source=a1,target=/x,color=red"),
            "unexpected key 'color' in 'color=red'"
        );
        assert_eq!(
            e("source=a1,target=/x,readonly=maybe"),
            "invalid value for readonly: maybe"
        );
        assert_eq!(
            e("type=bind,source=/a,target=/x,tmpfs-size=1m"),
            "cannot mix 'tmpfs-*' options with mount type 'bind'"
        );
        assert_eq!(
            e("type=tmpfs,target=/x,volume-nocopy"),
            "cannot mix 'volume-*' options with mount type 'tmpfs'"
        );
        assert!(e("source=a1,target=relative").contains("must be an absolute path: relative"));
        assert!(e("source=a1,target=/").contains("destination can't be '/'"));
        assert!(e("source=a1,target=/a/../b").contains("must not contain '..'"));
        assert!(e("type=bind,source=srv,target=/x").contains("mount path must be absolute"));
        assert!(e("type=bind,source=/srv/../etc,target=/x").contains("must not contain '..'"));
        assert!(e("type=bind,target=/x").contains("field Source must not be empty"));
        assert!(e("type=tmpfs,source=x,target=/x").contains("field Source must not be specified"));
        assert!(e("target=/x").contains("no anonymous volumes"));
        assert!(e("type=nfs,source=a,target=/x").contains("invalid mount type"));
        assert!(e("type=tmpfs,target=/x,tmpfs-mode=999").contains("invalid value for tmpfs-mode"));
    }

    #[test]
    fn volume_names_cannot_leave_the_volumes_directory() {
        for ok in ["pgdata", "db_1", "a.b-c", "9x"] {
            validate_volume_name(ok).unwrap();
        }
        for bad in [
            "..", ".", "a/b", "../etc", "x", "-a", "_a", ".hidden", "a b", "",
        ] {
            let e = validate_volume_name(bad).unwrap_err();
            assert!(
                e.contains("includes invalid characters for a local volume name"),
                "{e}"
            );
        }
    }

    #[test]
    fn two_mounts_on_one_target_are_refused() {
        let a = Mount::parse("source=a1,target=/data").unwrap();
        let b = Mount::parse("type=tmpfs,target=/data/").unwrap();
        assert_eq!(
            validate_mounts(&[a.clone(), b]).unwrap_err(),
            "Duplicate mount point: /data"
        );
        let c = Mount::parse("type=tmpfs,target=/data/sub").unwrap();
        validate_mounts(&[a, c]).unwrap();
    }
}
