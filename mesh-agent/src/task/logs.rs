//! A task's output as a byte stream for the API: the log file of a process task (followed by
//! polling, as `tail -f` does on filesystems without inotify), or `podman logs` of a
//! container, its stdout and stderr merged.

use std::{io, path::PathBuf, time::Duration};

use futures_util::{Stream, StreamExt, stream::BoxStream};
use hyper::body::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt};

use super::Logs;

const CHUNK: usize = 16 * 1024;
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
                            let Some(last_nl) = partial.iter().rposition(|b| *b == b'\n') else {
                                continue;
                            };
                            let rest = partial.split_off(last_nl + 1);
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
