//! The real `docker` client drives mesh through the agent's Docker socket
//! (`DOCKER_HOST=unix:///run/mesh/<node>/docker.sock`), as a Swarm user's habits and scripts
//! would: `docker info`, `node ls/update`, `network create -d overlay`, `secret create`,
//! `service create/ls/ps/inspect/scale/update/rollback/rm`, `stack deploy/ls/services/ps/rm`
//! of a compose file; who may reach the socket, and refused requests. Real agents on a 3-node
//! namespace cluster, podman images built offline, both clients the machine has (docker
//! 28 and Debian's 20.10); the checks are what a user sees and what answers through the
//! published port.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use mesh_tests::{Cluster, Host, availability::Probe, image::Image, workload::tally};
use serde_json::Value;

/// The docker clients to drive: the image's own (28.x) and Debian's docker.io (20.10).
const CLIENTS: [&str; 2] = ["/usr/local/bin/docker", "/usr/bin/docker"];

fn docker_socket(h: &Host) -> PathBuf {
    h.socket().with_file_name("docker.sock")
}

/// Runs `docker ARGS…` against `h`'s socket, with a config directory of its own so nothing
/// of this machine's docker setup leaks in; gives up after 3 minutes.
fn docker_output(client: &str, h: &Host, args: &[&str], stdin: Option<&str>) -> Output {
    // Removed when this returns: the client writes nothing worth keeping into it.
    let config = tempfile::Builder::new()
        .prefix("mt-docker-config-")
        .tempdir()
        .unwrap();
    let mut cmd = Command::new("timeout");
    cmd.arg("180")
        .arg(client)
        .args(args)
        .env(
            "DOCKER_HOST",
            format!("unix://{}", docker_socket(h).display()),
        )
        .env("DOCKER_CONFIG", config.path())
        .env_remove("DOCKER_API_VERSION")
        .env_remove("DOCKER_CONTEXT");
    match stdin {
        None => cmd.stdin(std::process::Stdio::null()).output().unwrap(),
        Some(text) => {
            use std::io::Write;
            let mut child = cmd
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            child.wait_with_output().unwrap()
        }
    }
}

