//! `/metrics` in the Prometheus text format: scraped before and after traffic, parsed
//! strictly, and the counters move by exactly what was sent: flows and per-service and
//! per-backend counters by the requests, DNS answers by the lookups made.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use mesh_tests::{
    Cluster, Host,
    cluster::bin,
    workload::{RemoteSession, http_get},
};
use serde_json::Value;

const METRICS: &str = "127.0.0.1:9464";

/// A sample's name and its labels, sorted.
type Series = (String, BTreeMap<String, String>);

/// A strict reader of the text format (0.0.4): every sample belongs to a family declared
/// by `# TYPE` (histograms' `_bucket`/`_sum`/`_count` included), label values are quoted
/// and escaped, values are numbers, no series appears twice.
fn parse(text: &str) -> BTreeMap<Series, f64> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("TYPE"), Some(name), Some(t)) => {
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                        "{}",
                        at()
                    );
                    assert!(types.insert(name.into(), t.into()).is_none(), "{}", at());
                }
                (Some("HELP"), Some(_), Some(_)) => {}
                _ => panic!("unexpected comment, {}", at()),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{}", at()));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value, {}", at())),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("{}", at()));
                (
                    name,
                    parse_labels(body).unwrap_or_else(|| panic!("bad labels, {}", at())),
                )
            }
            None => (series, BTreeMap::new()),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name, {}",
            at()
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "sample without # TYPE, {}",
            at()
        );
        if types[family] == "counter" {
            assert!(
                name.ends_with("_total"),
                "counter not named _total, {}",
                at()
            );
        }
        assert!(
            samples.insert((name.to_owned(), labels), value).is_none(),
            "duplicate series, {}",
            at()
        );
    }
    samples
}

fn parse_labels(body: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut chars = body.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next()? != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => value.push(match chars.next()? {
                    'n' => '\n',
                    c @ ('\\' | '"') => c,
                    _ => return None,
                }),
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key, value);
        match chars.next() {
            Some(',') | None => {}
            Some(_) => return None,
        }
    }
    Some(labels)
}

