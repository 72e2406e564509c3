//! The event stream of a build or deploy: stage starts and ends, log lines, and how
//! far the work got (progress counters, a deploy's hosts and batches).
//!
//! Stages emit events into a [`Log`]; the CLI printer, the release store (which keeps
//! every line for `stretch logs`, and no progress) and tests subscribe through [`Sink`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    StageStarted {
        stage: String,
    },
    StageFinished {
        stage: String,
        elapsed: Duration,
        ok: bool,
    },
    Line {
        stage: String,
        text: String,
    },
    /// The run this log belongs to was recorded in the store (its id), so that a
    /// caller that started the work learns it without looking.
    RunStarted {
        run: i64,
    },
    /// How far one piece of work of the current stage got. Never stored: a front end
    /// draws it while it runs (a bar on a terminal, the web view's run page).
    Progress(Progress),
    /// Where one host of a deploy, rollback, apply or restart stands.
    Host(HostProgress),
    /// A batch of hosts began or ended.
    Batch(BatchProgress),
}

/// What a progress counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Bytes,
    Files,
    /// Steps of an image build.
    Steps,
    /// Layers of an image push.
    Layers,
}

/// One counter of a stage's work, as last reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub stage: String,
    /// Which work, unique within the stage: `sources`, `archive`, `image web`.
    pub task: String,
    pub unit: Unit,
    pub done: u64,
    /// `None` while unknown: a counter without an end.
    pub total: Option<u64>,
    /// A second count beside `done`: the archive's compressed bytes written.
    pub out: Option<u64>,
    /// The work is over (done or not): the last event of this task.
    pub ended: bool,
}

impl Progress {
    /// How much of the total is done, 0 to 100, when there is a total.
    pub fn percent(&self) -> Option<u64> {
        match self.total {
            Some(0) => Some(100),
            Some(t) => Some((u128::from(self.done.min(t)) * 100 / u128::from(t)) as u64),
            None => None,
        }
    }
}

/// Where a host stands in a deploy's rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum HostState {
    /// Its agent takes the spec and pulls the image.
    Preparing,
    /// Spec in place, image pulled: ready to switch.
    Ready,
    /// Waiting for its batch.
    Waiting,
    /// Its agent pulls the image: bytes so far, of the layer sizes known so far.
    Pulling {
        done: u64,
        total: u64,
    },
    /// Starting the new instances and checking their health.
    Switching,
    /// New instances started; `healthy` of `of` passed their health check.
    Checking {
        healthy: u32,
        of: u32,
    },
    Switched,
    /// Why it failed.
    Failed(String),
    SwitchedBack,
}

impl std::fmt::Display for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostState::Preparing => f.write_str("pulling image"),
            HostState::Ready => f.write_str("ready"),
            HostState::Waiting => f.write_str("waiting"),
            HostState::Pulling { done, total } if *total > 0 => write!(
                f,
                "pulling {} % ({:.1} of {:.1} MB)",
                done * 100 / total,
                *done as f64 / 1e6,
                *total as f64 / 1e6
            ),
            HostState::Pulling { .. } => f.write_str("pulling image"),
            HostState::Switching => f.write_str("starting, health-checking"),
            HostState::Checking { healthy, of } => write!(f, "health-checking {healthy}/{of}"),
            HostState::Switched => f.write_str("switched"),
            HostState::Failed(why) => write!(f, "failed: {why}"),
            HostState::SwitchedBack => f.write_str("switched back"),
        }
    }
}

/// One host of a group, in a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostProgress {
    pub stage: String,
    pub group: String,
    pub host: String,
    #[serde(flatten)]
    pub state: HostState,
}

/// Batch `n` of `of` of a group: its hosts, and once it ended whether all switched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BatchProgress {
    pub stage: String,
    pub group: String,
    pub n: usize,
    pub of: usize,
    pub hosts: Vec<String>,
    /// `None` while it runs.
    pub ok: Option<bool>,
}

/// Something that receives events.
pub trait Sink: Send + Sync {
    fn event(&self, event: &Event);

    /// Whether it shows progress (bars, host rows): work that only feeds progress,
    /// such as asking agents how far they got, is skipped when no sink does.
    fn wants_progress(&self) -> bool {
        false
    }
}

/// A cheap, clonable handle that stages write to.
#[derive(Clone)]
pub struct Log {
    sinks: Arc<Vec<Arc<dyn Sink>>>,
    stage: Arc<Mutex<String>>,
}

impl Log {
    pub fn new(sinks: Vec<Arc<dyn Sink>>) -> Self {
        Log {
            sinks: Arc::new(sinks),
            stage: Arc::new(Mutex::new(String::new())),
        }
    }

