//! Swarm's service templates: `--hostname "{{.Service.Name}}-{{.Task.Slot}}"`, and the same in
//! `--env` values, expanded on the node when a task starts, from the fields swarmkit's
//! `template.Context` has (`.Service.ID/Name/Labels`, `.Node.ID/Hostname/Platform.OS/
//! Platform.Architecture`, `.Task.ID/Name/Slot`).
//!
//! Only what these templates are used for is read: text, and `{{ FIELD.PATH }}` actions with
//! Go's `{{-`/`-}}` trimming. Errors use Go's `text/template` words, so a template that fails
//! under Docker fails here with the same message; [`check`] runs a template against a sample
//! task, as swarmkit's controlapi does, so a bad one is refused when the service is created.

use std::collections::BTreeMap;

/// The template's name in errors (swarmkit's).
const NAME: &str = "expansion";

/// What a template may name, for one task on one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Context {
    pub service_id: String,
    pub service_name: String,
    pub service_labels: BTreeMap<String, String>,
    pub node_id: String,
    pub node_hostname: String,
    pub node_os: String,
    pub node_arch: String,
    pub task_id: String,
    pub task_name: String,
    pub task_slot: String,
}

impl Context {
    /// The sample swarmkit checks templates against before it accepts a service.
    pub fn sample(labels: &BTreeMap<String, String>) -> Self {
        Self {
            service_id: "serviceid".into(),
            service_name: "servicename".into(),
            service_labels: labels.clone(),
            node_id: "nodeid".into(),
            node_hostname: "nodeHostname".into(),
            node_os: "os".into(),
            node_arch: "architecture".into(),
            task_id: "taskid".into(),
            task_name: "taskname".into(),
            task_slot: "1".into(),
        }
    }

    fn root(&self) -> Value<'_> {
        Value::Struct(
            "template.Context",
            vec![
                (
                    "Service",
                    Value::Struct(
                        "struct { ID string; Name string; Labels map[string]string }",
                        vec![
                            ("ID", Value::Str(&self.service_id)),
                            ("Name", Value::Str(&self.service_name)),
                            ("Labels", Value::Map(&self.service_labels)),
                        ],
                    ),
                ),
                (
                    "Node",
                    Value::Struct(
                        "struct { ID string; Hostname string; Platform template.Platform }",
                        vec![
                            ("ID", Value::Str(&self.node_id)),
                            ("Hostname", Value::Str(&self.node_hostname)),
                            (
                                "Platform",
                                Value::Struct(
                                    "template.Platform",
                                    vec![
                                        ("Architecture", Value::Str(&self.node_arch)),
                                        ("OS", Value::Str(&self.node_os)),
                                    ],
                                ),
                            ),
                        ],
                    ),
                ),
                (
                    "Task",
                    Value::Struct(
                        "struct { ID string; Name string; Slot string }",
                        vec![
                            ("ID", Value::Str(&self.task_id)),
                            ("Name", Value::Str(&self.task_name)),
                            ("Slot", Value::Str(&self.task_slot)),
                        ],
                    ),
                ),
            ],
        )
    }
}