fn scrape(h: &Host) -> BTreeMap<Series, f64> {
    let text =
        h.ns.run(|| {
            let mut s = TcpStream::connect(METRICS).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: mesh\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut resp = String::new();
            s.read_to_string(&mut resp).unwrap();
            resp
        })
        .unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    // The body may be chunked; the metrics never contain a line that is only hex.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    parse(&body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// The sum of a metric's series whose labels include `with`.
fn sum(m: &BTreeMap<Series, f64>, name: &str, with: &[(&str, &str)]) -> f64 {
    m.iter()
        .filter(|((n, l), _)| {
            n == name
                && with
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
        .sum()
}

fn declared(m: &BTreeMap<Series, f64>, name: &str) -> bool {
    m.keys().any(|(n, _)| n == name)
}

#[test]
fn per_service_counters_move_by_the_requests_sent() {
    let mut c = Cluster::new(3).unwrap();
    // Sealed gossip (the harness's key), so the gossip counters exist.
    for i in 1..=3 {
        c.host_mut(i)
            .start_agent(&["--metrics-listen", METRICS])
            .unwrap();
    }
    c.external("client", 100).unwrap();
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
    c.eventually(Duration::from_secs(15), "web at 3/3 on host 1", |c| {
        let s: Value = c.host(1).meshctl_json(&["service", "inspect", "web"])?;
        let active = s["dataplane"]["backends"]
            .as_array()
            .map_or(0, |b| b.iter().filter(|b| b["state"] == "active").count());
        Ok((s["running"] == 3 && active == 3).then_some(()))
    })
    .unwrap();

    const REQUESTS: usize = 30;
    let addr: SocketAddr = format!("{}:8080", c.host(1).ip).parse().unwrap();
    // A connection held open across the measurement: one flow that must be in the table.
    let held = RemoteSession::open(c.external_ns("client").unwrap(), addr);
    held.get();
    let before = scrape(c.host(1));
    c.external_ns("client")
        .unwrap()
        .run(move || {
            for _ in 0..REQUESTS {
                http_get(addr).unwrap();
            }
        })
        .unwrap();
    // DNS queries from inside one of host 1's tasks: one A query each (IPv4 only), answered
    // by the node's resolver itself.
    const QUERIES: usize = 5;
    let local: Vec<Value> = c.host(1).meshctl_json(&["ps"]).unwrap();
    let task = local[0]["name"].as_str().unwrap().to_owned();
    for _ in 0..QUERIES {
        c.host(1)
            .meshctl_ok(&["exec", &task, "--", "getent", "ahostsv4", "web"])
            .unwrap();
    }
    // Gossip goes to a random peer every 100 ms: give the counters of datagrams this node
    // sent and received a second to move, whatever the requests took.
    std::thread::sleep(Duration::from_secs(1));
    let after = scrape(c.host(1));

    let delta =
        |name: &str, with: &[(&str, &str)]| sum(&after, name, with) - sum(&before, name, with);
    let web = [("service", "web")];
    let n = REQUESTS as f64;
    assert_eq!(delta("mesh_service_flows_total", &web), n);
    assert_eq!(
        delta("mesh_backend_flows_total", &web),
        n,
        "backends add up"
    );
    assert_eq!(delta("mesh_flows_created_total", &[]), n);
    // Each request is a TCP connection: at least SYN, the request and the FIN's ACK.
    assert!(delta("mesh_service_packets_total", &web) >= 3.0 * n);
    assert!(delta("mesh_service_bytes_total", &web) >= 40.0 * 3.0 * n);
    let per_backend: Vec<f64> = after
        .iter()
        .filter(|((name, l), _)| name == "mesh_backend_flows_total" && l["service"] == "web")
        .map(|((_, l), v)| {
            v - before
                .get(&("mesh_backend_flows_total".into(), l.clone()))
                .unwrap_or(&0.0)
        })
        .collect();
    assert_eq!(per_backend, vec![n / 3.0; 3], "round robin over 3 backends");
    assert_eq!(delta("mesh_service_drops_total", &web), 0.0);

    // What the backends carried adds up to what the service carried.
    for m in ["packets", "bytes"] {
        assert_eq!(
            delta(&format!("mesh_backend_{m}_total"), &web),
            delta(&format!("mesh_service_{m}_total"), &web),
            "backend {m} add up to the service's"
        );
    }

    let q = QUERIES as f64;
    assert_eq!(
        delta(
            "mesh_dns_queries_total",
            &[("type", "A"), ("rcode", "NOERROR")]
        ),
        q,
        "one A answer per lookup"
    );
    assert_eq!(
        delta("mesh_dns_queries_total", &[]),
        q,
        "no other answers than those"
    );
    assert_eq!(
        delta("mesh_dns_forwarded_total", &[]),
        0.0,
        "service names are answered locally"
    );
    assert_eq!(sum(&after, "mesh_gossip_authenticated", &[]), 1.0);
    assert!(delta("mesh_gossip_datagrams_received_total", &[]) > 0.0);
    assert!(delta("mesh_gossip_datagrams_sent_total", &[]) > 0.0);
    assert!(declared(&after, "mesh_gossip_datagrams_dropped_total"));
    assert!(declared(&after, "mesh_dataplane_drops_total"));

    assert_eq!(
        sum(
            &after,
            "mesh_tasks",
            &[("service", "web"), ("state", "running")]
        ),
        3.0
    );
    assert_eq!(sum(&after, "mesh_service_replicas_running", &web), 3.0);
    assert_eq!(sum(&after, "mesh_service_replicas_desired", &web), 3.0);
    assert_eq!(sum(&after, "mesh_nodes", &[("status", "ready")]), 3.0);
    assert!(sum(&after, "mesh_programming_duration_seconds_count", &[]) >= 1.0);
    // The held connection is in the flow table, and the table holds no more flows than
    // connections were made through host 1 (the held one and the requests).
    let active = sum(&after, "mesh_flows_active", &[]);
    assert!((1.0..=n + 1.0).contains(&active), "{active} active flows");
    assert!(sum(&after, "mesh_flows_established", &[]) >= 1.0);
    held.get();
}
