//! Floods from spoofed sources, sent with a raw socket: what an attacker without a real
//! address sends at a published port. Used by the flood scenario test and `bench flood`.
//!
//! Every packet has a different source (198.18.0.0/15, the benchmarking range) and source
//! port, so each one is a new flow to the routing mesh; none can answer the backend.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

/// What a flood sent.
#[derive(Clone, Copy, Debug)]
pub struct FloodReport {
    pub packets: u64,
    pub elapsed: Duration,
}

impl FloodReport {
    pub fn pps(&self) -> f64 {
        self.packets as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloodKind {
    /// TCP SYNs.
    Syn,
    /// UDP datagrams of 16 bytes.
    Udp,
}

/// Sends `packets` packets of `kind` to `target` as fast as the socket takes them, from the
/// caller's network namespace (run it inside one with `Netns::run`).
pub fn flood(
    kind: FloodKind,
    target: SocketAddrV4,
    packets: u64,
    seed: u32,
) -> Result<FloodReport> {
    flood_at(kind, target, packets, seed, None)
}

/// [`flood`] at no more than `pps` packets a second (when set): a flood the links between
/// the namespaces carry without dropping, so what is measured is the routing mesh.
pub fn flood_at(
    kind: FloodKind,
    target: SocketAddrV4,
    packets: u64,
    seed: u32,
    pps: Option<u64>,
) -> Result<FloodReport> {
    // SAFETY: plain socket call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("opening a raw socket (needs root)");
    }
    // SAFETY: a fresh fd nobody else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(target.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let mut rng = seed | 1;
    let mut buf = Vec::with_capacity(64);
    let started = Instant::now();
    let mut sent = 0;
    while sent < packets {
        if let Some(pps) = pps
            && sent % 256 == 0
        {
            let due = Duration::from_secs_f64(sent as f64 / pps as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        let src = Ipv4Addr::from(0xc612_0000 | (rng & 0x0001_ffff));
        let sport = 1024 + (rng >> 17) as u16 % 64_000;
        packet(&mut buf, kind, src, sport, target, rng);
        // SAFETY: buffer and address outlive the call.
        let n = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            // A full queue (ENOBUFS) is back pressure: wait a moment, then go on.
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                std::thread::sleep(Duration::from_micros(50));
                continue;
            }
            return Err(e).context("sending a flood packet");
        }
        sent += 1;
    }
    Ok(FloodReport {
        packets: sent,
        elapsed: started.elapsed(),
    })
}

/// An IPv4 packet with a valid TCP or UDP checksum (the kernel fills in the IPv4 header's).
fn packet(
    buf: &mut Vec<u8>,
    kind: FloodKind,
    src: Ipv4Addr,
    sport: u16,
    dst: SocketAddrV4,
    r: u32,
) {
    buf.clear();
    let (proto, l4_len) = match kind {
        FloodKind::Syn => (6u8, 20usize),
        FloodKind::Udp => (17u8, 8 + 16),
    };
    let total = 20 + l4_len;
    buf.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0]);
    buf[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    buf[4..6].copy_from_slice(&(r as u16).to_be_bytes());
    buf.extend_from_slice(&src.octets());
    buf.extend_from_slice(&dst.ip().octets());
    buf.extend_from_slice(&sport.to_be_bytes());
    buf.extend_from_slice(&dst.port().to_be_bytes());
    match kind {
        FloodKind::Syn => {
            buf.extend_from_slice(&r.to_be_bytes()); // seq
            buf.extend_from_slice(&[0, 0, 0, 0, 0x50, 0x02, 0xfa, 0xf0, 0, 0, 0, 0]);
        }
        FloodKind::Udp => {
            buf.extend_from_slice(&(l4_len as u16).to_be_bytes());
            buf.extend_from_slice(&[0, 0]);
            buf.extend_from_slice(b"flood, not a dns");
        }
    }
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4_len as u16).to_be_bytes());
    let sum = !fold(sum16(&buf[20..], sum16(&pseudo, 0)));
    let at = if kind == FloodKind::Syn {
        20 + 16
    } else {
        20 + 6
    };
    buf[at..at + 2].copy_from_slice(&sum.to_be_bytes());
}

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The samples of a Prometheus text page, `name{labels}` → value.
pub fn parse_metrics(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// GET /metrics from `addr` (call inside the namespace the agent listens in).
pub fn scrape(addr: std::net::SocketAddr) -> Result<std::collections::BTreeMap<String, f64>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: mesh\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(parse_metrics(&text))
}
