//! What a benchmark hands back: tables, notes and plot data, printed on the terminal and
//! written as one markdown document by `bench all`.

use std::{fmt::Write as _, path::Path, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, Result, bail};

#[derive(Debug, Default)]
pub struct Report {
    pub title: String,
    /// What was run, one line each: topology, tools, durations, repetitions.
    pub ran: Vec<String>,
    pub tables: Vec<Table>,
    /// Findings and caveats.
    pub notes: Vec<String>,
    pub plots: Vec<Plot>,
    /// Wall time of the benchmark (set by the runner).
    pub seconds: f64,
}

impl Report {
    pub fn new(title: &str) -> Self {
        Self {
            title: title.to_owned(),
            ..Self::default()
        }
    }

    pub fn failed(what: &str, e: &anyhow::Error) -> Self {
        let mut r = Self::new(what);
        r.notes.push(format!("FAILED: {e:#}"));
        r
    }

    pub fn ran(&mut self, line: impl Into<String>) {
        self.ran.push(line.into());
    }

    pub fn note(&mut self, line: impl Into<String>) {
        self.notes.push(line.into());
    }

    /// For the terminal: aligned columns.
    pub fn text(&self) -> String {
        let mut out = format!("\n== {} ==\n", self.title);
        for t in &self.tables {
            if !t.caption.is_empty() {
                let _ = writeln!(out, "\n{}", t.caption);
            }
            let cols = t.headers.len();
            let width: Vec<usize> = (0..cols)
                .map(|c| {
                    t.rows
                        .iter()
                        .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                        .chain([t.headers[c].chars().count()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |cells: &[String]| {
                let mut l = String::new();
                for (c, w) in width.iter().enumerate() {
                    let cell = cells.get(c).map_or("", String::as_str);
                    if c == 0 {
                        let _ = write!(l, "{cell:<w$}");
                    } else {
                        let _ = write!(l, "  {cell:>w$}");
                    }
                }
                l
            };
            let _ = writeln!(out, "{}", line(&t.headers));
            for r in &t.rows {
                let _ = writeln!(out, "{}", line(r));
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "* {n}");
        }
        out
    }

    pub fn markdown(&self, plots: &[(String, PathBuf)]) -> String {
        let mut out = format!("## {}\n\n", self.title);
        if !self.ran.is_empty() {
            let _ = writeln!(out, "What ran ({:.0} s):\n", self.seconds);
            for l in &self.ran {
                let _ = writeln!(out, "- {l}");
            }
            out.push('\n');
        }
        for t in &self.tables {
            if !t.caption.is_empty() {
                let _ = writeln!(out, "{}\n", t.caption);
            }
            let _ = writeln!(out, "| {} |", t.headers.join(" | "));
            let _ = writeln!(
                out,
                "|{}",
                t.headers
                    .iter()
                    .enumerate()
                    .map(|(i, _)| if i == 0 { " --- |" } else { " ---: |" })
                    .collect::<String>()
            );
            for r in &t.rows {
                let _ = writeln!(out, "| {} |", r.join(" | "));
            }
            out.push('\n');
        }
        for p in &self.plots {
            if let Some((_, path)) = plots.iter().find(|(title, _)| *title == p.title) {
                let file = path.file_name().map(|f| f.to_string_lossy().into_owned());
                let _ = writeln!(out, "![{}]({})\n", p.title, file.unwrap_or_default());
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "- {n}");
        }
        out.push('\n');
        out
    }
}

#[derive(Debug, Default)]
pub struct Table {
    pub caption: String,
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(caption: &str, headers: &[&str]) -> Self {
        Self {
            caption: caption.to_owned(),
            headers: headers.iter().map(|s| (*s).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
}

/// A curve (or several) drawn with gnuplot.
#[derive(Clone, Debug, Default)]
pub struct Plot {
    /// File name without extension.
    pub stem: String,
    pub title: String,
    pub xlabel: String,
    pub ylabel: String,
    pub logx: bool,
    pub logy: bool,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

impl Plot {
    /// Writes `<dir>/<stem>.png`.
    pub fn render(&self, dir: &Path) -> Result<PathBuf> {
        if super::which("gnuplot").is_none() {
            bail!("gnuplot is not installed (scripts/setup.sh installs gnuplot-nox)");
        }
        let png = dir.join(format!("{}.png", self.stem));
        let mut script = String::new();
        let _ = writeln!(
            script,
            "set terminal pngcairo size 900,560 noenhanced font ',11'\nset output '{}'",
            png.display()
        );
        let _ = writeln!(script, "set title '{}'", self.title);
        let _ = writeln!(
            script,
            "set xlabel '{}'\nset ylabel '{}'",
            self.xlabel, self.ylabel
        );
        let _ = writeln!(script, "set grid\nset key top left\nset yrange [0:*]");
        if self.logx {
            let _ = writeln!(script, "set logscale x 10\nset format x '%.0f'");
        }
        if self.logy {
            let _ = writeln!(script, "set logscale y 10\nset yrange [*:*]");
        }
        let plots: Vec<String> = self
            .series
            .iter()
            .map(|(name, _)| format!("'-' using 1:2 with linespoints lw 2 pt 7 title '{name}'"))
            .collect();
        let _ = writeln!(script, "plot {}", plots.join(", "));
        for (_, points) in &self.series {
            for (x, y) in points {
                let _ = writeln!(script, "{x} {y}");
            }
            let _ = writeln!(script, "e");
        }
        let mut child = Command::new("gnuplot")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .context("running gnuplot")?;
        use std::io::Write as _;
        child
            .stdin
            .take()
            .context("gnuplot stdin")?
            .write_all(script.as_bytes())?;
        let status = child.wait()?;
        if !status.success() {
            bail!("gnuplot failed ({status})");
        }
        Ok(png)
    }
}

/// The results file of `bench all`.
pub fn document(
    reports: &[Report],
    plots: &[(String, PathBuf)],
    quick: bool,
    seconds: f64,
    date: &str,
) -> String {
    let mut out = format!(
        "# mesh benchmarks, {date}{}\n\n",
        if quick { " (--quick)" } else { "" }
    );
    let _ = writeln!(
        out,
        "`cargo xtask bench all{}` ran every benchmark below in one go in {:.0} s.\n",
        if quick { " --quick" } else { "" },
        seconds
    );
    let _ = writeln!(out, "Machine: {}\n", machine());
    out.push_str(
        "Caveats that hold for every section:\n\n\
         - One shared 2-core VM: other engineers' builds and tests may run at the same time, \
           so absolute numbers move from run to run. Every comparison is made side by side in \
           the same run and reported as a ratio; trust the ratios more than the absolutes.\n\
         - \"Hosts\" are network namespaces joined by veth to a bridge on one kernel; the \
           overlay is real kernel VXLAN, the dataplane real eBPF, agents real processes \
           (release builds). No NIC, no wire: per-packet costs are CPU costs.\n\
         - Timings that poll carry the polling interval as resolution, stated in each \
           section, with what is read: programming and failover read each node's kernel (the \
           pinned LB maps, the FDB over netlink) from one long-lived reader per node, never \
           the agent; convergence, update and orchestration read the agents (`service \
           inspect`, the API).\n\n",
    );
    for r in reports {
        out.push_str(&r.markdown(plots));
    }
    out
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!(
        "Linux {}, {cores} × {cpu}, {mem_gib:.0} GiB RAM",
        kernel.trim()
    )
}

/// min / median / max of a sample.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        // The middle value, or the mean of the two middle ones: with two repetitions the
        // nearest-rank median would be the larger one.
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            min: v[0],
            median,
            max: v[n - 1],
        })
    }

    pub fn of_durations(values: &[Duration]) -> Option<Self> {
        Self::of(
            &values
                .iter()
                .map(|d| d.as_secs_f64() * 1000.0)
                .collect::<Vec<_>>(),
        )
    }

    /// `min / median / max` with `unit`, formatted with `decimals`.
    pub fn show(&self, decimals: usize, unit: &str) -> String {
        format!(
            "{:.d$} / {:.d$} / {:.d$}{unit}",
            self.min,
            self.median,
            self.max,
            d = decimals
        )
    }
}

pub fn percentile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

pub fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// The machine's load average (1, 5, 15 min) as /proc/loadavg has it: the machine is shared,
/// so a result says how busy it was.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" / "))
        .unwrap_or_else(|| "unknown".into())
}
