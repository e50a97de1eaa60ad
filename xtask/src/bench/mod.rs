//! `cargo xtask bench <what>`: the benchmarks the project measures itself by, each against
//! its baseline in the same run, reported as ratios (this machine is shared and noisy, so
//! absolute numbers move from run to run; ratios taken side by side move much less).
//!
//! One module per benchmark; each returns a [`report::Report`]. `all` runs every one and
//! writes `bench/results/<date>.md` with the plots beside it.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;

mod agents;
mod convergence;
mod dns;
mod failover;
mod flood;
mod footprint;
mod kernel;
mod lbmaps;
mod mesh;
mod orchestration;
mod planner;
mod programming;
mod reference;
pub mod report;
mod scale;
mod simulation;
mod update;

use report::Report;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// Request path: keep-alive (wrk) and `Connection: close` load through the routing mesh,
    /// directly, and through an nftables DNAT baseline, to a local and a remote task.
    Mesh,
    /// ns/packet of the load balancer at 1 to 100,000 services and up to 1,000,000 flows, as
    /// ratios to the pass floor, beside iptables/nft DNAT at the same service counts.
    Scale,
    /// ns/packet of the routing mesh beside a minimal reference load balancer (one LRU
    /// lookup, DNAT, redirect) on the same frames, at 10k and 1M flows (issue 33).
    Reference,
    /// Time from `service create` / `meshctl run` to the kernel programmed on all nodes;
    /// time to program 10,000 services.
    Programming,
    /// Gossip convergence and bandwidth with 10, 50 and 200 control-plane-only agents.
    Convergence,
    /// Agent RSS and CPU, idle and with 10,000 services.
    Footprint,
    /// Time to evict a dead node's tasks everywhere, and to bring them back.
    Failover,
    /// mesh-dns against dnsmasq, both serving the same names, driven by dnsperf.
    Dns,
    /// Services: 30 and 300 replicas placed and balanced (and where the time goes), 30
    /// scaled to 60, rescheduled after a node dies.
    Orchestration,
    /// A rolling update of 10 tasks beside a naive stop-all/start-all, with a client loop.
    Update,
    /// The planner alone: 300 tasks placed over 3 and 1,000 simulated nodes, with
    /// reservations beside the same without; 10,000 services × 10 over 1,000 nodes.
    Planner,
    /// The agent's real gossip and view code at 100 nodes (more with `MESH_SIM_NODES`) in one
    /// process over a simulated network (latency, loss, a partition), on a virtual clock:
    /// time for a change to reach every node, bandwidth, memory and CPU per node; one
    /// worker's view of 1,000 nodes.
    Simulation,
    /// Spoofed SYN and UDP floods at a published port: flood pps, whether an established
    /// connection survives, share of new connections served.
    Flood,
    /// Everything above; writes bench/results/<date>.md and its plots.
    All,
}

const ORDER: [Target; 13] = [
    Target::Mesh,
    Target::Scale,
    Target::Reference,
    Target::Programming,
    Target::Convergence,
    Target::Footprint,
    Target::Failover,
    Target::Dns,
    Target::Orchestration,
    Target::Update,
    Target::Planner,
    Target::Simulation,
    Target::Flood,
];

