//! The visualizer in a real browser: headless Chromium, driven over the DevTools protocol
//! in the host's network namespace (the page listens on that host's loopback), sees the
//! whole cluster from one node and follows a scale and a node failure live, without a
//! reload. Screenshots go to the cluster's log directory and, to outlive the test, to
//! cargo's target tmp dir (`ui-*.png`).

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use base64::Engine;
use mesh_tests::{Cluster, Host, cluster::bin};
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

const UI: &str = "127.0.0.1:8090";
const DEVTOOLS_PORT: u16 = 9222;

/// A headless Chromium in a host's namespace and a DevTools connection to its page.
struct Browser {
    child: Child,
    ws: WebSocket<TcpStream>,
    next_id: u64,
    _profile: PathBuf,
}

impl Browser {
    fn start(h: &Host, dir: &std::path::Path) -> Self {
        let profile = dir.join("chromium-profile");
        std::fs::create_dir_all(&profile).unwrap();
        let log = std::fs::File::create(dir.join("chromium.log")).unwrap();
        let child =
            h.ns.command("chromium")
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--hide-scrollbars",
                    "--window-size=1600,1000",
                    &format!("--remote-debugging-port={DEVTOOLS_PORT}"),
                    "--remote-debugging-address=127.0.0.1",
                ])
                .arg(format!("--user-data-dir={}", profile.display()))
                .arg("about:blank")
                // Its singleton socket directory goes under TMPDIR, and a killed browser
                // leaves it behind: keep it with the profile, not in the machine's /tmp.
                .env("TMPDIR", &profile)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                // Its own process group: the renderers go with it.
                .process_group(0)
                .spawn()
                .expect("running chromium (scripts/setup.sh installs it)");
        // The page target's websocket, once DevTools answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            let targets =
                h.ns.run(|| http_get_local(DEVTOOLS_PORT, "/json/list"))
                    .unwrap();
            if let Some(Ok(list)) = targets.map(|t| serde_json::from_str::<Value>(&t)) {
                let page = list
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|t| t["type"] == "page");
                if let Some(u) = page.and_then(|p| p["webSocketDebuggerUrl"].as_str()) {
                    break u.to_owned();
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromium's DevTools did not come up:\n{}",
                std::fs::read_to_string(dir.join("chromium.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        // A socket made inside the namespace stays there: connect there, talk from here.
        let stream =
            h.ns.run(|| TcpStream::connect(("127.0.0.1", DEVTOOLS_PORT)))
                .unwrap()
                .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let (ws, _) = tungstenite::client(url.as_str(), stream).unwrap();
        Self {
            child,
            ws,
            next_id: 1,
            _profile: profile,
        }
    }

    /// One DevTools command; its result (events in between are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"id": id, "method": method, "params": params});
        self.ws.send(Message::text(msg.to_string())).unwrap();
        loop {
            let Message::Text(text) = self.ws.read().unwrap() else {
                continue;
            };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates an expression in the page; its value.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {r}");
        r["result"]["value"].clone()
    }

    /// Polls the page's state until `check` holds.
    fn until(&mut self, what: &str, timeout: Duration, check: impl Fn(&Value) -> bool) -> Value {
        self.until_eval(STATE, what, timeout, check)
    }

    /// Evaluates `expression` until `check` accepts what it returns.
    fn until_eval(
        &mut self,
        expression: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            // The page may still be loading (no body yet): that is "not yet", not a failure.
            let r = self.call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            );
            let state = if r.get("exceptionDetails").is_some() {
                Value::Null
            } else {
                r["result"]["value"].clone()
            };
            if !state.is_null() && check(&state) {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "page never showed {what}; it shows {state:#}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn screenshot(&mut self, name: &str, dirs: &[PathBuf]) {
        // New cards fade in for half a second.
        std::thread::sleep(Duration::from_millis(700));
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        for d in dirs {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join(name), &png).unwrap();
            eprintln!("screenshot: {}", d.join(name).display());
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.ws.close(None);
        // The group we made at spawn: the browser and its renderers, nothing else.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// What the page shows, read from its DOM.
const STATE: &str = r##"JSON.stringify({
  ready: document.body.dataset.ready === "true",
  live: document.getElementById("conn-text").textContent,
  nodes: [...document.querySelectorAll("section.node")].map(n => ({
    name: n.dataset.node, status: n.dataset.status,
    cards: [...n.querySelectorAll(".card")].map(c => c.dataset.task + ":" + c.dataset.state),
  })),
  services: [...document.querySelectorAll(".svc")].map(s =>
    s.dataset.service + " " + s.querySelector(".replicas").textContent),
  ticker: document.querySelectorAll("#ticker li").length,
  marker: window.__meshMarker || null,
})"##;

/// Where the services strip and each of its cards are on screen, and whether any card's
/// content is cut off.
const STRIP: &str = r##"JSON.stringify((() => {
  const strip = document.getElementById("services").getBoundingClientRect();
  return {
    vw: innerWidth, vh: innerHeight,
    strip: { top: strip.top, bottom: strip.bottom },
    cards: [...document.querySelectorAll(".svc")].map(c => {
      const r = c.getBoundingClientRect();
      return { name: c.dataset.service, top: r.top, bottom: r.bottom, left: r.left,
               right: r.right, height: r.height, clipped: c.scrollHeight > c.clientHeight + 1 };
    }),
    // Task cards that stick out of their node's panel.
    spilled: [...document.querySelectorAll("section.node .card")].filter(c =>
      c.getBoundingClientRect().bottom > c.closest("section.node").getBoundingClientRect().bottom + 1
    ).map(c => c.dataset.task),
  };
})())"##;

