//! The build step (SPEC §5): pull, decrypt, archive, build images, push, run build
//! plugins — one function per stage, in order. The release is recorded only when all
//! stages succeed; a failure removes whatever the build wrote.

mod images;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;

use crate::home::{Home, write_private};
use crate::log::{Log, Unit};
use crate::plugin::{self, Facts, Hook, ReleaseFacts};
use crate::release::config::{ConfigTemplate, FORMAT, NodeConfig, Plugin, ReleaseConfig};
use crate::release::remote::ReleaseStore;
use crate::release::{archive, name, sealed};
use crate::run::Run;
use crate::secrets::{self, Identities};
use crate::source::{self, Pulled};
use crate::store::{ReleaseRecord, RunKind, Store};
use crate::system::System;
use crate::system::project::Project;
use crate::util::now_rfc3339;
use crate::{Error, Result};

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// The age identity file (`--identity` / `STRETCH_IDENTITY`).
    pub identity: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct BuildOutcome {
    /// The build's run in the store.
    pub run: i64,
    pub release: ReleaseRecord,
    /// True when the sources produced a release that already existed.
    pub reused: bool,
}

/// What the decrypt stage yields.
struct Decrypted {
    project: Project,
    secrets: BTreeMap<String, serde_json::Value>,
    files: BTreeMap<String, Vec<u8>>,
}

/// Run the whole build step, recorded as a run of the store (callers learn its id
/// from the log's `RunStarted`). Bad input leaves no run behind; a failed stage does.
pub async fn build(
    system: &System,
    home: &Home,
    store: &Store,
    opts: &BuildOptions,
    log: &Log,
) -> Result<BuildOutcome> {
    let (run, log) = Run::start(store, RunKind::Build, None, None, None, log)?;
    let run = run.forget_bad_input();
    let result = stages(system, home, store, opts, &log).await;
    if let Ok(o) = &result {
        run.set_release(&o.release.id)?;
    }
    let id = run.id();
    run.finish(result).map(|o| BuildOutcome { run: id, ..o })
}

async fn stages(
    system: &System,
    home: &Home,
    store: &Store,
    opts: &BuildOptions,
    log: &Log,
) -> Result<BuildOutcome> {
    // One build at a time per home: they share the buffer folder.
    let _lock = match home.lock("build", false)? {
        Some(lock) => Some(lock),
        None => {
            log.line("another build of this home is running: waiting for it");
            home.lock("build", true)?
        }
    };
    system.check_release_recipients()?;
    sweep_unrecorded(home, store, log)?;
    // Inputs exactly as at the last build (no file read, only stamped): same release.
    let inputs = source::fingerprint(system, home, opts.identity.as_deref())?;
    if let Some(record) = unchanged_since_last_build(home, store, inputs.as_deref())? {
        log.stage("pull", async {
            log.line(format!(
                "inputs unchanged since the build of {} ({}): nothing to pull",
                record.name, record.id
            ));
            Ok::<_, Error>(())
        })
        .await?;
        log.line(format!(
            "release {} ({}) already exists: nothing to build",
            record.id, record.name
        ));
        return Ok(BuildOutcome {
            run: 0,
            release: record,
            reused: true,
        });
    }
    let (pulled, tree, stamps) = log
        .stage("pull", async {
            let (s, h, l) = (system.clone(), home.clone(), log.clone());
            let (pulled, tree) = blocking(move || source::pull_all(&s, &h, &l)).await?;
            // Linked files share their content with the sources: what the archive
            // reads must still be there when the images are built.
            let stamps = source::Stamps::take(&tree.root, &[])?
                .files_only()
                .with_sources(&tree);
            Ok::<_, Error>((pulled, Arc::new(tree), stamps))
        })
        .await?;
    let merged = tree.root.clone();
    let decrypted = log
        .stage("decrypt", decrypt(system, &tree, opts, log))
        .await?;
    let release_config = release_config(system, &decrypted);
    let (record, reused, created) = log
        .stage(
            "archive",
            archive_stage(system, home, store, &tree, &release_config, pulled, log),
        )
        .await?;
    if reused {
        log.line(format!(
            "release {} ({}) already exists: nothing to build",
            record.id, record.name
        ));
        remember_inputs(home, inputs.as_deref(), &record.id);
        return Ok(BuildOutcome {
            run: 0,
            release: record,
            reused: true,
        });
    }
    let pushed = std::cell::Cell::new(None::<String>);
    let rest = async {
        let images = log
            .stage(
                "images",
                images::build_all(
                    system,
                    &tree,
                    &decrypted.project,
                    &release_config,
                    &record.id,
                    store,
                    log,
                ),
            )
            .await?;
        if let Some(changed) = stamps.changed(&merged) {
            return Err(Error::failed(
                "images",
                format!(
                    "`{}` changed during the build: the images might not hold what was archived; build again",
                    changed.display()
                ),
            ));
        }
        // Images, then the release itself: the registry is the store every home
        // deploys from.
        let record = log
            .stage("push", async {
                let images = images::push_all(system, &images, log).await?;
                let mut record = record.clone();
                record.images = images;
                if let Some(registry) = ReleaseStore::open(system, "push").await? {
                    let digest = registry.push(home, &record, log).await?;
                    pushed.set(Some(digest));
                }
                Ok::<_, Error>(record)
            })
            .await?;
        log.stage(
            "plugins",
            run_plugins(system, &tree, &decrypted, &record, log),
        )
        .await?;
        store.insert_release(&record)?;
        Ok::<_, Error>(record)
    };
    match rest.await {
        Ok(record) => {
            remember_inputs(home, inputs.as_deref(), &record.id);
            Ok(BuildOutcome {
                run: 0,
                release: record,
                reused: false,
            })
        }
        Err(e) => {
            // A failed build leaves no half-made release behind.
            let _ = std::fs::remove_file(home.archive(&record.id));
            for chunk in &created {
                let _ = std::fs::remove_file(chunk);
            }
            let _ = std::fs::remove_file(home.release_config(&record.id));
            let _ = std::fs::remove_file(home.sealed_config(&record.id));
            if let Some(digest) = pushed.take() {
                unpush(system, &digest).await;
            }
            Err(e)
        }
    }
}

