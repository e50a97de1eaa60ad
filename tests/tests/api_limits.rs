//! What a slow, greedy or hostile client can hold of an agent's listeners is bounded, and it
//! is told why: request bodies, slow headers and idle connections, the number of
//! connections and of open streams on the API socket; the visualizer answers only to this
//! node's own names (DNS rebinding).

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use mesh_tests::Cluster;

const UI: &str = "127.0.0.1:8090";

/// Sends `request` on a new API connection and reads the answer until the agent closes it
/// (or `wait` passes).
fn raw(socket: &Path, request: &[u8], wait: Duration) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    // The agent may answer (and close) before it has read all of a large request.
    let _ = s.write_all(request);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn status(answer: &str) -> &str {
    answer.lines().next().unwrap_or_default()
}

#[test]
fn the_api_bounds_bodies_slow_clients_connections_and_streams() {
    let mut c = Cluster::new(1).unwrap();
    c.host_mut(1).start_agent(&["--ui-listen", UI]).unwrap();
    let h = c.host(1);
    let socket = h.socket();

    // A 10 MB body is refused with 413 and a JSON reason, before it is read.
    let big = vec![b'x'; 10 << 20];
    let mut request = format!(
        "POST /v1/services HTTP/1.1\r\nhost: mesh\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        big.len()
    )
    .into_bytes();
    request.extend_from_slice(&big);
    let started = Instant::now();
    let answer = raw(&socket, &request, Duration::from_secs(5));
    assert!(status(&answer).contains("413"), "{answer:.300}");
    assert!(
        answer.contains("\"error\":\"the request body (10485760 bytes) is larger"),
        "{answer:.300}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Chunked, with no length to go by: refused once it passes the limit.
    let mut request =
        b"POST /v1/services HTTP/1.1\r\nhost: mesh\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..10 {
        request.extend_from_slice(format!("{:x}\r\n", 1 << 20).as_bytes());
        request.extend_from_slice(&big[..1 << 20]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let answer = raw(&socket, &request, Duration::from_secs(5));
    assert!(status(&answer).contains("413"), "{answer:.300}");
    assert!(
        answer.contains("is larger than this listener accepts"),
        "{answer:.300}"
    );
    // Still serving.
    h.meshctl_ok(&["node", "ls"]).unwrap();

    // Slowloris: a header line every second never completes a request; the agent closes the
    // connection after its header timeout (10 s) instead of holding it for ever.
    let mut slow = UnixStream::connect(&socket).unwrap();
    slow.write_all(b"GET /v1/nodes HTTP/1.1\r\nhost: mesh\r\n")
        .unwrap();
    let started = Instant::now();
    let closed = loop {
        std::thread::sleep(Duration::from_secs(1));
        if slow.write_all(b"x-slow: 1\r\n").is_err() {
            break started.elapsed();
        }
        let mut b = [0u8; 1];
        slow.set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        if matches!(slow.read(&mut b), Ok(0)) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the slow client is still served"
        );
    };
    assert!(
        closed >= Duration::from_secs(8),
        "closed too early: {closed:?}"
    );
    // An idle keep-alive connection goes the same way.
    let mut idle = UnixStream::connect(&socket).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let started = Instant::now();
    let mut b = [0u8; 1];
    assert_eq!(idle.read(&mut b).unwrap_or(0), 0);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );

    // Streams: 64 event streams are served, the 65th is told why not.
    let mut streams = Vec::new();
    for _ in 0..64 {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.write_all(b"GET /v1/events HTTP/1.1\r\nhost: mesh\r\n\r\n")
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200", "{}", String::from_utf8_lossy(&head));
        streams.push(s);
    }
    let answer = raw(
        &socket,
        b"GET /v1/events HTTP/1.1\r\nhost: mesh\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(status(&answer).contains("503"), "{answer}");
    assert!(answer.contains("too many open streams"), "{answer}");
    drop(streams);
    std::thread::sleep(Duration::from_millis(300));
    let answer = raw(
        &socket,
        b"GET /v1/events?since_ms=0 HTTP/1.1\r\nhost: mesh\r\nconnection: close\r\n\r\n",
        Duration::from_millis(500),
    );
    assert!(status(&answer).contains("200"), "{answer}");

    // Connections: 256 at once; the next is answered 503 and closed.
    let held: Vec<UnixStream> = (0..256)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let answer = raw(
        &socket,
        b"GET /v1/nodes HTTP/1.1\r\nhost: mesh\r\n\r\n",
        Duration::from_secs(3),
    );
    assert!(status(&answer).contains("503"), "{answer}");
    assert!(answer.contains("too many connections"), "{answer}");
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    h.meshctl_ok(&["node", "ls"]).unwrap();

    // The visualizer answers to its address, localhost and the node's name, not to a name
    // an attacker's page rebinds to it.
    let curl = |host: &str| {
        let out =
            h.ns.command("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
                .arg(format!("Host: {host}"))
                .arg(format!("http://{UI}/api/overview"))
                .output()
                .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(curl("evil.example"), "403");
    assert_eq!(curl("evil.example:8090"), "403");
    assert_eq!(curl(UI), "200");
    assert_eq!(curl("localhost:8090"), "200");
    assert_eq!(curl(&format!("{}:8090", h.node_name())), "200");
    let out =
        h.ns.command("curl")
            .args(["-s", "-H", "Host: evil.example"])
            .arg(format!("http://{UI}/"))
            .output()
            .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.contains("answers only to localhost"), "{body}");
}
