//! `${VAR}` in compose values, as Docker substitutes them from the environment: `$VAR`,
//! `${VAR}`, `${VAR:-default}` / `${VAR-default}`, `${VAR:?error}` / `${VAR?error}`,
//! `${VAR:+other}` / `${VAR+other}`, and `$$` for a literal `$`. Keys are not substituted,
//! values are, wherever they are in the file. A variable that is not set becomes the empty
//! string with a warning, as Docker does.

use serde_yaml::Value;

/// Substitutes every string value of `v`; `at` names where `v` is (for errors and warnings).
pub fn values(
    v: &mut Value,
    at: &str,
    env: &dyn Fn(&str) -> Option<String>,
    warnings: &mut Vec<String>,
) -> Result<(), String> {
    match v {
        Value::String(s) => {
            *s = string(s, env, warnings).map_err(|e| format!("{at}: {e}"))?;
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                values(item, &format!("{at}[{i}]"), env, warnings)?;
            }
        }
        Value::Mapping(m) => {
            for (k, item) in m.iter_mut() {
                let key = k.as_str().map(str::to_owned).unwrap_or_default();
                let here = if at.is_empty() {
                    key
                } else {
                    format!("{at}.{key}")
                };
                values(item, &here, env, warnings)?;
            }
        }
        Value::Tagged(t) => values(&mut t.value, at, env, warnings)?,
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    Ok(())
}

