//! The README's podman-driver secrets, end to end ("Secrets, configs and stacks"): a secret
//! granted to an image service is readable inside its container at `/run/secrets/TARGET`
//! with the mode asked for, and another service's container has no such file.

use std::{process::Command, time::Duration};

use mesh_tests::{Cluster, image::Image};
use serde_json::Value;

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

#[test]
fn a_secret_is_in_the_granted_container_only_with_its_mode() {
    let image = Image::whoami().unwrap();
    let mut c = Cluster::new(1).unwrap();
    // Secrets need a cluster key: the harness's.
    c.start_agents().unwrap();
    let h = c.host(1);
    let out = h
        .meshctl_stdin(&["secret", "create", "db_password", "-"], b"1q2w3e4r\n")
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    h.meshctl_ok(&[
        "service",
        "create",
        "db",
        "--image",
        image.name(),
        "--secret",
        "source=db_password,target=mysql_root_password,mode=0400",
        "-d",
    ])
    .unwrap();
    h.meshctl_ok(&["service", "create", "other", "--image", image.name(), "-d"])
        .unwrap();
    // The container of each service's one task, by its label `mesh.task=NAME.ID`.
    let container = |service: &str| -> String {
        c.eventually(
            Duration::from_secs(30),
            &format!("{service}'s container"),
            |c| {
                let rows: Vec<Value> = c.host(1).meshctl_json(&["service", "ps", service])?;
                let Some(task) = rows
                    .iter()
                    .find(|r| r["history"] == false && r["state"] == "Running")
                else {
                    anyhow::bail!("no running task: {rows:?}");
                };
                let (ok, names) = podman(&[
                    "ps",
                    "--filter",
                    &format!(
                        "label=mesh.task={}.{}",
                        task["name"].as_str().unwrap(),
                        task["id"].as_str().unwrap()
                    ),
                    "--format",
                    "{{.Names}}",
                ]);
                if !ok || names.trim().is_empty() {
                    let (_, all) = podman(&["ps", "--all", "--format", "{{.Names}} {{.Labels}}"]);
                    anyhow::bail!("no container of task {task}: {names} / {all}");
                }
                Ok(Some(names.trim().to_owned()))
            },
        )
        .unwrap()
    };
    let (db, other) = (container("db"), container("other"));

    let (ok, out) = podman(&["exec", &db, "cat", "/run/secrets/mysql_root_password"]);
    assert!(ok, "{out}");
    assert_eq!(out, "1q2w3e4r\n");
    let (ok, out) = podman(&["exec", &db, "ls", "-ln", "/run/secrets/mysql_root_password"]);
    assert!(ok, "{out}");
    assert!(out.starts_with("-r-------- "), "mode 0400: {out}");
    let (ok, out) = podman(&["exec", &other, "ls", "/run/secrets/mysql_root_password"]);
    assert!(!ok, "the other service's container has no secret: {out}");
    let (ok, out) = podman(&["exec", &other, "cat", "/run/secrets/mysql_root_password"]);
    assert!(!ok && !out.contains("1q2w3e4r"), "{out}");

    for s in ["db", "other"] {
        c.host(1).meshctl_ok(&["service", "rm", s]).unwrap();
    }
    c.eventually(Duration::from_secs(30), "the containers gone", |_| {
        let (ok, names) = podman(&[
            "ps",
            "--all",
            "--filter",
            &format!("label=mesh.node={}", c.host(1).node_name()),
            "--format",
            "{{.Names}}",
        ]);
        Ok((ok && names.trim().is_empty()).then_some(()))
    })
    .unwrap();
}
