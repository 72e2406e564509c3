//! Stage 3 of a deploy: the agent spec of every (group, host) — image, instances,
//! ports, health, the node's configuration rendered with the deploy context, and its
//! container templates (checked here for every instance, so that an undefined variable
//! fails the deploy before any host is touched).

use std::collections::BTreeMap;
use std::path::Path;

use crate::agent::api::{self, GroupSpec, HealthSpec, ReleaseRef};
use crate::log::Log;
use crate::release::config::{NodeConfig, ReleaseConfig};
use crate::store::ReleaseRecord;
use crate::system::project::PluginDecl;
use crate::system::{Environment, System};
use crate::{Error, Result, template};

/// One group on one host: where its agent is and what it should run.
#[derive(Debug, Clone)]
pub struct HostGroup {
    pub host: String,
    pub agent: String,
    pub spec: GroupSpec,
}

impl HostGroup {
    pub fn id(&self) -> String {
        super::target_id(&self.spec.key.group, &self.host)
    }
}

/// Plugins of a deploy: the system's, then those of the nodes the environment runs.
pub fn plugins_for(cfg: &ReleaseConfig, nodes: &[&str]) -> Vec<PluginDecl> {
    let mut out: Vec<PluginDecl> = cfg.plugins.iter().map(PluginDecl::from).collect();
    for n in cfg
        .nodes
        .iter()
        .filter(|n| nodes.contains(&n.name.as_str()))
    {
        out.extend(n.plugins.iter().map(PluginDecl::from));
    }
    out
}

/// The environment as templates see it: `{name, hosts, groups}`.
pub fn environment_json(name: &str, env: &Environment) -> serde_json::Value {
    let hosts: serde_json::Map<String, serde_json::Value> = env
        .hosts
        .iter()
        .map(|(k, h)| (k.clone(), serde_json::json!({"name": k, "agent": h.agent})))
        .collect();
    let groups: serde_json::Map<String, serde_json::Value> = env
        .groups
        .iter()
        .map(|(k, g)| {
            let mut group = serde_json::json!({"name": k, "node": g.node, "hosts": g.hosts, "instances": g.instances.unwrap_or(1),
                "batch": g.batch, "listen": g.listen});
            // Only when set, so that records written before it existed read the same.
            if let (Some(p), Some(map)) = (&g.proxy, group.as_object_mut()) {
                map.insert(
                    "proxy".into(),
                    serde_json::json!({"response_timeout": p.response_timeout}),
                );
            }
            if let (false, Some(map)) = (g.domains.is_empty(), group.as_object_mut()) {
                map.insert("domains".into(), serde_json::json!(g.domains));
            }
            if let (Some(t), Some(map)) = (&g.tls, group.as_object_mut()) {
                let tls = match &t.acme {
                    Some(a) => serde_json::json!({"acme": {"email": a.email, "directory": a.directory}}),
                    None => serde_json::json!({"certificate": t.certificate, "key": t.key}),
                };
                map.insert("tls".into(), tls);
            }
            (k.clone(), group)
        })
        .collect();
    serde_json::json!({"name": name, "hosts": hosts, "groups": groups, "services": env.services})
}

/// The decrypted `*.age` files of `node`'s container folder, by path inside it.
fn secret_files(cfg: &ReleaseConfig, node: &NodeConfig) -> BTreeMap<String, String> {
    let dir = node.templates.strip_suffix("templates").unwrap_or_default();
    cfg.files
        .iter()
        .filter_map(|(path, data)| {
            let rel = path.strip_prefix(dir)?;
            Some((rel.to_string(), data.clone()))
        })
        .collect()
}

/// The reference agents run for `repo` (`REGISTRY/SYSTEM/NODE`) of `release`, and the
/// image id they must find: pinned to what the build recorded, so a tag moved since
/// changes nothing. Releases recorded without digests run by tag.
fn pinned_image(release: &ReleaseRecord, repo: &str, local: bool) -> (String, Option<String>) {
    let tag = format!("{repo}:{}", release.id);
    let digest = release
        .images
        .iter()
        .find(|i| i.name == tag)
        .and_then(|i| i.digest.clone());
    match digest {
        Some(id) if local => (tag, Some(id)),
        Some(digest) => (format!("{repo}@{digest}"), None),
        None => (tag, None),
    }
}

pub fn release_ref(r: &ReleaseRecord) -> ReleaseRef {
    ReleaseRef {
        id: r.id.clone(),
        name: r.name.clone(),
        created_at: r.created_at.clone(),
    }
}

/// The TLS key paths of every group of the system: decrypted, they stay in memory.
pub fn tls_keys(system: &System) -> std::collections::BTreeSet<String> {
    system
        .spec
        .environments
        .values()
        .flat_map(|e| e.groups.values())
        .filter_map(|g| g.tls.as_ref()?.key.clone())
        .collect()
}

