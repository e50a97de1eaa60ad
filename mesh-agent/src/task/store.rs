//! Task records on disk: one JSON file per task under `<state dir>/tasks`, replaced
//! atomically, so an agent that crashed at any point finds each task either as it was before
//! or after the last change.

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use tracing::warn;

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
        let tmp = path.with_extension("json.tmp");
        let write = || -> io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(record)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().with_context(|| format!("saving task record {}", path.display()))
    }

    /// Forgets a task: its record and its log.
    pub fn remove(&self, task: &str) -> Result<()> {
        for p in [self.record_path(task), self.log_path(task)] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
            }
        }
        Ok(())
    }

    /// Every record that can be read; unreadable ones are reported and skipped so one bad
    /// file cannot keep the agent from adopting the others.
    pub fn load_all(&self) -> Result<Vec<TaskRecord>> {
        let mut records = Vec::new();
        let entries = std::fs::read_dir(&self.dir)
            .with_context(|| format!("reading {}", self.dir.display()))?;
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(anyhow::Error::from)
                .and_then(|b| serde_json::from_slice(&b).map_err(anyhow::Error::from))
            {
                Ok(r) => records.push(r),
                Err(e) => warn!("ignoring unreadable task record {}: {e:#}", path.display()),
            }
        }
        Ok(records)
    }
}
