//! A task's output as a byte stream for the API: the log file of a process task (followed by
//! polling, as `tail -f` does on filesystems without inotify), or `podman logs` of a
//! container, its stdout and stderr merged.

use std::{io, path::PathBuf, time::Duration};

use futures_util::{Stream, StreamExt, stream::BoxStream};
use hyper::body::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt};

use super::Logs;

const CHUNK: usize = 16 * 1024;
/// The longest line a prefixed stream holds back waiting for its newline.
const MAX_LINE: usize = 16 * 1024;
/// How often a followed log file is checked for more.
const POLL: Duration = Duration::from_millis(200);

impl Logs {
    /// The output so far, and with `follow` what comes after, until the client goes.
    pub fn into_stream(self) -> io::Result<BoxStream<'static, io::Result<Bytes>>> {
        match self {
            Logs::File { path, follow } => Ok(file(path, follow).boxed()),
            Logs::Podman(mut cmd) => {
                let mut child = cmd.spawn()?;
                let out = child.stdout.take().expect("stdout is piped");
                let err = child.stderr.take().expect("stderr is piped");
                // The child lives (and with kill_on_drop dies) with the stdout half.
                let stdout = reader((out, Some(child)));
                let stderr = reader((err, None));
                Ok(futures_util::stream::select(stdout, stderr).boxed())
            }
        }
    }
}

fn reader<R: AsyncRead + Unpin + Send + 'static>(
    state: (R, Option<tokio::process::Child>),
) -> impl Stream<Item = io::Result<Bytes>> + Send {
    futures_util::stream::unfold(state, |(mut r, child)| async move {
        let mut buf = vec![0u8; CHUNK];
        match r.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), (r, child)))
            }
            Err(e) => Some((Err(e), (r, child))),
        }
    })
}

fn file(path: PathBuf, follow: bool) -> impl Stream<Item = io::Result<Bytes>> + Send {
    futures_util::stream::unfold(
        (path, None::<tokio::fs::File>, 0u64, false),
        move |(path, file, pos, done)| async move {
            if done {
                return None;
            }
            let mut file = match file {
                Some(f) => f,
                None => match tokio::fs::File::open(&path).await {
                    Ok(f) => f,
                    // A task that never wrote anything has no log yet.
                    Err(e) if e.kind() == io::ErrorKind::NotFound && !follow => return None,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        tokio::time::sleep(POLL).await;
                        return Some((Ok(Bytes::new()), (path, None, pos, false)));
                    }
                    Err(e) => return Some((Err(e), (path, None, pos, true))),
                },
            };
            loop {
                let mut buf = vec![0u8; CHUNK];
                if let Err(e) = file.seek(io::SeekFrom::Start(pos)).await {
                    return Some((Err(e), (path, Some(file), pos, true)));
                }
                match file.read(&mut buf).await {
                    Ok(0) if !follow => return None,
                    Ok(0) => tokio::time::sleep(POLL).await,
                    Ok(n) => {
                        buf.truncate(n);
                        let next = pos + n as u64;
                        return Some((Ok(Bytes::from(buf)), (path, Some(file), next, false)));
                    }
                    Err(e) => return Some((Err(e), (path, Some(file), pos, true))),
                }
            }
        },
    )
}

/// Prefixes every line of `stream` with `prefix` (service logs interleave several tasks; a
/// line is never split between two of them).
pub fn prefixed(
    prefix: String,
    stream: BoxStream<'static, io::Result<Bytes>>,
) -> BoxStream<'static, io::Result<Bytes>> {
    futures_util::stream::unfold(
        (stream, Vec::<u8>::new(), false),
        move |(mut stream, mut partial, ended)| {
            let prefix = prefix.clone();
            async move {
                if ended {
                    return None;
                }
                loop {
                    match stream.next().await {
                        Some(Ok(chunk)) => {
                            partial.extend_from_slice(&chunk);
                            let cut = match partial.iter().rposition(|b| *b == b'\n') {
                                Some(last_nl) => last_nl + 1,
                                // A line without end is passed on in pieces of at most
                                // MAX_LINE, each ended, instead of held forever.
                                None if partial.len() >= MAX_LINE => {
                                    let mut piece = partial.split_off(MAX_LINE);
                                    std::mem::swap(&mut piece, &mut partial);
                                    piece.push(b'\n');
                                    let out = with_prefix(&prefix, &piece);
                                    return Some((Ok(out), (stream, partial, false)));
                                }
                                None => continue,
                            };
                            let rest = partial.split_off(cut);
                            let out = with_prefix(&prefix, &partial);
                            return Some((Ok(out), (stream, rest, false)));
                        }
                        Some(Err(e)) => return Some((Err(e), (stream, partial, true))),
                        None if partial.is_empty() => return None,
                        None => {
                            partial.push(b'\n');
                            let out = with_prefix(&prefix, &partial);
                            return Some((Ok(out), (stream, Vec::new(), true)));
                        }
                    }
                }
            }
        },
    )
    .boxed()
}

fn with_prefix(prefix: &str, lines: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(lines.len() + 16);
    for line in lines.split_inclusive(|b| *b == b'\n') {
        out.extend_from_slice(prefix.as_bytes());
        out.extend_from_slice(line);
    }
    Bytes::from(out)
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
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_line_without_end_is_passed_on_in_bounded_pieces() {
        // 100 KB without a newline, as a task that never ends its line writes it.
        let chunks: Vec<io::Result<Bytes>> = (0..100)
            .map(|_| Ok(Bytes::from(vec![b'x'; 1000])))
            .collect();
        let stream = futures_util::stream::iter(chunks).chain(futures_util::stream::pending());
        let mut out = prefixed("t.1 | ".into(), stream.boxed());
        let mut seen = 0;
        // The stream never ends: what arrives must arrive before it does.
        while seen < 6 * MAX_LINE / 1000 * 1000 - MAX_LINE {
            let piece = tokio::time::timeout(Duration::from_secs(1), out.next())
                .await
                .expect("a piece without waiting for the newline")
                .unwrap()
                .unwrap();
            assert!(piece.starts_with(b"t.1 | "));
            assert!(piece.ends_with(b"\n"));
            assert!(piece.len() <= MAX_LINE + "t.1 | \n".len());
            seen += piece.len() - "t.1 | \n".len();
        }
    }

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