enum Value<'a> {
    Str(&'a str),
    Map(&'a BTreeMap<String, String>),
    Struct(&'static str, Vec<(&'static str, Value<'a>)>),
}

impl Value<'_> {
    /// As Go's `fmt` prints a value (`{a b}`, `map[k:v]`).
    fn print(&self, out: &mut String) {
        match self {
            Value::Str(s) => out.push_str(s),
            Value::Map(m) => {
                out.push_str("map[");
                let pairs: Vec<String> = m.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                out.push_str(&pairs.join(" "));
                out.push(']');
            }
            Value::Struct(_, fields) => {
                out.push('{');
                for (i, (_, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    v.print(out);
                }
                out.push('}');
            }
        }
    }
}

/// Whether `s` has anything to expand (plain text is used as it is).
pub fn is_template(s: &str) -> bool {
    s.contains("{{")
}

/// `s` with its actions replaced by what they name in `ctx`.
pub fn expand(s: &str, ctx: &Context) -> Result<String, String> {
    let root = ctx.root();
    let mut out = String::new();
    let mut rest = s;
    let mut offset = 0;
    while let Some(open) = rest.find("{{") {
        let mut text = &rest[..open];
        let inner_start = open + 2;
        let Some(close) = rest[inner_start..].find("}}") else {
            let line = line_of(s, offset + open);
            return Err(format!("template: {NAME}:{line}: unclosed action"));
        };
        let mut inner = &rest[inner_start..inner_start + close];
        let mut inner_offset = offset + inner_start;
        // Go's trim markers: a dash and a space right inside the delimiters.
        if inner.starts_with("- ") || inner == "-" {
            text = text.trim_end();
            inner = &inner[1..];
            inner_offset += 1;
        }
        let trim_after = inner.ends_with(" -");
        if trim_after {
            inner = &inner[..inner.len() - 2];
        }
        out.push_str(text);
        let lead = inner.len() - inner.trim_start().len();
        action(s, inner.trim(), inner_offset + lead, &root, &mut out)?;
        rest = &rest[inner_start + close + 2..];
        offset += inner_start + close + 2;
        if trim_after {
            let trimmed = rest.trim_start();
            offset += rest.len() - trimmed.len();
            rest = trimmed;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Expands `s` against swarmkit's sample task: Err is what Docker says of a bad template.
pub fn check(s: &str, labels: &BTreeMap<String, String>) -> Result<(), String> {
    if !is_template(s) {
        return Ok(());
    }
    expand(s, &Context::sample(labels)).map(|_| ())
}

fn line_of(s: &str, at: usize) -> usize {
    s[..at].matches('\n').count() + 1
}

fn column_of(s: &str, at: usize) -> usize {
    at - s[..at].rfind('\n').map_or(0, |i| i + 1)
}

/// One `{{ … }}`: a field path (`.Task.Slot`) printed into `out`.
fn action(s: &str, inner: &str, at: usize, root: &Value, out: &mut String) -> Result<(), String> {
    let line = line_of(s, at);
    let col = column_of(s, at);
    if inner.is_empty() {
        return Err(format!(
            "template: {NAME}:{line}: missing value for command"
        ));
    }
    if inner.starts_with("/*") {
        return Ok(()); // a comment
    }
    let word = inner.split_whitespace().next().unwrap_or(inner);
    if !word.starts_with('.') {
        let name: String = word
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        return Err(if name.is_empty() {
            format!("template: {NAME}:{line}: unexpected {word:?} in command")
        } else {
            format!(
                "template: {NAME}:{line}: function {name:?} not defined (mesh's templates take \
                 fields only, e.g. {{{{.Service.Name}}}}-{{{{.Task.Slot}}}})"
            )
        });
    }
    if word != inner {
        return Err(format!(
            "template: {NAME}:{line}:{col}: executing \"{NAME}\" at <{word}>: {word} is not a \
             method but has arguments"
        ));
    }
    let mut value = root;
    let mut owned_label: Option<&str> = None;
    for field in word[1..].split('.').filter(|f| !f.is_empty()) {
        let fail = |what: String| {
            format!("template: {NAME}:{line}:{col}: executing \"{NAME}\" at <{word}>: {what}")
        };
        if owned_label.is_some() {
            return Err(fail(format!("can't evaluate field {field} in type string")));
        }
        match value {
            Value::Struct(ty, fields) => match fields.iter().find(|(n, _)| *n == field) {
                Some((_, v)) => value = v,
                None => return Err(fail(format!("can't evaluate field {field} in type {ty}"))),
            },
            Value::Map(m) => match m.get(field) {
                Some(v) => owned_label = Some(v),
                None => return Err(fail(format!("map has no entry for key {field:?}"))),
            },
            Value::Str(_) => {
                return Err(fail(format!("can't evaluate field {field} in type string")));
            }
        }
    }
    match owned_label {
        Some(v) => out.push_str(v),
        None => value.print(out),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context {
            service_id: "3f2a1c9b8d7e".into(),
            service_name: "web".into(),
            service_labels: BTreeMap::from([("tier".into(), "front".into())]),
            node_id: "a1b2c3d4e5f6".into(),
            node_hostname: "node-1".into(),
            node_os: "linux".into(),
            node_arch: "x86_64".into(),
            task_id: "0123456789ab".into(),
            task_name: "web.1.0123456789ab".into(),
            task_slot: "1".into(),
        }
    }

    #[test]
    fn fields_expand_as_swarm_expands_them() {
        let c = ctx();
        for (t, want) in [
            ("{{.Service.Name}}-{{.Task.Slot}}", "web-1"),
            ("{{ .Node.Hostname }}", "node-1"),
            ("{{.Task.Name}}", "web.1.0123456789ab"),
            ("{{.Task.ID}}@{{.Node.ID}}", "0123456789ab@a1b2c3d4e5f6"),
            ("{{.Service.ID}}", "3f2a1c9b8d7e"),
            (
                "{{.Node.Platform.OS}}/{{.Node.Platform.Architecture}}",
                "linux/x86_64",
            ),
            ("{{.Service.Labels.tier}}", "front"),
            ("a {{- .Task.Slot -}} b", "a1b"),
            ("plain", "plain"),
            ("{{/* nothing */}}x", "x"),
        ] {
            assert_eq!(expand(t, &c).unwrap(), want, "{t}");
        }
    }

    #[test]
    fn bad_templates_fail_in_gos_words() {
        let c = ctx();
        assert_eq!(
            expand("{{.Nope}}", &c).unwrap_err(),
            "template: expansion:1:2: executing \"expansion\" at <.Nope>: can't evaluate field \
             Nope in type template.Context"
        );
        assert_eq!(
            expand("x-{{ .Task.Nope }}", &c).unwrap_err(),
            "template: expansion:1:5: executing \"expansion\" at <.Task.Nope>: can't evaluate \
             field Nope in type struct { ID string; Name string; Slot string }"
        );
        let e = expand("{{.Service.Labels.missing}}", &c).unwrap_err();
        assert!(e.ends_with("map has no entry for key \"missing\""), "{e}");
        let e = expand("{{.Task.Slot.X}}", &c).unwrap_err();
        assert!(e.ends_with("can't evaluate field X in type string"), "{e}");
        assert_eq!(
            expand("{{.Task.Slot", &c).unwrap_err(),
            "template: expansion:1: unclosed action"
        );
        let e = expand("{{upper .Task.Slot}}", &c).unwrap_err();
        assert!(
            e.starts_with("template: expansion:1: function \"upper\" not defined"),
            "{e}"
        );
        assert!(check("{{.Nope}}", &BTreeMap::new()).is_err());
        assert!(check("{{.Service.Name}}", &BTreeMap::new()).is_ok());
    }
}