/// Where the last build's input fingerprint and release are kept.
fn inputs_file(home: &Home) -> std::path::PathBuf {
    home.root.join("last-build.json")
}

/// The release of the last build, if `inputs` are still what it built from and the
/// home still holds that release.
fn unchanged_since_last_build(
    home: &Home,
    store: &Store,
    inputs: Option<&str>,
) -> Result<Option<ReleaseRecord>> {
    let Some(inputs) = inputs else {
        return Ok(None);
    };
    let Ok(text) = std::fs::read(inputs_file(home)) else {
        return Ok(None);
    };
    let last: serde_json::Value = serde_json::from_slice(&text).unwrap_or_default();
    if last["inputs"].as_str() != Some(inputs) {
        return Ok(None);
    }
    let Some(id) = last["release"].as_str() else {
        return Ok(None);
    };
    match store.release_by_id(id)? {
        Some(r) if home.stored_archive(id).is_some() && sealed::stored(home, id).is_some() => {
            Ok(Some(r))
        }
        _ => Ok(None),
    }
}

/// Keep what a finished build was built from (best effort: it only saves time).
fn remember_inputs(home: &Home, inputs: Option<&str>, id: &str) {
    let path = inputs_file(home);
    match inputs {
        Some(inputs) => {
            let doc = serde_json::json!({"inputs": inputs, "release": id});
            let _ = write_private(&path, doc.to_string().as_bytes());
        }
        None => {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Take a failed build's release back out of the registry (best effort).
async fn unpush(system: &System, digest: &str) {
    let host = &system.spec.registry;
    if let Ok(auth) = crate::docker::auth::lookup(host, None)
        && let Ok(registry) = crate::docker::registry::Registry::new(host, &auth)
    {
        let repo = format!("{}/{}", system.name(), crate::release::remote::REPOSITORY);
        let _ = registry.delete_manifest(&repo, digest).await;
    }
}

/// Remove what a killed build left in `releases/`: archives and configurations of no
/// recorded release, and temp files. Runs under the build lock, so no build is writing.
fn sweep_unrecorded(home: &Home, store: &Store, log: &Log) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(home.releases()) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let id = name
            .strip_suffix(".tar.zst")
            .or_else(|| name.strip_suffix(".index"))
            .or_else(|| name.strip_suffix(".config.age"))
            .or_else(|| name.strip_suffix(".json"));
        let orphan = match id {
            _ if name.starts_with('.') && name.ends_with(".tmp") => true,
            Some(id) => store.release_by_id(id)?.is_none(),
            None => false,
        };
        if orphan && std::fs::remove_file(entry.path()).is_ok() {
            log.line(format!("removed `{name}`, left by an unfinished build"));
        }
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::failed("build", format!("worker thread: {e}")))?
}

/// Every `*.age` file of the tree, as paths relative to it.
fn age_files(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry =
            entry.map_err(|e| Error::failed("decrypt", format!("cannot walk the sources: {e}")))?;
        if entry.file_type().is_file() && entry.file_name().to_string_lossy().ends_with(".age") {
            let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
            out.push(rel.to_string_lossy().into_owned());
        }
    }
    Ok(out)
}