    /// A log that drops everything.
    pub fn null() -> Self {
        Log::new(Vec::new())
    }

    /// The same log, with one more sink.
    pub fn with(&self, sink: Arc<dyn Sink>) -> Self {
        let mut sinks: Vec<_> = self.sinks.iter().cloned().collect();
        sinks.push(sink);
        Log {
            sinks: Arc::new(sinks),
            stage: self.stage.clone(),
        }
    }

    /// Whether any sink shows progress.
    pub fn wants_progress(&self) -> bool {
        self.sinks.iter().any(|s| s.wants_progress())
    }

    fn emit(&self, event: Event) {
        for s in self.sinks.iter() {
            s.event(&event);
        }
    }

    /// A counter of work in the current stage, reported as [`Event::Progress`] at
    /// most every [`Meter::EVERY`] and once when its last clone goes.
    pub fn meter(&self, task: impl Into<String>, unit: Unit, total: Option<u64>) -> Meter {
        Meter(Arc::new(MeterState {
            log: self.clone(),
            stage: self.current(),
            task: task.into(),
            unit,
            done: AtomicU64::new(0),
            out: AtomicU64::new(NONE),
            total: AtomicU64::new(total.unwrap_or(NONE)),
            last: Mutex::new(None),
            ended: AtomicBool::new(false),
        }))
    }

    /// Say where host `host` of group `group` stands.
    pub fn host(&self, group: &str, host: &str, state: HostState) {
        if self.sinks.is_empty() {
            return;
        }
        self.emit(Event::Host(HostProgress {
            stage: self.current(),
            group: group.to_string(),
            host: host.to_string(),
            state,
        }));
    }

    /// Say that batch `n` (from 1) of `of` of `group` began (`ok` None) or ended.
    pub fn batch(&self, group: &str, n: usize, of: usize, hosts: &[&str], ok: Option<bool>) {
        if self.sinks.is_empty() {
            return;
        }
        self.emit(Event::Batch(BatchProgress {
            stage: self.current(),
            group: group.to_string(),
            n,
            of,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            ok,
        }));
    }

    fn current(&self) -> String {
        self.stage.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Say which recorded run this log belongs to.
    pub fn run_started(&self, run: i64) {
        self.emit(Event::RunStarted { run });
    }

    /// One line of output (a command's output, a message of ours).
    pub fn line(&self, text: impl AsRef<str>) {
        let stage = self.current();
        for l in text.as_ref().lines() {
            self.emit(Event::Line {
                stage: stage.clone(),
                text: l.to_string(),
            });
        }
    }

    /// Run `f` as the stage `name`, emitting its start, end and duration.
    pub async fn stage<T, E, F>(&self, name: &str, f: F) -> Result<T, E>
    where
        F: std::future::Future<Output = Result<T, E>>,
    {
        if let Ok(mut s) = self.stage.lock() {
            *s = name.to_string();
        }
        self.emit(Event::StageStarted {
            stage: name.to_string(),
        });
        let start = Instant::now();
        let result = f.await;
        self.emit(Event::StageFinished {
            stage: name.to_string(),
            elapsed: start.elapsed(),
            ok: result.is_ok(),
        });
        result
    }
}

/// `u64::MAX` stands for "not known" in a meter's atomics.
const NONE: u64 = u64::MAX;

/// A counter of one piece of work; cheap to clone and to share between threads.
/// Adding costs an atomic add; an event goes out at most every [`Meter::EVERY`].
#[derive(Clone)]
pub struct Meter(Arc<MeterState>);

struct MeterState {
    log: Log,
    stage: String,
    task: String,
    unit: Unit,
    done: AtomicU64,
    out: AtomicU64,
    total: AtomicU64,
    last: Mutex<Option<Instant>>,
    ended: AtomicBool,
}

impl Meter {
    /// The most often a meter reports: a terminal redraws about this often anyway.
    pub const EVERY: Duration = Duration::from_millis(100);

    /// `n` more done.
    pub fn add(&self, n: u64) {
        self.0.done.fetch_add(n, Ordering::Relaxed);
        self.tick(false);
    }

    /// `n` done in all.
    pub fn set(&self, n: u64) {
        self.0.done.store(n, Ordering::Relaxed);
        self.tick(false);
    }

    /// `n` more of the second count (the archive's bytes out).
    pub fn add_out(&self, n: u64) {
        let _ = self
            .0
            .out
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |o| {
                Some(if o == NONE { n } else { o.saturating_add(n) })
            });
        self.tick(false);
    }

