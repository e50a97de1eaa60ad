//! `cargo xtask layout`: the workspace's layout rules, checked from the source in a second.
//!
//! - No cycle between the top-level modules of a crate. The graph is read from the paths the
//!   code writes from the crate root: `use crate::…` trees and inline `crate::…`, `self::…`,
//!   `super::…` paths (`super::` inside `a/…` stays within `a`; a name the crate root
//!   re-exports counts as the module it comes from). Comments and string literals are not
//!   code, so a doc link never makes an edge.
//! - The clients (`meshctl`, `mesh-cni`) and the API crate (`mesh-api`) never pull in the
//!   kernel, gossip or DNS-server crates, nor the agent, through their normal dependencies:
//!   they build anywhere, fast, and cannot reach around the agent's socket.
//!
//! A cycle is reported as its modules and every edge between them, each with the places in
//! the source that make it, so the fix (moving an item to the module that owns it) can start
//! from the output.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Crates that never build the kernel, gossip or DNS-server code nor the agent, and what
/// each must not depend on.
const CLIENT_FORBIDDEN: &[&str] = &[
    "aya",
    "chitchat",
    "rtnetlink",
    "hickory-server",
    "nftables",
    "mesh-agent",
];
const API_FORBIDDEN: &[&str] = &[
    "aya",
    "chitchat",
    "rtnetlink",
    "hickory-server",
    "nftables",
    "mesh-agent",
    "meshctl",
];
const CRATE_RULES: &[(&str, &[&str])] = &[
    ("meshctl", CLIENT_FORBIDDEN),
    ("mesh-cni", CLIENT_FORBIDDEN),
    ("mesh-api", API_FORBIDDEN),
];

pub fn run() -> Result<()> {
    let metadata = cargo_metadata()?;
    let root = PathBuf::from(
        metadata["workspace_root"]
            .as_str()
            .context("cargo metadata without workspace_root")?,
    );
    let mut broken = 0;
    for (name, src) in workspace_sources(&metadata)? {
        let graph = ModuleGraph::read(&src)?;
        let cycles = graph.cycles();
        println!(
            "layout: {name}: {} modules, {} edges, {} cycles",
            graph.modules.len(),
            graph.edges.len(),
            cycles.len()
        );
        for cycle in &cycles {
            print!("{}", graph.describe_cycle(&name, cycle, &root));
        }
        broken += cycles.len();
    }
    let resolve = Resolve::read(&metadata)?;
    for (krate, forbidden) in CRATE_RULES {
        for chain in resolve.forbidden_chains(krate, forbidden)? {
            let culprit = chain.last().map_or("", String::as_str);
            println!(
                "layout: {krate} must not depend on {culprit}: {}",
                chain.join(" -> ")
            );
            broken += 1;
        }
    }
    if broken > 0 {
        bail!("layout: {broken} rule(s) broken");
    }
    println!("layout: no module cycle; meshctl, mesh-cni and mesh-api keep to their dependencies");
    Ok(())
}

fn cargo_metadata() -> Result<Value> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("reading cargo metadata")
}

/// Every workspace crate that has a `src/`, by name.
fn workspace_sources(metadata: &Value) -> Result<Vec<(String, PathBuf)>> {
    let members: BTreeSet<&str> = metadata["workspace_members"]
        .as_array()
        .context("cargo metadata without workspace_members")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut out = Vec::new();
    for p in metadata["packages"].as_array().into_iter().flatten() {
        if !p["id"].as_str().is_some_and(|id| members.contains(id)) {
            continue;
        }
        let (Some(name), Some(manifest)) = (p["name"].as_str(), p["manifest_path"].as_str()) else {
            continue;
        };
        let src = Path::new(manifest).with_file_name("src");
        if src.is_dir() {
            out.push((name.to_owned(), src));
        }
    }
    out.sort();
    Ok(out)
}

// ---- Reading paths out of Rust source ----

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Semi,
    Star,
    Other,
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    line: usize,
}

