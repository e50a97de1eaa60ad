//! Tasks and clients for load-balancing scenarios: servers that answer their own name, and
//! clients that count who answered.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::Netns;

const IO_TIMEOUT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(20);

/// A task that answers its own name: an HTTP response on a TCP port (or one line per line
/// received, for long-lived connections), a datagram on a UDP port. Stops on drop.
pub struct NameServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<Result<()>>>>,
}

impl NameServer {
    pub fn start(ns: &Netns, name: &str, tcp_port: u16, udp_port: u16) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let mut threads = Vec::new();
        {
            let (stop, name, ready) = (stop.clone(), name.to_owned(), ready_tx.clone());
            threads.push(ns.spawn_thread(move || serve_tcp(tcp_port, &name, &stop, ready))?);
        }
        {
            let (stop, name, ready) = (stop.clone(), name.to_owned(), ready_tx);
            threads.push(ns.spawn_thread(move || serve_udp(udp_port, &name, &stop, ready))?);
        }
        for _ in 0..2 {
            ready_rx
                .recv_timeout(IO_TIMEOUT)
                .context("server did not start")??;
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for NameServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_tcp(
    port: u16,
    name: &str,
    stop: &Arc<AtomicBool>,
    ready: std::sync::mpsc::Sender<Result<()>>,
) -> Result<()> {
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e).context("binding the TCP server"));
            return Ok(());
        }
    };
    listener.set_nonblocking(true)?;
    let _ = ready.send(Ok(()));
    let mut conns = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let (name, stop) = (name.to_owned(), stop.clone());
                conns.push(std::thread::spawn(move || answer(stream, &name, &stop)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) => return Err(e.into()),
        }
    }
    for c in conns {
        let _ = c.join();
    }
    Ok(())
}

fn answer(stream: TcpStream, name: &str, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut out = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::SeqCst) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line.ends_with('\n') => {
                if line.starts_with("GET ") {
                    // Skip the rest of the request head, answer, close.
                    let mut rest = String::new();
                    while reader.read_line(&mut rest).is_ok_and(|n| n > 2) {
                        rest.clear();
                    }
                    let _ = write!(
                        out,
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
                        name.len()
                    );
                    return;
                }
                let reply = match line.trim_end().split_once(' ') {
                    // "send N": N bytes of the bulk pattern.
                    Some(("send", n)) => {
                        let n: usize = n.parse().unwrap_or(0);
                        if out.write_all(&bulk(n)).is_err() {
                            return;
                        }
                        None
                    }
                    // "recv N": read N bytes, answer whether they were the bulk pattern.
                    Some(("recv", n)) => {
                        let n: usize = n.parse().unwrap_or(0);
                        let mut got = vec![0u8; n];
                        let _ = reader.get_ref().set_read_timeout(Some(IO_TIMEOUT));
                        let ok = reader.read_exact(&mut got).is_ok() && got == bulk(n);
                        let _ = reader.get_ref().set_read_timeout(Some(POLL * 5));
                        Some(if ok {
                            "intact".to_owned()
                        } else {
                            "corrupt".to_owned()
                        })
                    }
                    _ => Some(name.to_owned()),
                };
                if let Some(r) = reply
                    && out.write_all(format!("{r}\n").as_bytes()).is_err()
                {
                    return;
                }
                line.clear();
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

fn serve_udp(
    port: u16,
    name: &str,
    stop: &AtomicBool,
    ready: std::sync::mpsc::Sender<Result<()>>,
) -> Result<()> {
    let sock = match UdpSocket::bind(("0.0.0.0", port)) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e).context("binding the UDP server"));
            return Ok(());
        }
    };
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let _ = ready.send(Ok(()));
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        if let Ok((_, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(name.as_bytes(), from);
        }
    }
    Ok(())
}

