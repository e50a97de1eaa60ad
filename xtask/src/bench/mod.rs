//! `cargo xtask bench <target>`: benchmarks against the baselines the project measures itself by.

use anyhow::Result;
use clap::ValueEnum;

mod dns;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Target {
    /// mesh-dns against dnsmasq, both serving the same names, driven by dnsperf.
    Dns,
}

pub fn run(target: Target, quick: bool) -> Result<()> {
    match target {
        Target::Dns => dns::run(quick),
    }
}
