//! Which releases a deploy, rollback or apply means, and where they are: this home's
//! store first, then the system's registry (the release store every home shares), and
//! for what an environment runs, its agents when this home has no record of it.

use std::collections::BTreeMap;
use std::path::Path;

use tokio::sync::OnceCell;

use crate::agent::api::{AgentState, ReleaseRef};
use crate::agent::fleet::Fleet;
use crate::home::Home;
use crate::log::Log;
use crate::release::remote::{ReleaseStore, Remote};
use crate::release::sealed;
use crate::store::{ReleaseRecord, Store};
use crate::system::{Environment, System};
use crate::{Error, Result};

/// A release, and where to pull it from when this home lacks its files.
#[derive(Debug, Clone)]
pub struct Found {
    pub record: ReleaseRecord,
    pub remote: Option<Remote>,
}

/// Releases as one run finds them; the registry is opened on first need.
pub struct Known<'a> {
    system: &'a System,
    home: &'a Home,
    store: &'a Store,
    registry: OnceCell<Option<ReleaseStore>>,
}

const STAGE: &str = "pull release";

impl<'a> Known<'a> {
    pub fn new(system: &'a System, home: &'a Home, store: &'a Store) -> Known<'a> {
        Known {
            system,
            home,
            store,
            registry: OnceCell::new(),
        }
    }

    /// The registry's release store (`None` with `registry: local`).
    pub async fn registry(&self) -> Result<Option<&ReleaseStore>> {
        self.registry
            .get_or_try_init(|| ReleaseStore::open(self.system, STAGE))
            .await
            .map(Option::as_ref)
    }

    /// Does this home hold the archive and configuration of `id`?
    fn here(&self, id: &str) -> bool {
        self.home.stored_archive(id).is_some() && sealed::stored(self.home, id).is_some()
    }

    async fn with_files(&self, record: ReleaseRecord) -> Result<Found> {
        if self.here(&record.id) {
            return Ok(Found {
                record,
                remote: None,
            });
        }
        let remote = match self.registry().await? {
            Some(r) => r.get(&record.id, STAGE).await?,
            None => None,
        };
        Ok(Found { record, remote })
    }

    /// The release `key` names (id, unique id prefix or name), here or in the registry.
    pub async fn find(&self, key: &str) -> Result<Found> {
        match self.store.find_release(key) {
            Ok(record) => self.with_files(record).await,
            Err(e @ Error::NotFound { .. }) => {
                let Some(registry) = self.registry().await? else {
                    return Err(e);
                };
                match registry.find(key, STAGE).await? {
                    Some(remote) => Ok(Found {
                        record: remote.record.clone(),
                        remote: Some(remote),
                    }),
                    None => Err(Error::not_found(
                        format!("unknown release `{key}`"),
                        format!(
                            "neither this home nor the registry ({}) has it; `stretch releases --remote` lists the registry's",
                            registry.reference("…")
                        ),
                    )),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Release `id` if this home or the registry knows it.
    pub async fn by_id(&self, id: &str) -> Result<Option<Found>> {
        if let Some(record) = self.store.release_by_id(id)? {
            return self.with_files(record).await.map(Some);
        }
        let Some(registry) = self.registry().await? else {
            return Ok(None);
        };
        Ok(registry.get(id, STAGE).await?.map(|remote| Found {
            record: remote.record.clone(),
            remote: Some(remote),
        }))
    }

    /// The newest release: this home's, else the registry's.
    pub async fn newest(&self) -> Result<Option<Found>> {
        if let Some(record) = self.store.releases()?.into_iter().next() {
            return self.with_files(record).await.map(Some);
        }
        let Some(registry) = self.registry().await? else {
            return Ok(None);
        };
        match registry.list(STAGE).await?.into_iter().next() {
            Some(r) => self.by_id(&r.id).await,
            None => Ok(None),
        }
    }

    /// Make sure this home holds `found`'s files, pulling them from the registry.
    pub async fn pull(&self, found: &Found, identity: Option<&Path>, log: &Log) -> Result<()> {
        if self.here(&found.record.id) {
            return Ok(());
        }
        let (Some(remote), Some(registry)) = (&found.remote, self.registry().await?) else {
            return Err(Error::failed(
                STAGE,
                format!(
                    "release {} is not in this home{}",
                    found.record.id,
                    if self.system.spec.registry == "local" {
                        " (and the system keeps releases only there: `registry: local`)"
                    } else {
                        " nor in the registry"
                    }
                ),
            ));
        };
        registry
            .pull(self.home, self.store, remote, identity, log)
            .await
    }
}

/// Lines said while planning, before the run's log exists: kept, and said again once
/// the run started (so they are in its history, and reach a server's clients).
#[derive(Default)]
pub struct Notes(std::sync::Mutex<Vec<String>>);

impl crate::log::Sink for Notes {
    fn event(&self, event: &crate::log::Event) {
        if let crate::log::Event::Line { text, .. } = event
            && let Ok(mut lines) = self.0.lock()
        {
            lines.push(text.clone());
        }
    }
}

impl Notes {
    pub fn take(&self) -> Vec<String> {
        self.0
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default()
    }
}

/// The release most of `system`'s environment `env` groups serve, and the release it
/// replaced, as the agents' states say.
pub fn majority<'a>(
    states: impl IntoIterator<Item = &'a AgentState>,
    system: &str,
    env: &str,
) -> Option<(ReleaseRef, Option<ReleaseRef>)> {
    type Votes = BTreeMap<(String, Option<String>), (usize, ReleaseRef, Option<ReleaseRef>)>;
    let mut votes = Votes::new();
    for state in states {
        for g in &state.groups {
            if g.key.system != system || g.key.environment != env {
                continue;
            }
            let Some(r) = &g.release else { continue };
            let before = g.existing_release.clone();
            let key = (r.id.clone(), before.as_ref().map(|b| b.id.clone()));
            votes.entry(key).or_insert((0, r.clone(), before)).0 += 1;
        }
    }
    votes
        .into_values()
        .max_by_key(|(n, _, _)| *n)
        .map(|(_, r, before)| (r, before))
}

/// What an environment's agents run (ids): the release most of its groups serve, and
/// the one that release replaced. For a home that has no record of the environment.
pub async fn from_agents(
    system: &System,
    env_name: &str,
    env: &Environment,
    fleet: &Fleet,
    log: &Log,
) -> (Option<String>, Option<String>) {
    let states = fleet.states(super::hosts_in_groups(env), log).await;
    let answered = states.iter().filter_map(|(_, s)| s.as_ref().ok());
    match majority(answered, system.name(), env_name) {
        Some((current, before)) => (Some(current.id), before.map(|b| b.id)),
        None => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::api::{GroupKey, GroupStatus};

    fn group(
        system: &str,
        env: &str,
        group: &str,
        release: &str,
        before: Option<&str>,
    ) -> GroupStatus {
        let r = |id: &str| ReleaseRef {
            id: id.into(),
            name: format!("name-{id}"),
            created_at: String::new(),
        };
        GroupStatus {
            key: GroupKey {
                system: system.into(),
                environment: env.into(),
                group: group.into(),
            },
            node: "web".into(),
            host: "h".into(),
            release: Some(r(release)),
            existing_release: before.map(r),
            config_version: None,
            listen: None,
            instances: vec![],
            healthy: true,
            domains: vec![],
            certificate: None,
        }
    }

    #[test]
    fn most_groups_decide_and_other_environments_do_not_count() {
        let state = |groups| AgentState {
            version: String::new(),
            groups,
        };
        let states = [
            state(vec![
                group("s", "prod", "web", "r2", Some("r1")),
                group("s", "staging", "web", "r9", None),
                group("t", "prod", "web", "r9", None),
            ]),
            state(vec![group("s", "prod", "web", "r2", Some("r1"))]),
            state(vec![group("s", "prod", "api", "r3", Some("r2"))]),
        ];
        let (current, before) = majority(&states, "s", "prod").unwrap();
        assert_eq!(
            (current.id.as_str(), current.name.as_str()),
            ("r2", "name-r2")
        );
        assert_eq!(before.map(|b| b.id), Some("r1".to_string()));
        assert!(majority(&states, "s", "dev").is_none());
    }
}
