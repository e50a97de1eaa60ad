//! Where tasks find the embedded resolver.
//!
//! Tasks send DNS to 127.0.0.11:53, Docker's address. The agent's listener inside each task's
//! namespace sits on 127.0.0.11 at a port the kernel picked, and the socket hooks move
//! traffic between the two, so a task stays free to run its own server on port 53.

/// `netns cookie (u64) → listener port (u16)`: one entry per task namespace with a resolver.
pub const RESOLVERS_MAP: &str = "RESOLVERS";

/// How many task namespaces can have a resolver at once.
pub const MAX_RESOLVERS: u32 = 16384;

/// The resolver address tasks use.
pub const RESOLVER_ADDR: [u8; 4] = [127, 0, 0, 11];

/// The port tasks send to.
pub const DNS_PORT: u16 = 53;
