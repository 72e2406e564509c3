//! Day-two operations on a deployed environment, through its agents: the instances'
//! logs ([`logs`]), a command in one of them ([`exec`]), and a rolling restart of the
//! running release ([`restart`]). Nothing here prints: lines and outcomes go to the
//! caller.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::agent::api::{ExecRequest, GroupKey, LogLine, LogQuery};
use crate::agent::client::AgentError;
use crate::agent::fleet::{Fleet, prefixed};
use crate::deploy;
use crate::home::Home;
use crate::log::{HostState, Log};
use crate::run::Run;
use crate::store::{RunKind, Store};
use crate::system::System;
use crate::{Error, Result};

/// One group on one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub agent: String,
    pub group: String,
}

/// The groups on hosts of environment `env_name` that `group` and `host` select (all
/// when `None`), in `system.yml` order. An unknown group or host is bad input naming
/// it and what there is.
pub fn targets(
    system: &System,
    env_name: &str,
    group: Option<&str>,
    host: Option<&str>,
) -> Result<Vec<Target>> {
    let env = deploy::environment(system, env_name)?;
    let known = |names: Vec<&str>| {
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    };
    if let Some(g) = group
        && !env.groups.contains_key(g)
    {
        return Err(Error::not_found(
            format!("environment `{env_name}` has no group `{g}`"),
            format!(
                "groups: {}",
                known(env.groups.keys().map(String::as_str).collect())
            ),
        ));
    }
    if let Some(h) = host
        && !env.hosts.contains_key(h)
    {
        return Err(Error::not_found(
            format!("environment `{env_name}` has no host `{h}`"),
            format!(
                "hosts: {}",
                known(env.hosts.keys().map(String::as_str).collect())
            ),
        ));
    }
    let mut out = Vec::new();
    for (name, g) in &env.groups {
        if group.is_some_and(|want| want != name) {
            continue;
        }
        for h in &g.hosts {
            if host.is_some_and(|want| want != h) {
                continue;
            }
            if let Some(spec) = env.hosts.get(h) {
                out.push(Target {
                    host: h.clone(),
                    agent: spec.agent.clone(),
                    group: name.clone(),
                });
            }
        }
    }
    if out.is_empty() {
        return Err(Error::not_found(
            format!(
                "no group of environment `{env_name}` runs on host `{}`{}",
                host.unwrap_or(""),
                group
                    .map(|g| format!(" in group `{g}`"))
                    .unwrap_or_default()
            ),
            "see the groups' `hosts` in system.yml",
        ));
    }
    Ok(out)
}

fn fleet(system: &System, home: &Home, env_name: &str) -> Result<Fleet> {
    let env = deploy::environment(system, env_name)?;
    let token = deploy::agent_token(system, env_name, env)?;
    Fleet::new(system, env_name, env, home, &token)
}

/// How long lines wait to be put in time order with the other hosts' when following.
const FOLLOW_WINDOW: Duration = Duration::from_millis(150);

/// The output of the selected groups' instances, merged by time, each line given to
/// `each` as it is ready. Without `query.follow`, returns once every line asked for
/// was given; with it, runs until every agent ends its stream (or the caller stops
/// waiting). A host that cannot be read is said on `log` and the others go on; if no
/// host can be read, that is the error.
pub async fn logs(
    system: &System,
    home: &Home,
    env_name: &str,
    targets: &[Target],
    query: &LogQuery,
    log: &Log,
    mut each: impl FnMut(LogLine),
) -> Result<()> {
    let fleet = fleet(system, home, env_name)?;
    let (tx, mut rx) = mpsc::channel::<std::result::Result<LogLine, String>>(1024);
    let mut opened = 0usize;
    let mut failures = Vec::new();
    let opens = targets.iter().map(|t| {
        let key = deploy::group_key(system, env_name, &t.group);
        let fleet = &fleet;
        async move {
            let r = match fleet.client(&t.host, &t.agent) {
                Ok(c) => c.logs(&key, query).await,
                Err(e) => Err(e),
            };
            (t, r)
        }
    });
    for (t, r) in futures_util::future::join_all(opens).await {
        match r {
            Ok(mut reader) => {
                opened += 1;
                let tx = tx.clone();
                let host = t.host.clone();
                tokio::spawn(async move {
                    while let Some(line) = reader.next().await {
                        let item = line.map_err(|e| prefixed(&host, &e));
                        let stop = item.is_err();
                        if tx.send(item).await.is_err() || stop {
                            break;
                        }
                    }
                });
            }
            Err(AgentError::Failed { status: 404, .. }) => {
                log.line(format!(
                    "host `{}`: group `{}` runs nothing there",
                    t.host, t.group
                ));
            }
            Err(e) => {
                let m = prefixed(&t.host, &e);
                log.line(format!("warning: {m}"));
                failures.push(m);
            }
        }
    }
    drop(tx);
    if opened == 0 && !failures.is_empty() {
        return Err(Error::failed("logs", failures.join("; ")));
    }
    if !query.follow {
        let mut all = Vec::new();
        while let Some(item) = rx.recv().await {
            match item {
                Ok(l) => all.push(l),
                Err(m) => log.line(format!("warning: {m}")),
            }
        }
        sort(&mut all);
        all.into_iter().for_each(each);
        return Ok(());
    }
    // Following: hold lines a moment so that those of several hosts come out in
    // time order.
    let mut held: Vec<LogLine> = Vec::new();
    let mut open = true;
    while open || !held.is_empty() {
        let deadline = tokio::time::sleep(FOLLOW_WINDOW);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                item = rx.recv(), if open => match item {
                    Some(Ok(l)) => held.push(l),
                    Some(Err(m)) => log.line(format!("warning: {m}")),
                    None => open = false,
                },
                () = &mut deadline => break,
            }
            if !open {
                break;
            }
        }
        sort(&mut held);
        held.drain(..).for_each(&mut each);
    }
    Ok(())
}