/// Stage 2: parse the build files, then decrypt `secrets.yml` leaves and `*.age` files.
async fn decrypt(
    system: &System,
    tree: &source::Tree,
    opts: &BuildOptions,
    log: &Log,
) -> Result<Decrypted> {
    let merged = tree.root.as_path();
    // Files the build files name are brought into the tree as they are looked at.
    let fetch_failed = std::cell::RefCell::new(None);
    let project = Project::load_with(merged, system.name(), &|rel| {
        if let Err(e) = tree.ensure_file(Path::new(rel)) {
            fetch_failed.borrow_mut().get_or_insert(e);
        }
    });
    if let Some(e) = fetch_failed.into_inner() {
        return Err(e);
    }
    let project = project?;
    if project.all_plugins().next().is_some() {
        tree.ensure_path(Path::new("plugins"))?;
    }
    for p in project.all_plugins() {
        plugin::validate(p, merged)?;
    }
    log.line(format!(
        "{} node(s): {}; {} container(s)",
        project.nodes.len(),
        project
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        project.containers.len()
    ));
    let age = age_files(merged)?;
    let mut secrets = BTreeMap::new();
    let mut files = BTreeMap::new();
    if project.secrets_files.is_empty() && age.is_empty() {
        return Ok(Decrypted {
            project,
            secrets,
            files,
        });
    }
    let Some(identity) = &opts.identity else {
        let first = project
            .secrets_files
            .first()
            .or(age.first())
            .cloned()
            .unwrap_or_default();
        return Err(Error::invalid_with_help(
            format!("the sources hold secrets (`{first}`) but no identity was given"),
            "pass `--identity FILE` (or set STRETCH_IDENTITY) with the age key that can decrypt them",
        ));
    };
    let ids = Identities::from_file(identity)?;
    for file in &project.secrets_files {
        let text = std::fs::read_to_string(merged.join(file))
            .map_err(|e| Error::invalid(format!("cannot read `{file}`: {e}")))?;
        let tree = secrets::decrypt_secrets_file(file, &text, &ids)?;
        secrets.insert(file.clone(), tree.to_json());
    }
    for file in &age {
        let data = std::fs::read(merged.join(file))
            .map_err(|e| Error::invalid(format!("cannot read `{file}`: {e}")))?;
        let clear = secrets::decrypt_file(&ids, file, &data)?;
        files.insert(file.trim_end_matches(".age").to_string(), clear);
    }
    log.line(format!(
        "decrypted {} secrets file(s) and {} .age file(s)",
        secrets.len(),
        files.len()
    ));
    Ok(Decrypted {
        project,
        secrets,
        files,
    })
}

/// Image repository (without tag) of a node or base image.
pub fn image_repo(system: &System, name: &str) -> String {
    if system.spec.registry == "local" {
        format!("{}/{name}", system.name())
    } else {
        format!("{}/{}/{name}", system.spec.registry, system.name())
    }
}

fn release_config(system: &System, d: &Decrypted) -> ReleaseConfig {
    let p = &d.project;
    let nodes = p
        .nodes
        .iter()
        .map(|n| {
            let c = &p.containers[n.container];
            NodeConfig {
                name: n.name.clone(),
                dir: n.dir.clone(),
                image: image_repo(system, &n.image),
                port: c.port,
                health: c.health.clone(),
                reload: c.reload.clone(),
                reload_signal: c.reload_signal.clone(),
                stop_timeout_ms: c
                    .stop_timeout
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                templates: if c.dir.is_empty() {
                    "templates".into()
                } else {
                    format!("{}/templates", c.dir)
                },
                plugins: n.plugins.iter().map(Plugin::from).collect(),
                root_config: n.root_config.clone(),
                config: n.config.clone(),
            }
        })
        .collect();
    ReleaseConfig {
        format: FORMAT,
        system: system.name().to_string(),
        registry: system.spec.registry.clone(),
        plugins: p.plugins.iter().map(Plugin::from).collect(),
        nodes,
        config_files: p
            .config_files
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    ConfigTemplate {
                        template: v.template.clone(),
                        secrets: v.secrets.clone(),
                    },
                )
            })
            .collect(),
        secrets: d.secrets.clone(),
        files: d
            .files
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    base64::engine::general_purpose::STANDARD.encode(v),
                )
            })
            .collect(),
    }
}

/// The release id: a hash of the archive's content and the release configuration.
pub fn release_id(archive_hash: &str, config_json: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"stretch-release-v1\0");
    h.update(archive_hash.as_bytes());
    h.update(b"\0");
    h.update(config_json);
    h.finalize().to_hex()[..20].to_string()
}

