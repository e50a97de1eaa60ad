//! The client behind every availability claim ("0 failed and no gap over X ms"): new HTTP
//! connections sent at a fixed rate by a clock, each with a short budget, counted by outcome.
//!
//! A serial loop with a long timeout is blind to short outages: the kernel retransmits a
//! dropped SYN after 1 s (`tcp_syn_linear_timeouts`), so with a 3 s timeout an outage of up
//! to ~3 s is one slow success, and the requests it would have sent meanwhile are counted
//! nowhere. This client instead:
//! - sends at its rate whatever any request does (requests run concurrently, bounded);
//! - gives each request [`BUDGET`] (1 s), connect included, so a dropped SYN is a failure;
//! - reports what it sent, what succeeded, what failed by kind, and the longest stretch with
//!   no successful answer, edges included (start → first success, last success → stop).

use std::{
    collections::BTreeMap,
    fmt,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::Netns;

/// Requests per second unless told otherwise: a 10 ms grain for gaps, and well below what
/// one client address may open through a node's SNAT (~490 new connections a second per
/// backend, see the README).
pub const RATE: u32 = 100;
/// What one request may take, connect included: shorter than the kernel's first SYN
/// retransmit, so a dropped SYN is a failure, not a slow success.
pub const BUDGET: Duration = Duration::from_secs(1);
/// A probe stops sending by itself after this long, should nobody finish it.
const MAX_RUN: Duration = Duration::from_secs(600);
/// How many failures of each kind the report keeps in full (all are counted).
const KEPT_FAILURES: usize = 3;
/// Requests must have been sent at least at this share of the asked rate for a claim to
/// count: a client that could not keep its pace did not measure what it claims.
pub const FLOOR: f64 = 0.9;
/// The most of an answer read (mesh-whoami's are a few bytes).
const MAX_ANSWER: usize = 64 * 1024;

/// How a probe sends.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// Requests per second, each on a new connection.
    pub rate: u32,
    /// What one request may take, connect included.
    pub budget: Duration,
    /// Requests in flight at most; a tick that finds this many is a failure
    /// ([`Failure::Overrun`]), never a delay of the clock.
    pub max_in_flight: usize,
}

impl Pace {
    /// `rate` requests a second with the default budget, room for every request of 1.5
    /// budgets in flight (so the bound never binds unless requests overrun their budget).
    pub fn at(rate: u32) -> Self {
        let rate = rate.max(1);
        Self {
            rate,
            budget: BUDGET,
            max_in_flight: (f64::from(rate) * BUDGET.as_secs_f64() * 1.5).ceil() as usize + 4,
        }
    }

    fn period(&self) -> Duration {
        Duration::from_secs(1) / self.rate
    }
}

impl Default for Pace {
    fn default() -> Self {
        Self::at(RATE)
    }
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Failure {
    /// An RST or ICMP port unreachable answered the SYN.
    Refused,
    /// No SYN-ACK within the budget (a dropped SYN).
    ConnectTimeout,
    /// ICMP host or network unreachable.
    Unreachable,
    /// Any other error while connecting.
    ConnectError,
    /// Connected, but no complete answer within the budget.
    ReadTimeout,
    /// The connection was reset (or aborted) after it was established.
    Reset,
    /// The server closed the connection without answering.
    Closed,
    /// An answer that is not `HTTP/1.x 200`.
    BadAnswer,
    /// Any other error after connecting.
    IoError,
    /// Not sent: the in-flight bound was full when its tick came.
    Overrun,
}

impl Failure {
    /// Whether the request ran out of its budget.
    pub fn is_timeout(self) -> bool {
        matches!(self, Self::ConnectTimeout | Self::ReadTimeout)
    }

    fn of_connect(e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => Self::Refused,
            K::TimedOut | K::WouldBlock => Self::ConnectTimeout,
            K::HostUnreachable | K::NetworkUnreachable => Self::Unreachable,
            K::ConnectionReset => Self::Reset,
            _ => Self::ConnectError,
        }
    }

