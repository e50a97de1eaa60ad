//! One tracing setup for the daemon and the CLI. Plain text without colour when stderr is not
//! a terminal, so journald records read cleanly; eBPF log records (aya-log uses the `log`
//! crate) arrive through tracing's log bridge.

use tracing_subscriber::EnvFilter;

pub fn init(default_level: &str) {
    let filter =
        EnvFilter::try_from_env("MESH_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(true)
        .try_init();
}
