//! Volumes the way `docker service create --mount` and `docker volume` are used: a named
//! volume of a service pinned to one node keeps its data across `service update --force`
//! (and, for the podman driver, `--image`), `volume ls` shows it with its node, `volume rm`
//! is refused while a task uses it, a readonly bind mount refuses writes, a tmpfs works, and
//! bad input (a missing or forbidden bind source, a bad volume name, a compose volume with
//! another driver) changes nothing. Real agents on a namespace cluster.

use std::{path::PathBuf, process::Command, time::Duration};

use mesh_tests::{Cluster, Host, image::Image};
use serde_json::Value;

fn cluster(n: usize) -> Cluster {
    let mut c = Cluster::new(n).unwrap();
    c.start_agents().unwrap();
    c
}

/// A directory of this test process under /tmp, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Self {
        let p = std::env::temp_dir().join(format!("mt{}-vol-{what}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn path(&self, sub: &str) -> String {
        self.0.join(sub).to_str().unwrap().to_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The running task of a one-replica service: (its node, its local name `svc.1.<id>`).
fn running_task(c: &Cluster, service: &str, not: Option<&str>) -> (String, String) {
    c.eventually(
        Duration::from_secs(30),
        &format!("a running task of {service}"),
        |c| {
            let rows: Vec<Value> = c.host(1).meshctl_json(&["service", "ps", service])?;
            let Some(t) = rows.iter().find(|r| {
                r["history"] == false
                    && r["state"] == "Running"
                    && Some(r["id"].as_str().unwrap_or_default()) != not
            }) else {
                anyhow::bail!("no running task: {rows:?}");
            };
            Ok(Some((
                t["node"].as_str().unwrap().to_owned(),
                format!(
                    "{}.{}",
                    t["name"].as_str().unwrap(),
                    t["id"].as_str().unwrap()
                ),
            )))
        },
    )
    .unwrap()
}

fn host<'c>(c: &'c Cluster, node: &str) -> &'c Host {
    c.hosts().iter().find(|h| h.node_name() == node).unwrap()
}

/// `meshctl exec TASK -- sh -c SCRIPT` on the task's node: (success, stdout + stderr).
fn exec(h: &Host, task: &str, script: &str) -> (bool, String) {
    let out = h
        .meshctl(&["exec", task, "--", "/bin/sh", "-c", script])
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn fails_with(h: &Host, args: &[&str], says: &str) {
    let out = h.meshctl(args).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "meshctl {args:?} succeeded");
    assert!(err.contains(says), "meshctl {args:?}: {err}\nwant: {says}");
}

