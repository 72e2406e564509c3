//! Stage 3 of a deploy: render each node's `config.yml` templates with the deploy
//! context, resolve `!secret` tags from the release's decrypted secrets, and merge the
//! layers (root `config`, matching `local_config` blocks, the node's own file).

use serde_yaml_ng::Value as Yaml;

use crate::release::config::{NodeConfig, ReleaseConfig};
use crate::system::project::{local_configs, lookup};
use crate::system::yaml;
use crate::{Error, Result, template};

/// Deep merge: maps merge key by key, anything else is replaced by `over`.
pub fn merge(base: &mut serde_json::Value, over: serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, over) => *slot = over,
    }
}

/// Replace `!secret PATH` tags with values from `secrets` (a decrypted secrets.yml).
fn resolve_secrets(v: Yaml, secrets: &Yaml, file: &str) -> Result<Yaml> {
    Ok(match v {
        Yaml::Tagged(t) if t.tag == "secret" => {
            let path = t.value.as_str().unwrap_or_default().trim().to_string();
            lookup(secrets, &path).cloned().ok_or_else(|| {
                Error::invalid(format!(
                    "{file}: `!secret {path}` is not in the release's secrets"
                ))
            })?
        }
        Yaml::Tagged(mut t) => {
            t.value = resolve_secrets(t.value, secrets, file)?;
            Yaml::Tagged(t)
        }
        Yaml::Mapping(m) => {
            let mut out = serde_yaml_ng::Mapping::new();
            for (k, v) in m {
                out.insert(k, resolve_secrets(v, secrets, file)?);
            }
            Yaml::Mapping(out)
        }
        Yaml::Sequence(s) => Yaml::Sequence(
            s.into_iter()
                .map(|v| resolve_secrets(v, secrets, file))
                .collect::<Result<_>>()?,
        ),
        other => other,
    })
}

/// Render one config file of the release with `ctx` into YAML, secrets resolved.
fn render_file(release: &ReleaseConfig, path: &str, ctx: &minijinja::Value) -> Result<Yaml> {
    let file = release
        .config_files
        .get(path)
        .ok_or_else(|| Error::failed("configuration", format!("release has no `{path}`")))?;
    let rendered = template::render_value(path, &file.template, ctx.clone())?;
    if yaml::is_blank(&rendered) {
        return Ok(Yaml::Null);
    }
    let value: Yaml =
        serde_yaml_ng::from_str(&rendered).map_err(|e| yaml::error(path, &rendered, &e))?;
    let secrets: Yaml = match file.secrets.as_ref().and_then(|s| release.secrets.get(s)) {
        Some(s) => serde_json::from_value(s.clone())
            .map_err(|e| Error::failed("configuration", e.to_string()))?,
        None => Yaml::Null,
    };
    resolve_secrets(value, &secrets, path)
}

fn to_json(v: Yaml, file: &str) -> Result<serde_json::Value> {
    serde_json::to_value(&v)
        .map_err(|e| Error::invalid(format!("{file}: configuration is not plain data: {e}")))
}

/// The configuration tree of `node` for the deploy context `ctx`.
pub fn node_config(
    release: &ReleaseConfig,
    node: &NodeConfig,
    ctx: &minijinja::Value,
) -> Result<serde_json::Value> {
    let mut tree = serde_json::json!({});
    if let Some(root) = &node.root_config {
        let value = render_file(release, root, ctx)?;
        if let Some(c) = value.get("config").cloned() {
            merge(&mut tree, to_json(c, root)?);
        }
        for block in local_configs(&value) {
            if block.includes.iter().any(|n| n == &node.name)
                && let Some(c) = block.config
            {
                merge(&mut tree, to_json(c, root)?);
            }
        }
    }
    if let Some(own) = &node.config {
        let value = render_file(release, own, ctx)?;
        if !value.is_null() {
            merge(&mut tree, to_json(value, own)?);
        }
    }
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::config::ConfigTemplate;
    use std::collections::BTreeMap;

    fn release(files: &[(&str, &str, Option<&str>)], secrets: serde_json::Value) -> ReleaseConfig {
        ReleaseConfig {
            format: 1,
            system: "shop".into(),
            registry: "local".into(),
            plugins: vec![],
            nodes: vec![],
            config_files: files
                .iter()
                .map(|(p, t, s)| {
                    (
                        p.to_string(),
                        ConfigTemplate {
                            template: t.to_string(),
                            secrets: s.map(String::from),
                        },
                    )
                })
                .collect(),
            secrets: BTreeMap::from([("secrets.yml".to_string(), secrets)]),
            files: BTreeMap::new(),
        }
    }

    fn node(root: Option<&str>, own: Option<&str>) -> NodeConfig {
        NodeConfig {
            name: "web".into(),
            dir: "web".into(),
            image: "shop/web".into(),
            port: None,
            health: Default::default(),
            reload: None,
            reload_signal: None,
            stop_timeout_ms: None,
            templates: "web/templates".into(),
            plugins: vec![],
            root_config: root.map(String::from),
            config: own.map(String::from),
        }
    }

    #[test]
    fn layers_merge_in_order() {
        let r = release(
            &[
                (
                    "config.yml",
                    "config: {a: 1, m: {x: 1, y: 1}, pw: !secret db.pw}\nlocal_config:\n  - includes: [web]\n    config: {m: {y: 2}}\n  - includes: [api]\n    config: {a: 9}\n",
                    Some("secrets.yml"),
                ),
                (
                    "web/config.yml",
                    "m: {z: {{ services.port }}}\nenv: {{ environment }}\n",
                    None,
                ),
            ],
            serde_json::json!({"db": {"pw": "hunter2"}}),
        );
        let ctx = template::deploy_context(
            &serde_json::json!({"name": "production", "hosts": {}, "groups": {}}),
            &serde_json::json!({"port": 5432}),
            &serde_json::json!({"id": "r1"}),
            None,
        );
        let tree =
            node_config(&r, &node(Some("config.yml"), Some("web/config.yml")), &ctx).unwrap();
        assert_eq!(
            tree,
            serde_json::json!({"a": 1, "m": {"x": 1, "y": 2, "z": 5432}, "pw": "hunter2", "env": "production"})
        );
    }

    #[test]
    fn undefined_variable_names_file_and_variable() {
        let r = release(
            &[("web/config.yml", "a: {{ services.nope }}\n", None)],
            serde_json::json!({}),
        );
        let ctx = template::deploy_context(
            &serde_json::json!({"name": "p"}),
            &serde_json::json!({}),
            &serde_json::json!({}),
            None,
        );
        match node_config(&r, &node(None, Some("web/config.yml")), &ctx) {
            Err(Error::Config(c)) => assert_eq!(
                (c.file.as_str(), c.message.as_str()),
                ("web/config.yml", "undefined variable `services.nope`")
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn merge_replaces_non_maps() {
        let mut a = serde_json::json!({"l": [1, 2], "m": {"k": 1}});
        merge(&mut a, serde_json::json!({"l": [3], "m": 5}));
        assert_eq!(a, serde_json::json!({"l": [3], "m": 5}));
    }
}
