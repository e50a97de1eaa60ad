//! `mesh-cni`: the CNI plugin that attaches a container of any runtime (podman, containerd,
//! …) to a mesh network through the local agent. See `mesh_agent::cni`.

use std::io::{Read, Write};

fn main() {
    let mut stdin = Vec::new();
    // VERSION may come with an empty stdin; anything unreadable is reported as a decoding
    // failure by the config parser.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let out = mesh_agent::cni::run(|k| std::env::var(k).ok(), &stdin);
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.stdout.as_bytes());
    let _ = stdout.flush();
    std::process::exit(out.code);
}
