//! Stages 4 and 5: build every container (bases first) and push the images.
//!
//! Each container gets an input digest (its context, Dockerfile and base's digest);
//! when an image with the same inputs was built before and is still in the engine,
//! it is tagged for the new release instead of being rebuilt.

use std::collections::BTreeMap;

use crate::docker::{BuildRequest, Docker};
use crate::log::Log;
use crate::release::archive;
use crate::release::config::ReleaseConfig;
use crate::store::{Image, Store};
use crate::system::System;
use crate::system::project::{Container, Project};
use crate::{Error, Result};

/// An image the build made (or reused) and tagged.
#[derive(Debug, Clone)]
pub struct Built {
    pub reference: String,
    /// The engine's image id (`sha256:…`).
    pub image_id: String,
}

/// The repository names (without tag) a container's image is tagged with: one per
/// node built from it, or `base-NAME` for a base-only container.
fn repos(system: &System, project: &Project, index: usize) -> Vec<String> {
    let mut out: Vec<String> = project
        .nodes
        .iter()
        .filter(|n| n.container == index)
        .map(|n| super::image_repo(system, &n.image))
        .collect();
    if out.is_empty() {
        let c = &project.containers[index];
        let name = c.name.clone().unwrap_or_else(|| {
            let dir = if c.dir.is_empty() {
                system.name()
            } else {
                c.dir.rsplit('/').next().unwrap_or(&c.dir)
            };
            dir.to_lowercase()
        });
        out.push(super::image_repo(system, &format!("base-{name}")));
    }
    out.dedup();
    out
}

/// Does a Dockerfile have a `FROM` instruction of its own?
fn has_from(dockerfile: &str) -> bool {
    dockerfile.lines().any(|l| {
        l.trim_start()
            .get(..5)
            .is_some_and(|w| w.eq_ignore_ascii_case("from "))
    })
}

fn input_digest(context_hash: &str, dockerfile: &str, base: Option<&str>) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"stretch-image-v1\0");
    h.update(context_hash.as_bytes());
    h.update(b"\0");
    h.update(dockerfile.as_bytes());
    h.update(b"\0");
    h.update(base.unwrap_or("").as_bytes());
    h.finalize().to_hex().to_string()
}

pub async fn build_all(
    system: &System,
    tree: &std::sync::Arc<crate::source::Tree>,
    project: &Project,
    _config: &ReleaseConfig,
    release_id: &str,
    store: &Store,
    log: &Log,
) -> Result<Vec<Built>> {
    let docker = Docker::connect().await?;
    let mut digests: Vec<String> = Vec::new();
    let mut first_ref: Vec<String> = Vec::new();
    let mut built = Vec::new();
    for (i, c) in project.containers.iter().enumerate() {
        let tags: Vec<String> = repos(system, project, i)
            .into_iter()
            .map(|r| format!("{r}:{release_id}"))
            .collect();
        let dockerfile_text = std::fs::read_to_string(project.root.join(&c.dockerfile))
            .map_err(|e| Error::invalid(format!("cannot read `{}`: {e}", c.dockerfile)))?;
        let base_ref = c.from.map(|b| first_ref[b].clone());
        let base_digest = c.from.map(|b| digests[b].clone());
        let context = project.root.join(&c.dir);
        // The context as files: git files under it are written out first.
        let (t, dir) = (tree.clone(), c.dir.clone());
        super::blocking(move || t.ensure_path(std::path::Path::new(&dir))).await?;
        let ctx_hash = {
            let ctx = context.clone();
            tokio::task::spawn_blocking(move || archive::hash_tree(&ctx, &|_| false))
                .await
                .map_err(|e| Error::failed("images", e.to_string()))??
        };
        let digest = input_digest(&ctx_hash.hash, &dockerfile_text, base_digest.as_deref());
        let reused = match store.image_for_input(&digest)? {
            Some(id) if docker.image_id(&id).await?.is_some() => Some(id),
            _ => None,
        };
        let image_id = match reused {
            Some(image_id) => {
                for t in &tags {
                    docker.tag(&image_id, t).await?;
                }
                log.line(format!(
                    "{}: inputs unchanged, reusing image {}",
                    label(c),
                    short(&image_id)
                ));
                image_id
            }
            None => {
                let dockerfile = match (&base_ref, has_from(&dockerfile_text)) {
                    (Some(b), false) => format!("FROM {b}\n{dockerfile_text}"),
                    _ => dockerfile_text.clone(),
                };
                let mut build_args = BTreeMap::new();
                // Only when the Dockerfile reads it: an unused build-arg makes the
                // engine print a warning into every build log.
                if let Some(b) = &base_ref
                    && dockerfile_text.contains("STRETCH_BASE_IMAGE")
                {
                    build_args.insert("STRETCH_BASE_IMAGE".to_string(), b.clone());
                }
                log.line(format!("{}: building {}", label(c), tags.join(", ")));
                let image_id = docker
                    .build(
                        BuildRequest {
                            context: &context,
                            dockerfile,
                            tags: tags.clone(),
                            build_args,
                            // No labels: the classic builder turns each into a step
                            // that commits a container. The input digest is in the
                            // store, the system in the repository's name.
                            labels: BTreeMap::new(),
                            skip: &|_| false,
                        },
                        log,
                    )
                    .await
                    .map_err(|e| e.context(&label(c)))?;
                store.record_image(&digest, &image_id)?;
                image_id
            }
        };
        first_ref.push(tags[0].clone());
        digests.push(digest);
        built.extend(tags.into_iter().map(|reference| Built {
            reference,
            image_id: image_id.clone(),
        }));
    }
    Ok(built)
}

fn label(c: &Container) -> String {
    if c.file.is_empty() {
        "container (root)".into()
    } else {
        format!("container `{}`", c.file)
    }
}

fn short(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    &id[..id.len().min(12)]
}

/// Push every image; returns each with what its tag must keep meaning: the manifest
/// digest the registry took, or the image id for `registry: local`.
pub async fn push_all(system: &System, images: &[Built], log: &Log) -> Result<Vec<Image>> {
    if system.spec.registry == "local" {
        log.line("registry is `local`: images stay in this machine's engine");
        return Ok(images
            .iter()
            .map(|i| Image {
                name: i.reference.clone(),
                digest: Some(i.image_id.clone()),
            })
            .collect());
    }
    let docker = Docker::connect().await?;
    let registry = &system.spec.registry;
    let auth = crate::docker::auth::lookup(registry, None)?;
    match &auth.credentials {
        Some(c) => log.line(format!(
            "login `{}` for {registry} (from {})",
            c.username, auth.searched
        )),
        None => log.line(format!(
            "no login for {registry} in {}: pushing anonymously",
            auth.searched
        )),
    }
    let mut pushed = Vec::new();
    for i in images {
        log.line(format!("pushing {}", i.reference));
        let digest = docker.push(&i.reference, &auth, log).await?;
        pushed.push(Image {
            name: i.reference.clone(),
            digest: Some(digest),
        });
    }
    Ok(pushed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_detection() {
        assert!(has_from("# c\nFROM x\n"));
        assert!(has_from("ARG A\nfrom $A\n"));
        assert!(!has_from("RUN echo from\n"));
        assert_ne!(
            input_digest("a", "b", None),
            input_digest("a", "b", Some("c"))
        );
    }
}
