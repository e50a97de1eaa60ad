//! OCI images built offline for the podman tests: a rootfs of Debian's busybox-static
//! (sh, httpd, wget, nslookup, nc), `podman import`-ed in about a second. Nothing is pulled.

use std::{
    path::Path,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The applets the images' commands and the tests use.
const APPLETS: &[&str] = &[
    "sh", "httpd", "wget", "nslookup", "nc", "hostname", "cat", "echo", "sleep", "kill", "ls",
    "ip", "env", "dd",
];

/// A local image, removed (with any container still using it) on drop.
pub struct Image {
    name: String,
}

impl Image {
    /// `localhost/mt<pid>-whoami:<n>`: an HTTP server on port 80 that answers with the
    /// container's hostname (`web.1` for a task of web) and exits cleanly on SIGTERM.
    pub fn whoami() -> Result<Self> {
        Self::busybox(
            "whoami",
            r#"["/bin/sh","-c","trap 'exit 0' TERM; hostname > /www/index.html; httpd -f -p 80 -h /www & wait"]"#,
        )
    }

    /// A busybox image whose CMD is `cmd` (JSON array form).
    pub fn busybox(what: &str, cmd: &str) -> Result<Self> {
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        Self::named(
            &format!("localhost/mt{}-{what}:{seq}", std::process::id()),
            cmd,
        )
    }

    /// A busybox image under a name of the caller's (the demo's `localhost/demo-web:1`),
    /// whose CMD is `cmd` (JSON array form).
    pub fn named(name: &str, cmd: &str) -> Result<Self> {
        let busybox = Path::new("/bin/busybox");
        if !busybox.exists() {
            bail!("/bin/busybox is missing: install busybox-static (scripts/setup.sh does)");
        }
        let name = name.to_owned();
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("mt{}-image-{seq}", std::process::id()));
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin"))?;
        std::fs::create_dir_all(rootfs.join("www"))?;
        std::fs::create_dir_all(rootfs.join("etc"))?;
        std::fs::create_dir_all(rootfs.join("tmp"))?;
        std::fs::copy(busybox, rootfs.join("bin/busybox"))?;
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a))?;
        }
        let tar = dir.join("rootfs.tar");
        let built = run(Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg("."))
        .and_then(|_| {
            run(Command::new("podman")
                .arg("import")
                .args(["--change", &format!("CMD {cmd}")])
                .args(["--change", "ENV PATH=/bin"])
                .arg(&tar)
                .arg(&name))
        });
        let _ = std::fs::remove_dir_all(&dir);
        built.with_context(|| format!("building image {name}"))?;
        Ok(Self { name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rmi", "--force", &self.name])
            .output();
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().context("running a command")?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