/// The bytes bulk transfers carry: position-dependent, so a lost, duplicated or reordered
/// segment shows.
pub fn bulk(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// One HTTP GET on a fresh connection; the body (the answering task's name).
pub fn http_get(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: mesh\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .with_context(|| format!("reading the answer from {addr}"))?;
    match resp.split_once("\r\n\r\n") {
        // Servers may answer a 1.0 request as HTTP/1.1 (RFC 9110 §6.2).
        Some((head, body)) if head.starts_with("HTTP/1.") && head[8..].starts_with(" 200") => {
            Ok(body.to_owned())
        }
        _ => bail!("unexpected answer from {addr}: {resp:?}"),
    }
}

/// How soon "refused at once" must fail a connect: an RST or an ICMP error is one round trip
/// on this machine (well under a millisecond), a dropped SYN waits ~1 s for a retransmit.
pub const REFUSED_WITHIN: Duration = Duration::from_millis(100);

/// A TCP connect to `addr` refused at once: it fails with an RST (ECONNREFUSED) or an ICMP
/// error (host or network unreachable) within [`REFUSED_WITHIN`]; how long that took. An
/// accepted connection, a timeout, another error or a refusal that came late is an error
/// saying which.
pub fn refused_at_once(addr: SocketAddr) -> Result<Duration> {
    use std::io::ErrorKind as K;
    let start = Instant::now();
    // Longer than REFUSED_WITHIN, so a late refusal is told apart from a silent drop.
    let r = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
    let took = start.elapsed();
    match r {
        Ok(s) => bail!(
            "{addr} accepted the connection (from {:?}) in {took:?}",
            s.local_addr().ok()
        ),
        Err(e)
            if matches!(
                e.kind(),
                K::ConnectionRefused | K::HostUnreachable | K::NetworkUnreachable
            ) =>
        {
            if took <= REFUSED_WITHIN {
                Ok(took)
            } else {
                bail!("{addr} refused ({e}) but only after {took:?}, not at once")
            }
        }
        Err(e) => bail!("connecting to {addr}: {e} after {took:?}, not refused"),
    }
}

/// What a mesh-whoami task answered about the client it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The task that answered.
    pub task: String,
    /// The peer address the task saw.
    pub client: SocketAddr,
    /// The client socket's own address.
    pub local: SocketAddr,
}

impl Seen {
    fn parse(answer: &str, local: SocketAddr) -> Result<Self> {
        let (task, client) = answer
            .trim()
            .split_once(' ')
            .with_context(|| format!("not a `NAME ADDR:PORT` answer: {answer:?}"))?;
        Ok(Self {
            task: task.to_owned(),
            client: client
                .parse()
                .with_context(|| format!("bad address in {answer:?}"))?,
            local,
        })
    }
}

/// `GET /client` on a fresh connection: the task and the peer address it saw.
pub fn http_seen(addr: SocketAddr) -> Result<Seen> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    seen_on(s, addr)
}

/// [`http_seen`] from the client's port `port` (SO_REUSEADDR, as a load generator cycling
/// through its ports would).
pub fn http_seen_from(addr: SocketAddr, port: u16) -> Result<Seen> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
    s.connect_timeout(&addr.into(), IO_TIMEOUT)
        .with_context(|| format!("connecting from port {port} to {addr}"))?;
    seen_on(s.into(), addr)
}

fn seen_on(mut s: TcpStream, addr: SocketAddr) -> Result<Seen> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let local = s.local_addr()?;
    s.write_all(b"GET /client HTTP/1.0\r\nHost: mesh\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .with_context(|| format!("reading the answer from {addr}"))?;
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head[8..].starts_with(" 200") => {
            Seen::parse(body, local)
        }
        _ => bail!("unexpected answer from {addr}: {resp:?}"),
    }
}

/// A `client?` datagram from a fresh socket: the task and the peer address it saw. The
/// answer must come from `addr` itself (the published address).
pub fn udp_seen(addr: SocketAddr) -> Result<Seen> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.connect(addr)?;
    let local = s.local_addr()?;
    s.send(b"client?")?;
    let mut buf = [0u8; 512];
    let n = s
        .recv(&mut buf)
        .with_context(|| format!("no answer from {addr}"))?;
    Seen::parse(&String::from_utf8_lossy(&buf[..n]), local)
}

/// One datagram from a fresh socket; the answer.
pub fn udp_ask(addr: SocketAddr) -> Result<String> {
    ask_on(&UdpSocket::bind("0.0.0.0:0")?, addr)
}