    /// The total, once known (or changed).
    pub fn set_total(&self, total: u64) {
        self.0.total.store(total, Ordering::Relaxed);
        self.tick(false);
    }

    /// Report now, whatever the time since the last report.
    pub fn flush(&self) {
        self.tick(true);
    }

    /// The work is over: the last report.
    pub fn finish(&self) {
        self.0.finish();
    }

    /// What the meter stands at.
    pub fn progress(&self) -> Progress {
        self.0.progress(false)
    }

    fn tick(&self, force: bool) {
        let m = &self.0;
        if m.log.sinks.is_empty() || m.ended.load(Ordering::Relaxed) {
            return;
        }
        // Whoever holds the lock reports; the others' counts go with the next report.
        let Ok(mut last) = m.last.try_lock() else {
            return;
        };
        let now = Instant::now();
        if !force && last.is_some_and(|t| now.duration_since(t) < Self::EVERY) {
            return;
        }
        *last = Some(now);
        m.log.emit(Event::Progress(m.progress(false)));
    }
}

impl MeterState {
    fn progress(&self, ended: bool) -> Progress {
        let known = |v: u64| (v != NONE).then_some(v);
        Progress {
            stage: self.stage.clone(),
            task: self.task.clone(),
            unit: self.unit,
            done: self.done.load(Ordering::Relaxed),
            total: known(self.total.load(Ordering::Relaxed)),
            out: known(self.out.load(Ordering::Relaxed)),
            ended,
        }
    }

    fn finish(&self) {
        if self.log.sinks.is_empty() || self.ended.swap(true, Ordering::Relaxed) {
            return;
        }
        self.log.emit(Event::Progress(self.progress(true)));
    }
}

impl Drop for MeterState {
    fn drop(&mut self) {
        // A stage that failed half-way still ends its counters.
        self.finish();
    }
}

/// A sink that keeps every event, for tests.
#[derive(Default)]
pub struct Memory(pub Mutex<Vec<Event>>);

impl Sink for Memory {
    fn event(&self, event: &Event) {
        if let Ok(mut v) = self.0.lock() {
            v.push(event.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_states_say_how_far() {
        let pulling = HostState::Pulling {
            done: 12_300_000,
            total: 36_100_000,
        };
        assert_eq!(pulling.to_string(), "pulling 34 % (12.3 of 36.1 MB)");
        let unknown = HostState::Pulling { done: 0, total: 0 };
        assert_eq!(unknown.to_string(), "pulling image");
        let checking = HostState::Checking { healthy: 2, of: 3 };
        assert_eq!(checking.to_string(), "health-checking 2/3");
    }

    use super::*;

    fn progress(events: &[Event]) -> Vec<&Progress> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Progress(p) => Some(p),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_meter_reports_seldom_and_always_its_end() {
        let mem = Arc::new(Memory::default());
        let log = Log::new(vec![mem.clone()]);
        log.stage("archive", async {
            let m = log.meter("archive", Unit::Bytes, Some(1000));
            // Many adds in a moment: one report for the first, none for the rest.
            for _ in 0..100 {
                m.add(10);
            }
            m.add_out(7);
            drop(m);
            Ok::<_, ()>(())
        })
        .await
        .unwrap();
        let events = mem.0.lock().unwrap().clone();
        let p = progress(&events);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!((p[0].done, p[0].ended), (10, false));
        assert_eq!(p[0].percent(), Some(1));
        let last = p[1];
        assert_eq!(last.stage, "archive");
        assert_eq!(
            (last.done, last.total, last.out),
            (1000, Some(1000), Some(7))
        );
        assert!(last.ended);
        assert_eq!(last.percent(), Some(100));
    }

    #[test]
    fn percentages_stay_within_bounds() {
        let p = |done, total| Progress {
            stage: String::new(),
            task: String::new(),
            unit: Unit::Files,
            done,
            total,
            out: None,
            ended: false,
        };
        assert_eq!(p(5, None).percent(), None);
        assert_eq!(p(0, Some(0)).percent(), Some(100));
        assert_eq!(p(1, Some(3)).percent(), Some(33));
        assert_eq!(p(9, Some(3)).percent(), Some(100));
        assert_eq!(p(u64::MAX - 1, Some(u64::MAX - 1)).percent(), Some(100));
    }

    #[test]
    fn a_log_without_sinks_sends_nothing() {
        let m = Log::null().meter("x", Unit::Bytes, None);
        m.add(1);
        m.finish();
        assert_eq!(m.progress().done, 1);
    }
}