    fn of_io(e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::TimedOut | K::WouldBlock => Self::ReadTimeout,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => Self::Reset,
            _ => Self::IoError,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Refused => "connect refused",
            Self::ConnectTimeout => "connect timeout",
            Self::Unreachable => "unreachable",
            Self::ConnectError => "connect error",
            Self::ReadTimeout => "read timeout",
            Self::Reset => "reset",
            Self::Closed => "closed without an answer",
            Self::BadAnswer => "bad answer",
            Self::IoError => "IO error",
            Self::Overrun => "not sent (in-flight limit)",
        })
    }
}

/// What happened to one request, in time since the probe started.
struct Outcome {
    sent_at: Duration,
    done_at: Duration,
    result: std::result::Result<(), (Failure, String)>,
}

/// A client running in the background: sends until [`Probe::finish`].
pub struct Probe {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<Availability>>,
    start: Instant,
}

impl Probe {
    /// Starts [`RATE`] requests a second from inside `ns` to `addr`. The clock has started
    /// when this returns.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        Self::start_paced(ns, addr, Pace::default())
    }

    /// Starts a probe from inside `ns` that sends as `pace` says.
    pub fn start_paced(ns: &Netns, addr: SocketAddr, pace: Pace) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = mpsc::channel();
        let flag = stop.clone();
        let handle = ns.spawn_thread(move || run(addr, pace, &flag, ready_tx))?;
        Self::started(stop, handle, ready)
    }

    /// Starts a probe in the caller's own network namespace (a local server on 127.0.0.1).
    pub fn start_here(addr: SocketAddr, pace: Pace) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = mpsc::channel();
        let flag = stop.clone();
        let handle = std::thread::spawn(move || Ok(run(addr, pace, &flag, ready_tx)));
        Self::started(stop, handle, ready)
    }

    fn started(
        stop: Arc<AtomicBool>,
        handle: JoinHandle<Result<Availability>>,
        ready: mpsc::Receiver<Instant>,
    ) -> Result<Self> {
        let Ok(start) = ready.recv_timeout(Duration::from_secs(10)) else {
            stop.store(true, Ordering::SeqCst);
            return match handle.join() {
                Ok(Err(e)) => Err(e).context("starting the availability probe"),
                _ => anyhow::bail!("the availability probe did not start"),
            };
        };
        Ok(Self {
            stop,
            handle,
            start,
        })
    }

    /// Time since the probe's clock started: the scale of its report, to say when a test
    /// did something.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Stops sending, waits for the requests in flight (at most one budget) and reports.
    pub fn finish(self) -> Availability {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .join()
            .expect("the availability probe panicked")
            .expect("the availability probe could not enter its namespace")
    }
}

/// The pacer: one tick per period of the clock, each handed to a free worker; late ticks
/// are sent at once (the count stays rate × time), full ticks are [`Failure::Overrun`].
fn run(
    addr: SocketAddr,
    pace: Pace,
    stop: &AtomicBool,
    ready: mpsc::Sender<Instant>,
) -> Availability {
    // A job is the clock's start, from which its worker times it.
    let (jobs_tx, jobs) = mpsc::channel::<Instant>();
    let jobs = Arc::new(Mutex::new(jobs));
    let (done_tx, done) = mpsc::channel::<Outcome>();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::with_capacity(pace.max_in_flight);
    for _ in 0..pace.max_in_flight {
        let (jobs, done_tx, in_flight) = (jobs.clone(), done_tx.clone(), in_flight.clone());
        let spawned = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                loop {
                    // The lock is held only while waiting for a job, never while serving one.
                    let Ok(Ok(start)) = jobs.lock().map(|j| j.recv()) else {
                        return;
                    };
                    let sent_at = start.elapsed();
                    let result = http_probe(addr, pace.budget);
                    let _ = done_tx.send(Outcome {
                        sent_at,
                        done_at: start.elapsed(),
                        result,
                    });
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                }
            });
        match spawned {
            Ok(w) => workers.push(w),
            Err(_) => break,
        }
    }
    let max_in_flight = workers.len();
    // The clock starts now, workers ready.
    let start = Instant::now();
    let _ = ready.send(start);
    let period = pace.period();
    let (mut sent, mut stopped_by_limit) = (0u64, false);
    let stopped_at = loop {
        if stop.load(Ordering::SeqCst) {
            break start.elapsed();
        }
        if start.elapsed() >= MAX_RUN {
            stopped_by_limit = true;
            break start.elapsed();
        }
        let due = period * u32::try_from(sent).unwrap_or(u32::MAX);
        let now = start.elapsed();
        if due > now {
            // Short sleeps so a stop is seen within a period.
            std::thread::sleep((due - now).min(period));
            continue;
        }
        sent += 1;
        if in_flight.load(Ordering::SeqCst) >= max_in_flight {
            let _ = done_tx.send(Outcome {
                sent_at: now,
                done_at: now,
                result: Err((
                    Failure::Overrun,
                    format!("{max_in_flight} requests in flight"),
                )),
            });
            continue;
        }
        in_flight.fetch_add(1, Ordering::SeqCst);
        if jobs_tx.send(start).is_err() {
            break start.elapsed();
        }
    };
    drop(jobs_tx);
    drop(done_tx);
    for w in workers {
        let _ = w.join();
    }
    Availability::of(
        addr,
        pace,
        stopped_at,
        stopped_by_limit,
        done.try_iter().collect(),
    )
}

