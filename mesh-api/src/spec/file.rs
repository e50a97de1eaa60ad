//! Secrets and configs as a service's tasks are granted them.

use serde::{Deserialize, Serialize};

/// A secret or config granted to a service's tasks: `source` is the object's name, `target`
/// where the file appears (secrets: a name under /run/secrets; configs: an absolute path).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileRef {
    pub source: String,
    pub target: String,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

impl FileRef {
    /// Docker's `--secret`/`--config` syntax: `NAME`, or
    /// `source=NAME[,target=T][,uid=U][,gid=G][,mode=0400]`. `config` selects the target
    /// rules: secrets are file names under /run/secrets (default: the name), configs absolute
    /// paths (default `/<name>`).
    pub fn parse(s: &str, config: bool) -> Result<Self, String> {
        let kind = if config { "config" } else { "secret" };
        let mut r = FileRef {
            source: String::new(),
            target: String::new(),
            uid: 0,
            gid: 0,
            mode: 0o444,
        };
        if !s.contains('=') {
            r.source = s.to_owned();
        } else {
            for field in s.split(',') {
                let (k, v) = field.split_once('=').ok_or_else(|| {
                    format!("invalid --{kind} {s:?}: expected source=NAME[,target=…][,uid=…][,gid=…][,mode=0444]")
                })?;
                let num = |v: &str, radix: u32| {
                    u32::from_str_radix(v, radix)
                        .map_err(|_| format!("invalid {k} {v:?} in --{kind} {s:?}"))
                };
                match k.trim() {
                    "source" | "src" => r.source = v.to_owned(),
                    "target" | "dst" | "destination" => r.target = v.to_owned(),
                    "uid" => r.uid = num(v, 10)?,
                    "gid" => r.gid = num(v, 10)?,
                    "mode" => {
                        r.mode = num(v, 8)?;
                        if r.mode > 0o777 {
                            return Err(format!(
                                "invalid mode {v:?} in --{kind} {s:?}: use octal permission bits such as 0400"
                            ));
                        }
                    }
                    other => {
                        return Err(format!(
                            "unknown key {other:?} in --{kind} {s:?}: use source, target, uid, gid or mode"
                        ));
                    }
                }
            }
        }
        if r.source.is_empty() {
            return Err(format!("--{kind} {s:?} names no source={kind}"));
        }
        if r.target.is_empty() {
            r.target = if config {
                format!("/{}", r.source)
            } else {
                r.source.clone()
            };
        }
        if config {
            if !r.target.starts_with('/')
                || r.target.split('/').any(|c| c == "..")
                || r.target == "/"
            {
                return Err(format!(
                    "config target {:?} must be an absolute file path such as /etc/site.conf",
                    r.target
                ));
            }
        } else if r.target.contains('/') || r.target == "." || r.target == ".." {
            return Err(format!(
                "secret target {:?} must be a file name: secrets appear as /run/secrets/<target>",
                r.target
            ));
        }
        Ok(r)
    }
}
