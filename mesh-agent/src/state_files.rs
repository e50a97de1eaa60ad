//! Files the agent keeps across restarts (its gossip keys, task and CNI records, key files,
//! the config init/join write): written so a crash or power loss at any moment leaves the
//! old file or the new one, and read so a damaged one is set aside, said and counted instead
//! of taken for a first start.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use tracing::error;

static QUARANTINED: AtomicU64 = AtomicU64::new(0);

/// Replaces `path` with `bytes` (file mode `mode`): written to a temporary file beside it,
/// flushed to disk, renamed over it, and the directory flushed so the rename itself survives
/// a power loss. A full disk fails here, before the old file is touched.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    fs::File::open(dir)?.sync_all()
}

/// The second copy of a file written with [`write_with_backup`].
pub fn backup_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".bak");
    path.with_file_name(name)
}

/// [`write_atomic`], then the same to a second copy beside it: a file damaged later (a bad
/// block, a careless edit) still has its twin. A crash between the two leaves the copy one
/// write behind, which a reader takes over nothing.
pub fn write_with_backup(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_atomic(path, bytes, mode)?;
    write_atomic(&backup_path(path), bytes, mode)
}

/// Reads a file written with [`write_with_backup`] through `decode`: a damaged copy is set
/// aside and the other one used. None when neither exists or neither decodes.
pub fn read_with_backup<T, E: std::fmt::Display>(
    path: &Path,
    decode: impl Fn(&[u8]) -> Result<T, E>,
) -> Option<T> {
    let mut main_lost = false;
    for p in [path.to_owned(), backup_path(path)] {
        match fs::read(&p) {
            Ok(bytes) => match decode(&bytes) {
                Ok(v) => {
                    // The twin takes the damaged copy's place, so both exist again.
                    if main_lost && let Err(e) = write_atomic(path, &bytes, 0o600) {
                        error!("restoring {} from its copy: {e}", path.display());
                    }
                    return Some(v);
                }
                Err(e) => {
                    quarantine(&p, &e);
                    main_lost |= p == path;
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                quarantine(&p, &e);
                main_lost |= p == path;
            }
        }
    }
    None
}

/// Removes a file written with [`write_with_backup`] and its copy.
pub fn remove_with_backup(path: &Path) -> io::Result<()> {
    for p in [path.to_owned(), backup_path(path)] {
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sets a damaged file aside as `<name>.corrupt-<unix seconds>` (kept for a post-mortem,
/// never read again), logs why and counts it. Returns the new name, or None if even the
/// rename failed (then the file is left where it is, and that is logged too).
pub fn quarantine(path: &Path, why: &dyn std::fmt::Display) -> Option<PathBuf> {
    QUARANTINED.fetch_add(1, Ordering::Relaxed);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".corrupt-{secs}"));
    let aside = path.with_file_name(name);
    match fs::rename(path, &aside) {
        Ok(()) => {
            error!(
                "{} is damaged ({why}); moved it to {} and rebuilding what it held",
                path.display(),
                aside.display()
            );
            Some(aside)
        }
        Err(e) => {
            error!(
                "{} is damaged ({why}) and could not be moved aside: {e}",
                path.display()
            );
            None
        }
    }
}

/// Damaged state files set aside since the agent started.
pub fn quarantined() -> u64 {
    QUARANTINED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mesh-state-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_write_replaces_the_file_whole_with_its_mode_and_leaves_no_temporary() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("write");
        let path = dir.join("state.json");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
        // A directory that is not there fails the write and changes nothing else.
        assert!(write_atomic(&dir.join("missing/state.json"), b"x", 0o600).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_copy_is_set_aside_and_its_twin_read() {
        let dir = scratch("backup");
        let path = dir.join("keys.json");
        write_with_backup(&path, b"[1]", 0o600).unwrap();
        let decode = |b: &[u8]| serde_json::from_slice::<Vec<u8>>(b);
        assert_eq!(read_with_backup(&path, decode), Some(vec![1]));
        fs::write(&path, b"[").unwrap();
        assert_eq!(read_with_backup(&path, decode), Some(vec![1]));
        // The damaged copy was set aside and replaced from its twin.
        assert_eq!(fs::read(&path).unwrap(), b"[1]");
        fs::write(&path, b"[").unwrap();
        fs::write(backup_path(&path), b"").unwrap();
        assert_eq!(read_with_backup(&path, decode), None);
        let aside = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
            .count();
        assert_eq!(aside, 2);
        write_with_backup(&path, b"[2]", 0o600).unwrap();
        remove_with_backup(&path).unwrap();
        assert!(!path.exists() && !backup_path(&path).exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_file_is_moved_aside_and_counted() {
        let dir = scratch("quarantine");
        let path = dir.join("t.json");
        fs::write(&path, b"{\"trunc").unwrap();
        let before = quarantined();
        let aside = quarantine(&path, &"EOF while parsing").unwrap();
        assert!(!path.exists());
        assert_eq!(fs::read(&aside).unwrap(), b"{\"trunc");
        let name = aside.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("t.json.corrupt-"), "{name}");
        assert!(quarantined() > before);
        fs::remove_dir_all(&dir).unwrap();
    }
}
