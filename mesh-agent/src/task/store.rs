//! Task records on disk: one JSON file per task under `<state dir>/tasks`, replaced
//! atomically, so an agent that crashed at any point finds each task either as it was before
//! or after the last change.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::TaskRecord;

pub(super) struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn open(state_dir: &Path) -> Result<Self> {
        let dir = state_dir.join("tasks");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the task state directory {}", dir.display()))?;
        Ok(Self { dir })
    }

    pub fn log_path(&self, task: &str) -> PathBuf {
        self.dir.join(format!("{task}.log"))
    }

    fn record_path(&self, task: &str) -> PathBuf {
        self.dir.join(format!("{task}.json"))
    }

    pub fn save(&self, record: &TaskRecord) -> Result<()> {
        let path = self.record_path(&record.spec.name);
        let bytes = serde_json::to_vec_pretty(record).context("encoding a task record")?;
        crate::state_files::write_with_backup(&path, &bytes, 0o600)
            .with_context(|| format!("saving task record {}", path.display()))
    }

    /// Forgets a task: its record and its log.
    pub fn remove(&self, task: &str) -> Result<()> {
        crate::state_files::remove_with_backup(&self.record_path(task))
            .with_context(|| format!("removing the record of {task}"))?;
        let log = self.log_path(task);
        super::logs::remove_all(&log)
            .with_context(|| format!("removing the logs {}*", log.display()))
    }

    /// Every record that can be read (a damaged one from its copy), and the names of tasks
    /// whose record and copy could not: those are set aside (quarantined) so one bad file
    /// cannot keep the agent from adopting the others, and their task is cleaned up by name
    /// rather than left running unmanaged.
    pub fn load_all(&self) -> Result<(Vec<TaskRecord>, Vec<String>)> {
        let mut records = Vec::new();
        let mut damaged = Vec::new();
        let entries = std::fs::read_dir(&self.dir)
            .with_context(|| format!("reading {}", self.dir.display()))?;
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match crate::state_files::read_with_backup(&path, |b| {
                serde_json::from_slice::<TaskRecord>(b)
            }) {
                Some(r) => records.push(r),
                None => {
                    if let Some(task) = path.file_stem() {
                        damaged.push(task.to_string_lossy().into_owned());
                    }
                }
            }
        }
        Ok((records, damaged))
    }
}
