//! A task's output with a time on every line.
//!
//! A process task writes into a pipe read by `mesh-agent log-writer` (see [`write_log`]), a
//! small process of its own so the output keeps its times while the agent restarts. It stamps
//! each line (`<RFC3339 nanos> <line>\n`), cuts lines at [`MAX_LINE`] and rotates the file at a
//! size, keeping `max-file - 1` old files (`<log>.1` the newest) so a noisy task cannot fill a
//! disk: agent.toml's `[task_logs]` sets the most a task may keep, and a service's
//! `--log-opt max-size/max-file` may only ask for less. Containers' output comes from `podman
//! logs --timestamps`.

use std::{
    io::{self, Read, Write},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    time::Duration,
};

use futures_util::{Stream, StreamExt, stream::BoxStream};
use mesh_api::v1::{LogsQuery, format_timestamp, parse_timestamp};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncSeekExt};

use super::Logs;

/// Longer lines are cut into pieces of this size (as Docker's 16 KiB log messages), so a
/// writer that never ends a line cannot make the reader buffer without bound.
pub const MAX_LINE: usize = 16 * 1024;
/// A log file is rotated when it would grow past this (Docker's json-file `max-size`).
pub const DEFAULT_MAX_SIZE: u64 = 10 * 1024 * 1024;
/// Files kept, the current one included (Docker's `max-file`): the current and one old one.
pub const DEFAULT_MAX_FILE: u32 = 2;
/// The most old files a node lets a task keep, whatever agent.toml says: each is read whole
/// by `service logs`.
pub const MAX_FILES: u32 = 100;
/// A partial line is written out after this long without more output.
const PARTIAL_FLUSH: Duration = Duration::from_secs(1);
/// How often a followed log file is checked for more.
const POLL: Duration = Duration::from_millis(200);

/// One line of output: when it was written (ns since the epoch) and its text.
pub type Stamped = (i64, String);

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The newest rotated file kept next to `log`.
pub fn rotated(log: &Path) -> PathBuf {
    rotated_n(log, 1)
}

/// The `n`th rotated file (`<log>.n`; higher is older).
pub fn rotated_n(log: &Path, n: u32) -> PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(format!(".{n}"));
    PathBuf::from(p)
}

/// The rotated files that exist next to `log`, oldest first.
fn rotated_files(log: &Path) -> Vec<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = Vec::new();
    let (Some(dir), Some(name)) = (log.parent(), log.file_name()) else {
        return Vec::new();
    };
    let prefix = format!("{}.", name.to_string_lossy());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = file
                .strip_prefix(&prefix)
                .and_then(|n| n.parse::<u32>().ok())
            {
                found.push((n, e.path()));
            }
        }
    }
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found.into_iter().map(|(_, p)| p).collect()
}

/// Removes `log` and every rotated file beside it.
pub fn remove_all(log: &Path) -> io::Result<()> {
    for p in rotated_files(log).into_iter().chain([log.to_owned()]) {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Where a process task's stdout and stderr go: a pipe to a `mesh-agent log-writer` for
/// `log`. The writer runs in its own process group so it outlives an agent restart (the task
/// does too) and ends when the task and everything it started close the pipe. Outside the
/// mesh-agent binary (the crate's unit tests) the output goes straight to the file, unstamped.
pub fn capture(log: &Path, max_size: u64, max_file: u32) -> io::Result<std::fs::File> {
    let exe = std::env::current_exe()?;
    let is_agent = exe
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("mesh-agent"));
    if !is_agent {
        return std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log);
    }
    let (read, write) = io::pipe()?;
    let mut child = std::process::Command::new(exe)
        .arg("log-writer")
        .arg(format!("--max-size={max_size}"))
        .arg(format!("--max-file={max_file}"))
        .arg(log)
        .stdin(read)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .process_group(0)
        .spawn()?;
    std::thread::Builder::new()
        .name("log-writer-reaper".into())
        .spawn(move || child.wait())?;
    Ok(std::fs::File::from(std::os::fd::OwnedFd::from(write)))
}