fn services(h: &Host) -> Vec<String> {
    let all: Vec<Value> = h.meshctl_json(&["service", "ls"]).unwrap();
    all.iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

fn volumes(h: &Host) -> Vec<(String, String)> {
    let all: Vec<Value> = h.meshctl_json(&["volume", "ls"]).unwrap();
    all.iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_owned(),
                v["node"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn a_named_volume_keeps_its_data_on_its_node_and_is_removed_only_when_unused() {
    let c = cluster(2);
    let dirs = Scratch::new("named");
    // The target exists on the host (process tasks share its file system) and stays empty
    // there: the volume is mounted in the task's own mount namespace only.
    let target = dirs.path("data");
    std::fs::create_dir_all(&target).unwrap();
    let pinned = c.host(2).node_name().to_owned();
    let h1 = c.host(1);
    h1.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "db",
        "--constraint",
        &format!("node.hostname=={pinned}"),
        "--mount",
        &format!("type=volume,source=pgdata,target={target}"),
        "-d",
        "--process",
        "--",
        "/bin/sleep",
        "3600",
    ])
    .unwrap();
    let (node, task) = running_task(&c, "db", None);
    assert_eq!(node, pinned);
    let h2 = host(&c, &node);
    // Process tasks run as nobody: a new volume is theirs to write.
    let (ok, out) = exec(
        h2,
        &task,
        &format!("id -u > {target}/who && echo rows-1 > {target}/table"),
    );
    assert!(ok, "{out}");
    let data = h2.state_dir().join("volumes/pgdata/_data");
    assert_eq!(
        std::fs::read_to_string(data.join("table")).unwrap(),
        "rows-1\n"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("who")).unwrap(),
        "65534\n"
    );
    assert!(
        std::fs::read_dir(&target).unwrap().next().is_none(),
        "the host's own directory is untouched"
    );

    // Every node lists it, with its node.
    c.eventually(Duration::from_secs(10), "volume ls on host 1", |c| {
        let v = volumes(c.host(1));
        Ok((v == [("pgdata".to_owned(), pinned.clone())]).then_some(()))
    })
    .unwrap();
    let table = h1.meshctl_ok(&["volume", "ls"]).unwrap();
    assert!(
        table
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            == ["DRIVER", "VOLUME", "NAME", "NODE"],
        "{table}"
    );
    assert!(
        table.contains("local") && table.contains(&pinned),
        "{table}"
    );
    assert_eq!(h1.meshctl_ok(&["volume", "ls", "-q"]).unwrap(), "pgdata\n");
    assert_eq!(
        h1.meshctl_ok(&["volume", "ls", "-q", "--filter", "node=nope"])
            .unwrap(),
        ""
    );
    let inspect: Vec<Value> =
        serde_json::from_str(&h1.meshctl_ok(&["volume", "inspect", "pgdata"]).unwrap()).unwrap();
    assert_eq!(inspect[0]["Name"], "pgdata");
    assert_eq!(inspect[0]["Driver"], "local");
    assert_eq!(inspect[0]["Scope"], "local");
    assert_eq!(inspect[0]["Node"], pinned.as_str());

    // In use: refused on its node; another node says where it lives.
    fails_with(h2, &["volume", "rm", "pgdata"], "volume is in use");
    fails_with(
        h1,
        &["volume", "rm", "pgdata"],
        &format!("it is on node {pinned}"),
    );

    // Replaced on the same node, the task finds the data.
    h1.meshctl_ok(&["service", "update", "--force", "-d", "db"])
        .unwrap();
    let old_id = task.rsplit('.').next().unwrap().to_owned();
    let (node, task2) = running_task(&c, "db", Some(&old_id));
    assert_eq!(node, pinned);
    assert_ne!(task2, task);
    let (ok, out) = exec(h2, &task2, &format!("cat {target}/table"));
    assert!(ok, "{out}");
    assert_eq!(out, "rows-1\n");
    let pretty = h1
        .meshctl_ok(&["service", "inspect", "--pretty", "db"])
        .unwrap();
    assert!(
        pretty.contains(&format!(
            "Mounts:\n Target:\t{target}\n  Source:\tpgdata\n  ReadOnly:\tfalse\n  Type:\t\tvolume"
        )),
        "{pretty}"
    );

    // Kept when the service goes; removable once nothing uses it.
    h1.meshctl_ok(&["service", "rm", "db"]).unwrap();
    c.eventually(Duration::from_secs(30), "db's task gone", |_| {
        let out = h2.meshctl(&["volume", "rm", "pgdata"])?;
        Ok(out.status.success().then_some(()))
    })
    .unwrap();
    assert!(!data.exists());
    c.eventually(Duration::from_secs(10), "volume ls empty", |c| {
        Ok(volumes(c.host(1)).is_empty().then_some(()))
    })
    .unwrap();

    // `volume create` on a node, and the same name on another node is another volume.
    h1.meshctl_ok(&["volume", "create", "--label", "tier=db", "made"])
        .unwrap();
    h2.meshctl_ok(&["volume", "create", "made"]).unwrap();
    c.eventually(Duration::from_secs(10), "both nodes' volumes", |c| {
        Ok((volumes(c.host(2)).len() == 2).then_some(()))
    })
    .unwrap();
    assert_eq!(
        h1.meshctl_ok(&["volume", "ls", "-q", "--filter", "label=tier=db"])
            .unwrap(),
        "made\n"
    );
    for h in [h1, h2] {
        assert_eq!(h.meshctl_ok(&["volume", "rm", "made"]).unwrap(), "made\n");
    }
}