/// At this viewport, every card of the services strip is on screen whole, inside the strip,
/// tall enough to read (name, replicas, ports), and a screenshot shows it.
fn strip_is_readable_at(b: &mut Browser, width: u32, height: u32, shots: &[PathBuf]) {
    b.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
    );
    let g = state(&b.until_eval(
        STRIP,
        &format!("the page laid out at {width}x{height}"),
        Duration::from_secs(5),
        |v| {
            let g = state(v);
            g["vw"] == width && g["vh"] == height
        },
    ));
    let strip_top = g["strip"]["top"].as_f64().unwrap();
    let strip_bottom = g["strip"]["bottom"].as_f64().unwrap();
    let cards = g["cards"].as_array().unwrap();
    assert_eq!(cards.len(), 2, "{g:#}");
    for card in cards {
        let f = |k: &str| card[k].as_f64().unwrap();
        let whole = f("top") >= strip_top - 0.5
            && f("bottom") <= strip_bottom + 0.5
            && f("bottom") <= height as f64
            && f("left") >= 0.0
            && f("right") <= width as f64;
        assert!(
            whole,
            "{width}x{height}: card {} is not whole in the strip: {g:#}",
            card["name"]
        );
        assert!(
            f("height") >= 50.0,
            "{width}x{height}: card {} is squashed: {g:#}",
            card["name"]
        );
        assert_eq!(
            card["clipped"], false,
            "{width}x{height}: card {} cut off: {g:#}",
            card["name"]
        );
    }
    assert_eq!(
        g["spilled"],
        json!([]),
        "{width}x{height}: task cards outside their node's panel"
    );
    b.screenshot(&format!("ui-{width}x{height}.png"), shots);
}

fn state(v: &Value) -> Value {
    serde_json::from_str(v.as_str().unwrap()).unwrap()
}

fn cards(s: &Value, state_name: &str) -> usize {
    s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|n| n["cards"].as_array().unwrap())
        .filter(|c| {
            let c = c.as_str().unwrap();
            c.starts_with("web.") && c.ends_with(&format!(":{state_name}"))
        })
        .count()
}

/// A GET on this namespace's loopback; the body. DevTools keeps the connection open
/// whatever the request says, so the body is read by its Content-Length.
fn http_get_local(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let len = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })?;
        if body.len() >= len {
            return Some(body[..len].to_owned());
        }
    }
}

