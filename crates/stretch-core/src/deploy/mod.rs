//! The deploy step (SPEC §6): pull release, pre-deploy plugins, configuration, push to
//! agents, change release batch by batch, switch buffers, post-deploy plugins. A
//! rollback is the same step with kind `rollback`. A host that fails stops the rollout
//! and every host already switched is switched back.

pub mod apply;
pub mod buffers;
pub mod config;
pub mod known;
pub mod lock;
mod specs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::agent::api::{GroupKey, GroupSpec, Switch};
use crate::agent::client::{AgentClient, AgentError};
use crate::agent::fleet::{Fleet, prefixed};
use crate::home::Home;
use crate::log::{HostState, Log};
use crate::plugin::{self, Facts, Hook, ReleaseFacts};
use crate::release::config::ReleaseConfig;
use crate::run::Run;
use crate::store::{EnvironmentRecord, ReleaseRecord, RunKind, Store};
use crate::system::{Environment, System};
use crate::{Error, Result};
use known::{Found, Known};

pub use specs::HostGroup;

/// What a deploy step does: the two kinds of run it records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Deploy,
    Rollback,
}

impl Kind {
    /// The run this records.
    pub fn run_kind(self) -> RunKind {
        match self {
            Kind::Deploy => RunKind::Deploy,
            Kind::Rollback => RunKind::Rollback,
        }
    }

    pub fn as_str(self) -> &'static str {
        self.run_kind().as_str()
    }
}

impl From<Kind> for RunKind {
    fn from(k: Kind) -> RunKind {
        k.run_kind()
    }
}

#[derive(Debug, Clone)]
pub struct DeployRequest {
    pub environment: String,
    /// Id, unique id prefix or name; default: the newest release (deploy) or the one
    /// before the current (rollback).
    pub release: Option<String>,
    pub kind: Kind,
    /// Wait for the environment's lock instead of failing at once.
    pub wait: bool,
    /// The release identity (else `STRETCH_RELEASE_IDENTITY`): opens sealed release
    /// configurations.
    pub release_identity: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct DeployOutcome {
    pub run: i64,
    pub release: ReleaseRecord,
    pub existing: Option<ReleaseRecord>,
}

/// The environment named `name` in `system.yml`.
pub fn environment<'a>(system: &'a System, name: &str) -> Result<&'a Environment> {
    system.spec.environments.get(name).ok_or_else(|| {
        let known: Vec<&str> = system
            .spec
            .environments
            .keys()
            .map(String::as_str)
            .collect();
        Error::not_found(
            format!("unknown environment `{name}`"),
            if known.is_empty() {
                "`system.yml` declares no environments".to_string()
            } else {
                format!("environments: {}", known.join(", "))
            },
        )
    })
}

/// The token agents of `env` expect: `agent_token_file` (relative to the system file)
/// or `STRETCH_AGENT_TOKEN`.
pub fn agent_token(system: &System, env_name: &str, env: &Environment) -> Result<String> {
    let token = match &env.agent_token_file {
        Some(f) => {
            let path = system.dir.join(f);
            std::fs::read_to_string(&path).map_err(|e| {
                Error::invalid(format!(
                    "environment `{env_name}`: cannot read `agent_token_file` `{}`: {e}",
                    path.display()
                ))
            })?
        }
        None => std::env::var("STRETCH_AGENT_TOKEN").map_err(|_| {
            Error::invalid_with_help(
                format!("environment `{env_name}` has no agent token"),
                "set `agent_token_file` in system.yml or the STRETCH_AGENT_TOKEN variable",
            )
        })?,
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(Error::invalid(format!(
            "environment `{env_name}`: the agent token is empty"
        )));
    }
    Ok(token)
}

/// Load a release's configuration (sealed ones need the release identity).
pub fn release_config(home: &Home, id: &str, identity: Option<&Path>) -> Result<ReleaseConfig> {
    crate::release::sealed::open(home, id, identity)
}

/// Everything resolved before anything runs (bad input fails here, recording nothing).
struct Plan {
    env_name: String,
    token: String,
    release: Found,
    existing: Option<Found>,
    /// What the agents said while planning, said again in the run's log.
    notes: Vec<String>,
}

