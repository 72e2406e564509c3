//! The event stream of a build or deploy: stage starts and ends, and log lines.
//!
//! Stages emit events into a [`Log`]; the CLI printer, the release store (which keeps
//! every line for `stretch logs`) and tests subscribe through [`Sink`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
}

/// Something that receives events.
pub trait Sink: Send + Sync {
    fn event(&self, event: &Event);
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

    fn emit(&self, event: Event) {
        for s in self.sinks.iter() {
            s.event(&event);
        }
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
