//! `stretch prune`: remove old releases — their archives, configurations, local images
//! and registry manifests — keeping the newest N and every release an environment
//! runs or would roll back to.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::deploy::lock;
use crate::docker::registry::{Deleted, Registry};
use crate::docker::{self, Docker, split_reference};
use crate::home::Home;
use crate::log::Log;
use crate::release::archive;
use crate::store::{ReleaseRecord, Store};
use crate::system::System;
use crate::{Error, Result};

/// Releases kept without a reason of their own (the newest ones).
pub const DEFAULT_KEEP: usize = 10;

#[derive(Debug, Clone)]
pub struct PruneRequest {
    /// How many of the newest releases to keep whatever they are.
    pub keep: usize,
    pub dry_run: bool,
}

/// What a prune removed and kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pruned {
    pub dry_run: bool,
    pub removed: Vec<Removed>,
    pub kept: Vec<Kept>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Removed {
    pub id: String,
    pub name: String,
    /// Image names removed from this machine's engine.
    pub images: Vec<String>,
    /// `REPO@DIGEST` manifests deleted from the registry.
    pub registry: Vec<String>,
    /// What stayed, and why (a registry without deletes, an image in use).
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Kept {
    pub id: String,
    pub name: String,
    pub why: Vec<String>,
}

/// Why each release must stay: the environments that run it or would roll back to it.
fn protected(store: &Store) -> Result<BTreeMap<String, Vec<String>>> {
    let mut why: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for env in store.environment_names()? {
        let Some(record) = store.environment(&env)? else {
            continue;
        };
        if let Some(r) = record.release {
            why.entry(r).or_default().push(format!("`{env}` runs it"));
        }
        if let Some(r) = record.existing_release {
            why.entry(r)
                .or_default()
                .push(format!("`{env}` rolls back to it"));
        }
    }
    Ok(why)
}

pub async fn prune(
    system: &System,
    home: &Home,
    store: &Store,
    req: &PruneRequest,
    log: &Log,
) -> Result<Pruned> {
    // No build may record a release and no deploy may pick one while we choose: hold
    // the build lock and every environment's (a busy one fails the prune at once).
    let mut held = Vec::new();
    let mut _build = None;
    if !req.dry_run {
        _build = home.lock("build", true)?;
        let mut envs: Vec<String> = system.spec.environments.keys().cloned().collect();
        envs.extend(store.environment_names()?);
        envs.sort();
        envs.dedup();
        for env in envs {
            held.push(lock::lock(home, &env, "prune", false, log)?);
        }
    }
    let protected = protected(store)?;
    let mut kept = Vec::new();
    let mut doomed: Vec<ReleaseRecord> = Vec::new();
    // Manifests a kept release still runs (an image reused unchanged) stay.
    let mut in_use = std::collections::BTreeSet::new();
    for (i, r) in store.releases()?.into_iter().enumerate() {
        let mut why = protected.get(&r.id).cloned().unwrap_or_default();
        if i < req.keep {
            why.insert(0, format!("one of the newest {}", req.keep));
        }
        if why.is_empty() {
            doomed.push(r);
        } else {
            in_use.extend(registry_refs(system, &r));
            kept.push(Kept {
                id: r.id,
                name: r.name,
                why,
            });
        }
    }
    let mut removed = Vec::new();
    if req.dry_run {
        for r in doomed {
            removed.push(Removed {
                images: r.images.iter().map(|i| i.name.clone()).collect(),
                registry: registry_refs(system, &r)
                    .into_iter()
                    .filter(|m| !in_use.contains(m))
                    .collect(),
                id: r.id,
                name: r.name,
                notes: vec![],
            });
        }
    } else {
        let docker = if doomed.is_empty() {
            None
        } else {
            Some(Docker::connect().await?)
        };
        let registry = registry_client(system, &doomed)?;
        for r in doomed {
            let ctx = Ctx {
                home,
                store,
                docker: docker.as_ref(),
                registry: registry.as_ref(),
                system,
                in_use: &in_use,
                log,
            };
            removed.push(ctx.remove(r).await?);
        }
        sweep_chunks(home, log);
    }
    Ok(Pruned {
        dry_run: req.dry_run,
        removed,
        kept,
    })
}

/// Remove the chunks no archive of the home lists any more (a removed release's, or
/// left by a build that was killed). A damaged index stops the sweep: its chunks
/// might be the ones it would remove.
fn sweep_chunks(home: &Home, log: &Log) {
    let mut keep = std::collections::HashSet::new();
    let Ok(entries) = std::fs::read_dir(home.releases()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "index") {
            continue;
        }
        match archive::Index::read(&path) {
            Ok(index) => keep.extend(index.chunks.into_iter().map(|c| c.hash)),
            Err(e) => {
                log.line(format!("chunks not swept: {e}"));
                return;
            }
        }
    }
    let (count, bytes) = archive::sweep(&home.chunks(), &keep);
    if count > 0 {
        log.line(format!(
            "removed {count} chunk file(s) no release uses ({:.1} MiB)",
            bytes as f64 / (1u64 << 20) as f64
        ));
    }
}

