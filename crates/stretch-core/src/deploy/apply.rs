//! The config-only deploy, `stretch apply ENV` (SPEC §6): after the environment's
//! hosts, services or groups changed in `system.yml`, re-render the configuration of
//! the release that is running and converge every host on it. No plugin runs, no image
//! is pulled for hosts already in a group, the release does not change.
//!
//! The plan compares two things: the environment as last applied (for the human
//! `changes` list) and the spec each agent runs per `group/host` (for the `actions`):
//! the hosts are the truth, so re-running after a failure retries exactly what is
//! left, and a home that never deployed the environment can apply it too.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::buffers::Buffers;
use super::known::{self, Known};
use super::specs::{self, HostGroup};
use crate::agent::api::GroupSpec;
use crate::agent::fleet::{Fleet, prefixed};
use crate::home::Home;
use crate::log::{HostState, Log};
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
    /// The release identity (else `STRETCH_RELEASE_IDENTITY`).
    pub release_identity: Option<std::path::PathBuf>,
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
                || a.domains != b.domains
                || a.tls != b.tls
            {
                Some(ActionKind::Reload)
            } else {
                None
            }
        }
        (None, None) => None,
    }
}

/// A plan, the specs the agents run per target, and the specs wanted now.
type Planned = (Plan, BTreeMap<String, GroupSpec>, Vec<HostGroup>);

/// Every `group/host` the environment had (as last applied) or has, with its agent.
fn all_targets(
    applied: Option<&serde_json::Value>,
    env: &crate::system::Environment,
) -> BTreeMap<String, (String, String, String)> {
    let mut out = BTreeMap::new();
    if let Some(a) = applied {
        let agents = &a["hosts"];
        if let Some(groups) = a["groups"].as_object() {
            for (g, group) in groups {
                for h in group["hosts"].as_array().into_iter().flatten() {
                    let Some(h) = h.as_str() else { continue };
                    let agent = agents[h]["agent"].as_str().unwrap_or_default();
                    out.insert(
                        super::target_id(g, h),
                        (g.clone(), h.to_string(), agent.to_string()),
                    );
                }
            }
        }
    }
    for (g, group) in &env.groups {
        for h in &group.hosts {
            if let Some(host) = env.hosts.get(h) {
                out.insert(
                    super::target_id(g, h),
                    (g.clone(), h.clone(), host.agent.clone()),
                );
            }
        }
    }
    out
}

