//! Secrets and configs the way `docker secret` / `docker config` are used: the seeds' mysql
//! flow with a stand-in server that serves a hash of its password file, a task without the
//! grant that cannot read it, a secret that is never in plaintext in a state file or a log,
//! a config served from its mount, a secret in use that cannot be removed, and a rotation
//! (`--secret-rm old --secret-add new`) that rolls the service with no failed request.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use mesh_tests::{Cluster, Host, availability::Probe, cluster::bin, workload::http_get};
use serde_json::Value;

const PASSWORD: &str = "1q2w3e4r";
const PASSWORD_V2: &str = "5t6y7u8i-rotated";

/// FNV-1a 64 in hex, as `mesh-whoami --hash` answers.
fn fnv(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h = (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}\n")
}

/// A cluster whose gossip is sealed (secrets need a cluster key): the harness's key.
fn cluster(n: usize) -> Cluster {
    let mut c = Cluster::new(n).unwrap();
    c.start_agents().unwrap();
    c.external("client", 100).unwrap();
    c
}

fn whoami() -> String {
    bin("mesh-whoami").to_str().unwrap().to_owned()
}

fn addr(h: &Host, port: u16) -> SocketAddr {
    format!("{}:{port}", h.ip).parse().unwrap()
}

fn get(c: &Cluster, addr: SocketAddr) -> anyhow::Result<String> {
    c.external_ns("client")
        .unwrap()
        .run(move || http_get(addr))?
}