async fn plan(
    system: &System,
    home: &Home,
    store: &Store,
    known: &Known<'_>,
    req: &DeployRequest,
) -> Result<Plan> {
    let env = environment(system, &req.environment)?;
    let token = agent_token(system, &req.environment, env)?;
    let mut plan_notes = Vec::new();
    // What runs now, and what ran before: the home's record, else the hosts say.
    let (current, before) = match store.environment(&req.environment)? {
        Some(p) => (p.release, p.existing_release),
        None => {
            let fleet = Fleet::new(system, &req.environment, env, home, &token)?;
            let notes = std::sync::Arc::new(known::Notes::default());
            let quiet = Log::new(vec![notes.clone()]);
            let found = known::from_agents(system, &req.environment, env, &fleet, &quiet).await;
            plan_notes = notes.take();
            found
        }
    };
    let existing = match &current {
        Some(id) => known.by_id(id).await?,
        None => None,
    };
    let release = match (&req.release, req.kind) {
        (Some(key), _) => known.find(key).await?,
        (None, Kind::Deploy) => known.newest().await?.ok_or_else(|| {
            Error::invalid_with_help(
                "there are no releases to deploy",
                "run `stretch build` first",
            )
        })?,
        (None, Kind::Rollback) => {
            let before = before.ok_or_else(|| {
                Error::invalid(format!(
                    "environment `{}` has no earlier release to roll back to",
                    req.environment
                ))
            })?;
            known.find(&before).await?
        }
    };
    Ok(Plan {
        env_name: req.environment.clone(),
        token,
        release,
        existing,
        notes: plan_notes,
    })
}

/// `user@host`, for lease holders.
fn whoami() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "someone".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "somewhere".into());
    format!("{user}@{host}")
}

/// Who holds a lease: `user@host, run N (deploy of NAME)`.
pub(crate) fn holder(run: i64, what: &str) -> String {
    format!("{}, run {run} ({what})", whoami())
}

/// Run the deploy step, recording it (with its log) in the store.
pub async fn deploy(
    system: &System,
    home: &Home,
    store: &Store,
    req: &DeployRequest,
    log: &Log,
) -> Result<DeployOutcome> {
    let known = Known::new(system, home, store);
    let plan = plan(system, home, store, &known, req).await?;
    let what = format!(
        "{} of {} ({})",
        req.kind.as_str(),
        plan.release.record.name,
        plan.release.record.id
    );
    let _lock = lock::lock(home, &plan.env_name, &what, req.wait, log)?;
    // Re-read under the lock: another deploy may have finished while we waited.
    let plan = if req.wait {
        self::plan(system, home, store, &known, req).await?
    } else {
        plan
    };
    let (run, log) = Run::start(
        store,
        req.kind.run_kind(),
        Some(&plan.env_name),
        Some(&plan.release.record.id),
        plan.existing.as_ref().map(|r| r.record.id.as_str()),
        log,
    )?;
    log.line(format!(
        "{} {} ({}) to `{}`{}",
        req.kind.as_str(),
        plan.release.record.name,
        plan.release.record.id,
        plan.env_name,
        plan.existing
            .as_ref()
            .map(|x| format!(", replacing {} ({})", x.record.name, x.record.id))
            .unwrap_or_default()
    ));
    for note in &plan.notes {
        log.line(note);
    }
    let id = run.id();
    let result = execute(system, home, store, &known, req, &plan, id, &log).await;
    run.finish(result).map(|()| DeployOutcome {
        run: id,
        release: plan.release.record,
        existing: plan.existing.map(|x| x.record),
    })
}