pub fn run(target: Target, quick: bool) -> Result<()> {
    if !is_root() && !in_process(target) {
        bail!("the benchmarks create network namespaces and load eBPF: run them as root");
    }
    // Agents, the load balancer's userspace and the timing loops are measured as shipped:
    // optimised. A debug xtask re-runs itself as a release build (which builds release
    // agents, see mesh_tests::cluster::bin).
    if !running_release() {
        return rerun_release(target, quick);
    }
    prebuild(target)?;
    let started = Instant::now();
    match target {
        Target::All => all(quick)?,
        t => {
            let report = one(t, quick)?;
            println!("{}", report.text());
            // The section as `all` would write it (with what ran), to commit a single
            // benchmark's results.
            let md = std::env::temp_dir().join(format!(
                "mesh-bench-{}-{}.md",
                report
                    .title
                    .split(':')
                    .next()
                    .unwrap_or("report")
                    .replace(' ', "-"),
                std::process::id()
            ));
            std::fs::write(&md, report.markdown(&[]))
                .with_context(|| format!("writing {}", md.display()))?;
            println!("markdown: {}", md.display());
            let dir = std::env::temp_dir().join(format!("mesh-bench-plots-{}", std::process::id()));
            if !report.plots.is_empty() {
                std::fs::create_dir_all(&dir)?;
                for p in &report.plots {
                    match p.render(&dir) {
                        Ok(path) => println!("plot: {}", path.display()),
                        Err(e) => eprintln!("plot {} not drawn: {e:#}", p.stem),
                    }
                }
            }
        }
    }
    eprintln!(
        "==> bench {target:?} finished in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn one(target: Target, quick: bool) -> Result<Report> {
    eprintln!(
        "\n==> bench {target:?}{}",
        if quick { " --quick" } else { "" }
    );
    let started = Instant::now();
    let mut report = match target {
        Target::Mesh => mesh::run(quick),
        Target::Scale => scale::run(quick),
        Target::Reference => reference::run(quick),
        Target::Programming => programming::run(quick),
        Target::Convergence => convergence::run(quick),
        Target::Footprint => footprint::run(quick),
        Target::Failover => failover::run(quick),
        Target::Dns => dns::run(quick),
        Target::Orchestration => orchestration::run(quick),
        Target::Update => update::run(quick),
        Target::Planner => planner::run(quick),
        Target::Simulation => simulation::run(quick),
        Target::Flood => flood::run(quick),
        Target::All => unreachable!("all is not one benchmark"),
    }?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Every benchmark in turn; one that fails is reported as failed and the rest still run.
fn all(quick: bool) -> Result<()> {
    let started = Instant::now();
    let mut reports = Vec::new();
    for t in ORDER {
        match one(t, quick) {
            Ok(r) => {
                println!("{}", r.text());
                reports.push(r);
            }
            Err(e) => {
                eprintln!("bench {t:?} failed: {e:#}");
                reports.push(Report::failed(&format!("{t:?}"), &e));
            }
        }
    }
    let date = today()?;
    let dir = repo_root()?.join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let stem = if quick {
        format!("{date}-quick")
    } else {
        date.clone()
    };
    let mut plots = Vec::new();
    for r in &reports {
        for p in &r.plots {
            let mut p = p.clone();
            p.stem = format!("{stem}-{}", p.stem);
            match p.render(&dir) {
                Ok(path) => plots.push((p.title.clone(), path)),
                Err(e) => eprintln!("plot {} not drawn: {e:#}", p.stem),
            }
        }
    }
    let md = report::document(
        &reports,
        &plots,
        quick,
        started.elapsed().as_secs_f64(),
        &date,
    );
    let path = dir.join(format!("{stem}.md"));
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "==> wrote {} ({:.0} s in all)",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Builds what the benchmarks run before the clock starts, so a section's time is its
/// measurement, not a compile that happens to land in it (the first to need the optimised
/// hickory build used to pay ~200 s for it).
fn prebuild(target: Target) -> Result<()> {
    // These run in this process (the reference load balancer is loaded from the program
    // built into this binary): nothing to build.
    if in_process(target) || matches!(target, Target::Reference) {
        return Ok(());
    }
    let started = Instant::now();
    eprintln!("==> building the agents, test servers and the mesh-dns example (release)");
    let _ = mesh_tests::cluster::bin("mesh-agent");
    if matches!(target, Target::All | Target::Dns) {
        dns::build_serve_example()?;
    }
    eprintln!("==> built in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Benchmarks that run in this process alone: no root, no agents to build.
fn in_process(target: Target) -> bool {
    matches!(target, Target::Planner | Target::Simulation)
}

fn running_release() -> bool {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .is_some_and(|d| d.ends_with("release"))
}

fn rerun_release(target: Target, quick: bool) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("==> building the benchmarks and agents optimised (cargo build --release)");
    let target_name = target
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .context("benchmark name")?;
    let mut cmd = Command::new(cargo);
    cmd.args(["run", "--release", "--quiet", "--package", "xtask", "--"])
        .args(["bench", &target_name]);
    if quick {
        cmd.arg("--quick");
    }
    let status = cmd.status().context("running the release build of xtask")?;
    if !status.success() {
        bail!("bench {target_name} failed ({status})");
    }
    Ok(())
}

pub fn repo_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

fn today() -> Result<String> {
    let out = Command::new("date").arg("+%Y-%m-%d").output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// `tool` on PATH (or in the sbin directories, which root's PATH may lack).
pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| p.is_file())
}

pub fn require(tools: &[(&str, &str)]) -> Result<()> {
    for (tool, package) in tools {
        if which(tool).is_none() {
            bail!(
                "{tool} is not installed; scripts/setup.sh installs it (Debian package {package})"
            );
        }
    }
    Ok(())
}