/// One string with its variables substituted.
pub fn string(
    s: &str,
    env: &dyn Fn(&str) -> Option<String>,
    warnings: &mut Vec<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(inner) = rest.strip_prefix('{') {
            let end = closing_brace(inner)
                .ok_or_else(|| format!("invalid interpolation format for {s:?}: no closing }}"))?;
            out.push_str(&braced(&inner[..end], s, env, warnings)?);
            rest = &inner[end + 1..];
        } else {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            if len == 0 {
                return Err(format!(
                    "invalid interpolation format for {s:?}: a $ must start a variable; write $$ \
                     for a literal $"
                ));
            }
            out.push_str(&lookup(&rest[..len], env, warnings));
            rest = &rest[len..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The `}` that closes a `${`, past nested `${…}` in a default.
fn closing_brace(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 1;
            }
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

/// The inside of `${…}`: a name and, perhaps, an operator and its word.
fn braced(
    inner: &str,
    whole: &str,
    env: &dyn Fn(&str) -> Option<String>,
    warnings: &mut Vec<String>,
) -> Result<String, String> {
    let name_len = inner
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(inner.len());
    let (name, op) = inner.split_at(name_len);
    if name.is_empty() {
        return Err(format!(
            "invalid interpolation format for {whole:?}: no variable name"
        ));
    }
    let value = env(name);
    let set = value.is_some();
    let non_empty = value.as_deref().is_some_and(|v| !v.is_empty());
    let word = |w: &str, warnings: &mut Vec<String>| string(w, env, warnings);
    Ok(match op {
        "" => lookup(name, env, warnings),
        _ if op.starts_with(":-") => match value.filter(|_| non_empty) {
            Some(v) => v,
            None => word(&op[2..], warnings)?,
        },
        _ if op.starts_with('-') => match value {
            Some(v) => v,
            None => word(&op[1..], warnings)?,
        },
        _ if op.starts_with(":?") || op.starts_with('?') => {
            let (required_non_empty, msg) = match op.strip_prefix(":?") {
                Some(m) => (true, m),
                None => (false, &op[1..]),
            };
            if (required_non_empty && !non_empty) || !set {
                let msg = word(msg, warnings)?;
                return Err(format!(
                    "required variable {name} is missing a value{}",
                    if msg.is_empty() {
                        String::new()
                    } else {
                        format!(": {msg}")
                    }
                ));
            }
            value.unwrap_or_default()
        }
        _ if op.starts_with(":+") => {
            if non_empty {
                word(&op[2..], warnings)?
            } else {
                String::new()
            }
        }
        _ if op.starts_with('+') => {
            if set {
                word(&op[1..], warnings)?
            } else {
                String::new()
            }
        }
        _ => {
            return Err(format!(
                "invalid interpolation format for {whole:?}: use ${{VAR}}, ${{VAR:-default}}, \
                 ${{VAR:?error}} or ${{VAR:+other}}"
            ));
        }
    })
}

fn lookup(name: &str, env: &dyn Fn(&str) -> Option<String>, warnings: &mut Vec<String>) -> String {
    env(name).unwrap_or_else(|| {
        let w = format!("The {name} variable is not set. Defaulting to a blank string.");
        if !warnings.contains(&w) {
            warnings.push(w);
        }
        String::new()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "TAG" => Some("1.2".into()),
            "EMPTY" => Some(String::new()),
            "PORT" => Some("8080".into()),
            _ => None,
        }
    }

    fn sub(s: &str) -> Result<String, String> {
        string(s, &env, &mut Vec::new())
    }

    #[test]
    fn variables_are_substituted_as_docker_does() {
        assert_eq!(sub("web:${TAG}").unwrap(), "web:1.2");
        assert_eq!(sub("web:$TAG-x").unwrap(), "web:1.2-x");
        assert_eq!(sub("${PORT}:80").unwrap(), "8080:80");
        assert_eq!(sub("${NOPE:-latest}").unwrap(), "latest");
        assert_eq!(sub("${EMPTY:-latest}").unwrap(), "latest");
        assert_eq!(sub("${EMPTY-latest}").unwrap(), "");
        assert_eq!(sub("${NOPE-latest}").unwrap(), "latest");
        assert_eq!(sub("${NOPE:-${TAG}}").unwrap(), "1.2");
        assert_eq!(sub("${TAG:+set}${NOPE:+unset}").unwrap(), "set");
        assert_eq!(sub("cost $$5").unwrap(), "cost $5");
        assert_eq!(sub("no variables").unwrap(), "no variables");
    }

    #[test]
    fn unset_variables_warn_once_and_required_ones_fail() {
        let mut w = Vec::new();
        assert_eq!(string("${NOPE}/$NOPE", &env, &mut w).unwrap(), "/");
        assert_eq!(
            w,
            vec!["The NOPE variable is not set. Defaulting to a blank string."]
        );
        let e = sub("${DB_PASSWORD:?set it in .env}").unwrap_err();
        assert_eq!(
            e,
            "required variable DB_PASSWORD is missing a value: set it in .env"
        );
        assert!(sub("${EMPTY:?}").is_err());
        assert_eq!(sub("${EMPTY?}").unwrap(), "");
        assert!(sub("${TAG").unwrap_err().contains("no closing"));
        assert!(sub("${}").unwrap_err().contains("no variable name"));
        assert!(sub("$ alone").unwrap_err().contains("$$"));
        assert!(
            sub("${TAG/x/y}")
                .unwrap_err()
                .contains("invalid interpolation")
        );
    }

    #[test]
    fn values_are_substituted_everywhere_and_errors_name_the_key() {
        let mut v: Value = serde_yaml::from_str(
            "services:\n  web:\n    image: web:${TAG}\n    ports: ['${PORT}:80']\n",
        )
        .unwrap();
        values(&mut v, "", &env, &mut Vec::new()).unwrap();
        assert_eq!(v["services"]["web"]["image"], "web:1.2");
        assert_eq!(v["services"]["web"]["ports"][0], "8080:80");
        let mut bad: Value =
            serde_yaml::from_str("services:\n  web:\n    image: ${X:?}\n").unwrap();
        let e = values(&mut bad, "", &env, &mut Vec::new()).unwrap_err();
        assert!(
            e.starts_with("services.web.image: required variable X"),
            "{e}"
        );
    }
}