/// Reads `input` until it closes, writing stamped lines to `log` (the `log-writer` process).
pub fn write_log(
    mut input: impl Read + AsRawFd,
    log: &Path,
    max_size: u64,
    max_file: u32,
) -> io::Result<()> {
    let mut out = LogFile::open(log, max_size, max_file)?;
    let mut partial: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !partial.is_empty() && !readable(&input, PARTIAL_FLUSH)? {
            out.line(&std::mem::take(&mut partial))?;
            continue;
        }
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for piece in buf[..n].split_inclusive(|b| *b == b'\n') {
            let (text, ended) = match piece.strip_suffix(b"\n") {
                Some(t) => (t, true),
                None => (piece, false),
            };
            partial.extend_from_slice(text);
            while partial.len() >= MAX_LINE {
                let rest = partial.split_off(MAX_LINE);
                out.line(&std::mem::replace(&mut partial, rest))?;
            }
            if ended {
                out.line(&std::mem::take(&mut partial))?;
            }
        }
    }
    if !partial.is_empty() {
        out.line(&partial)?;
    }
    Ok(())
}

fn readable(input: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let mut fd = libc::pollfd {
        fd: input.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as i32) };
    match n {
        -1 if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => Ok(true),
        -1 => Err(io::Error::last_os_error()),
        n => Ok(n > 0),
    }
}

/// The current log file and its size, rotated before a line would take it past the cap.
struct LogFile {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
    max_size: u64,
    max_file: u32,
}

impl LogFile {
    fn open(path: &Path, max_size: u64, max_file: u32) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            file,
            size,
            max_size,
            max_file: max_file.clamp(1, MAX_FILES),
        })
    }

    /// The current file becomes `<log>.1`, each older one moves one up, and the one past
    /// `max_file` goes; with `max_file` 1 the current file is simply started again.
    fn rotate(&mut self) -> io::Result<()> {
        let keep = self.max_file - 1;
        if keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            for n in (1..keep).rev() {
                match std::fs::rename(rotated_n(&self.path, n), rotated_n(&self.path, n + 1)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            std::fs::rename(&self.path, rotated(&self.path))?;
        }
        // Files beyond the limit (left by a run with a larger max-file) go too.
        for p in rotated_files(&self.path) {
            let n = p
                .extension()
                .and_then(|e| e.to_str()?.parse::<u32>().ok())
                .unwrap_or(0);
            if n > keep {
                let _ = std::fs::remove_file(p);
            }
        }
        *self = Self::open(&self.path, self.max_size, self.max_file)?;
        Ok(())
    }

    fn line(&mut self, text: &[u8]) -> io::Result<()> {
        let mut record = format_timestamp(now_ns()).into_bytes();
        record.push(b' ');
        record.extend_from_slice(text);
        record.push(b'\n');
        if self.size > 0 && self.size + record.len() as u64 > self.max_size {
            self.rotate()?;
        }
        self.file.write_all(&record)?;
        self.size += record.len() as u64;
        Ok(())
    }
}

/// A stored line: its time and text. A line without a time (a log written before lines were
/// stamped) takes the time of the line before it.
fn parse(raw: &str, before: i64) -> Stamped {
    match raw.split_once(' ') {
        Some((ts, text)) => match parse_timestamp(ts) {
            Some(t) => (t, text.to_owned()),
            None => (before, raw.to_owned()),
        },
        None => match parse_timestamp(raw) {
            Some(t) => (t, String::new()),
            None => (before, raw.to_owned()),
        },
    }
}

fn parse_all(bytes: &[u8], out: &mut Vec<Stamped>) {
    let text = String::from_utf8_lossy(bytes);
    let mut last = out.last().map(|l| l.0).unwrap_or(0);
    for raw in text.lines() {
        let line = parse(raw, last);
        last = line.0;
        out.push(line);
    }
}

/// Keeps the lines a query asks for: at or after `since`, then the last `tail`.
pub fn select(mut lines: Vec<Stamped>, q: &LogsQuery) -> Vec<Stamped> {
    if let Some(since) = q.since_ns {
        lines.retain(|l| l.0 >= since);
    }
    if let Some(n) = q.tail {
        let skip = lines.len().saturating_sub(n as usize);
        lines.drain(..skip);
    }
    lines
}

/// Where a followed file was left: the open file (which a rotation renames but does not
/// close) and how far it was read.
struct Cursor {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    pos: u64,
}

