//! Seed 001's rolling update with images: a service of one image, `service update --image`
//! to the next while every node keeps answering, `service ps` showing the old image on the
//! `\_` rows, `service rollback` back to the first, and the refusals that change nothing.

use std::{collections::BTreeMap, time::Duration};

use mesh_tests::{Cluster, Host, availability::Probe, image::Image, workload::tally};
use serde_json::Value;

/// An image whose HTTP server on port 80 answers `<version> <hostname>`.
fn versioned(version: &str) -> Image {
    Image::busybox(
        version,
        &format!(
            r#"["/bin/sh","-c","trap 'exit 0' TERM; echo {version} $(hostname) > /www/index.html; httpd -f -p 80 -h /www & wait"]"#
        ),
    )
    .unwrap()
}

fn cluster(n: usize) -> Cluster {
    let mut c = Cluster::new(n).unwrap();
    for i in 1..=n {
        c.host_mut(i).start_agent(&[]).unwrap();
    }
    c.create_network("app", "10.62.0.0/24").unwrap();
    c.external("client", 100).unwrap();
    c
}

/// What `n` requests to a node's published port answered, by version (`v1`, `v2`).
fn versions(c: &Cluster, h: &Host, n: usize) -> BTreeMap<String, usize> {
    let a: std::net::SocketAddr = format!("{}:8080", h.ip).parse().unwrap();
    let answers = c
        .external_ns("client")
        .unwrap()
        .run(move || {
            (0..n)
                .map(|_| {
                    let body = mesh_tests::workload::http_get(a).unwrap();
                    body.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned()
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    tally(answers)
}

/// Waits until every node's answers all come from `version`.
fn all_answer(c: &Cluster, version: &str) {
    c.eventually(
        Duration::from_secs(60),
        &format!("every node answers {version}"),
        |c| {
            for h in c.hosts() {
                let got = versions(c, h, 6);
                if got.keys().ne([version]) {
                    anyhow::bail!("{} answered {got:?}", h.node_name());
                }
            }
            Ok(Some(()))
        },
    )
    .unwrap();
}

fn spec_version(h: &Host, name: &str) -> u64 {
    let s: Value = h.meshctl_json(&["service", "inspect", name]).unwrap();
    s["spec"]["version"].as_u64().unwrap()
}

#[test]
fn an_image_service_rolls_to_a_new_image_shows_the_old_one_in_its_history_and_rolls_back() {
    let (v1, v2) = (versioned("v1"), versioned("v2"));
    let c = cluster(3);
    let h = c.host(1);
    // Docker's order: options, then the image (seed 001's `service create --name my-web …
    // nginx:latest`).
    h.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "app",
        "--replicas",
        "3",
        "--publish",
        "published=8080,target=80",
        v1.name(),
    ])
    .unwrap();
    all_answer(&c, "v1");

    // Seed 001, step 6, while a client outside counts failures through host 2: flags before
    // the name, as Docker's CLI takes them. Without --detach the command follows the
    // rollout and fails if it does not converge.
    let addr = format!("{}:8080", c.host(2).ip).parse().unwrap();
    let client = Probe::start(c.external_ns("client").unwrap(), addr).unwrap();
    let out = h
        .meshctl_ok(&[
            "service",
            "update",
            "--image",
            v2.name(),
            "--update-delay",
            "1s",
            "web",
        ])
        .unwrap();
    assert!(out.contains("converged"), "{out}");
    // Stop-first, one slot at a time: the other two tasks keep answering while a slot's
    // container is replaced, so no request may fail and no answer may pause for as long as
    // a dropped SYN's retransmit (1 s); 500 ms is what the process-task updates hold too.
    client
        .finish()
        .assert_available("the --image rolling update", Duration::from_millis(500));
    all_answer(&c, "v2");

    let rows: Vec<Value> = h.meshctl_json(&["service", "ps", "web"]).unwrap();
    let current: Vec<&Value> = rows.iter().filter(|r| r["history"] == false).collect();
    let history: Vec<&Value> = rows.iter().filter(|r| r["history"] == true).collect();
    assert_eq!(current.len(), 3, "{rows:?}");
    assert!(
        current
            .iter()
            .all(|r| r["image"] == v2.name() && r["state"] == "Running")
    );
    assert!(
        history.len() >= 3
            && history
                .iter()
                .all(|r| r["image"] == v1.name() && r["desired"] == "Shutdown"),
        "the replaced tasks ran v1 and were shut down: {history:?}"
    );
    let table = h.meshctl_ok(&["service", "ps", "web"]).unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.contains(" \\_ web.") && l.contains(v1.name())),
        "a \\_ row shows the old image: {table}"
    );

    let out = h.meshctl_ok(&["service", "rollback", "web"]).unwrap();
    assert!(
        out.contains("rolled back") || out.contains("converged"),
        "{out}"
    );
    all_answer(&c, "v1");

    // Without --name the service is named after its image.
    h.meshctl_ok(&["service", "create", "-d", "--network", "app", v2.name()])
        .unwrap();
    let ls: Vec<Value> = h.meshctl_json(&["service", "ls"]).unwrap();
    let base = v2
        .name()
        .rsplit('/')
        .next()
        .unwrap()
        .split(':')
        .next()
        .unwrap();
    let named = ls
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .find(|n| n.starts_with(&format!("{base}-")))
        .unwrap_or_else(|| panic!("a service named after {base}: {ls:?}"));

    // Docker's listing options: IDs only, filters, several services at once.
    let lines = |args: &[&str]| -> Vec<String> {
        h.meshctl_ok(args)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    // A replaced task's record says Shutdown once its node has stopped it, a moment after
    // the rollback converged.
    c.eventually(Duration::from_secs(15), "3 tasks desired running", |_| {
        let running = lines(&[
            "service",
            "ps",
            "-q",
            "--filter",
            "desired-state=running",
            "web",
        ]);
        if running.len() != 3 {
            anyhow::bail!("{running:?}");
        }
        Ok(Some(()))
    })
    .unwrap();
    let web_id = lines(&["service", "ls", "-q", "--filter", "name=web"]);
    assert_eq!(web_id.len(), 1, "{web_id:?}");
    let bad = h
        .meshctl(&["service", "ls", "--filter", "colour=red"])
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("name="));
    let out = h
        .meshctl(&["service", "rm", "web", &named, "nosuch"])
        .unwrap();
    assert!(
        !out.status.success(),
        "an unknown service fails the command"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuch"));
    assert!(
        lines(&["service", "ls", "-q"]).is_empty(),
        "the services that exist were removed"
    );
}

#[test]
fn an_image_update_that_cannot_be_says_why_and_changes_nothing() {
    let c = cluster(1);
    let h = c.host(1);
    let whoami = mesh_tests::cluster::bin("mesh-whoami");
    h.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "proc",
        "--network",
        "app",
        "-d",
        "--process",
        "--",
        whoami.to_str().unwrap(),
    ])
    .unwrap();
    let before = spec_version(h, "proc");
    for (args, says) in [
        (
            vec!["service", "update", "--image", "localhost/x:1", "proc"],
            "runs a command, not an image",
        ),
        (
            vec!["service", "update", "--image", "", "proc"],
            "--image is empty",
        ),
        (
            vec!["service", "update", "--image", "localhost/x:1", "nosuch"],
            "not found",
        ),
    ] {
        let out = h.meshctl(&args).unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(
        spec_version(h, "proc"),
        before,
        "a refused update changes nothing"
    );
}

