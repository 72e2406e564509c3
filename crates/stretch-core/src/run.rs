//! A run's lifecycle in the store, written once for build, deploy, rollback and apply:
//! start it, send its log there, and end it by how the pipeline ended.

use std::sync::Arc;

use crate::Result;
use crate::log::Log;
use crate::store::{RunKind, RunSink, Store};

/// A run being recorded. End it with [`Run::finish`]; one dropped unfinished (its
/// pipeline cancelled or panicking) is recorded as failed, never left "running".
pub struct Run {
    store: Store,
    id: i64,
    finished: bool,
    forget_bad_input: bool,
}

impl Run {
    /// Record a new run, and say so on `log` (callers learn its id from
    /// [`crate::log::Event::RunStarted`]). Returns the run and a log that also writes
    /// into it.
    pub fn start(
        store: &Store,
        kind: RunKind,
        environment: Option<&str>,
        release: Option<&str>,
        existing: Option<&str>,
        log: &Log,
    ) -> Result<(Run, Log)> {
        let id = store.start_run(kind, environment, release, existing)?;
        let run = Run {
            store: store.clone(),
            id,
            finished: false,
            forget_bad_input: false,
        };
        let log = log.with(Arc::new(RunSink {
            store: store.clone(),
            run: id,
        }));
        log.run_started(id);
        Ok((run, log))
    }

    /// Bad input (exit 2) found by this run's own stages leaves no record, as if the
    /// command had been refused at once: a build validates its files while it runs.
    /// Deploys and applies check their input before they start, so whatever fails
    /// later (a template, a plugin that may already have acted) stays in the history.
    pub fn forget_bad_input(mut self) -> Run {
        self.forget_bad_input = true;
        self
    }

    pub fn id(&self) -> i64 {
        self.id
    }

    /// The release this run produced (a build learns it at its end).
    pub fn set_release(&self, release: &str) -> Result<()> {
        self.store.set_run_release(self.id, release)
    }

    /// End the run as `result` says: success, or failure with its error (or no record
    /// at all, see [`Run::forget_bad_input`]). The store's own failures here do not
    /// hide the pipeline's result.
    pub fn finish<T>(mut self, result: Result<T>) -> Result<T> {
        self.finished = true;
        match &result {
            Ok(_) => {
                let _ = self.store.finish_run(self.id, true);
            }
            Err(e) if self.forget_bad_input && e.exit_code() == 2 => {
                let _ = self.store.delete_run(self.id);
            }
            Err(e) => {
                let _ = self.store.add_line(self.id, "error", &e.to_string());
                let _ = self.store.finish_run(self.id, false);
            }
        }
        result
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.store.add_line(self.id, "error", "interrupted");
            let _ = self.store.finish_run(self.id, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use crate::store::RunStatus;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn runs_end_as_their_pipeline_did() {
        let (_dir, store) = store();
        let log = Log::null();

        let (run, _) = Run::start(&store, RunKind::Build, None, None, None, &log).unwrap();
        let ok = run.id();
        run.set_release("abc").unwrap();
        assert_eq!(run.finish(Ok(1)).unwrap(), 1);

        let (run, _) = Run::start(&store, RunKind::Build, None, None, None, &log).unwrap();
        let failed = run.id();
        let r: Result<()> = run.finish(Err(Error::failed("images", "engine said no")));
        assert!(r.is_err());

        let (run, _) = Run::start(&store, RunKind::Build, None, None, None, &log).unwrap();
        let run = run.forget_bad_input();
        let bad = run.id();
        let _ = run.finish::<()>(Err(Error::invalid("bad system.yml")));

        let (run, _) = Run::start(&store, RunKind::Deploy, Some("x"), None, None, &log).unwrap();
        let kept = run.id();
        let _ = run.finish::<()>(Err(Error::invalid("undefined variable")));

        let (run, _) = Run::start(&store, RunKind::Deploy, Some("x"), None, None, &log).unwrap();
        let dropped = run.id();
        drop(run);

        let runs = store.runs(None).unwrap();
        let status = |id| runs.iter().find(|r| r.id == id).map(|r| r.status);
        assert_eq!(status(ok), Some(RunStatus::Succeeded));
        assert_eq!(
            runs.iter().find(|r| r.id == ok).unwrap().release.as_deref(),
            Some("abc")
        );
        assert_eq!(status(failed), Some(RunStatus::Failed));
        assert_eq!(status(bad), None, "a build's bad input leaves no run");
        assert_eq!(status(kept), Some(RunStatus::Failed));
        assert_eq!(status(dropped), Some(RunStatus::Failed));
        let last = store.log(failed, 0).unwrap();
        assert!(last.iter().any(|l| l.text.contains("engine said no")));
    }
}