fn converged(c: &Cluster, name: &str, n: usize) {
    c.eventually(
        Duration::from_secs(40),
        &format!("{name} at {n}/{n}"),
        |c| {
            for h in c.hosts() {
                let s: Value = h.meshctl_json(&["service", "inspect", name])?;
                let active = s["dataplane"]["backends"]
                    .as_array()
                    .map_or(0, |b| b.iter().filter(|b| b["state"] == "active").count());
                let done = s["spec"]["update_status"]["state"]
                    .as_str()
                    .is_none_or(|s| s == "completed");
                if s["running"] != n || active != n || !done {
                    anyhow::bail!(
                        "{}: {} running, {active} backends",
                        h.node_name(),
                        s["running"]
                    );
                }
            }
            Ok(Some(()))
        },
    )
    .unwrap();
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The pid of a task of `service` running on `h`.
fn task_pid(h: &Host, service: &str) -> Option<u64> {
    let tasks: Vec<Value> = h.meshctl_json(&["ps"]).ok()?;
    tasks
        .iter()
        .find(|t| t["service"] == service && t["state"] == "running")
        .and_then(|t| t["pid"].as_u64())
}

#[test]
fn the_seed_mysql_flow_serves_a_secret_only_to_granted_tasks_and_rotates_without_failures() {
    let c = cluster(3);
    let h1 = c.host(1);

    // echo 1q2w3e4r | meshctl secret create db_password -
    let out = h1
        .meshctl_stdin(
            &["secret", "create", "db_password", "-"],
            format!("{PASSWORD}\n").as_bytes(),
        )
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let ls = c.host(2).meshctl_ok(&["secret", "ls"]).unwrap();
    assert!(ls.contains("db_password"), "{ls}");
    let inspect = c
        .host(3)
        .meshctl_ok(&["secret", "inspect", "db_password"])
        .unwrap();
    assert!(inspect.contains("\"size\": 9"), "{inspect}");
    assert!(!inspect.contains(PASSWORD), "{inspect}");
    // A secret that exists cannot change.
    let again = h1
        .meshctl_stdin(&["secret", "create", "db_password", "-"], b"other")
        .unwrap();
    assert!(!again.status.success());
    let e = String::from_utf8_lossy(&again.stderr);
    assert!(
        e.contains("already exists") && e.contains("--secret-add"),
        "{e}"
    );

    // A config from a file.
    let conf = c.log_dir().join("nginx.conf");
    std::fs::write(&conf, "server { listen 80; }\n").unwrap();
    h1.meshctl_ok(&["config", "create", "site_conf", conf.to_str().unwrap()])
        .unwrap();

    let w = whoami();
    // Unique per cluster: the process driver shares the host's /etc.
    let site = format!("/etc/{}-site.conf", c.name());
    h1.meshctl_ok(&[
        "service",
        "create",
        "db",
        "--replicas",
        "3",
        "-p",
        "8080:80",
        // The secret's owner: a process task runs as nobody unless told.
        "--user",
        "1000",
        "--secret",
        "source=db_password,target=mysql_root_password,uid=1000,gid=1000,mode=0400",
        "-e",
        "DB_PASSWORD_FILE=/run/secrets/mysql_root_password",
        "--",
        &w,
        "--hash",
        "/run/secrets/mysql_root_password",
    ])
    .unwrap();
    // The same program without the grant.
    h1.meshctl_ok(&[
        "service",
        "create",
        "nogrant",
        "-p",
        "8081:80",
        "--",
        &w,
        "--hash",
        "/run/secrets/mysql_root_password",
    ])
    .unwrap();
    h1.meshctl_ok(&[
        "service",
        "create",
        "site",
        "-p",
        "8082:80",
        "--config",
        &format!("source=site_conf,target={site}"),
        "--",
        &w,
        "--file",
        &site,
    ])
    .unwrap();
    converged(&c, "db", 3);
    converged(&c, "nogrant", 1);
    converged(&c, "site", 1);

    for h in c.hosts() {
        assert_eq!(
            get(&c, addr(h, 8080)).unwrap(),
            fnv(format!("{PASSWORD}\n").as_bytes())
        );
        let e = get(&c, addr(h, 8081)).unwrap_err().to_string();
        assert!(e.contains("No such file"), "a task without the grant: {e}");
        assert_eq!(get(&c, addr(h, 8082)).unwrap(), "server { listen 80; }\n");
    }

    // uid, gid and mode as granted, read-only, seen from inside the task's mount namespace.
    let (h, pid) = c
        .hosts()
        .iter()
        .find_map(|h| task_pid(h, "db").map(|p| (h, p)))
        .expect("a db task runs somewhere");
    let stat = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "--"])
        .args(["stat", "-c", "%a %u %g", "/run/secrets/mysql_root_password"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&stat.stdout).trim(),
        "400 1000 1000",
        "{stat:?}"
    );
    let write = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "--"])
        .args(["sh", "-c", "echo x > /run/secrets/mysql_root_password"])
        .output()
        .unwrap();
    assert!(!write.status.success(), "the secret mount is read-only");
    // Not on the host, not in the host's /run/secrets.
    assert!(
        !Path::new("/run/secrets/mysql_root_password").exists(),
        "the host's /run/secrets is only a mount point"
    );
    let _ = h;

    // In use: cannot be removed, and the error names the service.
    let rm = h1.meshctl(&["secret", "rm", "db_password"]).unwrap();
    assert!(!rm.status.success());
    let e = String::from_utf8_lossy(&rm.stderr);
    assert!(e.contains("in use by service(s) db"), "{e}");
    assert!(!e.contains(PASSWORD), "{e}");

    // Rotation: a new secret under a new name, switched in by a rolling update.
    let out = h1
        .meshctl_stdin(
            &["secret", "create", "db_password_v2", "-"],
            PASSWORD_V2.as_bytes(),
        )
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let client = Probe::start(c.external_ns("client").unwrap(), addr(c.host(2), 8080)).unwrap();
    c.host(3)
        .meshctl_ok(&[
            "service",
            "update",
            "db",
            "--secret-rm",
            "db_password",
            "--secret-add",
            "source=db_password_v2,target=mysql_root_password,uid=1000,mode=0400",
            "--update-order",
            "start-first",
            "--update-monitor",
            "1s",
        ])
        .unwrap();
    converged(&c, "db", 3);
    std::thread::sleep(Duration::from_millis(500));
    // Start-first: each new task serves before its old one leaves the load balancers, so
    // nothing should stall for half a SYN retransmit (1 s). Measured: gaps ≤ 40 ms.
    client
        .finish()
        .assert_available("during the secret rotation", Duration::from_millis(500));
    for h in c.hosts() {
        assert_eq!(get(&c, addr(h, 8080)).unwrap(), fnv(PASSWORD_V2.as_bytes()));
    }
    // The old one is still needed by a rollback.
    let rm = h1.meshctl(&["secret", "rm", "db_password"]).unwrap();
    let e = String::from_utf8_lossy(&rm.stderr);
    assert!(
        e.contains("db (its previous spec, kept for rollback)"),
        "{e}"
    );

    // Neither secret is in plaintext in any state file or agent log.
    for h in c.hosts() {
        let mut files = Vec::new();
        files_under(&h.state_dir(), &mut files);
        assert!(!files.is_empty());
        for f in files {
            let data = std::fs::read(&f).unwrap_or_default();
            for s in [PASSWORD, PASSWORD_V2] {
                assert!(
                    !contains(&data, s.as_bytes()),
                    "{} holds a secret",
                    f.display()
                );
            }
        }
        let logs = h.logs();
        for s in [PASSWORD, PASSWORD_V2] {
            assert!(!logs.contains(s), "{}'s log holds a secret", h.node_name());
        }
    }

    // Clean up everything; the config's mount point on the host goes with its task.
    for s in ["db", "nogrant", "site"] {
        h1.meshctl_ok(&["service", "rm", s]).unwrap();
    }
    c.eventually(Duration::from_secs(20), "tasks gone", |c| {
        Ok(c.hosts()
            .iter()
            .all(|h| task_pid(h, "db").is_none() && task_pid(h, "site").is_none())
            .then_some(()))
    })
    .unwrap();
    c.eventually(Duration::from_secs(10), "config removable", |c| {
        Ok(c.host(1)
            .meshctl(&["config", "rm", "site_conf"])?
            .status
            .success()
            .then_some(()))
    })
    .unwrap();
    h1.meshctl_ok(&["secret", "rm", "db_password", "db_password_v2"])
        .unwrap();
    c.eventually(Duration::from_secs(10), "mount point removed", |_| {
        Ok((!Path::new(&site).exists()).then_some(()))
    })
    .unwrap();
    let left: Vec<Value> = h1.meshctl_json(&["secret", "ls"]).unwrap();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn secrets_refuse_bad_input_with_a_clear_error() {
    let c = cluster(1);
    let h = c.host(1);
    let big = "x".repeat(500 * 1024 + 1);
    let out = h
        .meshctl_stdin(&["secret", "create", "big", "-"], big.as_bytes())
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("500 KB"), "{e}");
    let out = h
        .meshctl(&[
            "service", "create", "x", "--secret", "missing", "--", "sleep", "100",
        ])
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("secret missing not found"), "{e}");
    let out = h
        .meshctl(&[
            "service",
            "create",
            "x",
            "--secret",
            "source=a,target=../etc/passwd",
            "--",
            "sleep",
            "100",
        ])
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("must be a file name"), "{e}");
    let out = h.meshctl(&["secret", "rm", "nothing"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

#[test]
fn secrets_need_a_sealed_cluster() {
    let mut c = Cluster::new(1).unwrap();
    // Only an agent told --insecure runs without a key.
    c.host_mut(1).start_agent(&["--insecure"]).unwrap();
    let out = c
        .host(1)
        .meshctl_stdin(&["secret", "create", "s", "-"], b"data")
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("need a cluster key"), "{e}");
}