/// `podman inspect` of the one container carrying `label`.
fn inspect_labelled(label: &str) -> Value {
    let out = std::process::Command::new("podman")
        .args(["ps", "-a", "-q", "--filter", &format!("label={label}")])
        .output()
        .unwrap();
    let ids = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(
        ids.lines().count(),
        1,
        "one container labelled {label}: {ids:?}"
    );
    let out = std::process::Command::new("podman")
        .args(["inspect", &ids])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0].clone()
}

#[test]
fn an_image_task_runs_as_it_is_told_and_a_process_task_refuses_what_only_images_have() {
    let v1 = versioned("v1");
    let c = cluster(1);
    let h = c.host(1);
    let env_file = c.log_dir().join("web.env");
    std::fs::write(&env_file, "# settings\nMODE=prod\nLEVEL=3\n").unwrap();
    let label = format!("mesh-test={}", std::process::id());
    h.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "app",
        "--user",
        "1000:1000",
        "--workdir",
        "/tmp",
        "--stop-signal",
        "SIGINT",
        "--container-label",
        &label,
        "--env-file",
        env_file.to_str().unwrap(),
        "-e",
        "LEVEL=4",
        "--entrypoint",
        "/bin/sh -c",
        "--cap-drop",
        "ALL",
        "--cap-add",
        "NET_BIND_SERVICE",
        "--read-only",
        "--ulimit",
        "nofile=1024:2048",
        v1.name(),
        "echo started in $(pwd); exec sleep 1000",
    ])
    .unwrap();
    let ctr = inspect_labelled(&label);
    // The security flags reach podman, and the kernel holds them.
    let host = &ctr["HostConfig"];
    assert_eq!(
        ctr["EffectiveCaps"],
        serde_json::json!(["CAP_NET_BIND_SERVICE"])
    );
    assert!(
        host["CapDrop"].to_string().contains("CAP_CHOWN"),
        "{host:#}"
    );
    assert_eq!(host["ReadonlyRootfs"], true, "{host:#}");
    assert!(
        host["Ulimits"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["Name"] == "RLIMIT_NOFILE" && u["Soft"] == 1024 && u["Hard"] == 2048),
        "{host:#}"
    );
    let pid = ctr["State"]["Pid"].as_u64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.lines().any(|l| l == "CapBnd:\t0000000000000400"),
        "{status}"
    );
    let config = &ctr["Config"];
    assert_eq!(config["User"], "1000:1000", "{config:#}");
    assert_eq!(config["WorkingDir"], "/tmp", "{config:#}");
    // podman reports the signal by number or by name, depending on its version.
    assert!(
        config["StopSignal"] == 2 || config["StopSignal"] == "SIGINT",
        "{config:#}"
    );
    let entrypoint = config["Entrypoint"].to_string();
    assert!(
        entrypoint.contains("/bin/sh") && entrypoint.contains("-c"),
        "{entrypoint}"
    );
    let env = config["Env"].to_string();
    assert!(
        env.contains("MODE=prod") && env.contains("LEVEL=4"),
        "--env wins over the file: {env}"
    );
    assert!(!env.contains("LEVEL=3"), "{env}");

    // Process tasks run as the agent's user with their command as given: what only an image
    // has is refused, and nothing is created.
    let whoami = mesh_tests::cluster::bin("mesh-whoami");
    // (`--user` applies to process tasks too: tests/tests/isolation.rs.)
    for (flag, value) in [("--entrypoint", "/bin/sh"), ("--container-label", "a=b")] {
        let out = h
            .meshctl(&[
                "service",
                "create",
                "--name",
                "proc",
                "--process",
                flag,
                value,
                "--",
                whoami.to_str().unwrap(),
            ])
            .unwrap();
        assert!(
            !out.status.success(),
            "{flag} on a process task was accepted"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("only applies to image tasks"), "{flag}: {err}");
    }
    let ls: Vec<Value> = h.meshctl_json(&["service", "ls"]).unwrap();
    assert_eq!(ls.len(), 1, "only web exists: {ls:?}");
}

