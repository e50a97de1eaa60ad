//! Following a rollout as Docker's CLI does: overall progress, a line per slot, then
//! `verify: Service converged`, or the reason it paused or rolled back (and a non-zero exit).
//! Bars on a terminal (indicatif), plain lines otherwise, JSON lines with `--format json`.

use std::{
    io::IsTerminal,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;

use super::Format;
use mesh_api::Client;
use mesh_api::spec::UpdateState;
use mesh_api::v1::{ServiceInfo, ServiceTaskInfo};

/// How far a task has come, out of [`STEPS`], for its bar.
fn step(state: &str) -> u64 {
    match state {
        "New" | "Pending" => 1,
        "Assigned" => 2,
        "Preparing" => 3,
        "Starting" => 4,
        "Running" => STEPS,
        _ => 0,
    }
}
const STEPS: u64 = 5;

#[derive(Serialize)]
struct Line<'a> {
    service: &'a str,
    state: String,
    message: &'a str,
    updated: usize,
    total: usize,
    tasks: Vec<SlotLine>,
}

#[derive(Serialize, PartialEq, Clone)]
struct SlotLine {
    slot: String,
    state: String,
    updated: bool,
}

/// Follows the service's rollout until it completes (Ok), pauses or rolls back (Err); a
/// rollback the user asked for completes as Ok.
pub async fn follow(client: &Client, name: &str, fmt: Format, asked_rollback: bool) -> Result<()> {
    let bars = (fmt == Format::Table && std::io::stdout().is_terminal()).then(Bars::new);
    let mut last: Option<(usize, Vec<SlotLine>, String)> = None;
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let s: ServiceInfo = client.get(&format!("/v1/services/{name}")).await?;
        let rows: Vec<ServiceTaskInfo> = client.get(&format!("/v1/services/{name}/tasks")).await?;
        let Some(status) = s.spec.update_status.clone() else {
            return Ok(());
        };
        // One line per slot: its new task once it has one (start-first keeps the old one
        // beside it for a while).
        let mut by_slot: std::collections::BTreeMap<&str, SlotLine> = Default::default();
        for r in rows.iter().filter(|r| !r.history && r.desired == "Running") {
            let line = SlotLine {
                slot: r.slot.clone(),
                state: r.state.clone(),
                updated: r.updated,
            };
            match by_slot.get(r.slot.as_str()) {
                Some(l) if l.updated && !line.updated => {}
                _ => {
                    by_slot.insert(&r.slot, line);
                }
            }
        }
        let mut slots: Vec<SlotLine> = by_slot.into_values().collect();
        slots.sort_by_key(|l| (l.slot.parse::<u64>().unwrap_or(u64::MAX), l.slot.clone()));
        let total = s.desired.unwrap_or(slots.len());
        let updated = slots
            .iter()
            .filter(|l| l.updated && l.state == "Running")
            .count()
            .min(total);
        let now = (updated, slots.clone(), status.state.to_string());
        if last.as_ref() != Some(&now) {
            match (&bars, fmt) {
                (_, Format::Json) => println!(
                    "{}",
                    serde_json::to_string(&Line {
                        service: name,
                        state: status.state.to_string(),
                        message: &status.message,
                        updated,
                        total,
                        tasks: slots.clone(),
                    })?
                ),
                (Some(b), _) => b.show(updated, total, &slots),
                (None, _) => {
                    if last.as_ref().is_none_or(|(u, ..)| *u != updated) {
                        println!("overall progress: {updated} out of {total} tasks");
                    }
                    for (i, l) in slots.iter().enumerate() {
                        let changed = last
                            .as_ref()
                            .is_none_or(|(_, old, _)| old.get(i) != Some(l));
                        if changed {
                            println!(
                                "{}/{total}: {}{}",
                                i + 1,
                                l.state.to_lowercase(),
                                if l.updated { "" } else { " (old version)" }
                            );
                        }
                    }
                }
            }
            if last.as_ref().is_some_and(|(.., st)| *st != now.2) && fmt == Format::Table {
                println!("{}: {}", status.state, status.message);
            }
            last = Some(now);
        }
        match status.state {
            UpdateState::Completed => {
                if fmt == Format::Table {
                    println!("verify: Service {name} converged");
                }
                return Ok(());
            }
            UpdateState::RollbackCompleted if asked_rollback => {
                if fmt == Format::Table {
                    println!(
                        "rollback: {}\nverify: Service {name} converged",
                        status.message
                    );
                }
                return Ok(());
            }
            UpdateState::RollbackCompleted => {
                bail!(
                    "update of {name} rolled back: {}",
                    rollback_reason(client, name).await
                )
            }
            UpdateState::Paused | UpdateState::RollbackPaused => {
                bail!(
                    "{}; fix the cause and run `meshctl service update {name}` again to resume, \
                     or `meshctl service rollback {name}`",
                    status.message
                )
            }
            UpdateState::Updating | UpdateState::RollbackStarted => {}
        }
        if Instant::now() > deadline {
            bail!(
                "the rollout of {name} is still going after an hour; follow it with `meshctl service ps {name}`"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The message the rollback started with (why the update failed).
async fn rollback_reason(client: &Client, name: &str) -> String {
    let s: Result<ServiceInfo> = client.get(&format!("/v1/services/{name}")).await;
    s.ok()
        .and_then(|s| {
            s.spec
                .previous
                .and_then(|p| p.update_status.map(|u| u.message))
        })
        .unwrap_or_else(|| "see `meshctl service inspect --pretty`".into())
}

/// The terminal view: an overall bar and one per slot.
struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    slots: std::cell::RefCell<Vec<ProgressBar>>,
}

impl Bars {
    fn new() -> Self {
        let multi = MultiProgress::new();
        let overall = multi.add(ProgressBar::new(0));
        overall.set_style(
            ProgressStyle::with_template("overall progress: {pos} out of {len} tasks")
                .expect("valid template"),
        );
        Self {
            multi,
            overall,
            slots: Default::default(),
        }
    }

    fn show(&self, updated: usize, total: usize, slots: &[SlotLine]) {
        self.overall.set_length(total as u64);
        self.overall.set_position(updated as u64);
        let style = ProgressStyle::with_template("{prefix}: {msg:10} [{bar:50}]")
            .expect("valid template")
            .progress_chars("=> ");
        // Bars are only ever added: indicatif keeps their lines in place.
        let mut bars = self.slots.borrow_mut();
        while bars.len() < slots.len() {
            let b = self.multi.add(ProgressBar::new(STEPS));
            b.set_style(style.clone());
            bars.push(b);
        }
        for (i, (b, l)) in bars.iter().zip(slots).enumerate() {
            b.set_prefix(format!("{}/{total}", i + 1));
            b.set_message(l.state.to_lowercase());
            b.set_position(if l.updated { step(&l.state) } else { 0 });
        }
    }
}