/// Stage 3: write the archive and the release configuration; find out the id.
/// Returns the record, whether it existed, and the chunk files this build added.
async fn archive_stage(
    system: &System,
    home: &Home,
    store: &Store,
    tree: &Arc<source::Tree>,
    config: &ReleaseConfig,
    sources: Vec<Pulled>,
    log: &Log,
) -> Result<(ReleaseRecord, bool, Vec<PathBuf>)> {
    let config_json =
        serde_json::to_vec_pretty(config).map_err(|e| Error::failed("archive", e.to_string()))?;
    let tmp = home
        .releases()
        .join(format!(".building-{}.index.tmp", std::process::id()));
    let (tree, t, h) = (tree.clone(), tmp.clone(), home.clone());
    let meter = log.meter("archive", Unit::Bytes, None);
    let written = blocking(move || {
        let outside = archive::Outside {
            mirrors: &tree.mirrors,
            git: &tree.git,
            sources: &tree.sources,
        };
        archive::write_archive_with(
            &tree.root,
            Some(outside),
            &h.chunks(),
            &t,
            &|_| false,
            Some(&h.chunk_cache()),
            Some(&meter),
        )
    })
    .await?;
    let digest = &written.digest;
    let id = release_id(&digest.hash, &config_json);
    log.line(format!(
        "archived {} files, {} bytes: release id {id}",
        digest.files, digest.bytes
    ));
    log.line(format!(
        "chunks: {} new, {} already stored; {} not read (files unchanged since the last build)",
        written.created.len(),
        written.chunks.saturating_sub(written.created.len()),
        written.cached
    ));
    let keep = |existing: bool| -> Result<()> {
        if existing && home.stored_archive(&id).is_some() {
            let _ = std::fs::remove_file(&tmp);
            return Ok(());
        }
        std::fs::rename(&tmp, home.archive(&id)).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::failed("archive", format!("cannot store the archive: {e}"))
        })
    };
    if let Some(existing) = store.release_by_id(&id)? {
        // The record may have survived without its archive: then it is restored.
        let restore = home.stored_archive(&id).is_none();
        keep(true)?;
        if restore {
            sealed::write(home, &id, &system.spec.release_recipients, &config_json)?;
        }
        return Ok((existing, true, Vec::new()));
    }
    keep(false)?;
    sealed::write(home, &id, &system.spec.release_recipients, &config_json)?;
    let name = name::memorable(&id, &|n| store.name_taken(n).unwrap_or(false));
    let record = ReleaseRecord {
        id,
        name,
        created_at: now_rfc3339(),
        sources,
        images: Vec::new(),
        archive_hash: written.digest.hash,
    };
    Ok((record, false, written.created))
}

/// Stage 6: decrypted `*.age` files join the merged tree (0600) while build hooks run,
/// and leave it when they end, pass or fail: no clear secret stays in the home.
async fn run_plugins(
    system: &System,
    tree: &Arc<source::Tree>,
    d: &Decrypted,
    record: &ReleaseRecord,
    log: &Log,
) -> Result<()> {
    let merged = tree.root.as_path();
    let result = build_hooks(system, tree, d, record, log).await;
    for path in d.files.keys() {
        let _ = std::fs::remove_file(merged.join(path));
    }
    result
}

async fn build_hooks(
    system: &System,
    tree: &Arc<source::Tree>,
    d: &Decrypted,
    record: &ReleaseRecord,
    log: &Log,
) -> Result<()> {
    if d.project.all_plugins().next().is_none() {
        log.line("no build plugins");
        return Ok(());
    }
    let merged = tree.root.as_path();
    // Plugins see the whole tree as files.
    let all = tree.clone();
    let written = blocking(move || all.ensure(&|_| true)).await?;
    if written > 0 {
        log.line(format!(
            "{written} file(s) of git sources written for plugins"
        ));
    }
    // Plugins may write anywhere in the tree: it gets files of its own first.
    let copied = source::materialize(merged)?;
    if copied > 0 {
        log.line(format!(
            "{copied} linked file(s) copied so that plugins cannot change the sources"
        ));
    }
    for (path, data) in &d.files {
        write_private(&merged.join(path), data).map_err(|e| {
            Error::failed("plugins", format!("cannot write decrypted `{path}`: {e}"))
        })?;
    }
    let plugins: Vec<_> = d.project.all_plugins().collect();
    let facts = Facts {
        system: system.name().to_string(),
        environment: None,
        kind: None,
        release: ReleaseFacts {
            id: record.id.clone(),
            name: record.name.clone(),
            path: merged.to_path_buf(),
        },
        existing_release: None,
    };
    plugin::run_all(&plugins, Hook::Build, &facts, merged, log).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        let a = release_id("h1", b"{}");
        assert_eq!(a.len(), 20);
        assert_eq!(a, release_id("h1", b"{}"));
        assert_ne!(a, release_id("h2", b"{}"));
        assert_ne!(a, release_id("h1", b"{ }"));
    }
}
