//! What commands give back, as data: one type per outcome, shared by the CLI, the
//! server's API and `--server` mode, so each has one JSON form and one human form.

use serde::{Deserialize, Serialize};

use crate::Result;
use crate::deploy::{DeployOutcome, Kind};
use crate::source::Pulled;
use crate::status::ReleaseName;
use crate::store::{Image, ReleaseRecord, Store};

/// A release as commands show it (`releases`, `build`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    pub id: String,
    pub name: String,
    pub created_at: String,
    pub sources: Vec<Pulled>,
    pub images: Vec<Image>,
    /// The environments that run it now or would roll back to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environments: Vec<Use>,
}

/// An environment's use of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Use {
    pub environment: String,
    /// `current`, or `rollback`: the release `rollback` goes back to.
    pub role: Role,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Current,
    Rollback,
}

/// Every release in the system's registry, newest first, marked with the environments
/// this home knows use them (none with `registry: local`: there is no remote store).
pub async fn remote_releases(
    system: &crate::system::System,
    store: Option<&Store>,
) -> Result<Vec<Release>> {
    let Some(registry) = crate::release::remote::ReleaseStore::open(system, "releases").await?
    else {
        return Err(crate::Error::invalid(
            "the system keeps its releases in this home (`registry: local`): there is no remote store to list",
        ));
    };
    let uses = match store {
        Some(s) => uses(s)?,
        None => Vec::new(),
    };
    Ok(registry
        .list("releases")
        .await?
        .iter()
        .map(|r| with_uses(r, &uses))
        .collect())
}

fn with_uses(r: &ReleaseRecord, uses: &[(String, Use)]) -> Release {
    Release {
        environments: uses
            .iter()
            .filter(|(id, _)| id == &r.id)
            .map(|(_, u)| u.clone())
            .collect(),
        ..Release::from(r)
    }
}

/// Every release, newest first, with the environments that use it.
pub fn releases(store: &Store) -> Result<Vec<Release>> {
    let uses = uses(store)?;
    Ok(store
        .releases()?
        .iter()
        .map(|r| with_uses(r, &uses))
        .collect())
}

/// Which release each environment runs or would roll back to, as this home knows.
fn uses(store: &Store) -> Result<Vec<(String, Use)>> {
    let mut uses: Vec<(String, Use)> = Vec::new();
    for env in store.environment_names()? {
        if let Some(r) = store.environment(&env)? {
            for (id, role) in [
                (r.release, Role::Current),
                (r.existing_release, Role::Rollback),
            ] {
                if let Some(id) = id {
                    uses.push((
                        id,
                        Use {
                            environment: env.clone(),
                            role,
                        },
                    ));
                }
            }
        }
    }
    Ok(uses)
}

impl From<&ReleaseRecord> for Release {
    fn from(r: &ReleaseRecord) -> Release {
        Release {
            id: r.id.clone(),
            name: r.name.clone(),
            created_at: r.created_at.clone(),
            sources: r.sources.clone(),
            images: r.images.clone(),
            environments: vec![],
        }
    }
}

/// What `build` made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Built {
    #[serde(flatten)]
    pub release: Release,
    /// The sources gave a release that already existed.
    pub reused: bool,
}

/// What `deploy` or `rollback` did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployed {
    pub run: i64,
    pub kind: Kind,
    pub environment: String,
    pub release: ReleaseName,
    pub existing_release: Option<ReleaseName>,
}

impl Deployed {
    pub fn of(o: &DeployOutcome, kind: Kind, environment: &str) -> Deployed {
        let name = |r: &ReleaseRecord| ReleaseName {
            id: r.id.clone(),
            name: Some(r.name.clone()),
        };
        Deployed {
            run: o.run,
            kind,
            environment: environment.to_string(),
            release: name(&o.release),
            existing_release: o.existing.as_ref().map(name),
        }
    }
}