/// The tokens that matter for paths, with their lines; comments, literals and lifetimes
/// are left out (a `'{'` must not open a block, a `"crate::x"` must not make an edge).
fn tokenize(src: &str) -> Vec<Token> {
    let s: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    let newlines = |from: usize, to: usize| s[from..to].iter().filter(|c| **c == '\n').count();
    while i < s.len() {
        let c = s[i];
        let start = i;
        let tok = match c {
            '\n' => {
                line += 1;
                i += 1;
                continue;
            }
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            '/' if s.get(i + 1) == Some(&'/') => {
                while i < s.len() && s[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            '/' if s.get(i + 1) == Some(&'*') => {
                i = skip_block_comment(&s, i);
                line += newlines(start, i);
                continue;
            }
            '"' => {
                i = skip_string(&s, i);
                line += newlines(start, i);
                continue;
            }
            '\'' => {
                i = skip_char_or_lifetime(&s, i);
                continue;
            }
            c if c == '_' || c.is_alphabetic() => {
                if let Some(end) = raw_string_end(&s, i) {
                    i = end;
                    line += newlines(start, i);
                    continue;
                }
                if let Some(end) = prefixed_literal_end(&s, i) {
                    i = end;
                    line += newlines(start, i);
                    continue;
                }
                // A raw identifier (`r#type`) is the identifier.
                if c == 'r' && s.get(i + 1) == Some(&'#') {
                    i += 2;
                }
                let from = i;
                while i < s.len() && (s[i] == '_' || s[i].is_alphanumeric()) {
                    i += 1;
                }
                out.push(Token {
                    tok: Tok::Ident(s[from..i].iter().collect()),
                    line,
                });
                continue;
            }
            c if c.is_ascii_digit() => {
                while i < s.len() && (s[i] == '_' || s[i].is_alphanumeric()) {
                    i += 1;
                }
                continue;
            }
            ':' if s.get(i + 1) == Some(&':') => {
                i += 1;
                Tok::PathSep
            }
            '{' => Tok::Open,
            '}' => Tok::Close,
            ',' => Tok::Comma,
            ';' => Tok::Semi,
            '*' => Tok::Star,
            _ => Tok::Other,
        };
        i += 1;
        out.push(Token { tok, line });
    }
    out
}

/// The end of the (nested) block comment starting at `i`.
fn skip_block_comment(s: &[char], mut i: usize) -> usize {
    let mut depth = 0;
    while i < s.len() {
        if s[i] == '/' && s.get(i + 1) == Some(&'*') {
            depth += 1;
            i += 2;
        } else if s[i] == '*' && s.get(i + 1) == Some(&'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    i
}

/// The end of the escaped string literal whose opening quote is at `i`.
fn skip_string(s: &[char], mut i: usize) -> usize {
    i += 1;
    while i < s.len() {
        match s[i] {
            '\\' => i += 2,
            '"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// Past a character literal (`'a'`, `'\n'`, `'\u{7f}'`), or past the quote of a lifetime
/// (its name is read next as an identifier, which is harmless).
fn skip_char_or_lifetime(s: &[char], i: usize) -> usize {
    if s.get(i + 1) == Some(&'\\') {
        let mut j = i + 2;
        while j < s.len() && s[j] != '\'' {
            j += 1;
        }
        return j + 1;
    }
    if s.get(i + 2) == Some(&'\'') {
        return i + 3;
    }
    i + 1
}

/// The end of a raw string (`r"…"`, `r#"…"#`, `br#"…"#`, `cr"…"`) starting at `i`.
fn raw_string_end(s: &[char], i: usize) -> Option<usize> {
    let mut j = i;
    if matches!(s[j], 'b' | 'c') {
        j += 1;
    }
    if s.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let hashes = s[j..].iter().take_while(|c| **c == '#').count();
    j += hashes;
    if s.get(j) != Some(&'"') {
        return None;
    }
    j += 1;
    while j < s.len() {
        if s[j] == '"'
            && s[j + 1..]
                .iter()
                .take(hashes)
                .filter(|c| **c == '#')
                .count()
                == hashes
        {
            return Some(j + 1 + hashes);
        }
        j += 1;
    }
    Some(j)
}

/// The end of a byte, byte-string or C-string literal (`b'a'`, `b"…"`, `c"…"`) at `i`.
fn prefixed_literal_end(s: &[char], i: usize) -> Option<usize> {
    match (s[i], s.get(i + 1)) {
        ('b' | 'c', Some('"')) => Some(skip_string(s, i + 1)),
        ('b', Some('\'')) => Some(skip_char_or_lifetime(s, i + 1)),
        _ => None,
    }
}

/// One segment of a path as written, with its line.
#[derive(Clone, Debug, PartialEq)]
struct Segment {
    name: String,
    line: usize,
}

/// A path the source names, resolved from the crate root (`["cluster", "View"]`), and the
/// name it is imported as when it comes from a `use` (`as` included).
#[derive(Clone, Debug, PartialEq)]
struct Reference {
    path: Vec<Segment>,
    imported_as: Option<String>,
}

/// Every path of `src` that starts from the crate root, resolved. `module` is the file's
/// module path (`["agent", "routing"]`; empty for the crate root): `self::` and `super::`
/// start from it, as do paths in the inline modules it declares. In the crate root, a
/// `use a::…` is the same as `use crate::a::…`.
fn references(src: &str, module: &[&str]) -> Vec<Reference> {
    let toks = tokenize(src);
    let mut out = Vec::new();
    let mut depth = 0usize;
    // Inline modules (`mod tests { … }`) open, with the depth their body is at.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let here = || {
            module
                .iter()
                .map(|m| m.to_string())
                .chain(inline.iter().map(|(m, _)| m.clone()))
                .collect::<Vec<_>>()
        };
        match &toks[i].tok {
            Tok::Open => depth += 1,
            Tok::Close => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Tok::Ident(kw) if kw == "mod" => {
                if let (Some(Tok::Ident(name)), Some(Tok::Open)) = (
                    toks.get(i + 1).map(|t| &t.tok),
                    toks.get(i + 2).map(|t| &t.tok),
                ) {
                    inline.push((name.clone(), depth + 1));
                    depth += 1;
                    i += 3;
                    continue;
                }
            }
            Tok::Ident(kw) if kw == "use" && starts_use_tree(toks.get(i + 1)) => {
                let here = here();
                let mut j = i + 1;
                let mut trees = Vec::new();
                use_tree(&toks, &mut j, Vec::new(), &mut trees);
                for (path, alias) in trees {
                    if let Some(path) = from_root(&here, &path, true) {
                        let imported_as = alias.or_else(|| imported_name(&path));
                        out.push(Reference { path, imported_as });
                    }
                }
                while j < toks.len() && toks[j].tok != Tok::Semi {
                    j += 1;
                }
                i = j;
                continue;
            }
            Tok::Ident(kw)
                if matches!(kw.as_str(), "crate" | "self" | "super")
                    && toks.get(i + 1).is_some_and(|t| t.tok == Tok::PathSep) =>
            {
                let here = here();
                let mut j = i;
                let path = inline_path(&toks, &mut j);
                if let Some(path) = from_root(&here, &path, false) {
                    out.push(Reference {
                        path,
                        imported_as: None,
                    });
                }
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// `use` as a declaration, not `impl Trait + use<'a>`.
fn starts_use_tree(next: Option<&Token>) -> bool {
    next.is_some_and(|t| matches!(t.tok, Tok::Ident(_) | Tok::PathSep | Tok::Open))
}

/// Reads one use tree at `*i` (`a::b::{c, d::{self, E as F}, *}`), appending every path it
/// imports, each with its `as` name.
fn use_tree(
    toks: &[Token],
    i: &mut usize,
    mut path: Vec<Segment>,
    out: &mut Vec<(Vec<Segment>, Option<String>)>,
) {
    if toks.get(*i).is_some_and(|t| t.tok == Tok::PathSep) {
        // `use ::name`: always another crate.
        path.push(Segment {
            name: "::".into(),
            line: toks[*i].line,
        });
        *i += 1;
    }
    while let Some(t) = toks.get(*i) {
        match &t.tok {
            Tok::Ident(name) => {
                path.push(Segment {
                    name: name.clone(),
                    line: t.line,
                });
                *i += 1;
                if toks.get(*i).is_some_and(|t| t.tok == Tok::PathSep) {
                    *i += 1;
                    continue;
                }
                break;
            }
            Tok::Open => {
                *i += 1;
                while let Some(t) = toks.get(*i) {
                    match t.tok {
                        Tok::Close => {
                            *i += 1;
                            break;
                        }
                        Tok::Comma => *i += 1,
                        Tok::Semi => break,
                        _ => {
                            let before = *i;
                            use_tree(toks, i, path.clone(), out);
                            if *i == before {
                                *i += 1;
                            }
                        }
                    }
                }
                return;
            }
            Tok::Star => {
                path.push(Segment {
                    name: "*".into(),
                    line: t.line,
                });
                *i += 1;
                break;
            }
            _ => break,
        }
    }
    let alias = match (toks.get(*i), toks.get(*i + 1)) {
        (
            Some(Token {
                tok: Tok::Ident(kw),
                ..
            }),
            Some(Token {
                tok: Tok::Ident(a), ..
            }),
        ) if kw == "as" => {
            *i += 2;
            Some(a.clone())
        }
        _ => None,
    };
    if !path.is_empty() {
        out.push((path, alias));
    }
}

/// Reads the path starting at `*i` (`crate::a::B`), up to the first token that is not part
/// of it.
fn inline_path(toks: &[Token], i: &mut usize) -> Vec<Segment> {
    let mut path = Vec::new();
    while let Some(Token {
        tok: Tok::Ident(name),
        line,
    }) = toks.get(*i)
    {
        path.push(Segment {
            name: name.clone(),
            line: *line,
        });
        *i += 1;
        if toks.get(*i).is_some_and(|t| t.tok == Tok::PathSep) {
            *i += 1;
        } else {
            break;
        }
    }
    path
}

/// `path` as written in module `here`, from the crate root; `None` for another crate's
/// path, and for a path relative to a module other than the root (it stays inside it).
fn from_root(here: &[String], path: &[Segment], in_use: bool) -> Option<Vec<Segment>> {
    let first = path.first()?;
    let (base, rest): (Vec<String>, &[Segment]) = match first.name.as_str() {
        "crate" => (Vec::new(), &path[1..]),
        "self" => (here.to_vec(), &path[1..]),
        "super" => {
            let ups = path.iter().take_while(|s| s.name == "super").count();
            let keep = here.len().checked_sub(ups)?;
            (here[..keep].to_vec(), &path[ups..])
        }
        _ if in_use && here.is_empty() => (Vec::new(), path),
        _ => return None,
    };
    let mut out: Vec<Segment> = base
        .into_iter()
        .map(|name| Segment {
            name,
            line: first.line,
        })
        .collect();
    // `a::{self}` names `a` itself.
    out.extend(rest.iter().filter(|s| s.name != "self").cloned());
    Some(out)
}

/// The name a `use` of `path` brings into scope (none for a glob).
fn imported_name(path: &[Segment]) -> Option<String> {
    path.last()
        .filter(|s| s.name != "*")
        .map(|s| s.name.clone())
}

// ---- The module graph of a crate ----

/// A place in the source that names another module.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Site {
    file: PathBuf,
    line: usize,
}

#[derive(Debug, Default)]
struct ModuleGraph {
    modules: BTreeSet<String>,
    edges: BTreeMap<(String, String), Vec<Site>>,
}

/// A source file with its module path (`src/agent/mod.rs` is `["agent"]`; the crate roots
/// `lib.rs` and `main.rs` are `[]`).
struct SourceFile {
    path: PathBuf,
    module: Vec<String>,
    text: String,
}

impl ModuleGraph {
    /// The graph of the top-level modules of the crate whose source is in `src`.
    fn read(src: &Path) -> Result<Self> {
        Ok(Self::from_files(&source_files(src)?))
    }

    fn from_files(files: &[SourceFile]) -> Self {
        let scanned: Vec<(&SourceFile, Vec<Reference>)> = files
            .iter()
            .map(|f| {
                let module: Vec<&str> = f.module.iter().map(String::as_str).collect();
                (f, references(&f.text, &module))
            })
            .collect();
        let modules: BTreeSet<String> = files
            .iter()
            .filter_map(|f| f.module.first().cloned())
            .collect();
        let reexports = root_reexports(&scanned, &modules);
        let mut graph = ModuleGraph {
            modules,
            edges: BTreeMap::new(),
        };
        for (f, refs) in &scanned {
            graph.add_edges(f, refs, &reexports);
        }
        graph
    }

    /// The edges from `file`'s top-level module to the modules its references name.
    fn add_edges(
        &mut self,
        file: &SourceFile,
        refs: &[Reference],
        reexports: &BTreeMap<String, String>,
    ) {
        // The crate root (inline modules included) is no node: it declares every module,
        // and a binary's root holds what its modules share and calls into them, so each
        // would be a cycle with it. Its items (`crate::programs::MAP`) make no edge either.
        let Some(from) = file.module.first() else {
            return;
        };
        for r in refs {
            let Some(first) = r.path.first() else {
                continue;
            };
            let target = if self.modules.contains(&first.name) {
                first.name.clone()
            } else if let Some(m) = reexports.get(&first.name) {
                m.clone()
            } else {
                continue;
            };
            if *from == target {
                continue;
            }
            let sites = self.edges.entry((from.clone(), target)).or_default();
            let site = Site {
                file: file.path.clone(),
                line: first.line,
            };
            if !sites.contains(&site) {
                sites.push(site);
            }
        }
    }

    /// Every strongly connected component of more than one module, each sorted.
    fn cycles(&self) -> Vec<Vec<String>> {
        let mut tarjan = Tarjan::new(self);
        for m in &self.modules {
            if !tarjan.index.contains_key(m.as_str()) {
                tarjan.visit(m);
            }
        }
        let mut out: Vec<Vec<String>> = tarjan
            .components
            .into_iter()
            .filter(|c| c.len() > 1)
            .map(|c| {
                let mut c: Vec<String> = c.into_iter().map(str::to_owned).collect();
                c.sort();
                c
            })
            .collect();
        out.sort();
        out
    }

    /// The cycle's modules and every edge between them, with the sites that make it.
    fn describe_cycle(&self, krate: &str, cycle: &[String], root: &Path) -> String {
        let mut out = format!("cycle in {krate}: {}\n", cycle.join(", "));
        for ((from, to), sites) in &self.edges {
            if !cycle.contains(from) || !cycle.contains(to) {
                continue;
            }
            out += &format!("  {from} -> {to}\n");
            for s in sites {
                let file = s.file.strip_prefix(root).unwrap_or(&s.file);
                out += &format!("      {}:{}\n", file.display(), s.line);
            }
        }
        out
    }
}

/// Every `.rs` file under `src`, with its module path; `src/bin/` holds crates of their own.
fn source_files(src: &Path) -> Result<Vec<SourceFile>> {
    let mut out = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
        for e in entries {
            let path = e?.path();
            if path.is_dir() {
                if path != src.join("bin") {
                    dirs.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let module = module_path(src, &path);
            out.push(SourceFile { path, module, text });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// `src/a/b.rs` is `a::b`, `src/a/mod.rs` is `a`, `src/lib.rs` and `src/main.rs` the root.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.pop() {
        let stem = last.strip_suffix(".rs").unwrap_or(&last).to_owned();
        let root = parts.is_empty() && (stem == "lib" || stem == "main");
        if stem != "mod" && !root {
            parts.push(stem);
        }
    }
    parts
}

/// Names the crate root imports from its modules (`pub use cluster::Host`), with the
/// module each comes from: `crate::Host` is a use of `cluster`.
fn root_reexports(
    scanned: &[(&SourceFile, Vec<Reference>)],
    modules: &BTreeSet<String>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (_, refs) in scanned.iter().filter(|(f, _)| f.module.is_empty()) {
        for r in refs {
            let (Some(first), Some(name)) = (r.path.first(), &r.imported_as) else {
                continue;
            };
            if r.path.len() > 1 && modules.contains(&first.name) {
                out.insert(name.clone(), first.name.clone());
            }
        }
    }
    out
}

/// Tarjan's strongly connected components over the module graph.
struct Tarjan<'g> {
    next: BTreeMap<&'g str, Vec<&'g str>>,
    index: BTreeMap<&'g str, usize>,
    low: BTreeMap<&'g str, usize>,
    stack: Vec<&'g str>,
    on_stack: BTreeSet<&'g str>,
    components: Vec<Vec<&'g str>>,
}

impl<'g> Tarjan<'g> {
    fn new(graph: &'g ModuleGraph) -> Self {
        let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (from, to) in graph.edges.keys() {
            next.entry(from.as_str()).or_default().push(to.as_str());
        }
        Tarjan {
            next,
            index: BTreeMap::new(),
            low: BTreeMap::new(),
            stack: Vec::new(),
            on_stack: BTreeSet::new(),
            components: Vec::new(),
        }
    }

    fn visit(&mut self, m: &'g str) {
        let n = self.index.len();
        self.index.insert(m, n);
        self.low.insert(m, n);
        self.stack.push(m);
        self.on_stack.insert(m);
        for to in self.next.get(m).cloned().unwrap_or_default() {
            if !self.index.contains_key(to) {
                self.visit(to);
                let low = self.low[m].min(self.low[to]);
                self.low.insert(m, low);
            } else if self.on_stack.contains(to) {
                let low = self.low[m].min(self.index[to]);
                self.low.insert(m, low);
            }
        }
        if self.low[m] == self.index[m] {
            let mut component = Vec::new();
            while let Some(top) = self.stack.pop() {
                self.on_stack.remove(top);
                component.push(top);
                if top == m {
                    break;
                }
            }
            self.components.push(component);
        }
    }
}

// ---- Crate rules, from cargo's resolve graph ----

/// Packages by id, and each package's normal (not dev, not build) dependencies.
struct Resolve {
    names: BTreeMap<String, String>,
    normal: BTreeMap<String, Vec<String>>,
}

impl Resolve {
    fn read(metadata: &Value) -> Result<Self> {
        let names = metadata["packages"]
            .as_array()
            .context("cargo metadata without packages")?
            .iter()
            .filter_map(|p| Some((p["id"].as_str()?.to_owned(), p["name"].as_str()?.to_owned())))
            .collect();
        let mut normal = BTreeMap::new();
        for node in metadata["resolve"]["nodes"]
            .as_array()
            .context("cargo metadata without a resolve graph")?
        {
            let Some(id) = node["id"].as_str() else {
                continue;
            };
            let deps = node["deps"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| {
                    d["dep_kinds"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|k| k["kind"].is_null())
                })
                .filter_map(|d| d["pkg"].as_str().map(str::to_owned))
                .collect();
            normal.insert(id.to_owned(), deps);
        }
        Ok(Resolve { names, normal })
    }

    /// For each `forbidden` package `krate` reaches through normal dependencies, the
    /// shortest chain of package names that pulls it in.
    fn forbidden_chains(&self, krate: &str, forbidden: &[&str]) -> Result<Vec<Vec<String>>> {
        let start = self
            .names
            .iter()
            .find(|(id, name)| *name == krate && self.normal.contains_key(*id))
            .map(|(id, _)| id.as_str())
            .with_context(|| format!("{krate} is not in the workspace"))?;
        let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start]);
        let mut out = Vec::new();
        while let Some(id) = queue.pop_front() {
            for dep in self.normal.get(id).into_iter().flatten() {
                if dep == start || parent.contains_key(dep.as_str()) {
                    continue;
                }
                parent.insert(dep, id);
                if forbidden.contains(&self.names[dep].as_str()) {
                    out.push(self.chain(&parent, dep));
                }
                queue.push_back(dep);
            }
        }
        Ok(out)
    }

    /// The package names from the start (the one package without a parent) to `end`.
    fn chain(&self, parent: &BTreeMap<&str, &str>, end: &str) -> Vec<String> {
        let mut ids = vec![end];
        while let Some(p) = ids.last().and_then(|id| parent.get(id)) {
            ids.push(p);
        }
        ids.iter().rev().map(|id| self.names[*id].clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paths `src` names from the root, as `a::b@line`, in module `module`.
    fn refs(src: &str, module: &[&str]) -> Vec<String> {
        references(src, module)
            .into_iter()
            .map(|r| {
                let path: Vec<&str> = r.path.iter().map(|s| s.name.as_str()).collect();
                format!("{}@{}", path.join("::"), r.path[0].line)
            })
            .collect()
    }

    #[test]
    fn a_multi_line_use_tree_with_nested_braces_self_and_aliases() {
        let src = "use crate::{\n    cluster::{self, View as V},\n    lb::{\n        maps::{Key, Value},\n    },\n    events,\n};\n";
        assert_eq!(
            refs(src, &["agent"]),
            [
                "cluster@2",
                "cluster::View@2",
                "lb::maps::Key@3",
                "lb::maps::Value@3",
                "events@6",
            ]
        );
        let aliases: Vec<Option<String>> = references(src, &["agent"])
            .into_iter()
            .map(|r| r.imported_as)
            .collect();
        assert_eq!(aliases[1].as_deref(), Some("V"));
        assert_eq!(aliases[0].as_deref(), Some("cluster"));
    }

    #[test]
    fn inline_paths_self_and_super_resolve_from_the_files_module() {
        let src = "fn f() -> crate::cluster::View { self::g(); super::h::I; super::super::lb::J }";
        assert_eq!(
            refs(src, &["agent", "routing"]),
            [
                "cluster::View@1",
                "agent::routing::g@1",
                "agent::h::I@1",
                "lb::J@1",
            ]
        );
        // `super::` of a top-level module is the root; past the root is not a path.
        assert_eq!(
            refs("use super::{Format, table};", &["service"]),
            ["Format@1", "table@1"]
        );
        assert!(refs("use super::super::x;", &["a"]).is_empty());
    }

    #[test]
    fn comments_strings_and_chars_make_no_path() {
        let src = r##"
            // use crate::a::B;
            /* crate::b::C /* nested */ crate::c::D */
            /// [`crate::d`]
            let s = "crate::e::F";
            let r = r#"crate::f::G "quoted" "#;
            let b = b"crate::g";
            let c = '{';
            let q = '"';
            fn l<'a>(x: &'a str) -> crate::h::H { crate::i::I }
        "##;
        assert_eq!(refs(src, &["m"]), ["h::H@10", "i::I@10"]);
    }

    #[test]
    fn other_crates_and_relative_paths_are_not_edges() {
        let src = "use std::fmt;\nuse ::serde::Serialize;\nuse routing::x;\nfn f() { cluster::View::new(); }";
        assert!(refs(src, &["agent"]).is_empty());
        // In the crate root, `use a::…` is `use crate::a::…` (or another crate's path).
        assert_eq!(
            refs("pub use cluster::{Cluster, Host};", &[]),
            ["cluster::Cluster@1", "cluster::Host@1"]
        );
    }

    #[test]
    fn super_in_an_inline_module_is_its_file() {
        let src =
            "mod tests {\n    use super::*;\n    use super::super::lb::X;\n}\nuse self::y::Z;";
        assert_eq!(
            refs(src, &["overlay"]),
            ["overlay::*@2", "lb::X@3", "overlay::y::Z@5"]
        );
    }

    #[test]
    fn use_in_impl_trait_bounds_is_not_a_declaration() {
        assert_eq!(
            refs("fn f() -> impl Sized + use<> { crate::a::b() }", &["m"]),
            ["a::b@1"]
        );
    }

    fn graph(edges: &[(&str, &str)]) -> ModuleGraph {
        let mut g = ModuleGraph::default();
        for (a, b) in edges {
            g.modules.insert(a.to_string());
            g.modules.insert(b.to_string());
            g.edges.insert((a.to_string(), b.to_string()), Vec::new());
        }
        g
    }

    #[test]
    fn cycles_are_components_of_more_than_one_module() {
        let g = graph(&[
            ("agent", "http"),
            ("http", "metrics"),
            ("metrics", "agent"),
            ("cluster", "gossip"),
            ("gossip", "cluster"),
            ("lb", "cluster"),
        ]);
        assert_eq!(
            g.cycles(),
            [vec!["agent", "http", "metrics"], vec!["cluster", "gossip"]]
        );
        assert!(graph(&[("a", "b"), ("b", "c")]).cycles().is_empty());
    }

    fn file(path: &str, text: &str) -> SourceFile {
        SourceFile {
            module: module_path(Path::new("src"), Path::new(path)),
            path: PathBuf::from(path),
            text: text.into(),
        }
    }

    #[test]
    fn edges_name_their_sites_and_follow_the_roots_reexports() {
        let g = ModuleGraph::from_files(&[
            file(
                "src/lib.rs",
                "mod cluster;\nmod overlay;\npub use cluster::{Host as H};",
            ),
            file("src/cluster.rs", "use crate::overlay::Link;\n"),
            file("src/overlay/mod.rs", "mod fdb;"),
            file("src/overlay/fdb.rs", "fn f() {\n    crate::H::new();\n}"),
        ]);
        assert_eq!(g.modules.iter().collect::<Vec<_>>(), ["cluster", "overlay"]);
        let sites = |from: &str, to: &str| {
            g.edges[&(from.to_owned(), to.to_owned())]
                .iter()
                .map(|s| format!("{}:{}", s.file.display(), s.line))
                .collect::<Vec<_>>()
        };
        assert_eq!(sites("cluster", "overlay"), ["src/cluster.rs:1"]);
        assert_eq!(sites("overlay", "cluster"), ["src/overlay/fdb.rs:2"]);
        assert_eq!(g.cycles(), [vec!["cluster", "overlay"]]);
    }

    #[test]
    fn module_paths_of_files() {
        let src = Path::new("/x/src");
        let m = |p: &str| module_path(src, &src.join(p));
        assert_eq!(m("lib.rs"), Vec::<String>::new());
        assert_eq!(m("agent/mod.rs"), ["agent"]);
        assert_eq!(m("agent/routing.rs"), ["agent", "routing"]);
        assert_eq!(m("metrics.rs"), ["metrics"]);
    }

    #[test]
    fn a_forbidden_crate_is_found_through_normal_dependencies_only() {
        let metadata = serde_json::json!({
            "packages": [
                {"id": "c", "name": "meshctl"},
                {"id": "api", "name": "mesh-api"},
                {"id": "h", "name": "helper"},
                {"id": "aya", "name": "aya"},
                {"id": "ag", "name": "mesh-agent"},
            ],
            "resolve": {"nodes": [
                {"id": "c", "deps": [
                    {"pkg": "api", "dep_kinds": [{"kind": null}]},
                    {"pkg": "ag", "dep_kinds": [{"kind": "dev"}]},
                ]},
                {"id": "api", "deps": [{"pkg": "h", "dep_kinds": [{"kind": null}]}]},
                {"id": "h", "deps": [{"pkg": "aya", "dep_kinds": [{"kind": null}]}]},
                {"id": "aya", "deps": []},
                {"id": "ag", "deps": []},
            ]},
        });
        let r = Resolve::read(&metadata).unwrap();
        assert_eq!(
            r.forbidden_chains("meshctl", &["aya", "mesh-agent"])
                .unwrap(),
            [vec!["meshctl", "mesh-api", "helper", "aya"]]
        );
        assert!(
            r.forbidden_chains("helper", &["mesh-agent"])
                .unwrap()
                .is_empty()
        );
    }
}