#[test]
fn bind_mounts_and_tmpfs_are_mounted_as_asked() {
    let c = cluster(1);
    let dirs = Scratch::new("bind");
    let site = dirs.path("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(format!("{site}/index.html"), "hello\n").unwrap();
    let (html, scratch, deep) = (dirs.path("html"), dirs.path("scratch"), dirs.path("deep"));
    let h = c.host(1);
    h.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--mount",
        &format!("type=bind,source={site},target={html},readonly"),
        "--mount",
        &format!("type=tmpfs,target={scratch},tmpfs-size=1m"),
        "--mount",
        &format!("type=bind,source={site}/index.html,target={deep}/a/conf.html,readonly"),
        "-d",
        "--process",
        "--",
        "/bin/sleep",
        "3600",
    ])
    .unwrap();
    let (_, task) = running_task(&c, "web", None);
    // Mount points the host lacked were made for the task.
    let (ok, out) = exec(h, &task, &format!("cat {html}/index.html"));
    assert!(ok, "{out}");
    assert_eq!(out, "hello\n");
    // A file bound onto a file the host lacked (made empty, with its directories).
    let (ok, out) = exec(h, &task, &format!("cat {deep}/a/conf.html"));
    assert!(ok, "{out}");
    assert_eq!(out, "hello\n");
    let (ok, out) = exec(h, &task, &format!("echo x > {html}/new"));
    assert!(!ok && out.contains("Read-only file system"), "{out}");
    assert!(!std::path::Path::new(&format!("{site}/new")).exists());
    let (ok, out) = exec(
        h,
        &task,
        &format!(
            "echo y > {scratch}/f && cat {scratch}/f && grep ' {scratch} tmpfs ' /proc/mounts"
        ),
    );
    assert!(ok, "{out}");
    assert!(
        out.starts_with("y\n") && out.contains("size=1024k"),
        "{out}"
    );
    h.meshctl_ok(&["service", "rm", "web"]).unwrap();
    c.eventually(
        Duration::from_secs(30),
        "web's mount points removed",
        |_| {
            let gone = |p: &str| !std::path::Path::new(p).exists();
            Ok((gone(&scratch) && gone(&deep)).then_some(()))
        },
    )
    .unwrap();
}

#[test]
fn bad_mounts_change_nothing() {
    let c = cluster(1);
    let h = c.host(1);
    let dirs = Scratch::new("bad");
    let state = h.state_dir();
    let cases = [
        (
            format!("type=bind,source={},target=/x", dirs.path("missing")),
            "bind source path does not exist".to_owned(),
        ),
        (
            format!("type=bind,source={},target=/x", state.display()),
            "would expose".to_owned(),
        ),
        (
            "type=bind,source=/,target=/x".to_owned(),
            "would expose".to_owned(),
        ),
        (
            "type=volume,source=../../etc,target=/x".to_owned(),
            "includes invalid characters for a local volume name".to_owned(),
        ),
        (
            "type=volume,source=ok1,target=relative".to_owned(),
            "must be an absolute path".to_owned(),
        ),
    ];
    for (mount, says) in &cases {
        fails_with(
            h,
            &[
                "service",
                "create",
                "--name",
                "bad",
                "--mount",
                mount,
                "-d",
                "--process",
                "--",
                "/bin/sleep",
                "60",
            ],
            says,
        );
    }
    fails_with(
        h,
        &[
            "service",
            "create",
            "--name",
            "bad",
            "--mount",
            "source=a1,target=/x",
            "--mount",
            "type=tmpfs,target=/x",
            "-d",
            "--process",
            "--",
            "/bin/sleep",
            "60",
        ],
        "Duplicate mount point: /x",
    );
    fails_with(
        h,
        &["volume", "create", ".."],
        "includes invalid characters",
    );
    fails_with(
        h,
        &["volume", "rm", "../state"],
        "includes invalid characters",
    );
    fails_with(
        h,
        &["volume", "create", "-d", "nfs", "v1"],
        "plugin \"nfs\" not found",
    );

    // An existing service cannot be changed to a forbidden bind either.
    h.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "ok",
        "-d",
        "--process",
        "--",
        "/bin/sleep",
        "3600",
    ])
    .unwrap();
    let before: Value = h.meshctl_json(&["service", "inspect", "ok"]).unwrap();
    fails_with(
        h,
        &[
            "service",
            "update",
            "--mount-add",
            &format!("type=bind,source={},target=/x", state.display()),
            "ok",
        ],
        "would expose",
    );
    let after: Value = h.meshctl_json(&["service", "inspect", "ok"]).unwrap();
    assert_eq!(before["spec"], after["spec"]);

    // A compose volume with another driver: nothing of the stack is created.
    let compose = dirs.path("stack.yml");
    std::fs::write(
        &compose,
        "volumes:\n  data:\n    driver: nfs\nservices:\n  db:\n    command: [\"/bin/sleep\", \"60\"]\n    volumes: [\"data:/data\"]\n",
    )
    .unwrap();
    fails_with(
        h,
        &["stack", "deploy", "-c", &compose, "shop"],
        "volumes.data.driver: volume driver \"nfs\" is not supported",
    );
    // One volume for a podman and a process service: their data would live apart.
    std::fs::write(
        &compose,
        "volumes:\n  data: {}\nservices:\n  db:\n    image: postgres:16\n    volumes: [\"data:/data\"]\n  \
         backup:\n    command: [\"/bin/sleep\", \"60\"]\n    volumes: [\"data:/data\"]\n",
    )
    .unwrap();
    fails_with(
        h,
        &["stack", "deploy", "-c", &compose, "shop"],
        "volume \"shop_data\" is mounted by service shop_",
    );
    assert_eq!(services(h), ["ok"]);
    assert!(volumes(h).is_empty());
    assert!(
        !state.join("volumes").exists()
            || std::fs::read_dir(state.join("volumes"))
                .unwrap()
                .next()
                .is_none()
    );
}

