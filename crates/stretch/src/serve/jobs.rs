//! Builds, deploys, rollbacks and applies started through the server. Each runs on a
//! thread of its own with its own single-threaded runtime (a build waits on the home's
//! build lock with a blocking `flock`, and stores every log line synchronously), so the
//! workers that answer requests and stream logs are never held up.
//!
//! A build's run is recorded here before it starts, so its id is known at once. Deploys
//! (and applies) record their own run once they hold the environment's lock; a sink
//! watches for that run to appear, so the caller learns its id, or the error that
//! stopped it first (a busy environment, an unknown release).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use stretch_core::build::{self, BuildOptions};
use stretch_core::deploy::apply::{self, ApplyRequest};
use stretch_core::deploy::{self, DeployRequest, Kind};
use stretch_core::error::ErrorBody;
use stretch_core::log::{Event, Log, Sink};
use stretch_core::outcome::{Built, Deployed, Release};
use stretch_core::store::{RunKind, Store};
use stretch_core::{Error, Result};
use tokio::sync::oneshot;

use super::Shared;
use crate::progress::Board;

/// What the server remembers of a run it ran, beyond the store: what a client watching
/// it wants to know at the end (a build's `reused`, the error), including for a build
/// that was bad input, whose run is deleted from the history like the CLI's.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub status: JobStatus,
    /// The error on one line, as the CLI prints it.
    pub error: Option<String>,
    pub help: Option<String>,
    /// The error with its kind and stage, for `--server` clients to rebuild it.
    pub failure: Option<ErrorBody>,
    pub exit_code: u8,
    pub reused: Option<bool>,
    pub release: Option<String>,
    /// What the job returned beyond its run (an apply's plan).
    pub result: Option<serde_json::Value>,
}

/// How a job the server ran ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Succeeded,
    Failed,
    /// Bad input: nothing was recorded.
    Invalid,
}

impl Outcome {
    fn of<T>(r: &Result<T>, reused: Option<bool>, release: Option<String>) -> Outcome {
        match r {
            Ok(_) => Outcome {
                status: JobStatus::Succeeded,
                error: None,
                help: None,
                failure: None,
                exit_code: 0,
                reused,
                release,
                result: None,
            },
            Err(e) => Outcome {
                status: if e.exit_code() == 2 {
                    JobStatus::Invalid
                } else {
                    JobStatus::Failed
                },
                error: Some(e.to_string()),
                help: e.help().map(String::from),
                failure: Some(ErrorBody::from(e)),
                exit_code: e.exit_code(),
                reused: None,
                release,
                result: None,
            },
        }
    }
}

#[derive(Default)]
pub struct Jobs {
    active: Mutex<HashSet<i64>>,
    outcomes: Mutex<HashMap<i64, Outcome>>,
    /// What each running job's progress shows now, and a count of its changes.
    progress: Mutex<HashMap<i64, (u64, Board)>>,
}

/// What starting a job gave.
pub enum Started {
    /// It runs (or already ran) as this run.
    Run(i64),
    /// It ended at once without a run (an apply with nothing to do, a dry run).
    Done(serde_json::Value),
}

impl Jobs {
    pub fn outcome(&self, run: i64) -> Option<Outcome> {
        self.outcomes.lock().ok()?.get(&run).cloned()
    }

    /// The progress of a running job of this server: a count that grows with each
    /// change, and its rows (as JSON).
    pub fn progress(&self, run: i64) -> Option<(u64, serde_json::Value)> {
        let p = self.progress.lock().ok()?;
        p.get(&run).map(|(n, board)| (*n, board.to_json()))
    }

    fn track(&self, run: i64, event: &Event) {
        if let Ok(mut p) = self.progress.lock() {
            let (n, board) = p.entry(run).or_default();
            board.apply(event);
            *n += 1;
        }
    }

    fn begin(&self, run: i64) {
        if let Ok(mut a) = self.active.lock() {
            a.insert(run);
        }
    }

    /// The job of `run` ended: keep its outcome, then stop calling it active, so
    /// whoever sees it inactive also sees the outcome.
    fn end(&self, run: i64, outcome: Outcome) {
        if let Ok(mut o) = self.outcomes.lock() {
            o.insert(run, outcome);
        }
        if let Ok(mut a) = self.active.lock() {
            a.remove(&run);
        }
        if let Ok(mut p) = self.progress.lock() {
            p.remove(&run);
        }
    }

