//! Compose volumes: top-level `volumes:` (named, `external`, labels; the `local` driver
//! only), a service's `volumes:` in short (`name:/path[:ro]`, `/host:/path[:ro]`) and long
//! syntax, and `tmpfs:`. Named volumes are `<stack>_<name>` as with `docker stack deploy`
//! and carry the stack's label; a task creates its volume on its node at first use.

use std::collections::BTreeMap;

use mesh_api::spec::{Mount, MountType};
use serde_yaml::Value;

use super::{Stack, boolean, key_str, list_or_map, map, string, strings};

/// A volume of the file: its name in the cluster and the labels a task creating it gives it.
pub(super) struct StackVolume {
    name: String,
    labels: BTreeMap<String, String>,
}

impl Stack {
    /// Top-level `volumes:`.
    pub(super) fn volumes(&mut self, v: &Value) -> Result<(), String> {
        if v.is_null() {
            return Ok(());
        }
        for (n, spec) in map(v, "volumes")? {
            let n = key_str(n, "volumes")?;
            let at = format!("volumes.{n}");
            let mut vol = StackVolume {
                name: self.full(&n),
                labels: self.labels.clone(),
            };
            let mut external = false;
            if !spec.is_null() {
                for (k, v) in map(spec, &at)? {
                    let k = key_str(k, &at)?;
                    let here = format!("{at}.{k}");
                    match k.as_str() {
                        "driver" => {
                            let d = string(v, &here)?;
                            if d != mesh_api::v1::VOLUME_DRIVER {
                                return Err(format!(
                                    "{here}: volume driver {d:?} is not supported: mesh volumes \
                                     use the local driver (remove the key or write local)"
                                ));
                            }
                        }
                        "driver_opts" if map(v, &here)?.is_empty() => {}
                        "driver_opts" => {
                            return Err(format!(
                                "{here}: the local driver's options (NFS, devices) are not \
                                 supported by mesh; remove them"
                            ));
                        }
                        "external" => external = boolean(v, &here)?,
                        "name" => vol.name = string(v, &here)?,
                        "labels" => vol.labels.extend(list_or_map(v, &here)?),
                        other => return Err(format!("{at}: unknown key {other:?}")),
                    }
                }
            }
            if external {
                // An external volume is the operator's: its name as given, no stack label.
                if spec.get("name").is_none() {
                    vol.name = n.clone();
                }
                vol.labels.clear();
            }
            mesh_api::spec::validate_volume_name(&vol.name).map_err(|e| format!("{at}: {e}"))?;
            self.volumes.insert(n, vol);
        }
        Ok(())
    }

