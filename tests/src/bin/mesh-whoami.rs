//! A tiny task for demos, tests and benchmarks: answers HTTP requests and UDP datagrams with
//! its own name, so a client can see which task served it.
//!
//! `mesh-whoami --name web-1 [--http 80] [--udp 80] [--file PATH | --hash PATH]`
//!
//! `GET /client` answers `NAME ADDR:PORT` instead: the peer address the task sees (the seeds'
//! whoami app prints `request.client.host`), as does a UDP datagram `client?`. `GET /bytes/N`
//! answers N bytes (at most 64 MiB), for downloads larger than a packet.
//!
//! `--file PATH` answers HTTP with the file's contents instead, `--hash PATH` with the FNV-1a
//! hash of them (a stand-in for a server that reads its password from a secret: the answer
//! proves the task read it without showing it); both read the file on every request, and
//! answer 500 when they cannot.
//!
//! HTTP/1.1 with keep-alive (so wrk measures the network path, not connection setup), one
//! thread per connection — plenty for a handful of benchmark connections.

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream, UdpSocket},
};

fn main() {
    let mut name = std::env::var("HOSTNAME").unwrap_or_else(|_| "whoami".into());
    let mut http: Option<u16> = Some(80);
    let mut udp: Option<u16> = None;
    let mut body: Option<Body> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--name" => name = value(),
            "--http" => http = Some(value().parse().unwrap_or_else(|_| usage("bad --http port"))),
            "--no-http" => http = None,
            "--file" => body = Some(Body::File(value())),
            "--hash" => body = Some(Body::Hash(value())),
            "--udp" => udp = Some(value().parse().unwrap_or_else(|_| usage("bad --udp port"))),
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    let mut threads = Vec::new();
    if let Some(port) = udp {
        let sock = UdpSocket::bind(("0.0.0.0", port))
            .unwrap_or_else(|e| fail(&format!("udp {port}: {e}")));
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let answer = if buf[..n].starts_with(b"client?") {
                        format!("{name} {from}\n")
                    } else {
                        format!("{name}\n")
                    };
                    let _ = sock.send_to(answer.as_bytes(), from);
                }
            }
        }));
    }
    if let Some(port) = http {
        let listener = TcpListener::bind(("0.0.0.0", port))
            .unwrap_or_else(|e| fail(&format!("http {port}: {e}")));
        eprintln!("{name}: serving HTTP on :{port}");
        for stream in listener.incoming().flatten() {
            let name = name.clone();
            let body = body.clone();
            std::thread::spawn(move || serve(stream, &name, body.as_ref()));
        }
    }
    for t in threads {
        let _ = t.join();
    }
}

#[derive(Clone)]
enum Body {
    File(String),
    Hash(String),
}

/// FNV-1a 64, hex: what `--hash` answers (the tests compute the same).
pub fn fnv(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h = (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The largest `GET /bytes/N`.
const MAX_BYTES: usize = 64 << 20;

/// What a request asks for.
enum Ask {
    Name,
    Client,
    Bytes(usize),
}

fn ask(path: Option<&str>) -> Ask {
    match path {
        Some("/client") => Ask::Client,
        Some(p) => match p.strip_prefix("/bytes/").map(str::parse::<usize>) {
            Some(Ok(n)) => Ask::Bytes(n.min(MAX_BYTES)),
            _ => Ask::Name,
        },
        None => Ask::Name,
    }
}

/// The status and body of a name, `--file` or `--hash` answer.
fn respond(name: &str, body: Option<&Body>) -> (&'static str, String) {
    match body {
        None => ("200 OK", format!("{name}\n")),
        Some(Body::File(p) | Body::Hash(p)) => match std::fs::read(p) {
            Ok(data) => (
                "200 OK",
                match body {
                    Some(Body::Hash(_)) => format!("{}\n", fnv(&data)),
                    _ => String::from_utf8_lossy(&data).into_owned(),
                },
            ),
            Err(e) => ("500 Internal Server Error", format!("{p}: {e}\n")),
        },
    }
}

/// A whole answer. One that ends the connection says so (RFC 9112 §9.6), so a client that
/// asked for keep-alive knows.
fn answer(status: &str, content_type: &str, body: &str, close: bool) -> String {
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         {connection}\r\n{body}",
        body.len()
    )
}

fn serve(stream: TcpStream, name: &str, file: Option<&Body>) {
    let _ = stream.set_nodelay(true);
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    // Without a file the name answer never changes: built once per connection kind.
    let fixed = file.is_none().then(|| {
        let (status, body) = respond(name, None);
        [false, true].map(|close| answer(status, "text/plain", &body, close))
    });
    let mut line = String::new();
    loop {
        // Read one request head; bodies are not expected.
        let mut close = false;
        let mut first = true;
        let mut what = Ask::Name;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let l = line.trim_end();
            if first {
                close = l.ends_with("HTTP/1.0");
                what = ask(l.split(' ').nth(1));
                first = false;
            }
            if l.eq_ignore_ascii_case("connection: close") {
                close = true;
            }
            if l.is_empty() {
                break;
            }
        }
        let response = match what {
            Ask::Client => answer("200 OK", "text/plain", &format!("{name} {peer}\n"), close),
            Ask::Bytes(n) => answer("200 OK", "application/octet-stream", &"x".repeat(n), close),
            Ask::Name => match &fixed {
                Some(f) => f[usize::from(close)].clone(),
                None => {
                    let (status, body) = respond(name, file);
                    answer(status, "text/plain", &body, close)
                }
            },
        };
        if out.write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
}

fn usage(msg: &str) -> ! {
    eprintln!(
        "mesh-whoami: {msg}\nusage: mesh-whoami --name NAME [--http PORT | --no-http] [--udp PORT]"
    );
    std::process::exit(2)
}

fn fail(msg: &str) -> ! {
    eprintln!("mesh-whoami: {msg}");
    std::process::exit(1)
}