/// The lines of a log and its rotated files so far, and a cursor at their end.
async fn read_stored(path: &Path) -> io::Result<(Vec<Stamped>, Cursor)> {
    let mut lines = Vec::new();
    for old in rotated_files(path) {
        match tokio::fs::read(old).await {
            Ok(b) => parse_all(&b, &mut lines),
            // Rotated away while we listed them.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let mut cursor = Cursor {
        path: path.to_owned(),
        file: None,
        pos: 0,
    };
    match tokio::fs::File::open(path).await {
        Ok(mut f) => {
            let mut b = Vec::new();
            f.read_to_end(&mut b).await?;
            // A line still being written stays for the follower.
            let whole = b.iter().rposition(|c| *c == b'\n').map_or(0, |i| i + 1);
            parse_all(&b[..whole], &mut lines);
            cursor.pos = whole as u64;
            cursor.file = Some(f);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok((lines, cursor))
}

impl Cursor {
    /// The whole lines written since the last call (after a rotation: the rest of the old
    /// file, then the new one).
    async fn more(&mut self) -> io::Result<Vec<Stamped>> {
        let mut lines = Vec::new();
        if self.file.is_none() {
            match tokio::fs::File::open(&self.path).await {
                Ok(f) => {
                    self.file = Some(f);
                    self.pos = 0;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(lines),
                Err(e) => return Err(e),
            }
        }
        let rotated_away = {
            use std::os::unix::fs::MetadataExt;
            let open = self.file.as_ref().expect("opened above").metadata().await?;
            match tokio::fs::metadata(&self.path).await {
                Ok(now) => now.ino() != open.ino(),
                Err(_) => true,
            }
        };
        let file = self.file.as_mut().expect("opened above");
        file.seek(io::SeekFrom::Start(self.pos)).await?;
        let mut b = Vec::new();
        file.read_to_end(&mut b).await?;
        let whole = if rotated_away {
            b.len()
        } else {
            b.iter().rposition(|c| *c == b'\n').map_or(0, |i| i + 1)
        };
        parse_all(&b[..whole], &mut lines);
        self.pos += whole as u64;
        if rotated_away {
            self.file = None;
            self.pos = 0;
        }
        Ok(lines)
    }
}

impl Logs {
    /// The lines the query asks for, then with `follow` what comes after, until dropped.
    pub fn into_lines(self) -> io::Result<BoxStream<'static, io::Result<Stamped>>> {
        match self {
            Logs::File { path, query } => Ok(file(path, query).boxed()),
            Logs::Podman { mut cmd, query } => {
                let mut child = cmd.spawn()?;
                let out = child.stdout.take().expect("stdout is piped");
                let err = child.stderr.take().expect("stderr is piped");
                // The child lives (and with kill_on_drop dies) with the stdout half.
                let stdout = podman_lines(out, Some(child));
                let stderr = podman_lines(err, None);
                let since = query.since_ns.unwrap_or(i64::MIN);
                Ok(futures_util::stream::select(stdout, stderr)
                    .filter(move |l| std::future::ready(l.as_ref().map_or(true, |l| l.0 >= since)))
                    .boxed())
            }
        }
    }
}

fn podman_lines<R: AsyncRead + Unpin + Send + 'static>(
    r: R,
    child: Option<tokio::process::Child>,
) -> impl Stream<Item = io::Result<Stamped>> + Send {
    let reader = tokio::io::BufReader::with_capacity(MAX_LINE, r);
    futures_util::stream::unfold((reader, child), |(mut r, child)| async move {
        let mut buf = Vec::new();
        // A line is cut at MAX_LINE (the rest comes as the next line).
        let n = (&mut r)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
            .await;
        match n {
            Ok(0) => None,
            Ok(_) => {
                let raw = String::from_utf8_lossy(&buf);
                let line = parse(raw.trim_end_matches('\n'), now_ns());
                Some((Ok(line), (r, child)))
            }
            Err(e) => Some((Err(e), (r, None))),
        }
    })
}

fn file(path: PathBuf, query: LogsQuery) -> impl Stream<Item = io::Result<Stamped>> + Send {
    enum State {
        Start(PathBuf, LogsQuery),
        Following(Cursor, i64),
        Done,
    }
    let batches = futures_util::stream::unfold(State::Start(path, query), |state| async move {
        match state {
            State::Done => None,
            State::Start(path, q) => match read_stored(&path).await {
                Ok((lines, cursor)) => {
                    let next = match q.follow {
                        true => State::Following(cursor, q.since_ns.unwrap_or(i64::MIN)),
                        false => State::Done,
                    };
                    Some((Ok(select(lines, &q)), next))
                }
                Err(e) => Some((Err(e), State::Done)),
            },
            State::Following(mut cursor, since) => loop {
                match cursor.more().await {
                    Ok(mut lines) if !lines.is_empty() => {
                        lines.retain(|l| l.0 >= since);
                        return Some((Ok(lines), State::Following(cursor, since)));
                    }
                    Ok(_) => tokio::time::sleep(POLL).await,
                    Err(e) => return Some((Err(e), State::Done)),
                }
            },
        }
    });
    batches.flat_map(|b| match b {
        Ok(lines) => futures_util::stream::iter(lines.into_iter().map(Ok).collect::<Vec<_>>()),
        Err(e) => futures_util::stream::iter(vec![Err(e)]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| parse(l, 0).1)
            .collect()
    }

    fn write(path: &Path, input: &[u8], max: u64) {
        let (r, mut w) = std::io::pipe().unwrap();
        let input = input.to_vec();
        let t = std::thread::spawn(move || w.write_all(&input));
        write_log(r, path, max, DEFAULT_MAX_FILE).unwrap();
        t.join().unwrap().unwrap();
    }

    #[test]
    fn every_line_gets_a_time_and_long_lines_are_cut() {
        let dir = tempdir();
        let log = dir.path().join("t.log");
        let long = vec![b'x'; MAX_LINE + 10];
        let mut input = b"one\ntwo\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\nlast without newline");
        write(&log, &input, DEFAULT_MAX_SIZE);
        let got = lines_of(&log);
        assert_eq!(got.len(), 5, "{got:?}");
        assert_eq!(&got[..2], ["one", "two"]);
        assert_eq!(got[2].len(), MAX_LINE);
        assert_eq!(got[3], "x".repeat(10));
        assert_eq!(got[4], "last without newline");
        let raw = std::fs::read_to_string(&log).unwrap();
        let first = raw.lines().next().unwrap();
        assert!(parse_timestamp(first.split_once(' ').unwrap().0).is_some());
    }

    #[tokio::test]
    async fn tail_reads_across_the_rotated_file() {
        let dir = tempdir();
        let log = dir.path().join("t.log");
        let input: String = (0..100).map(|i| format!("line {i}\n")).collect();
        // ~40 bytes a stamped line: a 1 KiB cap rotates a few times, keeping one old file.
        write(&log, input.as_bytes(), 1024);
        assert!(rotated(&log).exists());
        let on_disk = std::fs::metadata(&log).unwrap().len()
            + std::fs::metadata(rotated(&log)).unwrap().len();
        assert!(on_disk <= 2048, "{on_disk} bytes kept");
        let current = lines_of(&log).len();
        let q = LogsQuery {
            tail: Some(current as u64 + 3),
            ..Default::default()
        };
        let got: Vec<String> = Logs::File {
            path: log.clone(),
            query: q,
        }
        .into_lines()
        .unwrap()
        .map(|l| l.unwrap().1)
        .collect()
        .await;
        let want: Vec<String> = (100 - current - 3..100)
            .map(|i| format!("line {i}"))
            .collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn max_file_keeps_that_many_files_and_reads_them_in_order() {
        let dir = tempdir();
        let log = dir.path().join("t.log");
        let input: String = (0..200).map(|i| format!("line {i}\n")).collect();
        let (r, mut w) = std::io::pipe().unwrap();
        let t = std::thread::spawn(move || w.write_all(input.as_bytes()));
        write_log(r, &log, 1024, 3).unwrap();
        t.join().unwrap().unwrap();
        assert!(rotated_n(&log, 1).exists() && rotated_n(&log, 2).exists());
        assert!(
            !rotated_n(&log, 3).exists(),
            "max-file 3 keeps two old files"
        );
        let got: Vec<String> = Logs::File {
            path: log.clone(),
            query: LogsQuery::default(),
        }
        .into_lines()
        .unwrap()
        .map(|l| l.unwrap().1)
        .collect()
        .await;
        let first: usize = got[0].trim_start_matches("line ").parse().unwrap();
        let want: Vec<String> = (first..200).map(|i| format!("line {i}")).collect();
        assert_eq!(
            got, want,
            "oldest file first, nothing lost within what is kept"
        );
        // max-file 1: the file starts again, nothing old is kept.
        let one = dir.path().join("one.log");
        let mut f = LogFile::open(&one, 200, 1).unwrap();
        for i in 0..20 {
            f.line(format!("l {i}").as_bytes()).unwrap();
        }
        assert!(!rotated(&one).exists());
        assert!(std::fs::metadata(&one).unwrap().len() <= 200);
        remove_all(&log).unwrap();
        assert!(!log.exists() && !rotated_n(&log, 2).exists());
    }

    #[test]
    fn since_and_tail_select_by_time_then_count() {
        let lines: Vec<Stamped> = (0..10).map(|i| (i * 10, format!("l{i}"))).collect();
        let q = LogsQuery {
            since_ns: Some(45),
            tail: Some(2),
            ..Default::default()
        };
        let got: Vec<String> = select(lines.clone(), &q).into_iter().map(|l| l.1).collect();
        assert_eq!(got, ["l8", "l9"]);
        let q = LogsQuery {
            since_ns: Some(75),
            ..Default::default()
        };
        assert_eq!(select(lines.clone(), &q).len(), 2);
        let q = LogsQuery {
            tail: Some(0),
            ..Default::default()
        };
        assert!(select(lines, &q).is_empty());
    }

    #[tokio::test]
    async fn follow_sees_lines_after_a_rotation() {
        let dir = tempdir();
        let log = dir.path().join("t.log");
        let mut f = LogFile::open(&log, 400, DEFAULT_MAX_FILE).unwrap();
        f.line(b"before").unwrap();
        let q = LogsQuery {
            follow: true,
            ..Default::default()
        };
        let mut s = Logs::File {
            path: log.clone(),
            query: q,
        }
        .into_lines()
        .unwrap();
        assert_eq!(s.next().await.unwrap().unwrap().1, "before");
        for i in 0..8 {
            f.line(format!("after {i} ..............").as_bytes())
                .unwrap();
        }
        assert!(rotated(&log).exists());
        let mut got = Vec::new();
        for _ in 0..8 {
            let l = tokio::time::timeout(Duration::from_secs(5), s.next())
                .await
                .unwrap();
            got.push(l.unwrap().unwrap().1);
        }
        let want: Vec<String> = (0..8)
            .map(|i| format!("after {i} .............."))
            .collect();
        assert_eq!(got, want);
    }

    /// Removed when the test ends, passed or panicked.
    fn tempdir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("mesh-logs-test-")
            .tempdir()
            .unwrap()
    }
}

/// What `exec` keeps of each of a command's stdout and stderr: the API answers with the
/// output whole, so a command that prints without end must not fill the agent's memory.
pub const EXEC_OUTPUT_LIMIT: usize = 1 << 20;

/// Waits for `child` (stdout and stderr piped) and collects at most `limit` bytes of each;
/// the rest is read and dropped (so the command is not blocked on a full pipe), and a note
/// at the end says how much.
pub async fn bounded_output(
    mut child: tokio::process::Child,
    limit: usize,
) -> io::Result<std::process::Output> {
    let out = child.stdout.take();
    let err = child.stderr.take();
    let (stdout, stderr, status) = tokio::join!(
        read_bounded(out, limit),
        read_bounded(err, limit),
        child.wait()
    );
    Ok(std::process::Output {
        status: status?,
        stdout: stdout?,
        stderr: stderr?,
    })
}

/// What `read_bounded` reads at a time.
const CHUNK: usize = 16 * 1024;

async fn read_bounded<R: AsyncRead + Unpin>(r: Option<R>, limit: usize) -> io::Result<Vec<u8>> {
    let Some(mut r) = r else {
        return Ok(Vec::new());
    };
    let mut kept = Vec::new();
    let mut dropped = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        let room = limit.saturating_sub(kept.len()).min(n);
        kept.extend_from_slice(&buf[..room]);
        dropped += (n - room) as u64;
    }
    if dropped > 0 {
        kept.extend_from_slice(
            format!(
                "\n[mesh: output cut at {limit} bytes, {dropped} more dropped; redirect it to \
                 a file in the task to keep it all]\n"
            )
            .as_bytes(),
        );
    }
    Ok(kept)
}

#[cfg(test)]
mod exec_tests {
    use super::*;

    #[tokio::test]
    async fn exec_output_is_cut_at_the_limit_and_says_so() {
        let child = tokio::process::Command::new("sh")
            .args(["-c", "head -c 3000000 /dev/zero; echo err >&2"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = bounded_output(child, 1000).await.unwrap();
        assert!(out.status.success());
        assert_eq!(&out.stdout[..1000], &[0u8; 1000][..]);
        let note = String::from_utf8_lossy(&out.stdout[1000..]).into_owned();
        assert!(
            note.contains("cut at 1000 bytes, 2999000 more dropped"),
            "{note}"
        );
        assert_eq!(out.stderr, b"err\n");
    }
}