/// A group's HTTPS as its agents take it: the certificate and key read from the
/// release (a decrypted `*.age` file first, kept in memory), or where ACME is asked.
fn tls_spec(
    group_name: &str,
    group: &crate::system::Group,
    release: &ReleaseRecord,
    cfg: &ReleaseConfig,
    buffer: &Path,
) -> Result<Option<api::TlsSpec>> {
    let Some(tls) = &group.tls else {
        return Ok(None);
    };
    if let Some(acme) = &tls.acme {
        return Ok(Some(api::TlsSpec::Acme {
            email: acme.email.clone(),
            directory: acme
                .directory
                .clone()
                .unwrap_or_else(|| crate::system::LETS_ENCRYPT.to_string()),
        }));
    }
    let read = |path: &str| -> Result<String> {
        let missing = |why: String| {
            Error::invalid_with_help(
                format!("group `{group_name}`: TLS file `{path}` {why}"),
                format!(
                    "the path is inside release {} (a key may be shipped as `{path}.age`)",
                    release.id
                ),
            )
        };
        if let Some(b64) = cfg.files.get(path) {
            let raw = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64)
                .map_err(|e| missing(format!("cannot be decoded: {e}")))?;
            return String::from_utf8(raw).map_err(|_| missing("is not PEM text".into()));
        }
        let file = buffer.join(path);
        match std::fs::symlink_metadata(&file) {
            Ok(m) if m.is_file() => {
                std::fs::read_to_string(&file).map_err(|e| missing(format!("cannot be read: {e}")))
            }
            Ok(_) => Err(missing("is not a plain file".into())),
            Err(_) => Err(missing(format!("is not in release {}", release.id))),
        }
    };
    match (&tls.certificate, &tls.key) {
        (Some(c), Some(k)) => Ok(Some(api::TlsSpec::Files {
            certificate: read(c)?,
            key: read(k)?,
        })),
        // Checked when the system file is loaded.
        _ => Ok(None),
    }
}

/// Every file under `dir`, by path relative to it, as text.
fn read_templates(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    for entry in walkdir::WalkDir::new(dir)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry = entry
            .map_err(|e| Error::failed("configuration", format!("cannot read templates: {e}")))?;
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry
            .path()
            .strip_prefix(dir)
            .unwrap_or(entry.path())
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(entry.path()).map_err(|e| {
            Error::invalid(format!("template `templates/{rel}` is not UTF-8 text: {e}"))
        })?;
        out.insert(rel, text);
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
pub fn build(
    system: &System,
    env_name: &str,
    env: &Environment,
    release: &ReleaseRecord,
    existing: Option<&ReleaseRecord>,
    cfg: &ReleaseConfig,
    buffer: &Path,
    log: &Log,
) -> Result<Vec<HostGroup>> {
    let release_json = serde_json::to_value(release_ref(release)).unwrap_or_default();
    let existing_json = existing.map(|x| serde_json::to_value(release_ref(x)).unwrap_or_default());
    let services = serde_json::to_value(&env.services).unwrap_or_default();
    let ctx = template::deploy_context(
        &environment_json(env_name, env),
        &services,
        &release_json,
        existing_json.as_ref(),
    );
    let mut out = Vec::new();
    for (group_name, group) in &env.groups {
        let node = cfg
            .nodes
            .iter()
            .find(|n| n.name == group.node)
            .ok_or_else(|| {
                let known: Vec<&str> = cfg.nodes.iter().map(|n| n.name.as_str()).collect();
                Error::invalid_with_help(
                    format!(
                        "group `{group_name}` runs node `{}`, which release {} does not have",
                        group.node, release.id
                    ),
                    format!("its nodes: {}", known.join(", ")),
                )
            })?;
        if group.listen.is_some() && node.port.is_none() {
            return Err(Error::invalid(format!(
                "group `{group_name}` has `listen`, but node `{}` declares no `port` in its container.yml",
                node.name
            )));
        }
        let config = super::config::node_config(cfg, node, &ctx)?;
        let templates = read_templates(&buffer.join(&node.templates))?;
        let secrets = secret_files(cfg, node);
        let config_version = api::config_version_with(&config, &templates, &secrets);
        log.line(format!(
            "node `{}`: configuration {config_version}, {} template(s)",
            node.name,
            templates.len()
        ));
        let (image, image_id) = pinned_image(release, &node.image, cfg.registry == "local");
        let tls = tls_spec(group_name, group, release, cfg, buffer)?;
        for host in &group.hosts {
            let agent = env
                .hosts
                .get(host)
                .map(|h| h.agent.clone())
                .unwrap_or_default();
            let spec = GroupSpec {
                key: super::group_key(system, env_name, group_name),
                host: host.clone(),
                node: node.name.clone(),
                release: release_ref(release),
                existing_release: existing.map(release_ref),
                image: image.clone(),
                image_id: image_id.clone(),
                pull: cfg.registry != "local",
                instances: group.instances.unwrap_or(1),
                listen: group.listen,
                port: node.port,
                health: HealthSpec {
                    path: node.health.path.clone(),
                    interval_ms: u64::try_from(node.health.interval.as_millis())
                        .unwrap_or(u64::MAX),
                    timeout_ms: u64::try_from(node.health.timeout.as_millis()).unwrap_or(u64::MAX),
                },
                reload: node.reload.clone(),
                reload_signal: node.reload_signal.clone(),
                stop_timeout_ms: node.stop_timeout_ms,
                response_timeout_ms: group.response_timeout().map(|d| d.as_millis() as u64),
                config: config.clone(),
                config_version: config_version.clone(),
                templates: templates.clone(),
                environment_name: env_name.to_string(),
                secrets: secrets.clone(),
                domains: group
                    .domains
                    .iter()
                    .map(|d| d.to_ascii_lowercase())
                    .collect(),
                tls: tls.clone(),
            };
            for index in 0..spec.instances {
                template::render_templates(&spec.templates, &spec.app_context(index))?;
            }
            out.push(HostGroup {
                host: host.clone(),
                agent,
                spec,
            });
        }
    }
    Ok(out)
}
