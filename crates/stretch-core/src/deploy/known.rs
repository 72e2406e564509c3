//! Which releases a deploy, rollback or apply means, and where they are: this home's
//! store first, then the system's registry (the release store every home shares), and
//! for what an environment runs, its agents when this home has no record of it.

use std::path::Path;

use tokio::sync::OnceCell;

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
        self.home.archive(id).exists() && sealed::stored(self.home, id).is_some()
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

/// What an environment's agents run: the release most of its groups serve, and the
/// one that release replaced. For a home that has no record of the environment.
pub async fn from_agents(
    system: &System,
    env_name: &str,
    env: &Environment,
    fleet: &Fleet,
    log: &Log,
) -> (Option<String>, Option<String>) {
    let hosts = super::hosts_in_groups(env);
    let mut votes: std::collections::BTreeMap<(String, Option<String>), usize> =
        std::collections::BTreeMap::new();
    for (_, state) in fleet.states(hosts, log).await {
        let Ok(state) = state else { continue };
        for g in state.groups {
            if g.key.system != system.name() || g.key.environment != env_name {
                continue;
            }
            if let Some(r) = g.release {
                let before = g.existing_release.map(|x| x.id);
                *votes.entry((r.id, before)).or_default() += 1;
            }
        }
    }
    votes
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|((current, before), _)| (Some(current), before))
        .unwrap_or((None, None))
}