fn docker(client: &str, h: &Host, args: &[&str]) -> String {
    let out = docker_output(client, h, args, None);
    assert!(
        out.status.success(),
        "{client} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command that must fail: its stderr.
fn docker_err(client: &str, h: &Host, args: &[&str]) -> String {
    let out = docker_output(client, h, args, None);
    assert!(
        !out.status.success(),
        "{client} {args:?} should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A raw request to the Docker socket (what the client would not send): status and body.
fn raw(h: &Host, method: &str, path: &str, body: Option<&Path>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method])
        .arg("--unix-socket")
        .arg(docker_socket(h))
        .arg(format!("http://docker{path}"))
        .args(["-H", "Content-Type: application/json"]);
    if let Some(b) = body {
        cmd.arg("--data-binary").arg(format!("@{}", b.display()));
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_owned())
}

fn cluster() -> Cluster {
    let mut c = Cluster::new(3).unwrap();
    c.start_agents().unwrap();
    c.external("client", 100).unwrap();
    c
}

/// An image whose HTTP server on port 80 answers `<version> <hostname>`.
fn versioned(version: &str) -> Image {
    Image::busybox(
        version,
        &format!(
            r#"["/bin/sh","-c","trap 'exit 0' TERM; echo {version} $(hostname) > /www/index.html; echo serving {version}; httpd -f -p 80 -h /www & wait"]"#
        ),
    )
    .unwrap()
}

/// What `n` requests to a node's published port 8080 answered: `version hostname` lines.
fn answers(c: &Cluster, h: &Host, n: usize) -> BTreeMap<String, usize> {
    let a: std::net::SocketAddr = format!("{}:8080", h.ip).parse().unwrap();
    let got = c
        .external_ns("client")
        .unwrap()
        .run(move || {
            (0..n)
                .map(|_| {
                    mesh_tests::workload::http_get(a)
                        .map(|b| b.trim().to_owned())
                        .unwrap_or_else(|e| format!("error: {e:#}"))
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    tally(got)
}

/// Waits until every node's port 8080 answers from `replicas` tasks, all of `version`.
fn every_node_balances(c: &Cluster, version: &str, replicas: usize) {
    c.eventually(
        Duration::from_secs(60),
        &format!("every node balances over {replicas} tasks of {version}"),
        |c| {
            for h in c.hosts() {
                let got = answers(c, h, 4 * replicas);
                if got.len() != replicas || !got.keys().all(|k| k.starts_with(version)) {
                    anyhow::bail!("{} answered {got:?}", h.node_name());
                }
            }
            Ok(Some(()))
        },
    )
    .unwrap();
}

/// The row of `docker service ls` for `name`.
fn service_row(client: &str, h: &Host, name: &str) -> String {
    docker(client, h, &["service", "ls"])
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_default()
        .to_owned()
}

fn swarm_commands_work(client: &str) {
    if !Path::new(client).exists() {
        panic!("{client} is missing: scripts/setup.sh installs docker.io");
    }
    let (v1, v2) = (versioned("v1"), versioned("v2"));
    let c = cluster();
    let (h1, h2) = (c.host(1), c.host(2));

    // The client negotiates 1.41 from /_ping and sees an active swarm of three managers.
    let version = docker(
        client,
        h1,
        &["version", "--format", "{{.Server.APIVersion}}"],
    );
    assert_eq!(version.trim(), "1.41");
    let info = docker(client, h1, &["info"]);
    for want in [
        "Swarm: active",
        "Is Manager: true",
        "Managers: 3",
        "Nodes: 3",
        &format!("Node Address: {}", h1.ip),
    ] {
        assert!(info.contains(want), "docker info lacks {want:?}:\n{info}");
    }

    // node ls: three ready, active, reachable managers, this one starred. Under a loaded CI
    // run a node can miss the 800 ms failure detection once and show Down for a moment; what
    // is checked here is Docker's rendering of a healthy cluster, so wait for one.
    let mut nodes = String::new();
    c.eventually(Duration::from_secs(15), "docker node ls: 3 Ready", |_| {
        nodes = docker(client, h1, &["node", "ls"]);
        let ready = nodes
            .lines()
            .skip(1)
            .filter(|r| r.contains("Ready"))
            .count();
        Ok((ready == 3).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{nodes}"));
    let rows: Vec<&str> = nodes.lines().skip(1).collect();
    assert_eq!(rows.len(), 3, "{nodes}");
    assert!(
        rows.iter()
            .all(|r| r.contains("Ready") && r.contains("Active")),
        "{nodes}"
    );
    assert_eq!(
        rows.iter().filter(|r| r.contains(" * ")).count(),
        1,
        "{nodes}"
    );
    assert!(rows.iter().all(|r| r.contains("Reachable")), "{nodes}");

    // node update: labels and availability, seen by meshctl too.
    let n2 = h2.node_name().to_owned();
    docker(
        client,
        h1,
        &["node", "update", "--label-add", "zone=b", &n2],
    );
    let labels = docker(
        client,
        h1,
        &["node", "inspect", "--format", "{{json .Spec.Labels}}", &n2],
    );
    assert_eq!(labels.trim(), r#"{"zone":"b"}"#);
    // meshctl on node 2 sees it once gossip has carried it there.
    c.eventually(Duration::from_secs(10), "node 2 hears of zone=b", |_| {
        let mesh: Value = h2.meshctl_json(&["node", "inspect", &n2])?;
        if mesh["operator_labels"]["zone"] != "b" {
            anyhow::bail!("{mesh}");
        }
        Ok(Some(()))
    })
    .unwrap();
    docker(
        client,
        h1,
        &["node", "update", "--availability", "drain", &n2],
    );
    assert!(docker(client, h1, &["node", "ls"]).contains("Drain"));
    docker(
        client,
        h1,
        &["node", "update", "--availability", "active", &n2],
    );
    let err = docker_err(
        client,
        h1,
        &["node", "update", "--availability", "pause", &n2],
    );
    assert!(err.contains("pause is not supported"), "{err}");

    // Overlay networks only, with Docker's flags.
    docker(
        client,
        h1,
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet",
            "10.20.0.0/24",
            "app",
        ],
    );
    let nets = docker(client, h1, &["network", "ls"]);
    assert!(
        nets.lines()
            .any(|l| l.contains(" app ") && l.contains("overlay") && l.contains("swarm")),
        "{nets}"
    );
    let subnet = docker(
        client,
        h2,
        &[
            "network",
            "inspect",
            "--format",
            "{{(index .IPAM.Config 0).Subnet}}",
            "app",
        ],
    );
    assert_eq!(subnet.trim(), "10.20.0.0/24");
    let err = docker_err(client, h1, &["network", "create", "local"]);
    assert!(err.contains("--driver overlay"), "{err}");

    // Secrets from stdin, as the seed does.
    let out = docker_output(
        client,
        h1,
        &["secret", "create", "my_mysql_password", "-"],
        Some("1q2w3e4r\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(docker(client, h2, &["secret", "ls"]).contains("my_mysql_password"));
    // Configs from a file; unlike a secret's, their data shows in inspect.
    let config_file = std::env::temp_dir().join(format!("mt{}-config.yml", std::process::id()));
    std::fs::write(&config_file, "version: 0.1\nlog:\n  level: info\n").unwrap();
    docker(
        client,
        h1,
        &[
            "config",
            "create",
            "registry-config",
            config_file.to_str().unwrap(),
        ],
    );
    let _ = std::fs::remove_file(&config_file);
    assert!(docker(client, h1, &["config", "ls"]).contains("registry-config"));
    let pretty = docker(
        client,
        h1,
        &["config", "inspect", "--pretty", "registry-config"],
    );
    assert!(pretty.contains("level: info"), "{pretty}");
    docker(client, h1, &["config", "rm", "registry-config"]);
    assert!(!docker(client, h1, &["config", "ls"]).contains("registry-config"));

    // service create waits for convergence (it polls tasks) and then returns.
    let started = std::time::Instant::now();
    docker(
        client,
        h1,
        &[
            "service",
            "create",
            "--name",
            "my-web",
            "--publish",
            "published=8080,target=80",
            "--replicas",
            "3",
            "--network",
            "app",
            "--secret",
            "my_mysql_password",
            v1.name(),
        ],
    );
    eprintln!("docker service create converged in {:?}", started.elapsed());
    let row = service_row(client, h2, "my-web");
    assert!(row.contains("replicated") && row.contains("3/3"), "{row}");
    assert!(row.contains("*:8080->80/tcp"), "{row}");
    every_node_balances(&c, "v1", 3);

    let ps = docker(client, h1, &["service", "ps", "my-web"]);
    let running: Vec<&str> = ps.lines().filter(|l| l.contains("Running")).collect();
    assert_eq!(running.len(), 3, "{ps}");
    for i in 1..=3 {
        assert!(ps.contains(&format!("my-web.{i} ")), "{ps}");
    }
    let pretty = docker(client, h1, &["service", "inspect", "--pretty", "my-web"]);
    for want in [
        "my-web",
        "Replicated",
        "Replicas:",
        "3",
        "8080",
        v1.name(),
        "my_mysql_password",
    ] {
        assert!(
            pretty.contains(want),
            "inspect --pretty lacks {want:?}:\n{pretty}"
        );
    }

    // Logs from every node's tasks, each line named by its task and node.
    let logs = docker(client, h2, &["service", "logs", "my-web"]);
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains("serving v1")).collect();
    assert_eq!(lines.len(), 3, "{logs}");
    for i in 1..=3 {
        assert!(
            lines.iter().any(|l| l.starts_with(&format!("my-web.{i}."))
                && l.contains('@')
                && l.contains("| serving v1")),
            "{logs}"
        );
    }

    // scale, and the load balancers follow.
    docker(client, h1, &["service", "scale", "my-web=4"]);
    assert!(service_row(client, h1, "my-web").contains("4/4"));
    every_node_balances(&c, "v1", 4);

    // A rolling update of the image while a client counts failures through node 2.
    let addr = format!("{}:8080", h2.ip).parse().unwrap();
    let probe = Probe::start(c.external_ns("client").unwrap(), addr).unwrap();
    docker(
        client,
        h1,
        &[
            "service",
            "update",
            "--image",
            v2.name(),
            "--update-delay",
            "1s",
            "my-web",
        ],
    );
    probe
        .finish()
        .assert_available("docker service update --image", Duration::from_millis(500));
    every_node_balances(&c, "v2", 4);
    let ps = docker(client, h1, &["service", "ps", "my-web"]);
    let history = ps.lines().filter(|l| l.contains(r"\_ my-web.")).count();
    assert!(
        history >= 4,
        "an old task under each slot as \\_ rows:\n{ps}"
    );
    assert!(
        ps.lines()
            .any(|l| l.contains(r"\_") && l.contains(v1.name())),
        "{ps}"
    );

    // rollback is an update with rollback=previous.
    docker(client, h1, &["service", "rollback", "my-web"]);
    every_node_balances(&c, "v1", 4);

    // Unsupported settings are refused by name and change nothing.
    let before = docker(
        client,
        h1,
        &[
            "service",
            "inspect",
            "--format",
            "{{.Version.Index}}",
            "my-web",
        ],
    );
    let err = docker_err(
        client,
        h1,
        &[
            "service",
            "update",
            "--mount-add",
            "type=volume,source=d,target=/d,volume-driver=nfs",
            "my-web",
        ],
    );
    assert!(
        err.contains("ContainerSpec.Mounts.VolumeOptions.DriverConfig is not supported"),
        "{err}"
    );
    // A bind of the agent's own state is refused on Docker's update as on meshctl's.
    let state = h1.state_dir();
    let err = docker_err(
        client,
        h1,
        &[
            "service",
            "update",
            "--mount-add",
            &format!("type=bind,source={},target=/stolen", state.display()),
            "my-web",
        ],
    );
    assert!(err.contains("would expose"), "{err}");
    let after = docker(
        client,
        h1,
        &[
            "service",
            "inspect",
            "--format",
            "{{.Version.Index}}",
            "my-web",
        ],
    );
    assert_eq!(before, after, "a refused update changed the service");

    docker(client, h1, &["service", "rm", "my-web"]);
    assert!(!docker(client, h1, &["service", "ls"]).contains("my-web"));
    // Other nodes hear of the removal through gossip, within moments.
    c.eventually(Duration::from_secs(10), "my-web gone on node 2", |_| {
        if docker(client, h2, &["service", "ls"]).contains("my-web") {
            anyhow::bail!("node 2 still lists my-web");
        }
        Ok(Some(()))
    })
    .unwrap();
    docker(client, h1, &["secret", "rm", "my_mysql_password"]);
    // The removed service's tasks stop first (as in Swarm, the network is in use until
    // then).
    c.eventually(Duration::from_secs(30), "network app removable", |_| {
        let out = docker_output(client, h1, &["network", "rm", "app"], None);
        if !out.status.success() {
            anyhow::bail!("{}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Some(()))
    })
    .unwrap();
    c.eventually(Duration::from_secs(10), "app gone on node 2", |_| {
        if docker(client, h2, &["network", "ls"]).contains(" app ") {
            anyhow::bail!("node 2 still lists app");
        }
        Ok(Some(()))
    })
    .unwrap();

    // Local containers are podman's: a clear 501.
    let err = docker_err(client, h1, &["ps"]);
    assert!(err.contains("podman"), "{err}");

    // What happened, as Docker's events: the service's life, its tasks as containers.
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 1;
    let events = docker(
        client,
        h1,
        &[
            "events",
            "--since",
            &(until - 900).to_string(),
            "--until",
            &until.to_string(),
            "--format",
            "{{.Type}} {{.Action}} {{.Actor.Attributes.name}}",
        ],
    );
    for want in [
        "service create my-web",
        "service remove my-web",
        "container start my-web.",
    ] {
        assert!(
            events.contains(want),
            "docker events lacks {want:?}:\n{events}"
        );
    }
}

#[test]
fn docker_28_drives_the_swarm_commands() {
    swarm_commands_work(CLIENTS[0]);
}

#[test]
fn debians_docker_20_10_drives_the_swarm_commands() {
    swarm_commands_work(CLIENTS[1]);
}

/// Where host 1's agent serves its metrics (inside its namespace).
const METRICS: &str = "127.0.0.1:9464";

/// `mesh_docker_api_refused_total` of host 1, by status code.
fn refused(h: &Host) -> BTreeMap<u16, f64> {
    let addr = METRICS.parse().unwrap();
    // The metrics listener comes up with the agent; give it a moment.
    let mut tries = 0;
    let all = loop {
        match h.ns.run(move || mesh_tests::flood::scrape(addr)).unwrap() {
            Ok(all) => break all,
            Err(e) if tries >= 20 => panic!("scraping {METRICS}: {e:#}"),
            Err(_) => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    };
    all.iter()
        .filter_map(|(k, v)| {
            let code = k
                .strip_prefix("mesh_docker_api_refused_total{code=\"")?
                .strip_suffix("\"}")?;
            Some((code.parse().ok()?, *v))
        })
        .collect()
}

/// Only root and the socket's group (root's, as dockerd's is root:docker 0660) may reach
/// the Docker socket: anyone else is refused by the kernel before the agent reads a byte.
/// `--docker-socket-group` (agent.toml `docker_socket_group`) hands the socket to a group,
/// as dockerd's `docker` group: its members get in, other users still do not; a group that
/// does not exist stops the agent with a message saying so.
#[test]
fn a_named_group_reaches_the_docker_socket_and_an_unknown_one_is_refused() {
    let mut c = Cluster::new(2).unwrap();
    c.host_mut(1)
        .start_agent(&["--docker-socket-group", "nogroup"])
        .unwrap();
    let sock = docker_socket(c.host(1));
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 65534), "{}", sock.display());
    let as_user = |gid: &str| {
        Command::new("setpriv")
            .args(["--reuid=65534", &format!("--regid={gid}"), "--clear-groups"])
            .arg(CLIENTS[0])
            .args(["version", "--format", "{{.Server.APIVersion}}"])
            .env("DOCKER_HOST", format!("unix://{}", sock.display()))
            .env("DOCKER_CONFIG", std::env::temp_dir())
            .output()
            .unwrap()
    };
    let out = as_user("65534");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1.41");
    let out = as_user("1");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{out:?}"
    );

    let h2 = c.host_mut(2);
    assert!(
        h2.start_agent(&["--docker-socket-group", "no-such-group"])
            .is_err(),
        "an agent with an unknown socket group started"
    );
    let said = h2.output() + &h2.logs();
    assert!(
        said.contains("docker_socket_group \"no-such-group\" does not exist"),
        "{said}"
    );
}

#[test]
fn only_root_and_its_group_reach_the_docker_socket() {
    let c = cluster();
    let h = c.host(1);
    let sock = docker_socket(h);
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o660,
        "{}",
        sock.display()
    );
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
    let as_user = |gid: &str| {
        Command::new("setpriv")
            .args(["--reuid=65534", &format!("--regid={gid}"), "--clear-groups"])
            .arg(CLIENTS[0])
            .args(["version", "--format", "{{.Server.APIVersion}}"])
            .env("DOCKER_HOST", format!("unix://{}", sock.display()))
            .env("DOCKER_CONFIG", std::env::temp_dir())
            .output()
            .unwrap()
    };
    let out = as_user("65534");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    // The same user in the socket's group gets through.
    let out = as_user("0");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1.41");

    // Updating a secret with its data compares it with the sealed data: root's answer only,
    // else the group could test guesses of it.
    let out = docker_output(
        CLIENTS[0],
        h,
        &["secret", "create", "pw", "-"],
        Some("hunter2"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, body) = raw(h, "GET", "/secrets/pw", None);
    let index = serde_json::from_str::<Value>(&body).unwrap()["Version"]["Index"].clone();
    let guess = |uid: &str, data: &str| {
        let body = format!(r#"{{"Name": "pw", "Data": "{data}"}}"#);
        let out = Command::new("setpriv")
            .args([&format!("--reuid={uid}"), "--regid=0", "--clear-groups"])
            .args([
                "curl",
                "-s",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                "-X",
                "POST",
            ])
            .arg("--unix-socket")
            .arg(&sock)
            .arg(format!("http://docker/secrets/pw/update?version={index}"))
            .args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &body,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // base64 of "hunter2" and of "wrong".
    let (right, wrong) = ("aHVudGVyMg==", "d3Jvbmc=");
    for data in [right, wrong] {
        let out = guess("65534", data);
        assert!(out.ends_with("\n403") && out.contains("only root"), "{out}");
    }
    assert!(guess("0", right).ends_with("\n200"));
    let out = guess("0", wrong);
    assert!(
        out.ends_with("\n400") && out.contains("only updates to Labels"),
        "{out}"
    );
}

/// Bad requests get Docker's error shape, change nothing and are counted.
#[test]
fn bad_requests_get_dockers_errors_and_change_nothing() {
    let mut c = Cluster::new(1).unwrap();
    c.host_mut(1)
        .start_agent(&["--metrics-listen", METRICS])
        .unwrap();
    let h = c.host(1);
    let refused_before = refused(h);
    let dir = tempfile::Builder::new()
        .prefix("mt-docker-bad-")
        .tempdir()
        .unwrap();
    let file = |name: &str, text: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (code, body) = raw(h, "HEAD", "/_ping", None);
    assert_eq!(code, 200, "{body}");
    let create = |extra: &str| {
        format!(
            r#"{{"Name": "web", "TaskTemplate": {{"ContainerSpec": {{"Image": "localhost/x:1"{extra}}}}},
               "Mode": {{"Replicated": {{"Replicas": 1}}}}}}"#
        )
    };
    let cases: Vec<(&str, PathBuf, u16, &str)> = vec![
        (
            "unknown field",
            file("unknown.json", create(r#", "Bogus": true"#).as_bytes()),
            400,
            "unknown field `Bogus`",
        ),
        (
            "wrong type",
            file("type.json", create(r#", "Env": "A=1""#).as_bytes()),
            400,
            "invalid type",
        ),
        (
            "unsupported field",
            file(
                "mounts.json",
                create(r#", "Mounts": [{"Type": "npipe", "Target": "/d"}]"#).as_bytes(),
            ),
            400,
            "ContainerSpec.Mounts.Type \"npipe\" is not supported",
        ),
        (
            "not JSON",
            file("garbage.json", b"{\"Name\": "),
            400,
            "invalid JSON",
        ),
        (
            "10 MB body",
            file("big.json", &vec![b' '; 10 << 20]),
            413,
            "larger than this listener accepts",
        ),
    ];
    for (what, path, status, want) in &cases {
        for prefix in ["", "/v1.41"] {
            let (code, body) = raw(h, "POST", &format!("{prefix}/services/create"), Some(path));
            assert_eq!(code, *status, "{what}: {body}");
            let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{what}: {body}"));
            let msg = v["message"].as_str().unwrap_or_default();
            assert!(msg.contains(want), "{what}: {body}");
        }
    }
    let (code, body) = raw(h, "GET", "/services", None);
    assert_eq!(
        (code, body.trim()),
        (200, "[]"),
        "a refused create made a service"
    );
    // Axum's own rejections (a query that does not parse, a method the path lacks) are in
    // Docker's shape too.
    for (method, path, status) in [
        ("GET", "/services?status=maybe", 400),
        ("PUT", "/services", 405),
        (
            "GET",
            "/tasks?filters=%7B%22bogus%22%3A%7B%22x%22%3Atrue%7D%7D",
            400,
        ),
    ] {
        let (code, body) = raw(h, method, path, None);
        assert_eq!(code, status, "{method} {path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: {body}"));
        assert!(
            !v["message"].as_str().unwrap_or_default().is_empty(),
            "{path}: {body}"
        );
    }
    let counted = refused(h);
    let grew =
        |code: u16| counted.get(&code).unwrap_or(&0.0) - refused_before.get(&code).unwrap_or(&0.0);
    // 4 bad bodies and 2 rejected queries (400) twice over, the oversized body (413) twice.
    assert_eq!(grew(400), 10.0, "{counted:?}");
    assert_eq!(grew(413), 2.0, "{counted:?}");
    assert_eq!(grew(405), 1.0, "{counted:?}");

    // A version conflict: the update names a version the service is no longer at.
    let image = versioned("v1");
    let ok = file(
        "ok.json",
        create("").replace("localhost/x:1", image.name()).as_bytes(),
    );
    let (code, body) = raw(h, "POST", "/services/create", Some(&ok));
    assert_eq!(code, 201, "{body}");
    let (_, body) = raw(h, "GET", "/services/web", None);
    let v: Value = serde_json::from_str(&body).unwrap();
    let index = v["Version"]["Index"].as_u64().unwrap();
    let mut spec = v["Spec"].clone();
    spec["Mode"]["Replicated"]["Replicas"] = 2.into();
    let update = file("update.json", spec.to_string().as_bytes());
    let stale = format!("/services/web/update?version={}", index + 7);
    let (code, body) = raw(h, "POST", &stale, Some(&update));
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("update out of sequence"), "{body}");
    let (_, after) = raw(h, "GET", "/services/web", None);
    let after: Value = serde_json::from_str(&after).unwrap();
    assert_eq!(
        after["Version"]["Index"], index,
        "a stale update changed the service"
    );
    // The same update with the version read goes through.
    let (code, body) = raw(
        h,
        "POST",
        &format!("/services/web/update?version={index}"),
        Some(&update),
    );
    assert_eq!(code, 200, "{body}");
    let (_, after) = raw(h, "GET", "/services/web", None);
    let after: Value = serde_json::from_str(&after).unwrap();
    assert_eq!(
        after["Spec"]["Mode"]["Replicated"]["Replicas"], 2,
        "{after}"
    );

    // Paths of local containers, images and volumes point at podman; a too new version is
    // refused as dockerd does.
    for path in ["/containers/json", "/v1.41/images/json", "/volumes"] {
        let (code, body) = raw(h, "GET", path, None);
        assert_eq!(code, 501, "{path}: {body}");
        assert!(body.contains("podman"), "{path}: {body}");
    }
    let (code, body) = raw(h, "GET", "/v1.99/info", None);
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("Maximum supported API version is 1.41"),
        "{body}"
    );
}

/// A podman volume a test's tasks made, removed by name when the test ends however it ends
/// (podman's volumes are the machine's, not the cluster's).
struct PodmanVolume(String);

impl Drop for PodmanVolume {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["volume", "rm", "--force", &self.0])
            .output();
    }
}

/// `docker stack deploy` of a compose file with a network, a secret, a config, deploy keys
/// and a healthcheck, and a worker on two networks with a volume, extra hosts and log
/// rotation: the real CLI parses the file and makes the API calls; the stack's web
/// service answers through every node with the secret and config it was given, the worker's
/// spec comes back as the file said (so a redeploy changes nothing), and
/// `stack ls/services/ps/rm` show and remove it all.
fn stack_commands_work(client: &str) {
    if !Path::new(client).exists() {
        panic!("{client} is missing: scripts/setup.sh installs docker.io");
    }
    // The task serves what it was given: the secret and the config, read from their files.
    let image = Image::busybox(
        "stacked",
        r#"["/bin/sh","-c","trap 'exit 0' TERM; echo $(cat /run/secrets/db_password) $(cat /etc/site.conf) $(hostname) > /www/index.html; httpd -f -p 80 -h /www & wait"]"#,
    )
    .unwrap();
    let c = cluster();
    let (h1, h2) = (c.host(1), c.host(2));
    // A directory of this cluster's own: both clients' tests run at once in one process.
    let stack_dir = tempfile::Builder::new()
        .prefix(&format!("{}-docker-stack-", c.name()))
        .tempdir()
        .unwrap();
    let dir = stack_dir.path();
    std::fs::write(dir.join("db_password.txt"), "s3cret\n").unwrap();
    std::fs::write(dir.join("site.conf"), "site-v1\n").unwrap();
    // Podman volumes are the machine's, not the cluster's: a name of this cluster's own.
    let volume = format!(
        "data{}",
        c.name().replace(|ch: char| !ch.is_ascii_alphanumeric(), "")
    );
    let _gone = PodmanVolume(format!("infra_{volume}"));
    let compose = dir.join("docker-compose.yml");
    std::fs::write(
        &compose,
        format!(
            r#"version: "3.8"
services:
  web:
    image: {image}
    ports:
      - "8080:80"
    networks: [front]
    secrets: [db_password]
    configs:
      - source: site
        target: /etc/site.conf
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1/"]
      interval: 2s
      timeout: 2s
      retries: 3
    deploy:
      replicas: 3
      labels:
        tier: front
      update_config:
        parallelism: 1
        delay: 1s
      restart_policy:
        condition: on-failure
      placement:
        max_replicas_per_node: 1
  worker:
    image: {image}
    command: ["sleep", "1000000"]
    networks:
      front:
      back:
        aliases: [jobs]
    volumes:
      - {volume}:/data
    extra_hosts: ["db.local:10.0.0.5"]
    logging:
      driver: json-file
      options:
        max-size: 1m
volumes:
  {volume}:
networks:
  front:
    driver: overlay
  back:
    driver: overlay
secrets:
  db_password:
    file: ./db_password.txt
configs:
  site:
    file: ./site.conf
"#,
            image = image.name(),
        ),
    )
    .unwrap();
    let out = docker(
        client,
        h1,
        &["stack", "deploy", "-c", compose.to_str().unwrap(), "infra"],
    );
    for want in [
        "Creating network infra_front",
        "Creating secret infra_db_password",
        "Creating config infra_site",
        "Creating service infra_web",
        "Creating service infra_worker",
    ] {
        assert!(out.contains(want), "stack deploy lacks {want:?}:\n{out}");
    }

    // Every node answers from the three tasks, each with the secret and the config.
    c.eventually(
        Duration::from_secs(90),
        "every node balances over infra_web's 3 tasks",
        |c| {
            for h in c.hosts() {
                let got = answers(c, h, 12);
                if got.len() != 3 || !got.keys().all(|k| k.starts_with("s3cret site-v1 ")) {
                    anyhow::bail!("{} answered {got:?}", h.node_name());
                }
            }
            Ok(Some(()))
        },
    )
    .unwrap();

    let ls = docker(client, h2, &["stack", "ls"]);
    assert!(
        ls.lines()
            .any(|l| l.split_whitespace().take(2).eq(["infra", "2"])),
        "{ls}"
    );
    let services = docker(client, h2, &["stack", "services", "infra"]);
    let row = services
        .lines()
        .find(|l| l.contains("infra_web"))
        .unwrap_or_else(|| panic!("{services}"));
    assert!(
        row.contains("replicated") && row.contains("3/3") && row.contains("*:8080->80/tcp"),
        "{services}"
    );
    let ps = docker(client, h1, &["stack", "ps", "infra"]);
    let running: Vec<&str> = ps.lines().filter(|l| l.contains("Running")).collect();
    assert_eq!(running.len(), 4, "{ps}");
    assert_eq!(
        running.iter().filter(|l| l.contains("infra_web.")).count(),
        3,
        "{ps}"
    );
    // The worker's networks, mounts, hosts and logging arrived as the file said.
    let worker: Value = serde_json::from_str(&docker(
        client,
        h1,
        &[
            "service",
            "inspect",
            "--format",
            "{{json .Spec.TaskTemplate}}",
            "infra_worker",
        ],
    ))
    .unwrap();
    let nets = worker["Networks"].as_array().unwrap();
    assert_eq!(nets.len(), 2, "{worker}");
    assert!(
        nets.iter().any(|n| n["Aliases"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a == "jobs"))),
        "{worker}"
    );
    let container = &worker["ContainerSpec"];
    let mounts = container["Mounts"].as_array().unwrap();
    assert!(
        mounts.iter().any(|m| m["Type"] == "volume"
            && m["Source"] == format!("infra_{volume}")
            && m["Target"] == "/data"),
        "{worker}"
    );
    assert_eq!(container["Hosts"][0], "10.0.0.5 db.local", "{worker}");
    assert_eq!(worker["LogDriver"]["Name"], "json-file", "{worker}");
    assert_eq!(
        worker["LogDriver"]["Options"]["max-size"], "1MiB",
        "{worker}"
    );
    // The deploy keys and the healthcheck arrived in the service's spec.
    let spec: Value = serde_json::from_str(&docker(
        client,
        h1,
        &[
            "service",
            "inspect",
            "--format",
            "{{json .Spec}}",
            "infra_web",
        ],
    ))
    .unwrap();
    assert_eq!(spec["Labels"]["tier"], "front", "{spec}");
    assert_eq!(spec["Labels"]["com.docker.stack.namespace"], "infra");
    assert_eq!(spec["Mode"]["Replicated"]["Replicas"], 3);
    assert_eq!(spec["UpdateConfig"]["Delay"], 1_000_000_000u64, "{spec}");
    assert_eq!(
        spec["TaskTemplate"]["RestartPolicy"]["Condition"],
        "on-failure"
    );
    assert_eq!(
        spec["TaskTemplate"]["Placement"]["MaxReplicas"], 1,
        "{spec}"
    );
    let health = &spec["TaskTemplate"]["ContainerSpec"]["Healthcheck"];
    assert_eq!(health["Test"][1], "wget", "{spec}");
    assert_eq!(health["Interval"], 2_000_000_000u64, "{spec}");
    // Another stack's tasks are not infra's: `stack ps` filters by the stack's label.
    let err = docker_err(client, h1, &["stack", "ps", "other"]);
    assert!(err.contains("nothing found in stack: other"), "{err}");

    // A redeploy of the same file updates in place: the secret and config stay, the
    // service keeps its tasks (nothing in its template changed).
    // `stack ps -q`: the IDs of the stack's tasks.
    // (The current tasks: a task a slow health check had restarted before the redeploy is
    // history, not the redeploy's doing.)
    let task_ids = || -> Vec<String> {
        let mut ids: Vec<String> = docker(
            client,
            h1,
            &[
                "stack",
                "ps",
                "-q",
                "--filter",
                "desired-state=running",
                "infra",
            ],
        )
        .lines()
        .map(str::to_owned)
        .collect();
        ids.sort();
        ids
    };
    let tasks_before = task_ids();
    assert_eq!(
        tasks_before.len(),
        4,
        "{}",
        docker(client, h1, &["stack", "ps", "--no-trunc", "infra"])
    );
    let out = docker(
        client,
        h1,
        &["stack", "deploy", "-c", compose.to_str().unwrap(), "infra"],
    );
    assert!(out.contains("Updating service infra_web"), "{out}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        tasks_before,
        task_ids(),
        "an unchanged redeploy replaced tasks"
    );
    // A config cannot change under its name, in Swarm or here: refused by the API, and
    // nothing else of the stack changes.
    std::fs::write(dir.join("site.conf"), "site-v2\n").unwrap();
    let err = docker_err(
        client,
        h1,
        &["stack", "deploy", "-c", compose.to_str().unwrap(), "infra"],
    );
    assert!(err.contains("only updates to Labels are allowed"), "{err}");
    assert!(
        answers(&c, h2, 6)
            .keys()
            .all(|k| k.starts_with("s3cret site-v1 "))
    );

    // stack rm removes the service, the network, the secret and the config.
    docker(client, h1, &["stack", "rm", "infra"]);
    c.eventually(Duration::from_secs(60), "infra removed everywhere", |_| {
        for (what, args) in [
            ("stack", &["stack", "ls"][..]),
            ("service", &["service", "ls"][..]),
            ("network", &["network", "ls"][..]),
            ("secret", &["secret", "ls"][..]),
            ("config", &["config", "ls"][..]),
        ] {
            let out = docker(client, h2, args);
            if out.contains("infra") {
                anyhow::bail!("{what} left:\n{out}");
            }
        }
        Ok(Some(()))
    })
    .unwrap();
    // As in Docker, `stack rm` keeps volumes: this one goes with `volume rm` where it lives.
    let volume = format!("infra_{volume}");
    c.eventually(
        Duration::from_secs(60),
        "the worker's volume removed",
        |c| {
            for h in c.hosts() {
                let _ = h.meshctl(&["volume", "rm", &volume]);
            }
            let left = Command::new("podman")
                .args(["volume", "exists", &volume])
                .status()?;
            Ok((!left.success()).then_some(()))
        },
    )
    .unwrap();
}

#[test]
fn docker_28_deploys_a_stack() {
    stack_commands_work(CLIENTS[0]);
}

#[test]
fn debians_docker_20_10_deploys_a_stack() {
    stack_commands_work(CLIENTS[1]);
}