#[allow(clippy::too_many_arguments)]
async fn execute(
    system: &System,
    home: &Home,
    store: &Store,
    known: &Known<'_>,
    req: &DeployRequest,
    plan: &Plan,
    run: i64,
    log: &Log,
) -> Result<()> {
    let env = environment(system, &plan.env_name)?;
    let buffers = buffers::Buffers::new(home, &plan.env_name).withholding(specs::tls_keys(system));
    let fleet = Fleet::new(system, &plan.env_name, env, home, &plan.token)?;
    let identity = req.release_identity.as_deref();
    let release = &plan.release.record;

    // 1. Pull release (from the registry when this home lacks it) and open its
    //    configuration; make sure of every agent, and take the environment's lease on
    //    each, before anything runs anywhere: a refused certificate, an unreachable
    //    agent or another run's lease stops the deploy here.
    let (new_config, existing_config, leases, previous_specs) = log
        .stage("pull release", async {
            known.pull(&plan.release, identity, log).await?;
            let new_config = release_config(home, &release.id, identity)?;
            buffers.prepare_new(home, release, &new_config, log)?;
            let mut existing_config = None;
            if let Some(x) = &plan.existing {
                match known.pull(x, identity, log).await {
                    Ok(()) => {
                        let cfg = release_config(home, &x.record.id, identity)?;
                        buffers.ensure_existing(home, &x.record, &cfg, log)?;
                        existing_config = Some(cfg);
                    }
                    Err(e) => log.line(format!(
                        "no buffer of the running release {}: {e}",
                        x.record.id
                    )),
                }
            }
            let hosts = hosts_in_groups(env);
            fleet.connect(hosts.clone(), "pull release", log).await?;
            let what = format!("{} of {}", req.kind.as_str(), release.name);
            let leases = fleet
                .lease(
                    system.name(),
                    &plan.env_name,
                    hosts,
                    &holder(run, &what),
                    env.lease_ttl(),
                    req.wait,
                    "pull release",
                    log,
                )
                .await?;
            // What each target runs now, as its agent says: what a failure switches
            // back to, whichever home deployed it.
            let previous_specs = match running_specs(system, &plan.env_name, env, &fleet).await {
                Ok(s) => s,
                Err(e) => {
                    leases.release().await;
                    return Err(e);
                }
            };
            Ok::<_, Error>((new_config, existing_config, leases, previous_specs))
        })
        .await?;
    let result = rollout(
        system,
        store,
        req.kind,
        plan,
        &fleet,
        &buffers,
        &new_config,
        &previous_specs,
        log,
    )
    .await;
    leases.release().await;
    // Decrypted files stay in the buffers only while the run needs them.
    buffers.scrub(&new_config);
    if let Some(cfg) = &existing_config {
        buffers.scrub(cfg);
    }
    result
}

/// The spec every `group/host` target of the environment runs now, as its agent says.
async fn running_specs(
    system: &System,
    env_name: &str,
    env: &Environment,
    fleet: &Fleet,
) -> Result<BTreeMap<String, GroupSpec>> {
    let mut calls = Vec::new();
    for (group_name, group) in &env.groups {
        for host in &group.hosts {
            let Some(h) = env.hosts.get(host) else {
                continue;
            };
            let key = group_key(system, env_name, group_name);
            calls.push(async move {
                let r = match fleet.client(host, &h.agent) {
                    Ok(c) => c.current_spec(&key).await,
                    Err(e) => Err(e),
                };
                (target_id(group_name, host), host, r)
            });
        }
    }
    let mut out = BTreeMap::new();
    for (id, host, r) in futures_util::future::join_all(calls).await {
        match r {
            Ok(Some(spec)) => {
                out.insert(id, spec);
            }
            Ok(None) => {}
            Err(e) => {
                return Err(Error::failed(
                    "pull release",
                    format!("nothing was changed on any host; {}", prefixed(host, &e)),
                ));
            }
        }
    }
    Ok(out)
}