/// One `GET /` on a new connection, all of it within `budget`.
fn http_probe(addr: SocketAddr, budget: Duration) -> std::result::Result<(), (Failure, String)> {
    let started = Instant::now();
    http_get_within(addr, budget).map_err(|(kind, why)| {
        (
            kind,
            format!("after {} ms: {why}", started.elapsed().as_millis()),
        )
    })
}

fn http_get_within(
    addr: SocketAddr,
    budget: Duration,
) -> std::result::Result<(), (Failure, String)> {
    let deadline = Instant::now() + budget;
    let left = || {
        let l = deadline.saturating_duration_since(Instant::now());
        if l.is_zero() {
            Err((Failure::ReadTimeout, "the budget ran out".to_owned()))
        } else {
            Ok(l)
        }
    };
    let io = |e: std::io::Error| (Failure::of_io(&e), e.to_string());
    let mut s = TcpStream::connect_timeout(&addr, budget)
        .map_err(|e| (Failure::of_connect(&e), e.to_string()))?;
    s.set_write_timeout(Some(left()?)).map_err(io)?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: mesh\r\n\r\n")
        .map_err(io)?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        s.set_read_timeout(Some(left()?)).map_err(io)?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if answer.len() > MAX_ANSWER {
                    return Err((Failure::BadAnswer, "an answer over 64 KiB".to_owned()));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
    }
    if answer.is_empty() {
        return Err((Failure::Closed, "closed before answering".to_owned()));
    }
    let text = String::from_utf8_lossy(&answer);
    match text.split_once("\r\n\r\n") {
        // Servers may answer a 1.0 request as HTTP/1.1 (RFC 9110 §6.2).
        Some((head, _)) if head.starts_with("HTTP/1.") && head.get(8..12) == Some(" 200") => Ok(()),
        _ => Err((
            Failure::BadAnswer,
            format!("{:?}", text.chars().take(80).collect::<String>()),
        )),
    }
}

/// What a probe saw, the basis of an availability claim.
#[derive(Clone, Debug)]
pub struct Availability {
    pub target: SocketAddr,
    pub pace: Pace,
    /// From the clock's start to the stop of sending.
    pub duration: Duration,
    /// Requests whose tick came (each is either ok or failed).
    pub sent: usize,
    pub ok: usize,
    pub failed_by_kind: BTreeMap<Failure, usize>,
    /// The longest stretch with no successful answer: (from, to) in time since the start,
    /// the start and the stop of sending counting as edges.
    pub longest_gap: (Duration, Duration),
    /// The slowest successful request.
    pub slowest_ok: Duration,
    /// Every failure, in the order sent: when it was sent and its kind.
    pub failures: Vec<(Duration, Failure)>,
    /// The first failures of each kind, in the order sent: when, the kind, the error.
    pub first_failures: Vec<(Duration, Failure, String)>,
    /// Whether the probe stopped on its own limit rather than being finished.
    pub stopped_by_limit: bool,
}

