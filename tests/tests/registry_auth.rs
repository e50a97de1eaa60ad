//! `--with-registry-auth` against a private registry (distribution's, with an htpasswd
//! login), the way a Swarm user ships a private image: the user has logged in on the machine
//! they run meshctl from, the agents have not. Without the flag the registry's refusal is the
//! error (at create, or in `service ps` on the node that pulls); with it the node that runs
//! the task pulls with the user's credentials, which nothing shows and no file keeps.

use std::{
    collections::BTreeMap,
    io::Write,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use mesh_agent::{
    cluster::Sealed,
    gossip::{
        keyring::{self, ClusterKey, Keyring},
        sealed, signed,
    },
    identity::{self, NodeIdentity},
};
use mesh_tests::{
    Cluster, Host,
    cluster::{UNDERLAY_PREFIX, bin},
    image::Image,
    membership::{join_command, token_and_address, wait_ready},
    workload::http_get,
};
use serde_json::Value;

const USER: &str = "mesh";
const PASSWORD: &str = "pr1vate-s3cret";

/// The registry's address on the underlay, from an outside machine.
fn registry_addr() -> String {
    format!("{UNDERLAY_PREFIX}.200:5000")
}

fn write(path: &Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

/// Two nodes with the harness's cluster key (credentials are sealed with it) whose podman takes the
/// test's registry without TLS; the registry and an outside client on the underlay.
fn cluster(dir: &Path) -> Cluster {
    let mut c = Cluster::new(2).unwrap();
    let registries = registries_conf(dir);
    for i in 1..=2 {
        c.host_mut(i)
            // Sealed by the harness's cluster key.
            .start_agent_with_env(
                &[],
                &[("CONTAINERS_REGISTRIES_CONF", registries.to_str().unwrap())],
            )
            .unwrap();
    }
    c.create_network("app", "10.63.0.0/24").unwrap();
    c.external("client", 100).unwrap();
    c
}

/// A podman registries.conf that takes the test's registry without TLS.
fn registries_conf(dir: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let registries = dir.join("registries.conf");
    write(
        &registries,
        &format!(
            "[[registry]]\nlocation = \"{}\"\ninsecure = true\n",
            registry_addr()
        ),
    );
    registries
}

/// The user's image, pushed to the private registry (no node has it), its name there, and
/// the auth file `podman login` wrote on the user's machine.
fn push_private_image(c: &Cluster, dir: &Path) -> (Image, String, std::path::PathBuf) {
    let image = Image::busybox(
        "private",
        r#"["/bin/sh","-c","trap 'exit 0' TERM; echo private $(hostname) > /www/index.html; httpd -f -p 80 -h /www & wait"]"#,
    )
    .unwrap();
    let remote = format!("{}/team/web:1", registry_addr());
    let push = c
        .external_ns("registry")
        .unwrap()
        .command("podman")
        .args(["push", "--tls-verify=false", "--quiet"])
        .arg(format!("--creds={USER}:{PASSWORD}"))
        .args([image.name(), &remote])
        .output()
        .unwrap();
    assert!(push.status.success(), "{push:?}");
    let _ = Command::new("podman")
        .args(["rmi", "--force", &remote])
        .output();
    let auth_file = dir.join("auth.json");
    write(
        &auth_file,
        &format!(
            r#"{{"auths": {{"{}": {{"auth": "{}"}}}}}}"#,
            registry_addr(),
            BASE64.encode(format!("{USER}:{PASSWORD}"))
        ),
    );
    (image, remote, auth_file)
}

/// A registry that lets only USER in, serving from `dir`; it stops with the namespace.
fn start_registry(c: &mut Cluster, dir: &Path) -> mesh_tests::netns::Background {
    let htpasswd = Command::new("htpasswd")
        .args(["-Bbn", USER, PASSWORD])
        .output()
        .expect("htpasswd (apache2-utils, scripts/setup.sh installs it)");
    assert!(htpasswd.status.success(), "{htpasswd:?}");
    write(
        &dir.join("htpasswd"),
        &String::from_utf8(htpasswd.stdout).unwrap(),
    );
    write(
        &dir.join("registry.yml"),
        &format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {}\nauth:\n  htpasswd:\n    realm: mesh-test\n    path: {}\n",
            dir.join("data").display(),
            registry_addr(),
            dir.join("htpasswd").display()
        ),
    );
    let ns = c.external("registry", 200).unwrap();
    let registry = ns
        .spawn(
            "docker-registry",
            &["serve", dir.join("registry.yml").to_str().unwrap()],
        )
        .unwrap();
    let url = format!("http://{}/v2/", registry_addr());
    c.eventually(Duration::from_secs(10), "the registry answers", |c| {
        let out = c
            .external_ns("registry")
            .unwrap()
            .command("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &url])
            .output()?;
        Ok((String::from_utf8_lossy(&out.stdout) == "401").then_some(()))
    })
    .unwrap();
    registry
}

/// meshctl as the user who logged in: their auth file is the one podman's login wrote.
fn meshctl_as_user(h: &Host, auth_file: &Path, args: &[&str]) -> Output {
    Command::new(bin("meshctl"))
        .arg("--socket")
        .arg(h.socket())
        .args(args)
        .env("REGISTRY_AUTH_FILE", auth_file)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Leftover pull credentials of the agents', if any.
fn pull_auth_files() -> Vec<String> {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("mesh-pull-"))
        .collect()
}

#[test]
fn a_private_image_runs_with_the_users_registry_login_and_fails_clearly_without() {
    let dir = std::env::temp_dir().join(format!("mt{}-registry", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut c = cluster(&dir);
    let _registry = start_registry(&mut c, &dir);

    let (_image, remote, auth_file) = push_private_image(&c, &dir);
    let host2 = c.host(2).node_name().to_owned();
    let create = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "service",
            "create",
            "--name",
            name,
            "--network",
            "app",
            "--constraint",
        ];
        let on_host2 = format!("node.id=={host2}");
        args.push(&on_host2);
        args.extend_from_slice(extra);
        args.push(&remote);
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        meshctl_as_user(c.host(1), &auth_file, &args)
    };

    // Without the flag, the creating node's own lookup meets the registry's refusal.
    let out = create("nologin", &["-d"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("could not be found on this node or its registry")
            && text(&out).contains("authentication required"),
        "{}",
        text(&out)
    );
    let services: Vec<Value> = c.host(1).meshctl_json(&["service", "ls"]).unwrap();
    assert!(services.is_empty(), "nothing created: {services:?}");

    // Left to the node (--no-resolve-image), the task fails there with the registry's words.
    let out = create("nopull", &["-d", "--no-resolve-image"]);
    assert!(out.status.success(), "{}", text(&out));
    let error = c
        // Up to two minutes: once, with the file's three tests (three registries, their
        // pulls) running at once on a loaded machine, the first rejection took over 60 s.
        .eventually(Duration::from_secs(120), "nopull's task rejected", |c| {
            let rows: Vec<Value> =
                c.host(1)
                    .meshctl_json(&["service", "ps", "nopull", "--no-trunc"])?;
            Ok(rows
                .iter()
                .find(|r| r["state"] == "Rejected")
                .map(|r| r["error"].as_str().unwrap_or_default().to_owned()))
        })
        .unwrap();
    assert!(
        error.contains(&format!("pull {remote}")) && error.contains("authentication required"),
        "{error}"
    );
    c.host(1).meshctl_ok(&["service", "rm", "nopull"]).unwrap();

    // With it: host2, which nobody logged in on, pulls with the user's credentials; the
    // task serves on the published port from every node.
    let out = create(
        "private",
        &[
            "--with-registry-auth",
            "--no-resolve-image",
            "--publish",
            "published=8080,target=80",
            "-d",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let client = c.external_ns("client").unwrap();
    c.eventually(Duration::from_secs(60), "the private image serves", |c| {
        let rows: Vec<Value> = c.host(1).meshctl_json(&["service", "ps", "private"])?;
        let running = rows
            .iter()
            .any(|r| r["state"] == "Running" && r["node"] == host2.as_str());
        if !running {
            return Ok(None);
        }
        let mut answers = Vec::new();
        for h in c.hosts() {
            let a: std::net::SocketAddr = format!("{}:8080", h.ip).parse()?;
            answers.push(client.run(move || http_get(a))??);
        }
        Ok(answers
            .iter()
            .all(|b| b.starts_with("private "))
            .then_some(()))
    })
    .unwrap();

    // Nothing shows the credentials, and no file keeps them.
    for args in [
        vec!["--format", "json", "service", "inspect", "private"],
        vec!["service", "inspect", "private", "--pretty"],
        vec!["service", "ps", "private", "--no-trunc"],
    ] {
        let shown = text(&c.host(2).meshctl(&args).unwrap());
        assert!(!shown.contains(PASSWORD), "{args:?}: {shown}");
        assert!(
            !shown.contains(&BASE64.encode(format!("{USER}:{PASSWORD}"))),
            "{shown}"
        );
    }
    assert!(pull_auth_files().is_empty(), "{:?}", pull_auth_files());
    for h in c.hosts() {
        for f in walk(&h.state_dir()) {
            let bytes = std::fs::read(&f).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&bytes).contains(PASSWORD),
                "{} holds the password",
                f.display()
            );
        }
    }
    let inspect: Value = c
        .host(2)
        .meshctl_json(&["service", "inspect", "private"])
        .unwrap();
    assert_eq!(
        inspect["spec"]["registry_auth"]["registry"],
        registry_addr(),
        "sealed, for that registry: {inspect}"
    );

    // New credentials (`service update --with-registry-auth` alone) are a new spec version
    // that replaces no task: they matter only to the next pull.
    let other = dir.join("other.json");
    write(
        &other,
        &format!(
            r#"{{"auths": {{"{}": {{"auth": "{}"}}}}}}"#,
            registry_addr(),
            BASE64.encode(format!("{USER}:rotated-{PASSWORD}"))
        ),
    );
    let running = |c: &Cluster| -> Vec<String> {
        let rows: Vec<Value> = c
            .host(1)
            .meshctl_json(&["service", "ps", "private"])
            .unwrap();
        rows.iter()
            .filter(|r| r["state"] == "Running")
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let before = running(&c);
    let version = inspect["spec"]["version"].as_u64().unwrap();
    let out = meshctl_as_user(
        c.host(1),
        &other,
        &["service", "update", "--with-registry-auth", "-d", "private"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let after: Value = c
        .host(1)
        .meshctl_json(&["service", "inspect", "private"])
        .unwrap();
    assert_eq!(after["spec"]["version"].as_u64(), Some(version + 1));
    assert_ne!(
        after["spec"]["registry_auth"]["data"], inspect["spec"]["registry_auth"]["data"],
        "sealed anew"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(running(&c), before, "no task replaced");

    // A process service pulls nothing: the flag is refused there, by name.
    c.host(1)
        .meshctl_ok(&[
            "service",
            "create",
            "--name",
            "proc",
            "-d",
            "--process",
            "--",
            "sleep",
            "1000",
        ])
        .unwrap();
    let out = meshctl_as_user(
        c.host(1),
        &auth_file,
        &["service", "update", "--with-registry-auth", "proc"],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("runs no image"), "{}", text(&out));

    c.host(1).meshctl_ok(&["service", "rm", "private"]).unwrap();
    let _ = Command::new("podman")
        .args(["rmi", "--force", &remote])
        .output();
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Every value of `h`'s own gossip keys as its state dir keeps them, unwrapped from their
/// signatures: every replicated object, since every node republishes them.
fn gossip_state(h: &Host) -> BTreeMap<String, Value> {
    let path = h.state_dir().join("gossip-keys.json");
    let kv: BTreeMap<String, String> =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    kv.into_iter()
        .filter_map(|(k, v)| {
            let v = signed::unchecked(&v).unwrap_or(&v).to_owned();
            Some((k, serde_json::from_str(&v).ok()?))
        })
        .collect()
}

/// Every cluster key (a keyring each) and Ed25519 key pair among `h`'s files.
fn keys_of(h: &Host) -> (Vec<Keyring>, Vec<NodeIdentity>) {
    let mut rings = Vec::new();
    let mut identities = Vec::new();
    for f in walk(&h.config_dir())
        .into_iter()
        .chain(walk(&h.state_dir()))
    {
        if let Ok(material) = keyring::read_material(&f) {
            for m in &material {
                rings.push(Keyring::new(vec![ClusterKey::new(m)]).unwrap());
            }
        }
        if let Ok(id) = NodeIdentity::load(&f) {
            identities.push(id);
        }
    }
    (rings, identities)
}

/// In a cluster with roles (`mesh-agent init`, `join`: host1 the admin, host2 and host3
/// workers) the credentials are sealed to the admin key, and only the node that pulls the
/// image gets a copy sealed to its own key: host2 pulls with it and serves, while host3 —
/// holding the cluster key, its node key and everything gossip carries, host2's copy too —
/// opens no form of them with any key it has. The copy goes with the service.
#[test]
fn with_roles_the_credentials_reach_only_the_node_that_pulls_the_image() {
    let dir = std::env::temp_dir().join(format!("mt{}-registry-roles", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let registries = registries_conf(&dir);
    let env = [("CONTAINERS_REGISTRIES_CONF", registries.to_str().unwrap())];
    let mut c = Cluster::new(3).unwrap();
    c.host_mut(1)
        .start_agent_command_with_env(&["init"], &[], &env)
        .unwrap();
    let (token, address) = token_and_address(&join_command(&c.host(1).output()));
    let token_file = dir.join("join-token");
    write(&token_file, &format!("{token}\n"));
    for i in 2..=3 {
        c.host_mut(i)
            .start_agent_command_with_env(
                &[
                    "join",
                    "--token-file",
                    token_file.to_str().unwrap(),
                    &address,
                ],
                &[],
                &env,
            )
            .unwrap();
    }
    wait_ready(&c, &[1, 2, 3], &[1, 2, 3], Duration::from_secs(15));
    let names: Vec<String> = (1..=3).map(|i| c.host(i).node_name().to_owned()).collect();
    c.eventually(Duration::from_secs(10), "roles settle", |c| {
        let r = c.host(3).node_roles().unwrap_or_default();
        let role = |i: usize| r.get(&names[i - 1]).map(String::as_str);
        Ok(
            (role(1) == Some("admin") && role(2) == Some("worker") && role(3) == Some("worker"))
                .then_some(()),
        )
    })
    .unwrap();
    c.create_network("app", "10.64.0.0/24").unwrap();
    c.external("client", 100).unwrap();
    let _registry = start_registry(&mut c, &dir);
    let (_image, remote, auth_file) = push_private_image(&c, &dir);
    let cluster = {
        let g: Value = c.host(1).meshctl_json(&["gossip", "stats"]).unwrap();
        g["cluster"].as_str().unwrap().to_owned()
    };
    let host2 = names[1].clone();

    let on_host2 = format!("node.id=={host2}");
    let out = meshctl_as_user(
        c.host(1),
        &auth_file,
        &[
            "service",
            "create",
            "--name",
            "private",
            "--network",
            "app",
            "--constraint",
            &on_host2,
            "--with-registry-auth",
            "--no-resolve-image",
            "--publish",
            "published=8080,target=80",
            "-d",
            &remote,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let client = c.external_ns("client").unwrap();
    let addr: std::net::SocketAddr = format!("{}:8080", c.host(3).ip).parse().unwrap();
    c.eventually(Duration::from_secs(60), "host2 pulls and serves", |c| {
        let rows: Vec<Value> = c.host(1).meshctl_json(&["service", "ps", "private"])?;
        let running = rows
            .iter()
            .any(|r| r["state"] == "Running" && r["node"] == host2.as_str());
        if !running {
            return Ok(None);
        }
        Ok(client
            .run(move || http_get(addr))??
            .starts_with("private ")
            .then_some(()))
    })
    .unwrap();

    // Sealed to the admins: nothing under the cluster key.
    let copy_key = format!("obj:secretcopy:registry-auth:private@{host2}");
    c.eventually(Duration::from_secs(10), "host3 keeps host2's copy", |c| {
        let state = gossip_state(c.host(3));
        Ok((state.contains_key("obj:svc:private") && state.contains_key(&copy_key)).then_some(()))
    })
    .unwrap();
    let state = gossip_state(c.host(3));
    let auth = &state["obj:svc:private"]["spec"]["registry_auth"];
    assert!(auth["admins"].is_string(), "{auth}");
    assert_eq!(auth["data"], "", "{auth}");
    assert!(
        !state
            .keys()
            .any(|k| k.starts_with("obj:secretcopy:registry-auth:private@")
                && !k.ends_with(&format!("@{host2}"))),
        "a copy only for host2: {:?}",
        state.keys().collect::<Vec<_>>()
    );

    // host3 tries every key it holds on every sealed form, under every node's name.
    let (rings, identities) = keys_of(c.host(3));
    let own = NodeIdentity::load(&identity::key_file(&c.host(3).state_dir())).unwrap();
    assert!(!rings.is_empty(), "host3 holds a cluster key");
    assert!(identities.iter().any(|i| i.public() == own.public()));
    let name = "registry-auth:private";
    let cluster_form = Sealed {
        key: mesh_api::v1::KeyId(auth["key"].as_u64().unwrap() as u32),
        data: auth["data"].as_str().unwrap().to_owned(),
    };
    let mut tried = 0;
    for ring in &rings {
        assert!(sealed::open(ring, &cluster, name, &cluster_form).is_err());
        tried += 1;
    }
    let copy = state[&copy_key]["spec"]["data"].as_str().unwrap();
    for id in &identities {
        let admins = auth["admins"].as_str().unwrap();
        assert!(sealed::open_for_admins(id, &cluster, name, admins).is_err());
        tried += 1;
        for node in &names {
            assert!(sealed::open_copy(id, &cluster, name, node, copy).is_none());
            tried += 1;
        }
    }
    eprintln!("host3 tried {tried} key/form pairs; none opened");
    assert_eq!(tried, rings.len() + identities.len() * (1 + names.len()));
    let login = BASE64.encode(format!("{USER}:{PASSWORD}"));
    for f in walk(&c.host(3).config_dir())
        .into_iter()
        .chain(walk(&c.host(3).state_dir()))
    {
        let bytes = String::from_utf8_lossy(&std::fs::read(&f).unwrap_or_default()).into_owned();
        assert!(
            !bytes.contains(PASSWORD) && !bytes.contains(&login),
            "{} holds the login",
            f.display()
        );
    }
    assert!(pull_auth_files().is_empty(), "{:?}", pull_auth_files());

    // The copy goes with the service.
    c.host(1).meshctl_ok(&["service", "rm", "private"]).unwrap();
    c.eventually(Duration::from_secs(30), "host2's copy is removed", |c| {
        let state = gossip_state(c.host(1));
        Ok(state
            .get(&copy_key)
            .is_some_and(|v| !v["deleted"].is_null())
            .then_some(()))
    })
    .unwrap();
    for h in c.hosts() {
        let g: Value = h.meshctl_json(&["gossip", "stats"]).unwrap();
        assert_eq!(g["origins"]["secret_copies_refused"], 0, "{g}");
    }
    let _ = Command::new("podman")
        .args(["rmi", "--force", &remote])
        .output();
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A cluster made before roles gets them: credentials sealed under the cluster key (which
/// every member opens), in the service and in its previous spec, are resealed to the admin
/// key by the admin once the agents restart with one; host2, a worker, gets its own copy and
/// pulls the image again with it.
#[test]
fn credentials_from_before_roles_are_resealed_to_the_admins_and_still_pull() {
    let dir = std::env::temp_dir().join(format!("mt{}-registry-reseal", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut c = cluster(&dir);
    let _registry = start_registry(&mut c, &dir);
    let (_image, remote, auth_file) = push_private_image(&c, &dir);
    let registries = dir.join("registries.conf");
    let (h1, h2) = (
        c.host(1).node_name().to_owned(),
        c.host(2).node_name().to_owned(),
    );
    let on_host2 = format!("node.id=={h2}");
    let out = meshctl_as_user(
        c.host(1),
        &auth_file,
        &[
            "service",
            "create",
            "--name",
            "private",
            "--network",
            "app",
            "--constraint",
            &on_host2,
            "--with-registry-auth",
            "--no-resolve-image",
            "-d",
            &remote,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    // A template change keeps the credentials in the previous spec too.
    c.host(1)
        .meshctl_ok(&["service", "update", "--env-add", "A=1", "-d", "private"])
        .unwrap();
    let forms = |h: &Host| {
        let state = gossip_state(h);
        let spec = &state["obj:svc:private"]["spec"];
        [
            spec["registry_auth"].clone(),
            spec["previous"]["registry_auth"].clone(),
        ]
    };
    for auth in forms(c.host(2)) {
        assert!(
            auth["admins"].is_null() && auth["data"].as_str().is_some_and(|d| !d.is_empty()),
            "{auth}"
        );
    }
    let tasks = |c: &Cluster| -> Vec<Value> {
        c.host(1)
            .meshctl_json(&["service", "ps", "private"])
            .unwrap_or_default()
    };
    // A task not among `old` runs on host2: it pulled the image there.
    let a_new_task_runs = |c: &Cluster, old: &[Value]| -> anyhow::Result<Option<()>> {
        Ok(tasks(c)
            .iter()
            .any(|r| {
                r["state"] == "Running"
                    && r["node"] == h2.as_str()
                    && !old.iter().any(|o| o["id"] == r["id"])
            })
            .then_some(()))
    };
    c.eventually(Duration::from_secs(60), "host2 pulls and runs", |c| {
        a_new_task_runs(c, &[])
    })
    .unwrap();

    // Roles arrive: host1 holds the admin key, host2 its public half.
    let key = c.host(1).cluster_key().to_str().unwrap().to_owned();
    let admin_dirs = c.give_admin_keys(2).unwrap();
    for (i, admin_dir) in (1..=2).zip(&admin_dirs) {
        c.host_mut(i)
            .start_agent_with_env(
                &["--cluster-key-file", &key, "--admin-key-dir", admin_dir],
                &[("CONTAINERS_REGISTRIES_CONF", registries.to_str().unwrap())],
            )
            .unwrap();
    }
    c.eventually(Duration::from_secs(20), "roles settle", |c| {
        let r = c.host(2).node_roles().unwrap_or_default();
        Ok((r.get(&h1).map(String::as_str) == Some("admin")
            && r.get(&h2).map(String::as_str) == Some("worker"))
        .then_some(()))
    })
    .unwrap();
    let copy_key = format!("obj:secretcopy:registry-auth:private@{h2}");
    c.eventually(
        Duration::from_secs(20),
        "the admin reseals both forms and host2 holds its copy",
        |c| {
            let resealed = forms(c.host(2))
                .iter()
                .all(|a| a["admins"].is_string() && a["data"] == "");
            let copy = gossip_state(c.host(2)).get(&copy_key).cloned();
            Ok((resealed && copy.is_some_and(|c| c["deleted"].is_null())).then_some(()))
        },
    )
    .unwrap();

    // The image gone from the node, a new task pulls it with host2's copy.
    let before = tasks(&c);
    let _ = Command::new("podman")
        .args(["rmi", "--force", &remote])
        .output();
    c.host(1)
        .meshctl_ok(&["service", "update", "--force", "-d", "private"])
        .unwrap();
    c.eventually(Duration::from_secs(60), "a new task pulls and runs", |c| {
        a_new_task_runs(c, &before)
    })
    .unwrap();

    c.host(1).meshctl_ok(&["service", "rm", "private"]).unwrap();
    let _ = Command::new("podman")
        .args(["rmi", "--force", &remote])
        .output();
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
}
