//! The config-only deploy, `stretch apply ENV` (SPEC §6): after the environment's
//! hosts, services or groups changed in `system.yml`, re-render the configuration of
//! the release that is running and converge every host on it. No plugin runs, no image
//! is pulled for hosts already in a group, the release does not change.
//!
//! The plan compares two things: the environment as last applied (for the human
//! `changes` list) and the agent specs last sent per `group/host` (for the `actions`).
//! Specs are recorded per target only when that target converged, so re-running after
//! a failure retries exactly what is left.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::buffers::Buffers;
use super::specs::{self, HostGroup};
use crate::agent::api::GroupSpec;
use crate::agent::fleet::{Fleet, prefixed};
use crate::home::Home;
use crate::log::Log;
use crate::run::Run;
use crate::store::{EnvironmentRecord, RunKind, Store};
use crate::system::System;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct ApplyRequest {
    pub environment: String,
    /// Show the plan and stop.
    pub dry_run: bool,
    pub wait: bool,
}

/// How a value of the environment's definition differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeOp {
    Added,
    Changed,
    Removed,
}

/// One difference in the environment's definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub op: ChangeOp,
    /// Dotted path, e.g. `services.mysql.host`, `groups.web.instances`, `hosts.web-3`.
    pub path: String,
    pub old: Option<serde_json::Value>,
    pub new: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// A host new to a group: pull the running release's image and start serving.
    Start,
    /// New configuration for running instances: `reload`, or a same-image replacement.
    Reload,
    /// Instances, ports or health changed: replace the instances with the same image.
    Replace,
    /// A host or group removed: stop its instances and close its proxy.
    Stop,
}

/// What one group on one host needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Action {
    pub target: String,
    pub group: String,
    pub host: String,
    pub agent: String,
    pub kind: ActionKind,
    pub from_config: Option<String>,
    pub to_config: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub environment: String,
    pub release: Option<String>,
    pub changes: Vec<Change>,
    pub actions: Vec<Action>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyOutcome {
    pub plan: Plan,
    /// The run recorded (none for a dry run, a never-deployed environment or no actions).
    pub run: Option<i64>,
    pub applied: bool,
    /// Why nothing was applied, when it wasn't.
    pub note: Option<String>,
}

/// Every difference between two JSON documents, as dotted paths.
pub fn diff(
    path: &str,
    old: Option<&serde_json::Value>,
    new: Option<&serde_json::Value>,
    out: &mut Vec<Change>,
) {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (old, new) {
        (Some(serde_json::Value::Object(a)), Some(serde_json::Value::Object(b))) => {
            for (k, v) in a {
                diff(&join(k), Some(v), b.get(k), out);
            }
            for (k, v) in b {
                if !a.contains_key(k) {
                    diff(&join(k), None, Some(v), out);
                }
            }
        }
        (Some(a), Some(b)) if a == b => {}
        (None, None) => {}
        (old, new) => out.push(Change {
            op: match (old, new) {
                (None, _) => ChangeOp::Added,
                (_, None) => ChangeOp::Removed,
                _ => ChangeOp::Changed,
            },
            path: path.to_string(),
            old: old.cloned(),
            new: new.cloned(),
        }),
    }
}

/// What a target needs to go from `old` to `new`.
fn action_for(old: Option<&GroupSpec>, new: Option<&GroupSpec>) -> Option<ActionKind> {
    match (old, new) {
        (None, Some(_)) => Some(ActionKind::Start),
        (Some(_), None) => Some(ActionKind::Stop),
        (Some(a), Some(b)) => {
            let shape = |s: &GroupSpec| {
                (
                    s.instances,
                    s.listen,
                    s.port,
                    s.health.clone(),
                    s.image.clone(),
                    s.stop_timeout_ms,
                )
            };
            if shape(a) != shape(b) {
                Some(ActionKind::Replace)
            } else if a.config_version != b.config_version
                || a.reload != b.reload
                || a.reload_signal != b.reload_signal
                || a.response_timeout_ms != b.response_timeout_ms
            {
                Some(ActionKind::Reload)
            } else {
                None
            }
        }
        (None, None) => None,
    }
}

/// A plan, the specs last sent per target, and the specs wanted now.
type Planned = (Plan, BTreeMap<String, GroupSpec>, Vec<HostGroup>);