/// `podman ARGS`: whether it exited 0, and its stdout and stderr.
fn podman(args: &[&str]) -> (bool, String) {
    let out = Command::new("podman").args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The container of a running task (by its label `mesh.task=NAME.ID`).
fn container(c: &Cluster, service: &str, not: Option<&str>) -> String {
    c.eventually(
        Duration::from_secs(60),
        &format!("{service}'s container"),
        |c| {
            let rows: Vec<Value> = c.host(1).meshctl_json(&["service", "ps", service])?;
            let Some(t) = rows.iter().find(|r| {
                r["history"] == false
                    && r["state"] == "Running"
                    && Some(r["id"].as_str().unwrap_or_default()) != not
            }) else {
                anyhow::bail!("no running task: {rows:?}");
            };
            let (ok, names) = podman(&[
                "ps",
                "--filter",
                &format!(
                    "label=mesh.task={}.{}",
                    t["name"].as_str().unwrap(),
                    t["id"].as_str().unwrap()
                ),
                "--format",
                "{{.Names}}",
            ]);
            if !ok || names.trim().is_empty() {
                anyhow::bail!("no container yet: {names}");
            }
            Ok(Some(names.trim().to_owned()))
        },
    )
    .unwrap()
}

#[test]
fn a_podman_volume_keeps_its_data_across_an_image_update() {
    let image = Image::busybox("volsleep", r#"["/bin/sleep","3600"]"#).unwrap();
    // A second tag of the same offline image: `--image` changes what the task runs.
    let second = format!("{}-v2", image.name().replace(':', "-"));
    let (ok, out) = podman(&["tag", image.name(), &format!("{second}:2")]);
    assert!(ok, "{out}");
    let second = format!("{second}:2");
    let volume = format!("mt{}-pgdata", std::process::id());
    let c = cluster(1);
    let h = c.host(1);
    h.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "db",
        "--mount",
        &format!("type=volume,source={volume},target=/data,volume-label=tier=db"),
        "--mount",
        "type=tmpfs,target=/cache",
        "-d",
        image.name(),
    ])
    .unwrap();
    let first = container(&c, "db", None);
    let (ok, out) = podman(&[
        "exec",
        &first,
        "sh",
        "-c",
        "echo rows-1 > /data/table && echo c > /cache/f",
    ]);
    assert!(ok, "{out}");
    // A podman volume, labelled with the node that made it.
    let (ok, out) = podman(&[
        "volume",
        "inspect",
        "--format",
        "{{index .Labels \"mesh.node\"}} {{index .Labels \"tier\"}}",
        &volume,
    ]);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), format!("{} db", h.node_name()));
    fails_with(h, &["volume", "rm", &volume], "volume is in use");

    h.meshctl_ok(&["service", "update", "--image", &second, "-d", "db"])
        .unwrap();
    let rows: Vec<Value> = h.meshctl_json(&["service", "ps", "db"]).unwrap();
    let old = rows
        .iter()
        .find(|r| r["history"] == false)
        .map(|r| r["id"].as_str().unwrap().to_owned());
    let next = c.eventually(Duration::from_secs(60), "the updated container", |c| {
        let n = container(c, "db", None);
        let (_, img) = podman(&["inspect", "--format", "{{.ImageName}}", &n]);
        Ok((n != first && img.trim() == second).then_some(n))
    });
    let next = next.unwrap_or_else(|e| panic!("{e:#} (old task {old:?})"));
    let (ok, out) = podman(&["exec", &next, "cat", "/data/table"]);
    assert!(ok, "{out}");
    assert_eq!(out, "rows-1\n");
    // A tmpfs is the task's own: the new one starts empty.
    let (ok, _) = podman(&["exec", &next, "cat", "/cache/f"]);
    assert!(!ok);

    h.meshctl_ok(&["service", "rm", "db"]).unwrap();
    c.eventually(Duration::from_secs(60), "the volume removable", |c| {
        Ok(c.host(1)
            .meshctl(&["volume", "rm", &volume])?
            .status
            .success()
            .then_some(()))
    })
    .unwrap();
    let (exists, _) = podman(&["volume", "exists", &volume]);
    assert!(!exists, "the podman volume is gone with `volume rm`");
    let _ = podman(&["rmi", &second]);
}