/// Time order (the agents' timestamps are RFC 3339 in UTC with nanoseconds), then host,
/// group and instance for lines of the same instant.
fn sort(lines: &mut [LogLine]) {
    lines.sort_by(|a, b| {
        (time_key(&a.time), &a.host, &a.group, a.instance).cmp(&(
            time_key(&b.time),
            &b.host,
            &b.group,
            b.instance,
        ))
    });
}

/// `2026-12-04T09:00:00.5Z` and `…00.123456789Z` compare right once the fraction has
/// nine digits.
fn time_key(t: &str) -> String {
    let Some(body) = t.strip_suffix('Z') else {
        return t.to_string();
    };
    let (secs, frac) = body.split_once('.').unwrap_or((body, ""));
    format!("{secs}.{frac:0<9}Z")
}

/// Open an exec session on the group's instances: on `host` if given, else on the
/// first host (in `system.yml` order) whose agent has a running instance. The host
/// chosen and the upgraded connection.
pub async fn exec(
    system: &System,
    home: &Home,
    env_name: &str,
    targets: &[Target],
    req: &ExecRequest,
    log: &Log,
) -> Result<(String, hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>)> {
    let fleet = fleet(system, home, env_name)?;
    let mut refusals = Vec::new();
    for t in targets {
        let key = deploy::group_key(system, env_name, &t.group);
        let client = fleet
            .client(&t.host, &t.agent)
            .map_err(|e| Error::failed("exec", prefixed(&t.host, &e)))?;
        match client.exec(&key, req).await {
            Ok(io) => {
                if let Err(e) = fleet.remember(&client, log) {
                    log.line(format!("warning: {e}"));
                }
                return Ok((t.host.clone(), io));
            }
            // No instance there (404: none of the group; 409: none running): the next
            // host may have one.
            Err(
                e @ AgentError::Failed {
                    status: 404 | 409, ..
                },
            ) if targets.len() > 1 => refusals.push(prefixed(&t.host, &e)),
            Err(AgentError::Failed {
                status: 404,
                message,
                ..
            }) => {
                return Err(Error::not_found(
                    format!("host `{}`: {message}", t.host),
                    "deploy the environment first (`stretch deploy ENV`)",
                ));
            }
            Err(e) => return Err(Error::failed("exec", prefixed(&t.host, &e))),
        }
    }
    Err(Error::failed("exec", refusals.join("; ")))
}

/// What [`restart`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restarted {
    pub run: i64,
    pub environment: String,
    pub release: Option<String>,
    /// Per host and group: how many instances now run.
    pub groups: Vec<RestartedGroup>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartedGroup {
    pub host: String,
    pub group: String,
    pub instances: usize,
}

/// Replace the instances of the selected groups with fresh ones of the release they
/// run, batch by batch as a deploy does (a group's `batch`, default half its hosts):
/// each host starts the new instances, waits until they are healthy, points its proxy
/// at them and drains the old ones, so no request is dropped. A failing host keeps its
/// old instances and stops the restart there. Recorded in history as a `restart`.
pub async fn restart(
    system: &System,
    home: &Home,
    store: &Store,
    env_name: &str,
    group: Option<&str>,
    wait: bool,
    log: &Log,
) -> Result<Restarted> {
    let env = deploy::environment(system, env_name)?;
    let targets = targets(system, env_name, group, None)?;
    let _lock = deploy::lock::lock(home, env_name, "restart", wait, log)?;
    let fleet = fleet(system, home, env_name)?;
    let record = store.environment(env_name)?;
    let release = record.as_ref().and_then(|r| r.release.clone());
    let hosts: BTreeMap<&str, &str> = targets
        .iter()
        .map(|t| (t.host.as_str(), t.agent.as_str()))
        .collect();
    fleet.connect(hosts.clone(), "restart", log).await?;
    let (run, log) = Run::start(
        store,
        RunKind::Restart,
        Some(env_name),
        release.as_deref(),
        release.as_deref(),
        log,
    )?;
    let result = async {
        let leases = fleet
            .lease(
                system.name(),
                env_name,
                hosts,
                &deploy::holder(run.id(), "restart"),
                env.lease_ttl(),
                wait,
                "restart",
                &log,
            )
            .await?;
        let r = log
            .stage("restart", rolling(system, env_name, &targets, &fleet, &log))
            .await;
        leases.release().await;
        r
    }
    .await;
    let outcome = result.map(|groups| Restarted {
        run: run.id(),
        environment: env_name.to_string(),
        release,
        groups,
    });
    run.finish(outcome)
}