impl Availability {
    fn of(
        target: SocketAddr,
        pace: Pace,
        duration: Duration,
        stopped_by_limit: bool,
        mut outcomes: Vec<Outcome>,
    ) -> Self {
        outcomes.sort_by_key(|o| o.sent_at);
        let mut failed_by_kind = BTreeMap::new();
        let mut first_failures = Vec::new();
        let mut failures = Vec::new();
        let mut successes = Vec::new();
        let mut slowest_ok = Duration::ZERO;
        for o in &outcomes {
            match &o.result {
                Ok(()) => {
                    successes.push(o.done_at);
                    slowest_ok = slowest_ok.max(o.done_at.saturating_sub(o.sent_at));
                }
                Err((kind, why)) => {
                    failures.push((o.sent_at, *kind));
                    let n = failed_by_kind.entry(*kind).or_default();
                    *n += 1;
                    if *n <= KEPT_FAILURES {
                        first_failures.push((o.sent_at, *kind, why.clone()));
                    }
                }
            }
        }
        successes.sort();
        Self {
            target,
            pace,
            duration,
            sent: outcomes.len(),
            ok: successes.len(),
            failed_by_kind,
            longest_gap: longest_gap(&successes, duration),
            slowest_ok,
            failures,
            first_failures,
            stopped_by_limit,
        }
    }

    /// Failed requests, all kinds.
    pub fn failed(&self) -> usize {
        self.failed_by_kind.values().sum()
    }

    /// Failed requests of the kinds `which` picks.
    pub fn failed_where(&self, which: impl Fn(Failure) -> bool) -> usize {
        self.failed_by_kind
            .iter()
            .filter(|(k, _)| which(**k))
            .map(|(_, n)| n)
            .sum()
    }

    /// The longest stretch with no successful answer.
    pub fn gap(&self) -> Duration {
        self.longest_gap.1 - self.longest_gap.0
    }

    /// What the rate should have sent in the time the probe ran.
    pub fn expected(&self) -> f64 {
        f64::from(self.pace.rate) * self.duration.as_secs_f64()
    }

    /// The claim in words: "0 failed and no gap over X ms", or "at most N failed and …".
    pub fn claim(max_failed: usize, max_gap: Duration) -> String {
        let failed = match max_failed {
            0 => "0 failed".to_owned(),
            n => format!("at most {n} failed"),
        };
        format!("{failed} and no gap over {} ms", max_gap.as_millis())
    }

    /// Whether "0 failed and no gap over `max_gap`" holds, with at least [`FLOOR`] of the
    /// requests the rate should have sent; if not, why, in those words, with the report.
    pub fn check(&self, max_gap: Duration) -> std::result::Result<(), String> {
        self.check_allowing(0, max_gap)
    }

    /// [`Availability::check`] for a scenario that genuinely loses some requests: "at most
    /// `max_failed` failed and no gap over `max_gap`".
    pub fn check_allowing(
        &self,
        max_failed: usize,
        max_gap: Duration,
    ) -> std::result::Result<(), String> {
        let mut broken = Vec::new();
        if self.failed() > max_failed {
            broken.push(format!("{} failed", self.failed()));
        }
        if self.gap() > max_gap {
            broken.push(format!(
                "a gap of {} ms > {} ms",
                self.gap().as_millis(),
                max_gap.as_millis()
            ));
        }
        let floor = (self.expected() * FLOOR).floor() as usize;
        if self.sent < floor {
            broken.push(format!(
                "only {} sent, under {:.0} % of the {:.0} that {} req/s for {:.1} s should send",
                self.sent,
                FLOOR * 100.0,
                self.expected(),
                self.pace.rate,
                self.duration.as_secs_f64()
            ));
        }
        if self.stopped_by_limit {
            broken.push(format!("it stopped on its own after {MAX_RUN:?}"));
        }
        if broken.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "\"{}\" does not hold: {}\n  {self}",
                Self::claim(max_failed, max_gap),
                broken.join("; ")
            ))
        }
    }

    /// Panics unless "0 failed and no gap over `max_gap`" holds (see [`Availability::check`]);
    /// `what` says whose claim it is.
    #[track_caller]
    pub fn assert_available(&self, what: &str, max_gap: Duration) {
        self.assert_available_allowing(what, 0, max_gap);
    }

    /// Panics unless "at most `max_failed` failed and no gap over `max_gap`" holds.
    #[track_caller]
    pub fn assert_available_allowing(&self, what: &str, max_failed: usize, max_gap: Duration) {
        if let Err(e) = self.check_allowing(max_failed, max_gap) {
            panic!("{what}: {e}");
        }
        eprintln!(
            "{what}: \"{}\" holds: {self}",
            Self::claim(max_failed, max_gap)
        );
    }

    /// Failures sent outside every one of `windows` (from, to), in time since the start.
    pub fn failed_outside(&self, windows: &[(Duration, Duration)]) -> Vec<(Duration, Failure)> {
        self.failures
            .iter()
            .filter(|(at, _)| !windows.iter().any(|(from, to)| from <= at && at < to))
            .copied()
            .collect()
    }
}