#[test]
fn a_stack_file_with_volumes_and_tmpfs_deploys_and_keeps_its_volume() {
    let c = cluster(1);
    let h = c.host(1);
    let dirs = Scratch::new("stack");
    let (data, scratch) = (dirs.path("data"), dirs.path("scratch"));
    std::fs::create_dir_all(&data).unwrap();
    let compose = dirs.path("stack.yml");
    std::fs::write(
        &compose,
        format!(
            "volumes:\n  data:\n    driver: local\n    labels: {{ tier: db }}\n\
             services:\n  db:\n    command: [\"/bin/sleep\", \"3600\"]\n\
             \x20   volumes:\n      - data:{data}\n\
             \x20   tmpfs:\n      - {scratch}:size=1m\n"
        ),
    )
    .unwrap();
    h.meshctl_ok(&["stack", "deploy", "-c", &compose, "shop"])
        .unwrap();
    let (_, task) = running_task(&c, "shop_db", None);
    let (ok, out) = exec(
        h,
        &task,
        &format!("echo kept > {data}/f && grep -c ' {scratch} tmpfs ' /proc/mounts"),
    );
    assert!(ok, "{out}");
    assert_eq!(out, "1\n");
    // Named `<stack>_<name>`, with the stack's label and its own.
    c.eventually(Duration::from_secs(10), "the stack's volume listed", |c| {
        let out = c.host(1).meshctl_ok(&[
            "volume",
            "ls",
            "-q",
            "--filter",
            "label=com.docker.stack.namespace=shop",
            "--filter",
            "label=tier=db",
        ])?;
        Ok((out == "shop_data\n").then_some(()))
    })
    .unwrap();
    // `stack rm` keeps volumes, as Docker's does.
    h.meshctl_ok(&["stack", "rm", "shop"]).unwrap();
    c.eventually(Duration::from_secs(30), "the volume removable", |c| {
        Ok(c.host(1)
            .meshctl(&["volume", "rm", "shop_data"])?
            .status
            .success()
            .then_some(()))
    })
    .unwrap();
    assert!(volumes(h).is_empty());
}