/// The registry's manifests of `r`: `REPO@DIGEST` (none with `registry: local`).
fn registry_refs(system: &System, r: &ReleaseRecord) -> Vec<String> {
    if system.spec.registry == "local" {
        return vec![];
    }
    r.images
        .iter()
        .filter_map(|i| {
            let d = i.digest.as_ref()?;
            Some(format!("{}@{d}", split_reference(&i.name).0))
        })
        .collect()
}

fn registry_client(system: &System, doomed: &[ReleaseRecord]) -> Result<Option<Registry>> {
    let host = &system.spec.registry;
    if host == "local" || doomed.is_empty() {
        return Ok(None);
    }
    let auth = docker::auth::lookup(host, None)?;
    Registry::new(host, &auth).map(Some)
}

/// What removing a release needs.
struct Ctx<'a> {
    home: &'a Home,
    store: &'a Store,
    docker: Option<&'a Docker>,
    registry: Option<&'a Registry>,
    system: &'a System,
    in_use: &'a std::collections::BTreeSet<String>,
    log: &'a Log,
}

impl Ctx<'_> {
    async fn remove(&self, r: ReleaseRecord) -> Result<Removed> {
        let Ctx {
            home,
            store,
            docker,
            registry,
            system,
            in_use,
            log,
        } = *self;
        let mut out = Removed {
            id: r.id.clone(),
            name: r.name.clone(),
            images: vec![],
            registry: vec![],
            notes: vec![],
        };
        if let Some(reg) = registry {
            for reference in registry_refs(system, &r) {
                if in_use.contains(&reference) {
                    out.notes.push(format!(
                        "{reference} stays in the registry: a kept release runs it"
                    ));
                    continue;
                }
                let (repo, digest) = split_reference(&reference);
                let path = repo.split_once('/').map_or(repo, |(_, p)| p);
                match reg.delete_manifest(path, digest).await? {
                    Deleted::Removed => out.registry.push(reference),
                    Deleted::Absent => {}
                    Deleted::Unsupported => out.notes.push(format!(
                        "{reference} stays in the registry: it does not allow deletes"
                    )),
                }
            }
        }
        if let Some(reg) = registry {
            // The release itself, as the registry stores it for other homes.
            let repo = format!("{}/{}", system.name(), crate::release::remote::REPOSITORY);
            if let Some(digest) = reg.manifest_digest(&repo, &r.id).await? {
                let reference = format!("{}/{repo}:{}", system.spec.registry, r.id);
                match reg.delete_manifest(&repo, &digest).await? {
                    Deleted::Removed => out.registry.push(reference),
                    Deleted::Absent => {}
                    Deleted::Unsupported => out.notes.push(format!(
                        "{reference} stays in the registry: it does not allow deletes"
                    )),
                }
            }
        }
        if let Some(docker) = docker {
            for image in &r.images {
                let id = docker.image_id(&image.name).await?;
                match docker.remove_image(&image.name).await {
                    Ok(()) => {
                        if id.is_some() {
                            out.images.push(image.name.clone());
                        }
                    }
                    Err(e) => out
                        .notes
                        .push(format!("{} stays in the engine: {e}", image.name)),
                }
                // The image itself is gone once its last name is: forget it for reuse.
                if let Some(id) = id
                    && docker.image_id(&id).await?.is_none()
                {
                    store.forget_image(&id)?;
                }
            }
        }
        for path in [
            home.archive(&r.id),
            home.legacy_archive(&r.id),
            home.release_config(&r.id),
            home.sealed_config(&r.id),
        ] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::failed(
                        "prune",
                        format!("cannot remove `{}`: {e}", path.display()),
                    ));
                }
            }
        }
        store.delete_release(&r.id)?;
        log.line(format!("removed release {} ({})", r.name, r.id));
        Ok(out)
    }
}