/// Stages 2 to 7, under the leases.
#[allow(clippy::too_many_arguments)]
async fn rollout(
    system: &System,
    store: &Store,
    kind: Kind,
    plan: &Plan,
    fleet: &Fleet,
    buffers: &buffers::Buffers,
    new_config: &ReleaseConfig,
    previous_specs: &BTreeMap<String, GroupSpec>,
    log: &Log,
) -> Result<()> {
    let env = environment(system, &plan.env_name)?;
    let release = &plan.release.record;
    let existing = plan.existing.as_ref().map(|x| &x.record);
    let facts = Facts {
        system: system.name().to_string(),
        environment: Some(plan.env_name.clone()),
        kind: Some(kind.as_str().to_string()),
        release: ReleaseFacts {
            id: release.id.clone(),
            name: release.name.clone(),
            path: buffers.new_dir(),
        },
        existing_release: existing.map(|x| ReleaseFacts {
            id: x.id.clone(),
            name: x.name.clone(),
            path: buffers.existing_dir(),
        }),
    };
    let nodes_in_env: Vec<&str> = env.groups.values().map(|g| g.node.as_str()).collect();
    let plugins = specs::plugins_for(new_config, &nodes_in_env);
    let plugin_refs: Vec<_> = plugins.iter().collect();

    // 2. Pre-deploy plugins: a failure here means no host was touched.
    log.stage("pre-deploy plugins", async {
        if plugin_refs.is_empty() {
            log.line("no plugins");
            return Ok(());
        }
        plugin::run_all(
            &plugin_refs,
            Hook::PreDeploy,
            &facts,
            &buffers.new_dir(),
            log,
        )
        .await
    })
    .await?;

    // 3. Configuration, rendered per node; container templates checked per instance.
    let targets = log
        .stage("configuration", async {
            specs::build(
                system,
                &plan.env_name,
                env,
                release,
                existing,
                new_config,
                &buffers.new_dir(),
                log,
            )
        })
        .await?;

    // 4. Push specs; agents pull images.
    log.stage("push", push(&targets, fleet, log)).await?;

    // 5. Change release, batch by batch.
    log.stage(
        "change release",
        change_release(env, &targets, previous_specs, fleet, log),
    )
    .await?;
    log.line(format!(
        "agents: {} TLS handshake(s) for {} host(s)",
        fleet.handshakes(),
        hosts_in_groups(env).len()
    ));

    // 6. Switch buffers, and record where the environment stands.
    log.stage("switch buffers", async {
        buffers.switch()?;
        store.set_environment(&EnvironmentRecord {
            name: plan.env_name.clone(),
            release: Some(release.id.clone()),
            existing_release: existing.map(|x| x.id.clone()),
            updated_at: String::new(),
            applied: serde_json::to_value(specs::environment_json(&plan.env_name, env)).ok(),
        })
    })
    .await?;

    // 7. Post-deploy plugins (after the switch the buffers have swapped places).
    let facts = Facts {
        release: ReleaseFacts {
            path: buffers.existing_dir(),
            ..facts.release.clone()
        },
        existing_release: facts.existing_release.clone().map(|x| ReleaseFacts {
            path: buffers.previous_dir(),
            ..x
        }),
        ..facts.clone()
    };
    log.stage("post-deploy plugins", async {
        if plugin_refs.is_empty() {
            log.line("no plugins");
            return Ok(());
        }
        plugin::run_all(
            &plugin_refs,
            Hook::PostDeploy,
            &facts,
            &buffers.existing_dir(),
            log,
        )
        .await
    })
    .await
}

/// Run `call`, a request to `client` about `key` on `host`, asking the agent every
/// 300 ms what it is doing (pull bytes, instances healthy), reported as host states —
/// when something shows them (a terminal, the web view); else just `call`.
pub(crate) async fn watched<T>(
    client: &crate::agent::client::AgentClient,
    key: &crate::agent::api::GroupKey,
    host: &str,
    log: &Log,
    call: impl std::future::Future<Output = T>,
) -> T {
    if !log.wants_progress() {
        return call.await;
    }
    let mut call = std::pin::pin!(call);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(300));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            r = &mut call => return r,
            _ = tick.tick() => {
                let Ok(a) = client.activity(key).await else { continue };
                let state = match a.phase.as_str() {
                    "pulling" => HostState::Pulling { done: a.bytes_done, total: a.bytes_total },
                    "checking" => HostState::Checking { healthy: a.healthy, of: a.instances },
                    _ => continue,
                };
                log.host(&key.group, host, state);
            }
        }
    }
}

/// Send every target its spec (agents pull images). One host's groups go one after
/// another over its one connection; hosts go in parallel.
async fn push(targets: &[HostGroup], fleet: &Fleet, log: &Log) -> Result<()> {
    let mut by_host: BTreeMap<&str, Vec<&HostGroup>> = BTreeMap::new();
    for t in targets {
        by_host.entry(t.host.as_str()).or_default().push(t);
    }
    for t in targets {
        log.host(&t.spec.key.group, &t.host, HostState::Waiting);
    }
    let calls = by_host.into_values().map(|ts| async move {
        let mut out = Vec::new();
        for t in ts {
            log.host(&t.spec.key.group, &t.host, HostState::Preparing);
            let r = match fleet.client(&t.host, &t.agent) {
                Ok(c) => watched(&c, &t.spec.key, &t.host, log, c.put_spec(&t.spec)).await,
                Err(e) => Err(e),
            };
            log.host(
                &t.spec.key.group,
                &t.host,
                match &r {
                    Ok(_) => HostState::Ready,
                    Err(e) => HostState::Failed(e.to_string()),
                },
            );
            out.push((t, r));
        }
        out
    });
    let results = futures_util::future::join_all(calls).await;
    let mut failures = Vec::new();
    for (t, r) in results.into_iter().flatten() {
        match r {
            Ok(p) => log.line(format!(
                "host `{}` ({}): group `{}` ready, image {}",
                t.host,
                t.agent,
                t.spec.key.group,
                short(&p.image_id)
            )),
            Err(e) => failures.push(prefixed(&t.host, &e)),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Error::failed(
            "push",
            format!("no host was switched; {}", failures.join("; ")),
        ))
    }
}