/// The longest stretch between successes, the start (0) and `stop` counting as edges.
fn longest_gap(successes: &[Duration], stop: Duration) -> (Duration, Duration) {
    let (mut best, mut prev) = ((Duration::ZERO, Duration::ZERO), Duration::ZERO);
    for &t in successes.iter().chain(std::iter::once(&stop)) {
        if t.saturating_sub(prev) > best.1 - best.0 {
            best = (prev, t);
        }
        prev = prev.max(t);
    }
    best
}

impl fmt::Display for Availability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.duration.as_secs_f64();
        write!(
            f,
            "to {}: {} sent in {secs:.1} s ({:.0} req/s, {} asked), {} ok, {} failed",
            self.target,
            self.sent,
            self.sent as f64 / secs.max(1e-9),
            self.pace.rate,
            self.ok,
            self.failed()
        )?;
        if !self.failed_by_kind.is_empty() {
            let kinds: Vec<String> = self
                .failed_by_kind
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect();
            write!(f, " ({})", kinds.join(", "))?;
        }
        write!(
            f,
            "; longest gap with no successful answer {} ms (from {:.2} s to {:.2} s); \
             slowest answer {} ms (budget {} ms)",
            self.gap().as_millis(),
            self.longest_gap.0.as_secs_f64(),
            self.longest_gap.1.as_secs_f64(),
            self.slowest_ok.as_millis(),
            self.pace.budget.as_millis()
        )?;
        for (at, kind, why) in &self.first_failures {
            write!(f, "\n    sent at {:.3} s: {kind}: {why}", at.as_secs_f64())?;
        }
        if self.failed() > self.first_failures.len() {
            write!(
                f,
                "\n    … and {} more",
                self.failed() - self.first_failures.len()
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// An HTTP server on 127.0.0.1 that answers 200 after `delay`, and holds every request
    /// that arrives while it is stalled until the stall is over. Stops on drop.
    struct LocalServer {
        addr: SocketAddr,
        stall_until: Arc<Mutex<Option<Instant>>>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl LocalServer {
        fn start(delay: Duration) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let addr = listener.local_addr().unwrap();
            let stall_until = Arc::new(Mutex::new(None::<Instant>));
            let stop = Arc::new(AtomicBool::new(false));
            let (stall, flag) = (stall_until.clone(), stop.clone());
            let thread = std::thread::spawn(move || {
                let mut conns = Vec::new();
                while !flag.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let stall = stall.clone();
                            conns.push(std::thread::spawn(move || serve(s, delay, &stall)));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
                for c in conns {
                    let _ = c.join();
                }
            });
            Self {
                addr,
                stall_until,
                stop,
                thread: Some(thread),
            }
        }

        fn stall_for(&self, d: Duration) {
            *self.stall_until.lock().unwrap() = Some(Instant::now() + d);
        }
    }

    impl Drop for LocalServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn serve(mut s: TcpStream, delay: Duration, stall: &Mutex<Option<Instant>>) {
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut head = Vec::new();
        let mut buf = [0u8; 512];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let until = *stall.lock().unwrap();
        if let Some(until) = until {
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
        }
        std::thread::sleep(delay);
        let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
    }

    fn probe_for(addr: SocketAddr, run: Duration) -> Availability {
        let p = Probe::start_here(addr, Pace::default()).unwrap();
        std::thread::sleep(run);
        p.finish()
    }

    #[test]
    fn a_healthy_server_keeps_the_claim_at_the_asked_rate() {
        let server = LocalServer::start(Duration::ZERO);
        let r = probe_for(server.addr, Duration::from_secs(2));
        r.check(Duration::from_millis(200)).unwrap();
        assert!(r.sent >= 190 && r.sent <= 202, "{r}");
        assert_eq!(r.ok, r.sent, "{r}");
        assert!(r.to_string().contains("0 failed"), "{r}");
    }

    #[test]
    fn slow_answers_do_not_slow_the_clock() {
        // Each answer takes 300 ms; one request at a time would send ~7 in 2 s.
        let server = LocalServer::start(Duration::from_millis(300));
        let r = probe_for(server.addr, Duration::from_secs(2));
        r.check(Duration::from_millis(500)).unwrap();
        assert!(r.sent >= 190, "{r}");
        assert!(r.slowest_ok >= Duration::from_millis(300), "{r}");
        // The first answer came ~300 ms in: the start is an edge of the gap.
        assert!(r.gap() >= Duration::from_millis(290), "{r}");
    }

    #[test]
    fn a_server_stalled_for_1_5_s_breaks_the_claim_with_timeouts_and_a_gap() {
        let server = LocalServer::start(Duration::ZERO);
        let p = Probe::start_here(server.addr, Pace::default()).unwrap();
        std::thread::sleep(Duration::from_millis(700));
        server.stall_for(Duration::from_millis(1500));
        std::thread::sleep(Duration::from_millis(1500 + 800));
        let r = p.finish();
        eprintln!("{r}");
        let e = r.check(Duration::from_millis(1000)).unwrap_err();
        assert!(
            e.contains("\"0 failed and no gap over 1000 ms\" does not hold"),
            "{e}"
        );
        assert!(r.gap() >= Duration::from_millis(1400), "{r}");
        assert!(r.gap() < Duration::from_millis(1700), "{r}");
        // Requests of the stall's first ~0.5 s ran out of budget; later ones were answered
        // late but within it.
        assert!(r.failed() >= 30, "{r}");
        assert_eq!(r.failed_where(Failure::is_timeout), r.failed(), "{r}");
        assert_eq!(
            r.failed_by_kind.get(&Failure::ReadTimeout),
            Some(&r.failed())
        );
        assert!(e.contains("read timeout"), "{e}");
    }

    #[test]
    fn a_closed_port_fails_every_request_as_refused() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let r = probe_for(addr, Duration::from_millis(500));
        assert_eq!(r.ok, 0, "{r}");
        assert!(r.sent >= 45, "{r}");
        assert_eq!(
            r.failed_by_kind.get(&Failure::Refused),
            Some(&r.sent),
            "{r}"
        );
        // No success at all: the whole run is one gap.
        assert_eq!(r.gap(), r.duration, "{r}");
        let e = r.check(Duration::from_secs(5)).unwrap_err();
        assert!(e.contains("connect refused"), "{e}");
    }

    #[test]
    fn a_client_that_sent_too_little_proves_nothing() {
        let r = Availability {
            target: SocketAddr::from(([127, 0, 0, 1], 1)),
            pace: Pace::default(),
            duration: Duration::from_secs(10),
            sent: 500,
            ok: 500,
            failed_by_kind: BTreeMap::new(),
            longest_gap: (Duration::ZERO, Duration::from_millis(20)),
            slowest_ok: Duration::from_millis(2),
            failures: Vec::new(),
            first_failures: Vec::new(),
            stopped_by_limit: false,
        };
        let e = r.check(Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("only 500 sent, under 90 % of the 1000"), "{e}");
    }

    #[test]
    fn the_edges_count_as_gaps() {
        let ms = Duration::from_millis;
        // Before the first success.
        assert_eq!(longest_gap(&[ms(700), ms(710)], ms(800)), (ms(0), ms(700)));
        // After the last success.
        assert_eq!(longest_gap(&[ms(10), ms(20)], ms(900)), (ms(20), ms(900)));
        // In the middle.
        assert_eq!(
            longest_gap(&[ms(10), ms(20), ms(1500), ms(1510)], ms(1520)),
            (ms(20), ms(1500))
        );
        // None at all: all of it.
        assert_eq!(longest_gap(&[], ms(500)), (ms(0), ms(500)));
        // A success after the stop (an answer in flight): no negative tail.
        assert_eq!(longest_gap(&[ms(10), ms(530)], ms(520)), (ms(10), ms(530)));
    }
}