fn ask_on(s: &UdpSocket, addr: SocketAddr) -> Result<String> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.send_to(b"who?", addr)?;
    let mut buf = [0u8; 512];
    let (n, _) = s
        .recv_from(&mut buf)
        .with_context(|| format!("no answer from {addr}"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// `n` UDP requests to `addr`, each from its own port (as from `n` clients): every socket
/// stays open until all are answered, since the kernel may give a closed socket's port to
/// the next one (1.5 % of batches of 30 do), which the routing mesh rightly takes for the
/// same flow.
pub fn udp_ask_each(addr: SocketAddr, n: usize) -> Result<Vec<String>> {
    let mut open = Vec::with_capacity(n);
    let mut answers = Vec::with_capacity(n);
    for _ in 0..n {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        answers.push(ask_on(&s, addr)?);
        open.push(s);
    }
    Ok(answers)
}

/// A long-lived connection: to a line server (`ask`, `download`, `upload`) or to an HTTP
/// server with keep-alive (`http_get`); each answer names the task that served it.
pub struct Session {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Session {
    pub fn open(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    pub fn ask(&mut self) -> Result<String> {
        self.request("who?")
    }

    /// One HTTP/1.1 request on the connection (to mesh-whoami, which keeps it alive): the
    /// serving task's name.
    pub fn http_get(&mut self) -> Result<String> {
        self.stream
            .write_all(b"GET / HTTP/1.1\r\nHost: mesh\r\n\r\n")
            .context("sending on the keep-alive connection")?;
        let mut length = None;
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("the keep-alive connection was closed");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse::<usize>().ok();
            }
        }
        let mut body = vec![0u8; length.context("answer without Content-Length")?];
        self.reader.read_exact(&mut body)?;
        Ok(String::from_utf8_lossy(&body).trim_end().to_owned())
    }

    /// Downloads `n` bytes of the bulk pattern; whether they arrived intact.
    pub fn download(&mut self, n: usize) -> Result<bool> {
        self.stream.write_all(format!("send {n}\n").as_bytes())?;
        let mut got = vec![0u8; n];
        self.reader
            .read_exact(&mut got)
            .context("downloading on the long-lived connection")?;
        Ok(got == bulk(n))
    }

    /// Uploads `n` bytes of the bulk pattern; whether the task got them intact.
    pub fn upload(&mut self, n: usize) -> Result<bool> {
        self.stream.write_all(format!("recv {n}\n").as_bytes())?;
        self.stream.write_all(&bulk(n))?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        Ok(line.trim_end() == "intact")
    }

    fn request(&mut self, what: &str) -> Result<String> {
        self.stream.write_all(format!("{what}\n").as_bytes())?;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .context("reading on the long-lived connection")?;
        if line.is_empty() {
            bail!("the long-lived connection was closed");
        }
        Ok(line.trim_end().to_owned())
    }
}

/// How many answers each task gave.
pub fn tally<I: IntoIterator<Item = String>>(answers: I) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for a in answers {
        *t.entry(a).or_default() += 1;
    }
    t
}

/// A keep-alive HTTP connection held by a thread inside a namespace, asked on demand from the
/// test's own thread.
pub struct RemoteSession {
    ask: std::sync::mpsc::Sender<()>,
    answers: std::sync::mpsc::Receiver<Result<String>>,
}

impl RemoteSession {
    pub fn open(ns: &Netns, addr: SocketAddr) -> Self {
        let (ask, asks) = std::sync::mpsc::channel::<()>();
        let (tx, answers) = std::sync::mpsc::channel();
        ns.spawn_thread(move || {
            let mut s = match Session::open(addr) {
                Ok(s) => s,
                Err(e) => return drop(tx.send(Err(e))),
            };
            while asks.recv().is_ok() {
                if tx.send(s.http_get()).is_err() {
                    break;
                }
            }
        })
        .expect("starting the session thread");
        Self { ask, answers }
    }

    /// One request on the connection; panics when it fails.
    pub fn get(&self) -> String {
        self.ask.send(()).expect("session thread gone");
        self.answers
            .recv_timeout(Duration::from_secs(10))
            .expect("no answer on the keep-alive connection")
            .expect("the keep-alive connection failed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_port_is_refused_at_once_and_a_listening_one_is_not() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let open = l.local_addr().unwrap();
        let e = refused_at_once(open).unwrap_err().to_string();
        assert!(e.contains("accepted"), "{e}");
        drop(l);
        let took = refused_at_once(open).unwrap();
        assert!(took <= REFUSED_WITHIN, "{took:?}");
    }

    /// What the old "refused" (any error) let through: a SYN dropped on the floor is a
    /// timeout, not a refusal. Needs root (a namespace with a DROP rule).
    #[test]
    fn a_dropped_syn_is_not_refused() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root for a network namespace");
            return;
        }
        let ns = crate::Netns::create(&format!("mt{}xrefuse", std::process::id())).unwrap();
        ns.sh("iptables -A INPUT -p tcp --dport 9 -j DROP").unwrap();
        let dropped = SocketAddr::from(([127, 0, 0, 1], 9));
        let closed = SocketAddr::from(([127, 0, 0, 1], 10));
        let (d, c) = ns
            .run(move || (refused_at_once(dropped), refused_at_once(closed)))
            .unwrap();
        let e = d.unwrap_err().to_string();
        assert!(e.contains("not refused"), "{e}");
        assert!(c.unwrap() <= REFUSED_WITHIN);
    }
}