/// `(name, address)` of every host that some group of `env` runs on.
fn hosts_in_groups(env: &Environment) -> Vec<(&str, &str)> {
    env.hosts
        .iter()
        .filter(|(name, _)| env.groups.values().any(|g| g.hosts.contains(name)))
        .map(|(name, h)| (name.as_str(), h.agent.as_str()))
        .collect()
}

fn short(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    &id[..id.len().min(12)]
}

/// Switch every group, `batch` hosts at a time; on a failure switch back every host
/// already switched (to its previous spec, or remove the group on a first deploy).
/// A host whose switch ended without a clean answer (timed out, connection lost after
/// the request) may have switched: it is reconciled with the others.
async fn change_release(
    env: &Environment,
    targets: &[HostGroup],
    previous: &BTreeMap<String, GroupSpec>,
    fleet: &Fleet,
    log: &Log,
) -> Result<()> {
    let mut switched: Vec<&HostGroup> = Vec::new();
    for (group_name, group) in &env.groups {
        let members: Vec<&HostGroup> = targets
            .iter()
            .filter(|t| &t.spec.key.group == group_name)
            .collect();
        let batch = group
            .batch
            .map(|b| b as usize)
            .unwrap_or_else(|| (members.len() / 2).max(1));
        let batches = members.len().div_ceil(batch.max(1));
        for (n, chunk) in members.chunks(batch.max(1)).enumerate() {
            let names: Vec<&str> = chunk.iter().map(|t| t.host.as_str()).collect();
            log.line(format!(
                "group `{group_name}` batch {}: {}",
                n + 1,
                names.join(", ")
            ));
            log.batch(group_name, n + 1, batches, &names, None);
            let calls = chunk.iter().map(|t| async move {
                let req = Switch {
                    release_id: t.spec.release.id.clone(),
                    config_version: t.spec.config_version.clone(),
                };
                log.host(&t.spec.key.group, &t.host, HostState::Switching);
                let r = match fleet.client(&t.host, &t.agent) {
                    Ok(c) => {
                        watched(&c, &t.spec.key, &t.host, log, c.switch(&t.spec.key, &req)).await
                    }
                    Err(e) => Err(e),
                };
                log.host(
                    &t.spec.key.group,
                    &t.host,
                    match &r {
                        Ok(_) => HostState::Switched,
                        Err(e) => HostState::Failed(e.to_string()),
                    },
                );
                (*t, r)
            });
            let mut failures = Vec::new();
            let mut uncertain = Vec::new();
            for (t, r) in futures_util::future::join_all(calls).await {
                match r {
                    Ok(s) => {
                        log.line(format!(
                            "host `{}`: serving {} with {} instance(s)",
                            t.host,
                            t.spec.release.name,
                            s.instances.len()
                        ));
                        switched.push(t);
                    }
                    Err(e) => {
                        // The agent's own refusal means its old instances kept
                        // serving; anything else leaves the outcome unknown.
                        if !matches!(e, AgentError::Failed { .. }) {
                            uncertain.push(t);
                        }
                        failures.push(prefixed(&t.host, &e));
                    }
                }
            }
            log.batch(
                group_name,
                n + 1,
                batches,
                &names,
                Some(failures.is_empty()),
            );
            if !failures.is_empty() {
                let reverted = switch_back(&switched, &uncertain, previous, fleet, log).await;
                return Err(Error::failed(
                    "change release",
                    format!(
                        "{}; rollout stopped, {reverted} switched host(s) switched back",
                        failures.join("; ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Put every switched host back on its previous spec, and reconcile the uncertain
/// ones. Returns how many hosts were switched back.
async fn switch_back(
    switched: &[&HostGroup],
    uncertain: &[&HostGroup],
    previous: &BTreeMap<String, GroupSpec>,
    fleet: &Fleet,
    log: &Log,
) -> usize {
    let sure = switched.iter().map(|t| (*t, false));
    let unsure = uncertain.iter().map(|t| (*t, true));
    let calls = sure.chain(unsure).map(|(t, unsure)| async move {
        let r = match fleet.client(&t.host, &t.agent) {
            Ok(client) => match previous.get(&t.id()) {
                Some(old) if unsure => reconcile(&client, t, old).await,
                Some(old) => put_and_switch(&client, old).await.map(|()| true),
                // A first deploy: the group goes (whatever state it reached).
                None => client.remove_group(&t.spec.key).await.map(|()| true),
            },
            Err(e) => Err(e),
        };
        (t, unsure, r)
    });
    let mut ok = 0;
    for (t, unsure, r) in futures_util::future::join_all(calls).await {
        match r {
            Ok(true) => {
                ok += 1;
                log.host(&t.spec.key.group, &t.host, HostState::SwitchedBack);
                log.line(format!("host `{}`: switched back", t.host));
            }
            Ok(false) => log.line(format!(
                "host `{}`: still on its previous release (checked)",
                t.host
            )),
            Err(e) if unsure => log.line(format!(
                "host `{}`: could not check whether it switched: {e}",
                t.host
            )),
            Err(e) => log.line(format!("host `{}`: could not switch back: {e}", t.host)),
        }
    }
    ok
}

/// A host whose switch to `t`'s spec ended without an answer: once any operation on
/// the group is over (putting `old` waits for it), ask what it runs, and switch it back
/// if it runs the new spec. Whether it had to be switched back.
async fn reconcile(
    client: &AgentClient,
    t: &HostGroup,
    old: &GroupSpec,
) -> std::result::Result<bool, AgentError> {
    client.put_spec(old).await?;
    let state = client.state().await?;
    let runs_new = state.groups.iter().any(|g| {
        g.key == t.spec.key
            && g.release.as_ref().map(|r| r.id.as_str()) == Some(t.spec.release.id.as_str())
            && g.config_version.as_deref() == Some(t.spec.config_version.as_str())
    });
    if runs_new {
        let req = Switch {
            release_id: old.release.id.clone(),
            config_version: old.config_version.clone(),
        };
        client.switch(&old.key, &req).await?;
    }
    Ok(runs_new)
}

/// Send `spec` to an agent and make it current there.
pub(crate) async fn put_and_switch(
    client: &AgentClient,
    spec: &GroupSpec,
) -> std::result::Result<(), crate::agent::client::AgentError> {
    client.put_spec(spec).await?;
    let req = Switch {
        release_id: spec.release.id.clone(),
        config_version: spec.config_version.clone(),
    };
    client.switch(&spec.key, &req).await.map(|_| ())
}

/// What [`auto_deploy`] is doing, for the caller to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutoDeploy<'a> {
    Starting { environment: &'a str },
    Deployed { environment: &'a str },
}

/// After a build: deploy release `id` to every `auto_deploy` environment not already
/// running it, in `system.yml` order, each recorded as its own run. Stops at the first
/// failure and returns it (the CLI and the server both run this, once).
pub async fn auto_deploy(
    system: &System,
    home: &Home,
    store: &Store,
    id: &str,
    release_identity: Option<&Path>,
    log: &Log,
    mut report: impl FnMut(AutoDeploy<'_>),
) -> Result<()> {
    for (name, env) in &system.spec.environments {
        if !env.auto_deploy {
            continue;
        }
        let current = store.environment(name)?.and_then(|e| e.release);
        if current.as_deref() == Some(id) {
            continue;
        }
        report(AutoDeploy::Starting { environment: name });
        let req = DeployRequest {
            environment: name.clone(),
            release: Some(id.to_string()),
            kind: Kind::Deploy,
            wait: true,
            release_identity: release_identity.map(Path::to_path_buf),
        };
        deploy(system, home, store, &req, log).await?;
        report(AutoDeploy::Deployed { environment: name });
    }
    Ok(())
}

/// The folder of an environment's buffers.
pub fn environment_dir(home: &Home, env: &str) -> PathBuf {
    home.root.join("environments").join(env)
}

/// Keys of targets: `GROUP/HOST`.
pub fn target_id(group: &str, host: &str) -> String {
    format!("{group}/{host}")
}

/// Used by the agent key of a target.
pub fn group_key(system: &System, env: &str, group: &str) -> GroupKey {
    GroupKey {
        system: system.name().to_string(),
        environment: env.to_string(),
        group: group.to_string(),
    }
}