#[test]
fn the_page_shows_the_cluster_and_follows_a_scale_and_a_node_failure_live() {
    let mut c = Cluster::new(3).unwrap();
    for i in 1..=3 {
        c.host_mut(i).start_agent(&["--ui-listen", UI]).unwrap();
    }
    let whoami = bin("mesh-whoami");
    c.host(1)
        .meshctl_ok(&[
            "service",
            "create",
            "web",
            "--replicas",
            "3",
            "-p",
            "8080:80",
            "--",
            whoami.to_str().unwrap(),
        ])
        .unwrap();
    c.host(1)
        .meshctl_ok(&[
            "service",
            "create",
            "api",
            "--mode",
            "global",
            "--",
            whoami.to_str().unwrap(),
        ])
        .unwrap();
    let shots = [c.log_dir(), PathBuf::from(env!("CARGO_TARGET_TMPDIR"))];

    // The page of host 2 (which created nothing) shows everything.
    let mut b = Browser::start(c.host(2), &c.log_dir());
    b.call("Page.enable", json!({}));
    b.call("Page.navigate", json!({"url": format!("http://{UI}/")}));
    let s = state(&b.until(
        "3 nodes and 3 running web tasks",
        Duration::from_secs(20),
        |v| {
            let s = state(v);
            s["ready"] == true
                && s["nodes"].as_array().unwrap().len() == 3
                && cards(&s, "running") == 3
        },
    ));
    let mut names: Vec<&str> = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    names.sort();
    let want: Vec<&str> = c.hosts().iter().map(|h| h.node_name()).collect();
    assert_eq!(names, want);
    for n in s["nodes"].as_array().unwrap() {
        assert_eq!(n["status"], "ready", "{s:#}");
    }
    assert_eq!(s["live"], "live");

    // Remember this page load: a reload would lose it.
    b.eval("window.__meshMarker = 'same page'");
    c.host(1)
        .meshctl_ok(&["service", "scale", "web=5"])
        .unwrap();
    let s = state(&b.until(
        "5 running web tasks after the scale",
        Duration::from_secs(20),
        |v| cards(&state(v), "running") == 5,
    ));
    assert_eq!(s["marker"], "same page", "the page reloaded");
    b.until(
        "web 5/5 in the services strip",
        Duration::from_secs(10),
        |v| {
            state(v)["services"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s == "web 5/5")
        },
    );
    let s = state(
        &b.until("the scale in the ticker", Duration::from_secs(5), |v| {
            state(v)["ticker"].as_u64() > Some(0)
        }),
    );
    assert!(s["ticker"].as_u64().unwrap() > 0);
    b.screenshot("ui-scaled.png", &shots);

    // A node dies: its column says so, and its slots come back elsewhere.
    c.host_mut(3).kill_agent().unwrap();
    let dead = c.host(3).node_name().to_owned();
    let s = state(&b.until("host 3 down", Duration::from_secs(20), |v| {
        state(v)["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == dead.as_str() && n["status"] == "down")
    }));
    assert_eq!(s["marker"], "same page", "the page reloaded");
    b.until(
        "web back to 5 running tasks on the live nodes",
        Duration::from_secs(30),
        |v| {
            let s = state(v);
            let on_live: usize = s["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["status"] == "ready")
                .flat_map(|n| n["cards"].as_array().unwrap())
                .filter(|c| {
                    let c = c.as_str().unwrap();
                    c.starts_with("web.") && c.ends_with(":running")
                })
                .count();
            on_live == 5
        },
    );
    b.screenshot("ui-node-down.png", &shots);

    // Enough tasks that the nodes' columns are taller than a screen: the services strip
    // must still show every card whole (it used to shrink to a sliver), at the sizes a
    // wall screen and a laptop have.
    c.host(1)
        .meshctl_ok(&["service", "scale", "-d", "web=24"])
        .unwrap();
    b.until("24 running web tasks", Duration::from_secs(60), |v| {
        cards(&state(v), "running") == 24
    });
    for (width, height) in [(1600, 1000), (1280, 800)] {
        strip_is_readable_at(&mut b, width, height, &shots);
    }
}