    /// A service's `volumes:`, short or long syntax.
    pub(super) fn service_volumes(&self, v: &Value, at: &str) -> Result<Vec<Mount>, String> {
        let Value::Sequence(items) = v else {
            return Err(format!("{at}: expected a list"));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let here = format!("{at}[{i}]");
                let m = match item {
                    Value::String(s) => self.short_volume(s, &here)?,
                    Value::Mapping(_) => self.long_volume(item, &here)?,
                    _ => return Err(format!("{here}: expected a string or a mapping")),
                };
                m.validate().map_err(|e| format!("{here}: {e}"))?;
                Ok(m)
            })
            .collect()
    }

    /// `SOURCE:TARGET[:MODE]`: a source starting with `/`, `.` or `~` is a host path, else a
    /// volume of the file.
    fn short_volume(&self, s: &str, at: &str) -> Result<Mount, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let (source, target, mode) = match parts.as_slice() {
            [t] => {
                return Err(format!(
                    "{at}: {t:?} is an anonymous volume, which mesh does not have: name it \
                     (NAME:{t}) and declare NAME under the top-level volumes:"
                ));
            }
            [s, t] => (*s, *t, ""),
            [s, t, m] => (*s, *t, *m),
            _ => return Err(format!("{at}: invalid volume specification: {s:?}")),
        };
        let mut read_only = false;
        for opt in mode.split(',').filter(|o| !o.is_empty()) {
            match opt {
                "ro" => read_only = true,
                "rw" => read_only = false,
                "nocopy" | "z" | "Z" | "consistent" | "cached" | "delegated" => {}
                other => return Err(format!("{at}: invalid mode {other:?} in {s:?}")),
            }
        }
        let mut m = Mount {
            target: target.to_owned(),
            read_only,
            ..Mount::default()
        };
        if source.starts_with(['/', '.', '~']) {
            m.kind = MountType::Bind;
            m.source = self.host_path(source, at)?;
        } else {
            m.kind = MountType::Volume;
            self.named(&mut m, source, at)?;
        }
        Ok(m)
    }

    /// `{type, source, target, read_only, volume: {nocopy}, tmpfs: {size, mode}}`.
    fn long_volume(&self, v: &Value, at: &str) -> Result<Mount, String> {
        let mut m = Mount::default();
        let mut source = None;
        for (k, val) in map(v, at)? {
            let k = key_str(k, at)?;
            let here = format!("{at}.{k}");
            match k.as_str() {
                "type" => {
                    m.kind = match string(val, &here)?.as_str() {
                        "volume" => MountType::Volume,
                        "bind" => MountType::Bind,
                        "tmpfs" => MountType::Tmpfs,
                        other => {
                            return Err(format!(
                                "{here}: {other:?} is not supported: use volume, bind or tmpfs"
                            ));
                        }
                    }
                }
                "source" => source = Some(string(val, &here)?),
                "target" => m.target = string(val, &here)?,
                "read_only" => m.read_only = boolean(val, &here)?,
                "consistency" => {}
                "volume" => {
                    for (vk, vv) in map(val, &here)? {
                        match key_str(vk, &here)?.as_str() {
                            "nocopy" => m.volume_nocopy = boolean(vv, &format!("{here}.nocopy"))?,
                            other => return Err(format!("{here}: unknown key {other:?}")),
                        }
                    }
                }
                "tmpfs" => {
                    for (tk, tv) in map(val, &here)? {
                        let tk = key_str(tk, &here)?;
                        let there = format!("{here}.{tk}");
                        match tk.as_str() {
                            "size" => {
                                m.tmpfs_size = Some(
                                    mesh_api::spec::bytes(&there, &string(tv, &there)?)
                                        .map_err(|e| format!("{there}: {e}"))?,
                                )
                            }
                            "mode" => m.tmpfs_mode = Some(mode(tv, &there)?),
                            other => return Err(format!("{here}: unknown key {other:?}")),
                        }
                    }
                }
                "bind" => {
                    return Err(format!(
                        "{here}: bind options (propagation, create_host_path) are not supported \
                         by mesh; remove them"
                    ));
                }
                other => return Err(format!("{at}: unknown key {other:?}")),
            }
        }
        match (m.kind, source) {
            (MountType::Volume, Some(s)) => self.named(&mut m, &s, at)?,
            (MountType::Volume, None) => {
                return Err(format!(
                    "{at}: a volume without a source is anonymous, which mesh does not have: \
                     give source: NAME"
                ));
            }
            (MountType::Bind, Some(s)) => m.source = self.host_path(&s, at)?,
            (MountType::Bind, None) => return Err(format!("{at}: a bind mount needs a source")),
            (MountType::Tmpfs, Some(_)) => {
                return Err(format!("{at}: a tmpfs has no source; remove it"));
            }
            (MountType::Tmpfs, None) => {}
        }
        Ok(m)
    }

    /// A volume of the file, by its name there.
    fn named(&self, m: &mut Mount, name: &str, at: &str) -> Result<(), String> {
        let vol = self.volumes.get(name).ok_or_else(|| {
            format!("{at}: undefined volume {name:?}: declare it under the top-level volumes:")
        })?;
        m.source = vol.name.clone();
        m.volume_labels = vol.labels.clone();
        Ok(())
    }

    /// A host path: relative ones from the compose file's directory, `~` from $HOME.
    fn host_path(&self, p: &str, at: &str) -> Result<String, String> {
        let path = if let Some(rest) = p.strip_prefix('~') {
            let home = std::env::var("HOME").map_err(|_| format!("{at}: {p}: HOME is not set"))?;
            std::path::PathBuf::from(home).join(rest.trim_start_matches('/'))
        } else if p.starts_with('.') {
            let dir = std::path::absolute(&self.dir).map_err(|e| format!("{at}: {e}"))?;
            dir.join(p)
        } else {
            std::path::PathBuf::from(p)
        };
        // `./data` and `../x` become plain absolute paths (mounts refuse `..`).
        let mut clean = std::path::PathBuf::from("/");
        for c in path.components() {
            match c {
                std::path::Component::ParentDir => {
                    clean.pop();
                }
                std::path::Component::Normal(n) => clean.push(n),
                _ => {}
            }
        }
        Ok(clean.display().to_string())
    }
}

/// A service's `tmpfs:`: a path or a list, each `PATH[:OPTIONS]` with `size=` and `mode=`.
pub(super) fn tmpfs(v: &Value, at: &str) -> Result<Vec<Mount>, String> {
    strings(v, at)?
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let here = format!("{at}[{i}]");
            let (target, opts) = s.split_once(':').unwrap_or((s, ""));
            let mut m = Mount {
                kind: MountType::Tmpfs,
                target: target.to_owned(),
                ..Mount::default()
            };
            for o in opts.split(',').filter(|o| !o.is_empty()) {
                match o.split_once('=') {
                    Some(("size", v)) => {
                        m.tmpfs_size = Some(
                            mesh_api::spec::bytes(&here, v).map_err(|e| format!("{here}: {e}"))?,
                        )
                    }
                    Some(("mode", v)) => {
                        m.tmpfs_mode = Some(
                            u32::from_str_radix(v, 8)
                                .map_err(|_| format!("{here}: invalid mode {v:?}"))?,
                        )
                    }
                    None if matches!(o, "rw" | "nosuid" | "nodev" | "noexec" | "exec") => {}
                    None if o == "ro" => m.read_only = true,
                    _ => return Err(format!("{here}: unsupported tmpfs option {o:?}")),
                }
            }
            m.validate().map_err(|e| format!("{here}: {e}"))?;
            Ok(m)
        })
        .collect()
}

/// An octal mode, written as YAML reads it (`0o1777`, `1777` or a decimal number).
fn mode(v: &Value, at: &str) -> Result<u32, String> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("{at}: invalid mode")),
        _ => {
            let s = string(v, at)?;
            u32::from_str_radix(s.trim_start_matches("0o"), 8)
                .map_err(|_| format!("{at}: invalid mode {s:?}"))
        }
    }
}
