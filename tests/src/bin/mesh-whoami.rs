//! A tiny task for demos, tests and benchmarks: answers HTTP requests and UDP datagrams with
//! its own name, so a client can see which task served it.
//!
//! `mesh-whoami --name web-1 [--http 80] [--udp 80]`
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
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(format!("{name}\n").as_bytes(), from);
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
            std::thread::spawn(move || serve(stream, &name));
        }
    }
    for t in threads {
        let _ = t.join();
    }
}

fn serve(stream: TcpStream, name: &str) {
    let _ = stream.set_nodelay(true);
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let body = format!("{name}\n");
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut line = String::new();
    loop {
        // Read one request head; bodies are not expected.
        let mut close = false;
        let mut first = true;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let l = line.trim_end();
            if first {
                close = l.ends_with("HTTP/1.0");
                first = false;
            }
            if l.eq_ignore_ascii_case("connection: close") {
                close = true;
            }
            if l.is_empty() {
                break;
            }
        }
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