/// Compute the plan; `Ok(None)` when the environment was never deployed.
async fn plan(
    system: &System,
    home: &Home,
    store: &Store,
    fleet: &Fleet,
    req: &ApplyRequest,
    log: &Log,
) -> Result<Option<Planned>> {
    let env_name = req.environment.as_str();
    let identity = req.release_identity.as_deref();
    let env = super::environment(system, env_name)?;
    let known = Known::new(system, home, store);
    let record = store.environment(env_name)?;
    let (current, before) = match &record {
        Some(r) => (r.release.clone(), r.existing_release.clone()),
        None => known::from_agents(system, env_name, env, fleet, log).await,
    };
    let Some(release_id) = current else {
        return Ok(None);
    };
    let release = known.by_id(&release_id).await?.ok_or_else(|| {
        Error::not_found(
            format!("environment `{env_name}` runs release {release_id}, which neither this home nor the registry has"),
            "deploy a release this home or the registry has",
        )
    })?;
    known.pull(&release, identity, log).await?;
    let existing = match &before {
        Some(id) => known.by_id(id).await?.map(|f| f.record),
        None => None,
    };
    let release = release.record;
    let cfg = super::release_config(home, &release.id, identity)?;
    let buffers = Buffers::new(home, env_name).withholding(specs::tls_keys(system));
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
    );
    buffers.scrub(&cfg);
    let targets = targets?;
    let applied = record.as_ref().and_then(|r| r.applied.clone());

    // What every target runs now, as its agent says; one that cannot be asked keeps
    // its action (which then fails, naming it).
    let all = all_targets(applied.as_ref(), env);
    let calls = all.iter().map(|(id, (g, h, agent))| async move {
        let key = super::group_key(system, env_name, g);
        let r = match fleet.client(h, agent) {
            Ok(c) => c.current_spec(&key).await,
            Err(e) => Err(e),
        };
        (id.clone(), r)
    });
    let mut old_specs: BTreeMap<String, GroupSpec> = BTreeMap::new();
    let mut unknown: Vec<String> = Vec::new();
    for (id, r) in futures_util::future::join_all(calls).await {
        match r {
            Ok(Some(spec)) => {
                old_specs.insert(id, spec);
            }
            Ok(None) => {}
            Err(_) => unknown.push(id),
        }
    }

    let mut changes = Vec::new();
    let new_env = specs::environment_json(env_name, env);
    diff("", applied.as_ref(), Some(&new_env), &mut changes);

    let mut actions = Vec::new();
    let new_by_id: BTreeMap<String, &HostGroup> = targets.iter().map(|t| (t.id(), t)).collect();
    for (id, (group, host, agent)) in &all {
        let old = old_specs.get(id);
        let new = new_by_id.get(id).map(|t| &t.spec);
        let kind = match (action_for(old, new), unknown.contains(id)) {
            (_, true) if new.is_none() => Some(ActionKind::Stop),
            (_, true) => Some(ActionKind::Start),
            (k, false) => k,
        };
        let Some(kind) = kind else {
            continue;
        };
        actions.push(Action {
            target: id.clone(),
            group: group.clone(),
            host: host.clone(),
            agent: new_by_id
                .get(id)
                .map(|t| t.agent.clone())
                .unwrap_or_else(|| agent.clone()),
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
    let fleet = Fleet::new(system, &req.environment, env, home, &token)?;
    // Planning says what it found through the plan alone: the same words locally and
    // through a server, which streams only what a run logs.
    let Some((plan, old_specs, targets)) =
        self::plan(system, home, store, &fleet, req, &Log::null()).await?
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
    let existing_release = match &record {
        Some(r) => r.existing_release.clone(),
        None => old_specs
            .values()
            .find_map(|s| s.existing_release.as_ref().map(|x| x.id.clone())),
    };
    let (run, log) = Run::start(
        store,
        RunKind::Config,
        Some(&req.environment),
        Some(&release),
        Some(&release),
        log,
    )?;
    let result = log
        .stage("apply", async {
            let mut hosts: BTreeMap<&str, &str> = BTreeMap::new();
            for a in &plan.actions {
                hosts.insert(a.host.as_str(), a.agent.as_str());
            }
            // Every agent's certificate is checked before any of them is changed (one
            // that is down fails its own actions; the others converge).
            let answered = fleet.check_identities(hosts.clone(), "apply", &log).await?;
            let reachable: BTreeMap<&str, &str> = hosts
                .into_iter()
                .filter(|(name, _)| answered.contains_key(*name))
                .collect();
            let leases = if reachable.is_empty() {
                None
            } else {
                Some(
                    fleet
                        .lease(
                            system.name(),
                            &req.environment,
                            reachable,
                            &super::holder(run.id(), "apply"),
                            env.lease_ttl(),
                            req.wait,
                            "apply",
                            &log,
                        )
                        .await?,
                )
            };
            let r = converge(system, &plan, &targets, &fleet, &log).await;
            if let Some(l) = leases {
                l.release().await;
            }
            r
        })
        .await;
    let failures = match &result {
        Ok(f) => f.clone(),
        Err(_) => vec![],
    };
    store.set_environment(&EnvironmentRecord {
        name: req.environment.clone(),
        release: Some(release.clone()),
        existing_release,
        updated_at: String::new(),
        applied: Some(specs::environment_json(&req.environment, env)),
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

/// Carry out every action at once; returns the failures.
async fn converge(
    system: &System,
    plan: &Plan,
    targets: &[HostGroup],
    fleet: &Fleet,
    log: &Log,
) -> Result<Vec<String>> {
    let new_by_id: BTreeMap<String, &HostGroup> = targets.iter().map(|t| (t.id(), t)).collect();
    if plan.actions.is_empty() {
        log.line("every host is up to date");
    }
    let calls = plan.actions.iter().map(|a| {
        let new = new_by_id.get(&a.target).map(|t| t.spec.clone());
        let key = super::group_key(system, &plan.environment, &a.group);
        async move {
            log.host(&a.group, &a.host, HostState::Switching);
            let client = match fleet.client(&a.host, &a.agent) {
                Ok(c) => c,
                Err(e) => {
                    log.host(&a.group, &a.host, HostState::Failed(e.to_string()));
                    return (a, Err(e));
                }
            };
            let r = super::watched(&client, &key, &a.host, log, async {
                match (a.kind, new) {
                    (ActionKind::Start, Some(spec)) => super::put_and_switch(&client, &spec).await,
                    (ActionKind::Replace, Some(mut spec)) => {
                        // The image is already on this host: nothing to pull.
                        spec.pull = false;
                        super::put_and_switch(&client, &spec).await
                    }
                    (ActionKind::Reload, Some(spec)) => {
                        client.update_config(&spec).await.map(|_| ())
                    }
                    (ActionKind::Stop, _) => client.remove_group(&key).await,
                    _ => Ok(()),
                }
            })
            .await;
            log.host(
                &a.group,
                &a.host,
                match &r {
                    Ok(()) => HostState::Switched,
                    Err(e) => HostState::Failed(e.to_string()),
                },
            );
            (a, r)
        }
    });
    let mut failures = Vec::new();
    for (a, r) in futures_util::future::join_all(calls).await {
        let what = match a.kind {
            ActionKind::Start => "started",
            ActionKind::Reload => "reloaded",
            ActionKind::Replace => "replaced",
            ActionKind::Stop => "stopped",
        };
        match r {
            Ok(()) => log.line(format!("{}: {what}", a.target)),
            Err(e) => failures.push(format!("{}, group `{}`", prefixed(&a.host, &e), a.group)),
        }
    }
    for f in &failures {
        log.line(f);
    }
    Ok(failures)
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
