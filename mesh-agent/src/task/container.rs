//! The `podman` driver: a task whose template names an image runs as a podman container in
//! the network namespace the agent prepared (`--network ns:/run/netns/<task netns>`), so the
//! agent keeps owning the plumbing — overlay, gateway egress, routing mesh, VIPs and DNS work
//! as for process tasks — and podman owns the rest (image, rootfs, PID/mount/UTS namespaces,
//! cgroups, logs).
//!
//! The container is named after the task's namespace (`<node>-<task>`, unique on the kernel
//! even with several agents on it) and labelled with the node and task, so a restarted agent
//! finds its containers and never starts a second copy. The container's init process is
//! followed through a pidfd like a process task's; its exit status comes from podman, which
//! (through conmon) is its parent.

use std::{
    path::Path,
    process::{Output, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::process::Command;

use super::process::{self, Exit, Spawned};

/// Labels every mesh container carries.
pub(super) const LABEL_NODE: &str = "mesh.node";
pub(super) const LABEL_TASK: &str = "mesh.task";

/// What `podman run` gets.
pub(super) struct Run<'a> {
    /// podman's and conmon's working directory (see [`workdir`]).
    pub workdir: &'a Path,
    pub container: &'a str,
    pub node: &'a str,
    pub task: &'a str,
    pub image: &'a str,
    /// Replace the image's CMD (empty: keep it).
    pub args: &'a [String],
    pub env: &'a [(String, String)],
    pub hostname: &'a str,
    /// Entrypoint, user, working directory, stop signal, labels.
    pub run: &'a mesh_api::spec::RunOptions,
    /// `--cap-add`, `--cap-drop`, `--read-only`, `--sysctl`, `--ulimit`, `--init`.
    pub security: &'a mesh_api::spec::Security,
    pub netns: &'a Path,
    pub nameservers: &'a [std::net::Ipv4Addr],
    pub dns_search: &'a [String],
    pub dns_options: &'a [String],
    /// conmon truncates the container's log past this (podman's k8s-file driver keeps no
    /// old files, so `max-file` has no podman equivalent).
    pub log_max_size: u64,
    /// `-v` arguments: the task's secrets and configs (see `files`).
    pub volumes: &'a [String],
    /// `--mount` arguments: its volumes, bind mounts and tmpfs (see `volumes`).
    pub mounts: &'a [String],
    /// `--memory`, `--cpus`, `--pids-limit`: runc writes them to the container's cgroups,
    /// v1 or v2.
    pub limits: &'a mesh_api::spec::Limits,
}

/// podman with the flags this kernel needs, whatever the host's containers.conf says: runc
/// (crun refuses hybrid cgroups) and no other configuration is changed for the host's own
/// containers.
fn podman() -> Command {
    let mut cmd = Command::new("podman");
    if runc_available() {
        cmd.args(["--runtime", "runc"]);
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

/// podman as the task driver runs it, for other commands (volumes).
pub(super) fn podman_command() -> Command {
    podman()
}

fn runc_available() -> bool {
    static RUNC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *RUNC.get_or_init(|| {
        std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("runc").is_file()))
    })
}

/// Whether podman can run containers here: what the node advertises as its `podman` driver.
/// `podman info` starts no container but does check storage and the runtime.
pub async fn available() -> bool {
    let out = podman()
        .args(["info", "--format", "{{.Host.OCIRuntime.Name}}"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output();
    match tokio::time::timeout(Duration::from_secs(20), out).await {
        Ok(Ok(out)) if out.status.success() => true,
        Ok(Ok(out)) => {
            tracing::info!(
                "podman is installed but does not work here ({}); the podman driver is off",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            false
        }
        Ok(Err(_)) => false,
        Err(_) => {
            tracing::warn!("podman info did not answer within 20 s; the podman driver is off");
            false
        }
    }
}

/// How long the creating node waits for an image it lacks; a registry that says nothing in
/// this time is as good as unreachable for the command waiting on it.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(120);

/// Docker's image resolution at `service create`/`update`: the image must be found here or
/// on its registry before the spec changes, so a typo in a tag is the command's error
/// rather than every node's failing tasks. An image this node lacks is pulled (podman has
/// no manifest-only query for every transport); the nodes then find it in their own
/// storage or pull it themselves. Err carries podman's or the registry's own words.
/// `auth`: credentials for the image's registry (`--with-registry-auth`), used for this pull
/// only.
pub async fn resolve(
    image: &str,
    auth: Option<&mesh_api::v1::RegistryAuth>,
) -> std::result::Result<(), String> {
    let exists = podman()
        .args(["image", "exists", image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map_err(|e| format!("running podman: {e}"))?;
    if exists.success() {
        return Ok(());
    }
    // The credentials go to podman in a file only root can read, never on its command line
    // (which every user of the host can read), and the file is gone when the pull is.
    let auth_file = match auth {
        Some(a) => Some(AuthFile::write(image, a).map_err(|e| format!("{e:#}"))?),
        None => None,
    };
    let mut pull = podman();
    pull.args(["pull", "--quiet"]);
    if let Some(f) = &auth_file {
        pull.arg("--authfile").arg(&f.path);
    }
    let pull = pull
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    match tokio::time::timeout(RESOLVE_TIMEOUT, pull).await {
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => Err(registry_message(&String::from_utf8_lossy(&out.stderr))),
        Ok(Err(e)) => Err(format!("running podman: {e}")),
        Err(_) => Err(format!(
            "its registry did not answer within {}s",
            RESOLVE_TIMEOUT.as_secs()
        )),
    }
}

/// A podman auth file with one registry's credentials, in a directory of its own (0700),
/// removed when dropped.
struct AuthFile {
    dir: std::path::PathBuf,
    path: std::path::PathBuf,
}

impl AuthFile {
    fn write(image: &str, auth: &mesh_api::v1::RegistryAuth) -> Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let mut rand = [0u8; 8];
        getrandom::fill(&mut rand).context("OS randomness")?;
        let dir = std::env::temp_dir().join(format!(
            "mesh-pull-{}",
            rand.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let file = Self {
            path: dir.join("auth.json"),
            dir,
        };
        let registry = mesh_api::spec::registry_of(image);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file.path)
            .with_context(|| format!("creating {}", file.path.display()))?;
        std::io::Write::write_all(&mut f, &auth_file_json(registry, auth))
            .with_context(|| format!("writing {}", file.path.display()))?;
        Ok(file)
    }
}

impl Drop for AuthFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// podman's auth file holding `auth` alone (`{"auths": {registry: {"auth": base64}}}`).
fn auth_file_json(registry: &str, auth: &mesh_api::v1::RegistryAuth) -> Vec<u8> {
    use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
    let token = BASE64.encode(format!("{}:{}", auth.username, auth.password));
    serde_json::to_vec(&serde_json::json!({ "auths": { registry: { "auth": token } } }))
        .expect("json serialises")
}

/// Images this agent has pulled ahead of their tasks, or is pulling now.
static PREFETCHED: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// [`resolve`] in the background, once per image: a node whose old tasks still serve pulls
/// the new image meanwhile. A failure is forgotten, so a later pass tries again, and the
/// task's own start pulls (and reports the registry's reason) anyway.
pub fn prefetch(image: &str, auth: Option<mesh_api::v1::RegistryAuth>) {
    let first = PREFETCHED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(image.to_owned());
    if !first {
        return;
    }
    let image = image.to_owned();
    tokio::spawn(async move {
        match resolve(&image, auth.as_ref()).await {
            Ok(()) => tracing::info!(image, "image ready ahead of the update's tasks"),
            Err(why) => {
                tracing::warn!(image, why, "pulling ahead of the update failed");
                PREFETCHED
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&image);
            }
        }
    });
}

/// The last line podman prints on a failed pull: the registry's (or the resolver's) reason,
/// without the retry chatter before it.
fn registry_message(stderr: &str) -> String {
    stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| l.trim_start_matches("Error: ").to_owned())
        .unwrap_or_else(|| "podman pull failed".into())
}

/// rlimits a container may have: podman's defaults exceed what some hosts (this VM kind,
/// without CAP_SYS_RESOURCE) allow, and setrlimit then fails the start. The agent's own hard
/// limits bound what a child may set; conmon, between podman and the container, was measured
/// to run with at most 32768 processes, so nproc is capped there too.
/// The task's own `--ulimit`s replace these defaults name by name.
fn ulimits(own: &[mesh_api::spec::Ulimit]) -> Vec<String> {
    const CONMON_NPROC: u64 = 32_768;
    let hard = |res| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into a valid struct.
        let ok = unsafe { libc::getrlimit(res, &mut lim) } == 0;
        ok.then_some(lim.rlim_max)
    };
    let mut out = Vec::new();
    for (name, res, cap) in [
        ("nofile", libc::RLIMIT_NOFILE, 1_048_576),
        ("nproc", libc::RLIMIT_NPROC, CONMON_NPROC),
    ] {
        if own.iter().any(|u| u.name == name) {
            continue;
        }
        if let Some(h) = hard(res) {
            let n = h.min(cap);
            out.push(format!("{name}={n}:{n}"));
        }
    }
    out.extend(
        own.iter()
            .map(|u| format!("{}={}:{}", u.name, u.soft, u.hard)),
    );
    out
}

/// Docker's security flags as podman takes them; names are checked again here, so a record
/// written by an older or foreign node cannot smuggle an option into the command line.
fn security_options(cmd: &mut Command, s: &mesh_api::spec::Security) -> Result<()> {
    s.validate().map_err(anyhow::Error::msg)?;
    for c in &s.cap_drop {
        cmd.args(["--cap-drop", c]);
    }
    for c in &s.cap_add {
        cmd.args(["--cap-add", c]);
    }
    if s.read_only {
        cmd.arg("--read-only");
    }
    for (k, v) in &s.sysctls {
        cmd.args(["--sysctl", &format!("{k}={v}")]);
    }
    if s.init {
        cmd.arg("--init");
    }
    Ok(())
}

/// Runs podman and fails with its stderr, which says what is wrong (no such image, ...).
async fn checked(cmd: &mut Command, what: &str) -> Result<Output> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .with_context(|| format!("running podman to {what} (is podman installed?)"))?;
    if !out.status.success() {
        bail!(
            "podman could not {what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A container podman started.
pub(super) enum Started {
    Running(Spawned),
    /// It already ended, with this status.
    Exited(Exit),
}

/// Starts the container detached and follows its init process.
pub(super) async fn run(r: &Run<'_>) -> Result<Started> {
    // A container of this name is a leftover (its record is gone): this task replaces it.
    remove(r.container).await?;
    // Pulled as a step of its own, so a failure is the registry's one-line reason (Docker's
    // "No such image" / "pull access denied") rather than podman run's retry chatter.
    // The orchestrator pulled it (with the service's credentials) before the start.
    resolve(r.image, None)
        .await
        .map_err(|why| anyhow::anyhow!("pull {}: {why}", r.image))?;
    let mut cmd = podman();
    cmd.current_dir(r.workdir);
    cmd.args(["run", "-d", "--name", r.container])
        .arg(format!("--network=ns:{}", r.netns.display()))
        .args(["--hostname", r.hostname])
        .args(["--label", &format!("{LABEL_NODE}={}", r.node)])
        .args(["--label", &format!("{LABEL_TASK}={}", r.task)])
        // The orchestrator restarts tasks by the service's policy; podman must not.
        .args(["--restart", "no"]);
    for ns in r.nameservers {
        cmd.args(["--dns", &ns.to_string()]);
    }
    for d in r.dns_search {
        cmd.args(["--dns-search", d]);
    }
    for o in r.dns_options {
        cmd.args(["--dns-opt", o]);
    }
    for h in &r.run.hosts {
        // Checked again here: a record from any node must not smuggle in an option.
        h.validate().map_err(anyhow::Error::msg)?;
        cmd.arg(format!("--add-host={}:{}", h.host, h.ip));
    }
    // The node's cap holds for containers too: a service cannot fill the node's disk.
    cmd.args(["--log-driver", "k8s-file"])
        .arg(format!("--log-opt=max-size={}", r.log_max_size));
    for u in ulimits(&r.security.ulimits) {
        cmd.args(["--ulimit", &u]);
    }
    security_options(&mut cmd, r.security)?;
    for (k, v) in r.env {
        cmd.args(["-e", &format!("{k}={v}")]);
    }
    for v in r.volumes {
        cmd.args(["-v", v]);
    }
    for m in r.mounts {
        cmd.args(["--mount", m]);
    }
    run_options(&mut cmd, r.run);
    cmd.args(limit_flags(r.limits));
    cmd.arg(r.image).args(r.args);
    checked(
        &mut cmd,
        &format!("start image {} as {}", r.image, r.container),
    )
    .await?;
    match follow(r.container).await {
        Ok(s) => Ok(s),
        Err(e) => {
            let _ = remove(r.container).await;
            Err(e)
        }
    }
}

/// `--entrypoint`, `--user`, `--workdir`, `--stop-signal`, `--label` as podman takes them.
fn run_options(cmd: &mut Command, run: &mesh_api::spec::RunOptions) {
    if let Some(e) = &run.entrypoint {
        // The JSON form keeps each word whole, spaces included.
        cmd.arg(format!(
            "--entrypoint={}",
            serde_json::to_string(e).unwrap_or_default()
        ));
    }
    if let Some(u) = &run.user {
        cmd.args(["--user", u]);
    }
    if let Some(w) = &run.workdir {
        cmd.args(["--workdir", w]);
    }
    if let Some(s) = &run.stop_signal {
        cmd.args(["--stop-signal", s]);
    }
    for (k, v) in &run.container_labels {
        cmd.args(["--label", &format!("{k}={v}")]);
    }
}

/// Docker's own flags for a task's limits; none for a limit that is not set.
fn limit_flags(limits: &mesh_api::spec::Limits) -> Vec<String> {
    let mut flags = Vec::new();
    if limits.memory_bytes > 0 {
        flags.push(format!("--memory={}b", limits.memory_bytes));
    }
    if limits.nano_cpus > 0 {
        // Exact: nine decimals are what a nano-CPU count is.
        let whole = limits.nano_cpus / 1_000_000_000;
        let frac = limits.nano_cpus % 1_000_000_000;
        flags.push(format!("--cpus={whole}.{frac:09}"));
    }
    if limits.pids > 0 {
        flags.push(format!("--pids-limit={}", limits.pids));
    }
    flags
}

/// A directory of the container's own for podman to run in: conmon writes an `oom` file in
/// its working directory when the kernel OOM-kills the container (measured: with runc on a
/// v1 memory hierarchy podman then still reports `State.OOMKilled` false), and that file
/// belongs with its container, not wherever the agent was started.
pub(super) fn workdir(state_dir: &Path, container: &str) -> Result<std::path::PathBuf> {
    let dir = state_dir.join("podman").join(container);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

pub(super) fn remove_workdir(state_dir: &Path, container: &str) {
    let _ = std::fs::remove_dir_all(state_dir.join("podman").join(container));
}

/// Whether the kernel killed the container for going over its memory limit (Docker's
/// `State.OOMKilled`, or conmon's `oom` file), read before the container is removed.
pub(super) async fn oom_killed(state_dir: &Path, container: &str) -> bool {
    if state_dir
        .join("podman")
        .join(container)
        .join("oom")
        .exists()
    {
        return true;
    }
    let out = podman()
        .args(["inspect", "--format", "{{.State.OOMKilled}}", container])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output();
    match tokio::time::timeout(Duration::from_secs(30), out).await {
        Ok(Ok(o)) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim() == "true",
        _ => false,
    }
}

/// The container's init process, by the PID podman reports.
async fn follow(container: &str) -> Result<Started> {
    let out = checked(
        podman().args(["inspect", "--format", "{{.State.Pid}}", container]),
        &format!("inspect {container}"),
    )
    .await?;
    let pid: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .with_context(|| format!("podman gave no PID for {container}"))?;
    // 0: already exited. The PID may also exit between inspect and pidfd_open.
    let followed = (pid != 0)
        .then(|| process::pidfd_open(pid).ok())
        .flatten()
        .and_then(|pidfd| {
            let (state, start_time) = process::stat(pid).ok()?;
            (state != 'Z' && state != 'X').then_some(Spawned {
                pid,
                start_time,
                pidfd,
            })
        });
    match followed {
        Some(s) => Ok(Started::Running(s)),
        None => {
            let exit = exit(container).await;
            tracing::debug!(container, code = ?exit.code, "container ended at once: {}", logs_tail(container).await);
            Ok(Started::Exited(exit))
        }
    }
}

/// The last lines a container wrote, to explain a failed start.
async fn logs_tail(container: &str) -> String {
    match podman()
        .args(["logs", "--tail", "5", container])
        .output()
        .await
    {
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            if text.trim().is_empty() {
                "it wrote nothing".into()
            } else {
                text.trim().to_owned()
            }
        }
        Err(e) => format!("its logs are unreadable: {e}"),
    }
}

/// How the container ended, once it has: podman's exit code (128+N for a signal N, as
/// Docker reports it). Unknown if the container is gone.
pub(super) async fn exit(container: &str) -> Exit {
    let unknown = Exit {
        code: None,
        signal: None,
    };
    // `podman wait` returns once conmon recorded the exit (the process may be gone a moment
    // earlier); bounded, in case the container was removed behind our back.
    let waited = tokio::time::timeout(
        Duration::from_secs(30),
        podman().args(["wait", container]).output(),
    )
    .await;
    match waited {
        Ok(Ok(out)) if out.status.success() => Exit {
            code: String::from_utf8_lossy(&out.stdout).trim().parse().ok(),
            signal: None,
        },
        _ => unknown,
    }
}

/// SIGTERM, then SIGKILL after `grace` (`podman stop -t`).
pub(super) async fn stop(container: &str, grace: Duration) -> Result<()> {
    let secs = grace.as_secs().max(1).to_string();
    checked(
        podman().args(["stop", "--ignore", "-t", &secs, container]),
        &format!("stop {container}"),
    )
    .await?;
    Ok(())
}

/// Removes the container (stopping it hard if it runs); a missing one is fine.
pub(super) async fn remove(container: &str) -> Result<()> {
    checked(
        podman().args(["rm", "--force", "--ignore", "--time", "0", container]),
        &format!("remove {container}"),
    )
    .await?;
    Ok(())
}

/// `podman exec`: a command in the running container, with its output.
pub(super) async fn exec(
    container: &str,
    command: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> Result<Output> {
    let mut cmd = podman();
    cmd.arg("exec");
    for (k, v) in env {
        cmd.args(["-e", &format!("{k}={v}")]);
    }
    cmd.arg(container)
        .args(command)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .with_context(|| format!("running podman exec in {container}"))?;
    let output = super::logs::bounded_output(child, super::logs::EXEC_OUTPUT_LIMIT);
    match tokio::time::timeout(timeout, output).await {
        Ok(out) => out.with_context(|| format!("running podman exec in {container}")),
        Err(_) => bail!("the command did not finish within {timeout:?} and was killed"),
    }
}

/// `podman logs [-f]` of the container, ready to spawn with piped output.
pub(super) fn logs(container: &str, q: &mesh_api::v1::LogsQuery) -> Command {
    let mut cmd = podman();
    cmd.args(["logs", "--timestamps"]);
    if q.follow {
        cmd.arg("--follow");
    }
    if let Some(n) = q.tail {
        cmd.arg(format!("--tail={n}"));
    }
    if let Some(since) = q.since_ns {
        cmd.arg(format!("--since={}", mesh_api::v1::format_timestamp(since)));
    }
    cmd.arg(container)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Containers labelled as this node's, by name: what an agent start reconciles against its
/// records.
pub(super) async fn list(node: &str) -> Result<Vec<String>> {
    let out = checked(
        podman().args([
            "ps",
            "--all",
            "--filter",
            &format!("label={LABEL_NODE}={node}"),
            "--format",
            "{{.Names}}",
        ]),
        "list this node's containers",
    )
    .await?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_auth_file_holds_the_one_registry() {
        use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
        let auth = mesh_api::v1::RegistryAuth {
            username: "u".into(),
            password: "p w".into(),
            server_address: "r:5000".into(),
        };
        let v: serde_json::Value =
            serde_json::from_slice(&auth_file_json("r:5000", &auth)).unwrap();
        assert_eq!(v["auths"]["r:5000"]["auth"], BASE64.encode("u:p w"));
        assert_eq!(v["auths"].as_object().unwrap().len(), 1);
        assert_eq!(
            format!("{auth:?}"),
            "RegistryAuth(u@r:5000)",
            "no password in Debug"
        );
    }

    #[test]
    fn limits_become_podmans_flags() {
        let l = mesh_api::spec::Limits {
            nano_cpus: 1_500_000_000,
            memory_bytes: 512 << 20,
            pids: 200,
        };
        assert_eq!(
            limit_flags(&l),
            [
                "--memory=536870912b",
                "--cpus=1.500000000",
                "--pids-limit=200"
            ]
        );
        assert!(limit_flags(&Default::default()).is_empty());
    }
}
