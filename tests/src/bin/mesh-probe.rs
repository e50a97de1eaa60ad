//! A client process for scenarios that need one outside the test process: socket load
//! balancing only sees processes in the node's cgroup, and cgroup v2 places whole processes.
//!
//! ```text
//! mesh-probe [--cgroup DIR] tcp ADDR COUNT   # COUNT HTTP GETs, one connection each
//! mesh-probe [--cgroup DIR] udp ADDR COUNT   # COUNT datagrams, one unconnected socket each
//! ```
//! Prints one line per request: `<peer address as the socket reports it> <answer>`, or
//! `error <why>`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(3);

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--cgroup") {
        let dir = args.get(1).expect("--cgroup needs a directory").clone();
        // Sockets belong to the cgroup their creator was in when it created them.
        std::fs::write(
            format!("{dir}/cgroup.procs"),
            std::process::id().to_string(),
        )
        .unwrap_or_else(|e| panic!("joining cgroup {dir}: {e}"));
        args.drain(..2);
    }
    let [mode, addr, count] = args.as_slice() else {
        eprintln!("usage: mesh-probe [--cgroup DIR] tcp|udp ADDR COUNT");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse().expect("ADDR is ip:port");
    let count: usize = count.parse().expect("COUNT is a number");
    for _ in 0..count {
        let line = match mode.as_str() {
            "tcp" => tcp(addr),
            "udp" => udp(addr),
            other => Err(format!("unknown mode {other}")),
        };
        match line {
            Ok((peer, answer)) => println!("{peer} {answer}"),
            Err(e) => println!("error {e}"),
        }
    }
}

fn tcp(addr: SocketAddr) -> Result<(SocketAddr, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    // getpeername(): what the application believes it is talking to.
    let peer = s.peer_addr().map_err(|e| format!("getpeername: {e}"))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(|e| format!("read: {e}"))?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((peer, body.to_owned()))
}

fn udp(addr: SocketAddr) -> Result<(SocketAddr, String), String> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.send_to(b"who?", addr)
        .map_err(|e| format!("sendto: {e}"))?;
    let mut buf = [0u8; 512];
    // recvfrom(): the source the application sees.
    let (n, from) = s
        .recv_from(&mut buf)
        .map_err(|e| format!("recvfrom: {e}"))?;
    Ok((from, String::from_utf8_lossy(&buf[..n]).into_owned()))
}
