//! What the API and the pages show, built once for both: releases, environments with
//! per-host health, runs with their stage timeline. Nothing here reads a release
//! configuration or an environment's `services` (they may hold secrets).

use serde::Serialize;
use stretch_core::Result;
use stretch_core::home::Home;
use stretch_core::outcome::Release;
use stretch_core::store::{LogEntry, LogLine, ReleaseRecord, RunRecord, RunStatus, Store};
use stretch_core::system::System;

/// An environment as the API and the pages show it: the core's status.
pub type Environment = stretch_core::status::EnvironmentStatus;

/// One environment: where it stands, and (with `health`) what each host's agent says.
pub async fn environment(
    system: &System,
    home: &Home,
    store: &Store,
    name: &str,
    health: bool,
) -> Result<Environment> {
    let log = stretch_core::log::Log::null();
    stretch_core::status::environment(system, home, Some(store), name, health, &log).await
}

/// Every environment of the system, health fetched from all agents at once.
pub async fn environments(
    system: &System,
    home: &Home,
    store: &Store,
    health: bool,
) -> Result<Vec<Environment>> {
    let names: Vec<&String> = system.spec.environments.keys().collect();
    let all = futures_util::future::join_all(
        names
            .iter()
            .map(|n| environment(system, home, store, n, health)),
    )
    .await;
    all.into_iter().collect()
}

pub fn release_json(r: &ReleaseRecord) -> serde_json::Value {
    serde_json::to_value(Release::from(r)).unwrap_or_default()
}

/// One stage of a run, from its log's stage events.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub name: String,
    /// `running`, `done` or `failed`.
    pub status: String,
    pub elapsed: Option<String>,
    pub started_at: String,
}

pub fn stages(lines: &[LogLine]) -> Vec<Stage> {
    let mut out: Vec<Stage> = Vec::new();
    for l in lines {
        match l.entry() {
            LogEntry::StageStarted => out.push(Stage {
                name: l.stage.clone(),
                status: "running".into(),
                elapsed: None,
                started_at: l.at.clone(),
            }),
            LogEntry::StageFinished { ok, elapsed_ms } => {
                let Some(s) = out
                    .iter_mut()
                    .rev()
                    .find(|s| s.status == "running" && s.name == l.stage)
                else {
                    continue;
                };
                s.status = if ok { "done" } else { "failed" }.into();
                s.elapsed = Some(format!("{:.2}s", elapsed_ms as f64 / 1000.0));
            }
            LogEntry::Line => {}
        }
    }
    out
}

/// A run with its timeline; `lines` is its log (or the part of it wanted).
pub fn run_json(
    run: &RunRecord,
    lines: &[LogLine],
    outcome: Option<&super::jobs::Outcome>,
) -> serde_json::Value {
    let error = outcome.and_then(|o| o.error.clone()).or_else(|| {
        lines
            .iter()
            .rev()
            .find(|l| l.stage == "error")
            .map(|l| l.text.clone())
    });
    let failed = run.status == RunStatus::Failed;
    serde_json::json!({
        "id": run.id,
        "kind": run.kind,
        "environment": run.environment,
        "release": run.release,
        "existing_release": run.existing_release,
        "status": run.status,
        "started_at": run.started_at,
        "ended_at": run.ended_at,
        "error": if failed { error } else { None },
        "failure": if failed { outcome.and_then(|o| o.failure.clone()) } else { None },
        "reused": outcome.and_then(|o| o.reused),
        "result": outcome.and_then(|o| o.result.clone()),
        "stages": stages(lines),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: i64, stage: &str, text: &str, event: Option<LogEntry>) -> LogLine {
        LogLine {
            seq,
            at: format!("t{seq}"),
            stage: stage.into(),
            text: text.into(),
            event,
        }
    }

    #[test]
    fn timeline() {
        let done = |ms| {
            Some(LogEntry::StageFinished {
                ok: true,
                elapsed_ms: ms,
            })
        };
        let l = [
            line(1, "pull", "==> pull", Some(LogEntry::StageStarted)),
            line(2, "pull", "cloning", Some(LogEntry::Line)),
            line(3, "pull", "<== pull done in 0.50s", done(500)),
            // A line stored before events were: read from its text.
            line(4, "change release", "==> change release", None),
            line(
                5,
                "change release",
                "<== change release failed in 2.00s",
                None,
            ),
            line(
                6,
                "post-deploy plugins",
                "==> post-deploy plugins",
                Some(LogEntry::StageStarted),
            ),
        ];
        let s = stages(&l);
        assert_eq!(s.len(), 3);
        assert_eq!(
            (s[0].status.as_str(), s[0].elapsed.as_deref()),
            ("done", Some("0.50s"))
        );
        assert_eq!(
            (s[1].name.as_str(), s[1].status.as_str()),
            ("change release", "failed")
        );
        assert_eq!(s[2].status, "running");
    }
}