/// Docker's image resolution: a malformed reference or an image neither the node nor its
/// registry has is the command's error (nothing is created or changed); with
/// `--no-resolve-image` the service is made and each node's pull failure is its tasks'
/// error, in the registry's words.
#[test]
fn an_image_that_does_not_exist_or_is_malformed_is_refused_before_anything_changes() {
    let c = cluster(1);
    let h = c.host(1);
    let v1 = versioned("v1");
    // No registry answers here: localhost:1 refuses at once, so the pull fails fast.
    let missing = "localhost:1/mesh-test/nosuch:1";
    for (image, says) in [
        (
            "Web:1",
            "invalid reference format: repository name must be lowercase",
        ),
        ("web:1:2", "invalid reference format"),
        ("web@sha256:abc", "invalid reference format"),
        (missing, "could not be found on this node or its registry"),
    ] {
        let out = h
            .meshctl(&[
                "service",
                "create",
                "--name",
                "bad",
                "--network",
                "app",
                image,
            ])
            .unwrap();
        assert!(!out.status.success(), "create with {image} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{image}: {err}");
    }
    let ls = h.meshctl_ok(&["service", "ls", "-q"]).unwrap();
    assert!(
        ls.trim().is_empty(),
        "a refused create made a service: {ls}"
    );

    h.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "app",
        "-d",
        v1.name(),
    ])
    .unwrap();
    let before = spec_version(h, "web");
    for image in ["localhost/Web:2", missing] {
        let out = h
            .meshctl(&["service", "update", "--image", image, "web"])
            .unwrap();
        assert!(!out.status.success(), "update to {image} succeeded");
    }
    assert_eq!(
        spec_version(h, "web"),
        before,
        "a refused update changes nothing"
    );

    // Without resolution the spec is written, and the pull fails on the node that runs the
    // task: its error says why, as `service ps --no-trunc` shows it.
    h.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "later",
        "--network",
        "app",
        "-d",
        "--no-resolve-image",
        missing,
    ])
    .unwrap();
    let error = c
        .eventually(
            Duration::from_secs(60),
            "the pull failure in service ps",
            |c| {
                let rows: Vec<Value> = c.host(1).meshctl_json(&["service", "ps", "later"])?;
                Ok(rows
                    .iter()
                    .find_map(|r| r["error"].as_str().filter(|e| !e.is_empty()))
                    .map(str::to_owned))
            },
        )
        .unwrap();
    assert!(
        error.contains("localhost:1") && error.contains("nosuch"),
        "the task's error names the image and the registry's reason: {error}"
    );
    let table = h
        .meshctl_ok(&["service", "ps", "--no-trunc", "later"])
        .unwrap();
    assert!(table.contains(&error), "{table}");
}