    /// Whether this server runs `run` and its job has not ended yet (its record may
    /// already say it finished: the outcome comes a moment later).
    pub fn is_active(&self, run: i64) -> bool {
        self.active.lock().is_ok_and(|a| a.contains(&run))
    }

    /// Mark every run still going as failed (the server is stopping). Returns how many.
    pub fn interrupt_all(&self, store: &Store) -> usize {
        let Ok(mut active) = self.active.lock() else {
            return 0;
        };
        for run in active.iter() {
            let _ = store.add_line(*run, "error", "interrupted: `stretch serve` stopped");
            let _ = store.finish_run(*run, false);
        }
        // Their followers get the end now; no outcome will come.
        let n = active.len();
        active.clear();
        n
    }
}

/// Run `f` on a thread of its own with a runtime of its own: a pipeline's busy tasks
/// (a plugin printing 100,000 lines, each stored synchronously) must not share the
/// workers that answer requests and stream logs.
fn spawn_pipeline<F, Fut>(state: &Shared, f: F)
where
    F: FnOnce(Shared) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let st = state.clone();
    let spawned = std::thread::Builder::new()
        .name("stretch-job".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(f(st)),
                Err(e) => eprintln!("stretch serve: cannot start a job's runtime: {e}"),
            }
        });
    if let Err(e) = spawned {
        eprintln!("stretch serve: cannot start a job's thread: {e}");
    }
}

/// Start a build: its run as soon as the core records it. `sources` overrides git
/// refs (`--source`). A new release then goes to the `auto_deploy` environments.
pub async fn start_build(state: &Shared, sources: &BTreeMap<String, String>) -> Result<Started> {
    let mut system = state.system()?;
    for (name, git_ref) in sources {
        system.override_ref(name, git_ref)?;
    }
    start_recorded(state, RunKind::Build, move |st, log| async move {
        let opts = BuildOptions {
            identity: st.identity.clone(),
        };
        let result = build::build(&system, &st.home, &st.store, &opts, &log).await;
        let then: Option<Then> = result.as_ref().ok().map(|o| {
            let id = o.release.id.clone();
            let st = st.clone();
            Box::pin(async move { auto_deploy(&st, &system, &id).await }) as Then
        });
        JobEnd {
            release: result.as_ref().ok().map(|o| o.release.id.clone()),
            reused: result.as_ref().ok().map(|o| o.reused),
            result: result.map(|o| {
                let built = Built {
                    release: Release::from(&o.release),
                    reused: o.reused,
                };
                (Some(o.run), to_json(&built))
            }),
            then,
        }
    })
    .await
}

/// Deploy a new release to every `auto_deploy` environment not already on it (each
/// deploy records its own run); a failure is said on the server's stderr too.
async fn auto_deploy(st: &Shared, system: &stretch_core::system::System, id: &str) {
    let log = Log::null();
    let done = deploy::auto_deploy(
        system,
        &st.home,
        &st.store,
        id,
        st.release_identity.as_deref(),
        &log,
        |_| {},
    )
    .await;
    if let Err(e) = done {
        eprintln!("stretch serve: auto_deploy of {id} failed: {e}");
    }
}

/// Start a deploy or rollback of `environment`; fails at once when the environment is
/// busy or the request is bad.
pub async fn start_deploy(
    state: &Shared,
    environment: &str,
    release: Option<String>,
    kind: Kind,
) -> Result<Started> {
    let system = state.system()?;
    deploy::environment(&system, environment)?;
    // A release this home lacks may still be in the registry: the deploy looks there.
    if let Some(key) = &release
        && system.spec.registry == "local"
    {
        state.reader.find_release(key)?;
    }
    let req = DeployRequest {
        environment: environment.to_string(),
        release,
        kind,
        wait: false,
        release_identity: state.release_identity.clone(),
    };
    start_recorded(state, kind.run_kind(), move |st, log| async move {
        let r = deploy::deploy(&system, &st.home, &st.store, &req, &log).await;
        let r = r.map(|o| {
            (
                Some(o.run),
                to_json(&Deployed::of(&o, kind, &req.environment)),
            )
        });
        JobEnd::of(r, None)
    })
    .await
}