/// Compute the plan; `Ok(None)` when the environment was never deployed.
fn plan(
    system: &System,
    home: &Home,
    store: &Store,
    env_name: &str,
    log: &Log,
) -> Result<Option<Planned>> {
    let env = super::environment(system, env_name)?;
    let Some(record) = store.environment(env_name)? else {
        return Ok(None);
    };
    let Some(release_id) = record.release.clone() else {
        return Ok(None);
    };
    let release = store.find_release(&release_id)?;
    let existing = match &record.existing_release {
        Some(id) => store.release_by_id(id)?,
        None => None,
    };
    let cfg = super::release_config(home, &release.id)?;
    let buffers = Buffers::new(home, env_name);
    buffers.ensure_existing(home, &release, &cfg, log)?;
    // Same release and deploy context as the deploy: only the environment differs.
    let targets = specs::build(
        system,
        env_name,
        env,
        &release,
        existing.as_ref(),
        &cfg,
        &buffers.existing_dir(),
        log,
    )?;
    let old_specs: BTreeMap<String, GroupSpec> = record.specs.clone().unwrap_or_default();

    let mut changes = Vec::new();
    let new_env = specs::environment_json(env_name, env);
    diff("", record.applied.as_ref(), Some(&new_env), &mut changes);

    let mut actions = Vec::new();
    let new_by_id: BTreeMap<String, &HostGroup> = targets.iter().map(|t| (t.id(), t)).collect();
    let old_agents: BTreeMap<String, String> = record
        .applied
        .as_ref()
        .and_then(|a| a.get("hosts"))
        .and_then(|h| h.as_object())
        .map(|h| {
            h.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v["agent"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let mut ids: Vec<&String> = old_specs.keys().chain(new_by_id.keys()).collect();
    ids.sort();
    ids.dedup();
    for id in ids {
        let old = old_specs.get(id);
        let new = new_by_id.get(id).map(|t| &t.spec);
        let Some(kind) = action_for(old, new) else {
            continue;
        };
        let (group, host) = id.split_once('/').unwrap_or((id.as_str(), ""));
        let agent = match new_by_id.get(id) {
            Some(t) => t.agent.clone(),
            None => env
                .hosts
                .get(host)
                .map(|h| h.agent.clone())
                .or_else(|| old_agents.get(host).cloned())
                .unwrap_or_default(),
        };
        actions.push(Action {
            target: id.clone(),
            group: group.to_string(),
            host: host.to_string(),
            agent,
            kind,
            from_config: old.map(|s| s.config_version.clone()),
            to_config: new.map(|s| s.config_version.clone()),
        });
    }
    let plan = Plan {
        environment: env_name.to_string(),
        release: Some(release.id.clone()),
        changes,
        actions,
    };
    Ok(Some((plan, old_specs, targets)))
}

/// Run `apply`: plan, then (unless a dry run) converge every target.
pub async fn apply(
    system: &System,
    home: &Home,
    store: &Store,
    req: &ApplyRequest,
    log: &Log,
) -> Result<ApplyOutcome> {
    let env = super::environment(system, &req.environment)?;
    let token = super::agent_token(system, &req.environment, env)?;
    let nothing = |note: String| ApplyOutcome {
        plan: Plan {
            environment: req.environment.clone(),
            release: None,
            changes: vec![],
            actions: vec![],
        },
        run: None,
        applied: false,
        note: Some(note),
    };
    // Planning reads state that a deploy may be changing: take the lock first.
    let _lock = if req.dry_run {
        None
    } else {
        Some(super::lock::lock(
            home,
            &req.environment,
            "apply",
            req.wait,
            log,
        )?)
    };
    // Planning says what it found through the plan alone: the same words locally and
    // through a server, which streams only what a run logs.
    let Some((plan, old_specs, targets)) =
        self::plan(system, home, store, &req.environment, &Log::null())?
    else {
        return Ok(nothing(format!(
            "environment `{}` has never been deployed: nothing to apply",
            req.environment
        )));
    };
    if req.dry_run {
        return Ok(ApplyOutcome {
            plan,
            run: None,
            applied: false,
            note: Some("dry run: nothing was changed".into()),
        });
    }
    let release = plan.release.clone().unwrap_or_default();
    let record = store.environment(&req.environment)?;
    let (run, log) = Run::start(
        store,
        RunKind::Config,
        Some(&req.environment),
        Some(&release),
        Some(&release),
        log,
    )?;
    let fleet = Fleet::new(system, &req.environment, env, home, &token)?;
    let result = log
        .stage("apply", converge(&plan, &old_specs, &targets, &fleet, &log))
        .await;
    let (converged, failures) = match &result {
        Ok(r) => r.clone(),
        Err(_) => (old_specs.clone(), vec![]),
    };
    store.set_environment(&EnvironmentRecord {
        name: req.environment.clone(),
        release: record.as_ref().and_then(|r| r.release.clone()),
        existing_release: record.as_ref().and_then(|r| r.existing_release.clone()),
        updated_at: String::new(),
        applied: Some(specs::environment_json(&req.environment, env)),
        specs: Some(converged),
    })?;
    let outcome = match (&result, failures.is_empty()) {
        (Ok(_), true) => Ok(ApplyOutcome {
            plan,
            run: Some(run.id()),
            applied: true,
            note: None,
        }),
        (Ok(_), false) => Err(Error::failed(
            "apply",
            format!(
                "{}; the other hosts converged; run `stretch apply {}` again to retry",
                failures.join("; "),
                req.environment
            ),
        )),
        (Err(e), _) => Err(Error::failed("apply", e.to_string())),
    };
    run.finish(outcome)
}

/// Carry out every action at once; returns the specs now in force and the failures.
async fn converge(
    plan: &Plan,
    old_specs: &BTreeMap<String, GroupSpec>,
    targets: &[HostGroup],
    fleet: &Fleet,
    log: &Log,
) -> Result<(BTreeMap<String, GroupSpec>, Vec<String>)> {
    let new_by_id: BTreeMap<String, &HostGroup> = targets.iter().map(|t| (t.id(), t)).collect();
    if plan.actions.is_empty() {
        log.line("every host is up to date");
    }
    // Every agent's certificate is checked before any of them is changed (one that is
    // down fails its own actions; the others converge).
    let mut hosts: BTreeMap<&str, &str> = BTreeMap::new();
    for a in &plan.actions {
        hosts.insert(a.host.as_str(), a.agent.as_str());
    }
    fleet.check_identities(hosts, "apply", log).await?;
    let calls = plan.actions.iter().map(|a| {
        let new = new_by_id.get(&a.target).map(|t| t.spec.clone());
        let old = old_specs.get(&a.target).cloned();
        async move {
            let client = match fleet.client(&a.host, &a.agent) {
                Ok(c) => c,
                Err(e) => return (a, Err(e)),
            };
            let r = match (a.kind, new, old) {
                (ActionKind::Start, Some(spec), _) => super::put_and_switch(&client, &spec).await,
                (ActionKind::Replace, Some(mut spec), _) => {
                    // The image is already on this host: nothing to pull.
                    spec.pull = false;
                    super::put_and_switch(&client, &spec).await
                }
                (ActionKind::Reload, Some(spec), _) => {
                    client.update_config(&spec).await.map(|_| ())
                }
                (ActionKind::Stop, _, Some(old)) => client.remove_group(&old.key).await,
                _ => Ok(()),
            };
            (a, r)
        }
    });
    let mut specs = old_specs.clone();
    let mut failures = Vec::new();
    for (a, r) in futures_util::future::join_all(calls).await {
        let what = match a.kind {
            ActionKind::Start => "started",
            ActionKind::Reload => "reloaded",
            ActionKind::Replace => "replaced",
            ActionKind::Stop => "stopped",
        };
        match r {
            Ok(()) => {
                log.line(format!("{}: {what}", a.target));
                match new_by_id.get(&a.target) {
                    Some(t) => specs.insert(a.target.clone(), t.spec.clone()),
                    None => specs.remove(&a.target),
                };
            }
            Err(e) => failures.push(format!("{}, group `{}`", prefixed(&a.host, &e), a.group)),
        }
    }
    for f in &failures {
        log.line(f);
    }
    Ok((specs, failures))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffs() {
        let old =
            serde_json::json!({"services": {"a": 1, "b": 2}, "hosts": {"h1": {"agent": "x"}}});
        let new = serde_json::json!({"services": {"a": 1, "b": 3, "c": 4}, "hosts": {}});
        let mut out = Vec::new();
        diff("", Some(&old), Some(&new), &mut out);
        let summary: Vec<(ChangeOp, &str)> = out.iter().map(|c| (c.op, c.path.as_str())).collect();
        assert_eq!(
            summary,
            [
                (ChangeOp::Removed, "hosts.h1"),
                (ChangeOp::Changed, "services.b"),
                (ChangeOp::Added, "services.c")
            ]
        );
        // As the API and `--json` show them.
        let ops = serde_json::to_value(out.iter().map(|c| c.op).collect::<Vec<_>>()).unwrap();
        assert_eq!(ops, serde_json::json!(["removed", "changed", "added"]));
        for op in [ChangeOp::Added, ChangeOp::Changed, ChangeOp::Removed] {
            let v = serde_json::to_value(op).unwrap();
            assert_eq!(serde_json::from_value::<ChangeOp>(v).unwrap(), op);
        }
    }

    #[test]
    fn a_changed_proxy_timeout_is_applied_without_a_restart() {
        let spec: GroupSpec = serde_json::from_value(serde_json::json!({
            "key": {"system": "s", "environment": "e", "group": "g"},
            "host": "h", "node": "n",
            "release": {"id": "r", "name": "n", "created_at": ""},
            "existing_release": null, "image": "i", "pull": false, "instances": 1,
            "listen": 80, "port": 8080,
            "health": {"path": "/", "interval_ms": 1000, "timeout_ms": 1000},
            "reload": null, "stop_timeout_ms": null, "config": {}, "config_version": "v",
            "templates": {}, "environment_name": "e"
        }))
        .unwrap();
        assert_eq!(action_for(Some(&spec), Some(&spec)), None);
        let slower = GroupSpec {
            response_timeout_ms: Some(120_000),
            ..spec.clone()
        };
        assert_eq!(
            action_for(Some(&spec), Some(&slower)),
            Some(ActionKind::Reload)
        );
    }
}
