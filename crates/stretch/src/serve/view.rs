//! What the API and the pages show, built once for both: releases, environments with
//! per-host health, runs with their stage timeline. Nothing here reads a release
//! configuration or an environment's `services` (they may hold secrets).

use std::time::Duration;

use serde::Serialize;
use stretch_core::Result;
use stretch_core::agent::fleet::{Fleet, prefixed};
use stretch_core::deploy;
use stretch_core::home::Home;
use stretch_core::store::{LogLine, ReleaseRecord, RunRecord, Store};
use stretch_core::system::System;

/// How long the system view waits for an agent's state.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Serialize)]
pub struct Environment {
    pub name: String,
    pub auto_deploy: bool,
    pub release: Option<ReleaseRef>,
    pub existing_release: Option<ReleaseRef>,
    pub updated_at: Option<String>,
    pub hosts: Vec<Host>,
    /// Why per-host health is unknown (e.g. no agent token), when it is.
    pub health_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReleaseRef {
    pub id: String,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Host {
    pub host: String,
    pub agent: String,
    pub reachable: Option<bool>,
    pub error: Option<String>,
    pub groups: Vec<HostGroup>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostGroup {
    pub group: String,
    pub node: String,
    pub release: Option<String>,
    pub config_version: Option<String>,
    pub instances: usize,
    pub healthy: bool,
}

fn release_ref(store: &Store, id: Option<String>) -> Option<ReleaseRef> {
    let id = id?;
    let name = store.release_by_id(&id).ok().flatten().map(|r| r.name);
    Some(ReleaseRef { id, name })
}

/// One environment: where it stands, and (with `health`) what each host's agent says.
pub async fn environment(
    system: &System,
    home: &Home,
    store: &Store,
    name: &str,
    health: bool,
) -> Result<Environment> {
    let env = deploy::environment(system, name)?;
    let record = store.environment(name)?;
    let mut out = Environment {
        name: name.to_string(),
        auto_deploy: env.auto_deploy,
        release: release_ref(store, record.as_ref().and_then(|r| r.release.clone())),
        existing_release: release_ref(
            store,
            record.as_ref().and_then(|r| r.existing_release.clone()),
        ),
        updated_at: record.map(|r| r.updated_at),
        hosts: Vec::new(),
        health_error: None,
    };
    let token = match deploy::agent_token(system, name, env) {
        Ok(t) => Some(t),
        Err(e) => {
            out.health_error = Some(e.to_string());
            None
        }
    };
    let fleet = match token.filter(|_| health) {
        Some(token) => match Fleet::new(system, name, env, home, &token) {
            Ok(f) => Some(f),
            Err(e) => {
                out.health_error = Some(e.to_string());
                None
            }
        },
        None => None,
    };
    let fleet = fleet.as_ref();
    let log = stretch_core::log::Log::null();
    let log = &log;
    let states = futures_util::future::join_all(env.hosts.iter().map(|(host, h)| async move {
        let fleet = fleet?;
        let one = async {
            let (_, r) = fleet
                .states([(host.as_str(), h.agent.as_str())], log)
                .await
                .pop()?;
            Some(r)
        };
        let state = match tokio::time::timeout(HEALTH_TIMEOUT, one).await {
            Ok(None) => Err("no answer".to_string()),
            Ok(Some(r)) => r.map_err(|e| prefixed(host, &e)),
            Err(_) => Err(format!(
                "agent at {} did not answer within {}s",
                h.agent,
                HEALTH_TIMEOUT.as_secs()
            )),
        };
        Some((host.clone(), state))
    }))
    .await;
    for ((host, h), state) in env.hosts.iter().zip(states) {
        let state = state.map(|(_, s)| s);
        let groups = env
            .groups
            .iter()
            .filter(|(_, g)| g.hosts.contains(host))
            .map(|(gname, g)| {
                let found = state.as_ref().and_then(|s| s.as_ref().ok()).and_then(|s| {
                    s.groups.iter().find(|x| {
                        x.key.system == system.name()
                            && x.key.environment == name
                            && &x.key.group == gname
                    })
                });
                HostGroup {
                    group: gname.clone(),
                    node: g.node.clone(),
                    release: found.and_then(|f| f.release.as_ref().map(|r| r.id.clone())),
                    config_version: found.and_then(|f| f.config_version.clone()),
                    instances: found.map(|f| f.instances.len()).unwrap_or(0),
                    healthy: found.is_some_and(|f| f.healthy),
                }
            })
            .collect();
        out.hosts.push(Host {
            host: host.clone(),
            agent: h.agent.clone(),
            reachable: state.as_ref().map(|s| s.is_ok()),
            error: state.and_then(|s| s.err()),
            groups,
        });
    }
    Ok(out)
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
    serde_json::json!({
        "id": r.id,
        "name": r.name,
        "created_at": r.created_at,
        "sources": r.sources,
        "images": r.images,
    })
}

/// One stage of a run, from its `==> stage` / `<== stage done in 1.23s` lines.
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
        if let Some(name) = l.text.strip_prefix("==> ") {
            out.push(Stage {
                name: name.to_string(),
                status: "running".into(),
                elapsed: None,
                started_at: l.at.clone(),
            });
        } else if let Some(rest) = l.text.strip_prefix("<== ") {
            let Some(s) = out
                .iter_mut()
                .rev()
                .find(|s| s.status == "running" && rest.starts_with(&format!("{} ", s.name)))
            else {
                continue;
            };
            let tail = &rest[s.name.len() + 1..];
            let (word, elapsed) = tail.split_once(" in ").unwrap_or((tail, ""));
            s.status = if word == "done" { "done" } else { "failed" }.into();
            s.elapsed = (!elapsed.is_empty()).then(|| elapsed.to_string());
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
    serde_json::json!({
        "id": run.id,
        "kind": run.kind,
        "environment": run.environment,
        "release": run.release,
        "existing_release": run.existing_release,
        "status": run.status,
        "started_at": run.started_at,
        "ended_at": run.ended_at,
        "error": if run.status == "failed" { error } else { None },
        "reused": outcome.and_then(|o| o.reused),
        "result": outcome.and_then(|o| o.result.clone()),
        "stages": stages(lines),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: i64, text: &str) -> LogLine {
        LogLine {
            seq,
            at: format!("t{seq}"),
            stage: "s".into(),
            text: text.into(),
        }
    }

    #[test]
    fn timeline() {
        let l = [
            line(1, "==> pull"),
            line(2, "cloning"),
            line(3, "<== pull done in 0.50s"),
            line(4, "==> change release"),
            line(5, "<== change release failed in 2.00s"),
            line(6, "==> post-deploy plugins"),
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