/// Start a config-only deploy of `environment` (or plan it, with `dry_run`).
pub async fn start_apply(state: &Shared, environment: &str, dry_run: bool) -> Result<Started> {
    let system = state.system()?;
    deploy::environment(&system, environment)?;
    let req = ApplyRequest {
        environment: environment.to_string(),
        dry_run,
        wait: false,
        release_identity: state.release_identity.clone(),
    };
    start_recorded(state, RunKind::Config, move |st, log| async move {
        let r = apply::apply(&system, &st.home, &st.store, &req, &log).await;
        let release = r.as_ref().ok().and_then(|o| o.plan.release.clone());
        let r = r.map(|o| (o.run, to_json(&o)));
        JobEnd::of(r, release)
    })
    .await
}

/// An outcome as the API sends it (and `--server` reads it back).
fn to_json(v: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

/// What runs after a job's run has ended (a build's auto-deploys).
type Then = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// How a job ended: its run (none when it ended without one) and what it returned
/// beyond it.
struct JobEnd {
    result: Result<(Option<i64>, serde_json::Value)>,
    release: Option<String>,
    reused: Option<bool>,
    then: Option<Then>,
}

impl JobEnd {
    fn of(result: Result<(Option<i64>, serde_json::Value)>, release: Option<String>) -> JobEnd {
        JobEnd {
            result,
            release,
            reused: None,
            then: None,
        }
    }
}

/// Start a job that records its own run of `kind`; answer with that run as soon as it
/// exists (the core says so with a `RunStarted` event), or with how the job ended if
/// it ended first.
async fn start_recorded<F, Fut>(state: &Shared, kind: RunKind, job: F) -> Result<Started>
where
    F: FnOnce(Shared, Log) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = JobEnd>,
{
    let (found_tx, found_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel();
    let finder = Arc::new(RunFinder {
        found: Mutex::new(None),
        tx: Mutex::new(Some(found_tx)),
        jobs: state.clone(),
    });
    spawn_pipeline(state, move |st| async move {
        let log = Log::new(vec![finder.clone()]);
        let JobEnd {
            result,
            release,
            reused,
            then,
        } = job(st.clone(), log).await;
        let run = result
            .as_ref()
            .ok()
            .and_then(|(run, _)| *run)
            .or_else(|| finder.found());
        if let Some(run) = run {
            let mut outcome = Outcome::of(&result, reused, release);
            outcome.result = result
                .as_ref()
                .ok()
                .map(|(_, body)| body.clone())
                .filter(|b| !b.is_null());
            st.jobs.end(run, outcome);
        }
        let _ = done_tx.send(result);
        if let Some(then) = then {
            then.await;
        }
    });
    tokio::select! {
        biased;
        Ok(run) = found_rx => Ok(Started::Run(run)),
        done = done_rx => match done {
            Ok(Ok((Some(run), _))) => Ok(Started::Run(run)),
            Ok(Ok((None, body))) => Ok(Started::Done(body)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::failed(kind.as_str(), "the job ended without a word")),
        },
    }
}

/// Learns the run a build, deploy, rollback or apply records from the core's `RunStarted`
/// event, and answers the request that started it with that id.
struct RunFinder {
    found: Mutex<Option<i64>>,
    tx: Mutex<Option<oneshot::Sender<i64>>>,
    jobs: Shared,
}

impl RunFinder {
    fn found(&self) -> Option<i64> {
        self.found.lock().ok().and_then(|f| *f)
    }
}

impl Sink for RunFinder {
    // The run page draws progress.
    fn wants_progress(&self) -> bool {
        true
    }

    fn event(&self, event: &Event) {
        let Event::RunStarted { run } = event else {
            // Lines are in the store; the rest is what the run page draws live.
            if !matches!(event, Event::Line { .. })
                && let Some(run) = self.found()
            {
                self.jobs.jobs.track(run, event);
            }
            return;
        };
        if let Ok(mut f) = self.found.lock() {
            *f = Some(*run);
        }
        self.jobs.jobs.begin(*run);
        if let Some(tx) = self.tx.lock().ok().and_then(|mut tx| tx.take()) {
            let _ = tx.send(*run);
        }
    }
}