async fn rolling(
    system: &System,
    env_name: &str,
    targets: &[Target],
    fleet: &Fleet,
    log: &Log,
) -> Result<Vec<RestartedGroup>> {
    let env = deploy::environment(system, env_name)?;
    let mut done = Vec::new();
    for (group_name, group) in &env.groups {
        let members: Vec<&Target> = targets.iter().filter(|t| &t.group == group_name).collect();
        if members.is_empty() {
            continue;
        }
        let key = deploy::group_key(system, env_name, group_name);
        let batch = group
            .batch
            .map(|b| b as usize)
            .unwrap_or_else(|| (members.len() / 2).max(1))
            .max(1);
        let batches = members.len().div_ceil(batch);
        for (n, chunk) in members.chunks(batch).enumerate() {
            let names: Vec<&str> = chunk.iter().map(|t| t.host.as_str()).collect();
            log.line(format!(
                "group `{group_name}` batch {}: {}",
                n + 1,
                names.join(", ")
            ));
            log.batch(group_name, n + 1, batches, &names, None);
            let calls = chunk.iter().map(|t| {
                let key = &key;
                async move {
                    log.host(group_name, &t.host, HostState::Switching);
                    let r = async {
                        let client = fleet.client(&t.host, &t.agent)?;
                        match client.current_spec(key).await? {
                            Some(spec) => crate::deploy::watched(
                                &client,
                                key,
                                &t.host,
                                log,
                                client.restart(&spec),
                            )
                            .await
                            .map(Some),
                            None => Ok(None),
                        }
                    }
                    .await;
                    log.host(
                        group_name,
                        &t.host,
                        match &r {
                            Ok(_) => HostState::Switched,
                            Err(e) => HostState::Failed(e.to_string()),
                        },
                    );
                    r
                }
            });
            let mut failures = Vec::new();
            for (t, r) in chunk
                .iter()
                .zip(futures_util::future::join_all(calls).await)
            {
                match r {
                    Ok(Some(status)) => {
                        log.line(format!(
                            "host `{}`: {} fresh instance(s) serving",
                            t.host,
                            status.instances.len()
                        ));
                        done.push(RestartedGroup {
                            host: t.host.clone(),
                            group: group_name.clone(),
                            instances: status.instances.len(),
                        });
                    }
                    Ok(None) => log.line(format!(
                        "host `{}`: group `{group_name}` runs nothing there",
                        t.host
                    )),
                    Err(e) => failures.push(prefixed(&t.host, &e)),
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
                return Err(Error::failed(
                    "restart",
                    format!(
                        "{}; restart stopped there (a host that failed kept its old instances)",
                        failures.join("; ")
                    ),
                ));
            }
        }
    }
    Ok(done)
}

/// The key of a group, for callers outside `deploy`.
pub fn group_key(system: &System, env_name: &str, group: &str) -> GroupKey {
    deploy::group_key(system, env_name, group)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(time: &str, host: &str) -> LogLine {
        LogLine {
            time: time.into(),
            host: host.into(),
            group: "web".into(),
            instance: 0,
            container: "c".into(),
            release_id: "r".into(),
            stream: "stdout".into(),
            line: String::new(),
        }
    }

    #[test]
    fn lines_sort_by_time_whatever_the_digits_of_the_fraction() {
        let mut l = vec![
            line("2026-12-04T09:00:01Z", "a"),
            line("2026-12-04T09:00:00.5Z", "b"),
            line("2026-12-04T09:00:00.123456789Z", "a"),
            line("2026-12-04T09:00:00.5Z", "a"),
        ];
        sort(&mut l);
        let got: Vec<(&str, &str)> = l
            .iter()
            .map(|l| (l.time.as_str(), l.host.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("2026-12-04T09:00:00.123456789Z", "a"),
                ("2026-12-04T09:00:00.5Z", "a"),
                ("2026-12-04T09:00:00.5Z", "b"),
                ("2026-12-04T09:00:01Z", "a"),
            ]
        );
    }
}
