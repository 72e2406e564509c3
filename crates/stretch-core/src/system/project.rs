//! The build files of a merged source tree: which nodes there are, their containers
//! (with `from` chains), configuration templates, secrets files and plugins.
//!
//! Paths inside the tree are kept as `/`-separated strings relative to its root
//! (`""` is the root), and every path a build file names must stay inside the tree.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use indexmap::IndexMap;
use serde::Deserialize;
use serde_yaml_ng::Value as Yaml;

use super::yaml;
use crate::{Error, Result, template};

/// A plugin as declared in a `stretch.yml`.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginDecl {
    pub name: String,
    pub options: serde_json::Value,
    /// Folder of the `stretch.yml` that declared it (relative to the tree).
    pub dir: String,
    /// The node it belongs to; `None` for system-level plugins.
    pub node: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub dir: String,
    /// Index into [`Project::containers`].
    pub container: usize,
    /// Image repository name (without registry and system): the container's `name` or the node's.
    pub image: String,
    pub plugins: Vec<PluginDecl>,
    /// The root `config.yml` (several-nodes layout), giving `config` and `local_config`.
    pub root_config: Option<String>,
    /// The node's own `config.yml`.
    pub config: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Container {
    /// The `container.yml` (or the folder, when it has none).
    pub file: String,
    pub dir: String,
    pub name: Option<String>,
    /// The Dockerfile, relative to the tree.
    pub dockerfile: String,
    pub from: Option<usize>,
    pub port: Option<u16>,
    pub health: Health,
    pub reload: Option<Vec<String>>,
    /// A signal (`SIGHUP`, …) sent to the main process instead of running `reload`.
    pub reload_signal: Option<String>,
    pub stop_timeout: Option<Duration>,
}

/// Health check of a node's instances; durations are stored as milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Health {
    pub path: String,
    #[serde(with = "millis")]
    pub interval: Duration,
    #[serde(with = "millis")]
    pub timeout: Duration,
}

/// Signals `reload_signal` accepts: the ones apps reload on (nginx, haproxy, Apache's
/// graceful restart…); stopping signals are refused, a reload must not end the app.
pub const RELOAD_SIGNALS: [&str; 3] = ["SIGHUP", "SIGUSR1", "SIGUSR2"];

/// `hup`, `HUP` or `SIGHUP` → `SIGHUP`, if it is one of [`RELOAD_SIGNALS`].
pub fn signal_name(name: &str) -> Option<String> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    RELOAD_SIGNALS.contains(&full.as_str()).then_some(full)
}

mod millis {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        <u64 as serde::Deserialize>::deserialize(d).map(Duration::from_millis)
    }
}

impl Default for Health {
    fn default() -> Self {
        Health {
            path: "/".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(30),
        }
    }
}

/// A `config.yml` template and the `secrets.yml` its `!secret` tags read.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: String,
    pub template: String,
    pub secrets: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Project {
    pub root: PathBuf,
    /// System-level plugins (several-nodes layout).
    pub plugins: Vec<PluginDecl>,
    pub nodes: Vec<Node>,
    /// Base containers come before the containers built from them.
    pub containers: Vec<Container>,
    pub config_files: IndexMap<String, ConfigFile>,
    /// Every `secrets.yml` a config file reads.
    pub secrets_files: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StretchFile {
    name: Option<String>,
    container: Option<String>,
    nodes: Option<IndexMap<String, String>>,
    plugins: Option<Yaml>,
    #[serde(default)]
    local_stretch: IndexMap<String, LocalStretch>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalStretch {
    includes: Vec<String>,
    plugins: Option<Yaml>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContainerFile {
    dockerfile: Option<String>,
    name: Option<String>,
    from: Option<String>,
    port: Option<u16>,
    health: Option<HealthFile>,
    reload: Option<Vec<String>>,
    reload_signal: Option<String>,
    stop_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthFile {
    path: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RootConfig {
    // Read at deploy time; here only its presence is allowed.
    #[serde(default, rename = "config")]
    _config: Option<Yaml>,
    #[serde(default)]
    local_config: Option<OneOrMany>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(LocalConfig),
    Many(Vec<LocalConfig>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    pub includes: Vec<String>,
    #[serde(default)]
    pub config: Option<Yaml>,
}

/// Join `rel` (as written in a build file in folder `dir`) and check it stays inside
/// the tree, lexically and after following symlinks.
pub fn resolve(root: &Path, dir: &str, rel: &str) -> std::result::Result<String, String> {
    let mut parts: Vec<String> = dir
        .split('/')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if Path::new(rel).is_absolute() {
        return Err(format!(
            "`{rel}` is an absolute path; paths must be relative and stay inside the sources"
        ));
    }
    for c in Path::new(rel).components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if parts.pop().is_none() {
                    return Err(format!("`{rel}` escapes the sources (`..` above the root)"));
                }
            }
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            _ => return Err(format!("`{rel}` is not a relative path")),
        }
    }
    let joined = parts.join("/");
    let full = root.join(&joined);
    if let (Ok(real), Ok(real_root)) = (full.canonicalize(), root.canonicalize())
        && !real.starts_with(&real_root)
    {
        return Err(format!("`{rel}` escapes the sources through a symlink"));
    }
    Ok(joined)
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn parent(path: &str) -> String {
    path.rsplit_once('/')
        .map(|(d, _)| d.to_string())
        .unwrap_or_default()
}

/// Parse a duration written `500ms`, `1s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        "h" => n * 3_600_000.0,
        "d" => n * 86_400_000.0,
        _ => return None,
    };
    (ms.is_finite() && ms >= 0.0).then(|| Duration::from_millis(ms as u64))
}

struct Loader<'a> {
    root: &'a Path,
    /// Called with a relative path before it is looked at: the build tree writes
    /// files it holds only as git blobs.
    fetch: &'a dyn Fn(&str),
    containers: Vec<Container>,
    config_files: IndexMap<String, ConfigFile>,
}

impl Loader<'_> {
    fn read(&self, rel: &str) -> Result<Option<String>> {
        (self.fetch)(rel);
        let full = self.root.join(rel);
        match std::fs::read_to_string(&full) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::invalid(format!("cannot read `{rel}`: {e}"))),
        }
    }

    fn exists(&self, rel: &str) -> bool {
        (self.fetch)(rel);
        self.root.join(rel).exists()
    }

    fn path_error(&self, file: &str, needle: &str, message: String) -> Error {
        match self.read(file) {
            Ok(Some(text)) => {
                let (line, col) = yaml::line_of(&text, needle);
                Error::config(file, &text, line, col, message, None)
            }
            _ => Error::invalid(format!("{file}: {message}")),
        }
    }

    fn stretch_file(&self, rel: &str) -> Result<Option<StretchFile>> {
        match self.read(rel)? {
            Some(text) => Ok(Some(yaml::parse(rel, &text)?)),
            None => Ok(None),
        }
    }

    fn plugins(
        &self,
        file: &str,
        value: Option<&Yaml>,
        node: Option<&str>,
    ) -> Result<Vec<PluginDecl>> {
        let dir = parent(file);
        let make = |name: &Yaml, options: &Yaml| -> Result<PluginDecl> {
            let name = name.as_str().ok_or_else(|| {
                self.path_error(file, "plugins", "a plugin name must be a string".into())
            })?;
            let options = serde_json::to_value(options).map_err(|e| {
                self.path_error(
                    file,
                    name,
                    format!("plugin `{name}`: options must be plain YAML: {e}"),
                )
            })?;
            crate::plugin::declared_env(name, &options)
                .map_err(|(needle, message)| self.path_error(file, &needle, message))?;
            Ok(PluginDecl {
                name: name.to_string(),
                options,
                dir: dir.clone(),
                node: node.map(String::from),
            })
        };
        match value {
            None | Some(Yaml::Null) => Ok(Vec::new()),
            Some(Yaml::Mapping(m)) => m.iter().map(|(k, v)| make(k, v)).collect(),
            Some(Yaml::Sequence(items)) => items
                .iter()
                .map(|item| match item {
                    Yaml::Mapping(m) if m.len() == 1 => {
                        m.iter().map(|(k, v)| make(k, v)).next().unwrap_or_else(|| {
                            Err(self.path_error(file, "plugins", "empty plugin entry".into()))
                        })
                    }
                    _ => Err(self.path_error(
                        file,
                        "plugins",
                        "each item of a `plugins` list must be a one-key map `NAME: options`"
                            .into(),
                    )),
                })
                .collect(),
            Some(_) => Err(self.path_error(
                file,
                "plugins",
                "`plugins` must be a map `NAME: options` or a list of one-key maps".into(),
            )),
        }
    }

    /// Load the container whose `container.yml` is `file` (or the folder `dir` when
    /// there is none), and its bases first. `stack` detects `from` loops.
    fn container(&mut self, file: &str, stack: &mut Vec<String>) -> Result<usize> {
        if let Some(i) = self.containers.iter().position(|c| c.file == file) {
            return Ok(i);
        }
        if let Some(pos) = stack.iter().position(|f| f == file) {
            let mut cycle: Vec<String> = stack[pos..].to_vec();
            cycle.push(file.to_string());
            return Err(Error::invalid_with_help(
                format!("container `from` loop: {}", cycle.join(" -> ")),
                "a base container cannot be built from one of the containers built from it",
            ));
        }
        let is_dir = self.root.join(file).is_dir();
        let (dir, spec, text) = if is_dir {
            (file.to_string(), ContainerFile::default(), String::new())
        } else {
            let text = self
                .read(file)?
                .ok_or_else(|| Error::invalid(format!("container file `{file}` does not exist")))?;
            let spec: ContainerFile = yaml::parse(file, &text)?;
            (parent(file), spec, text)
        };
        let at = |needle: &str, message: String| {
            let (line, col) = yaml::line_of(&text, needle);
            Error::config(file, &text, line, col, message, None)
        };
        let dockerfile_rel = spec
            .dockerfile
            .clone()
            .unwrap_or_else(|| "Dockerfile".into());
        let dockerfile =
            resolve(self.root, &dir, &dockerfile_rel).map_err(|m| at("dockerfile", m))?;
        (self.fetch)(&dockerfile);
        if !self.root.join(&dockerfile).is_file() {
            return Err(Error::invalid_with_help(
                format!("missing Dockerfile: `{dockerfile}` does not exist (container `{file}`)"),
                "add a Dockerfile beside container.yml, or name it with `dockerfile:`",
            ));
        }
        let from = match &spec.from {
            Some(f) => {
                let target = resolve(self.root, &dir, f).map_err(|m| at("from", m))?;
                let target = if self.root.join(&target).is_dir()
                    && self.exists(&join(&target, "container.yml"))
                {
                    join(&target, "container.yml")
                } else {
                    target
                };
                if !self.exists(&target) {
                    return Err(at(
                        "from",
                        format!("`from: {f}`: `{target}` does not exist"),
                    ));
                }
                stack.push(file.to_string());
                let base = self.container(&target, stack)?;
                stack.pop();
                Some(base)
            }
            None => None,
        };
        let duration = |field: &str, v: &Option<String>| -> Result<Option<Duration>> {
            match v {
                None => Ok(None),
                Some(s) => parse_duration(s).map(Some).ok_or_else(|| {
                    at(
                        field,
                        format!(
                            "`{field}: {s}` is not a duration (expected e.g. `500ms`, `1s`, `2m`)"
                        ),
                    )
                }),
            }
        };
        let mut health = Health::default();
        if let Some(h) = &spec.health {
            if let Some(p) = &h.path {
                health.path = p.clone();
            }
            if let Some(d) = duration("interval", &h.interval)? {
                health.interval = d;
            }
            if let Some(d) = duration("timeout", &h.timeout)? {
                health.timeout = d;
            }
        }
        if matches!(&spec.reload, Some(r) if r.is_empty()) {
            return Err(at(
                "reload",
                "`reload` must be a non-empty list of arguments".into(),
            ));
        }
        let reload_signal = match &spec.reload_signal {
            None => None,
            Some(_) if spec.reload.is_some() => {
                return Err(at(
                    "reload_signal",
                    "`reload` and `reload_signal` exclude each other: declare one way to reload"
                        .into(),
                ));
            }
            Some(name) => Some(signal_name(name).ok_or_else(|| {
                at(
                    "reload_signal",
                    format!(
                        "`reload_signal: {name}` is not a signal (expected one of {})",
                        RELOAD_SIGNALS.join(", ")
                    ),
                )
            })?),
        };
        let container = Container {
            file: file.to_string(),
            dir,
            name: spec.name.clone(),
            dockerfile,
            from,
            port: spec.port,
            health,
            reload: spec.reload.clone(),
            reload_signal,
            stop_timeout: duration("stop_timeout", &spec.stop_timeout)?,
        };
        self.containers.push(container);
        Ok(self.containers.len() - 1)
    }

    /// The container of a node in folder `dir`, per its `stretch.yml` `container:`.
    fn node_container(
        &mut self,
        stretch_file: &str,
        dir: &str,
        container: Option<&str>,
    ) -> Result<usize> {
        let file = match container {
            Some(c) => {
                let target =
                    resolve(self.root, dir, c).map_err(|m| self.path_error(stretch_file, c, m))?;
                if !self.exists(&target) {
                    return Err(self.path_error(
                        stretch_file,
                        c,
                        format!("container `{c}` does not exist"),
                    ));
                }
                if self.root.join(&target).is_dir() && self.exists(&join(&target, "container.yml"))
                {
                    join(&target, "container.yml")
                } else {
                    target
                }
            }
            None if self.exists(&join(dir, "container.yml")) => join(dir, "container.yml"),
            None => dir.to_string(),
        };
        self.container(&file, &mut Vec::new())
    }

    fn config_file(&mut self, dir: &str) -> Result<Option<String>> {
        let path = join(dir, "config.yml");
        let Some(template) = self.read(&path)? else {
            return Ok(None);
        };
        let secrets = join(dir, "secrets.yml");
        let secrets = self.exists(&secrets).then_some(secrets);
        self.config_files.insert(
            path.clone(),
            ConfigFile {
                path: path.clone(),
                template,
                secrets,
            },
        );
        Ok(Some(path))
    }
}

impl Project {
    /// Read the build files of the merged tree at `root`.
    pub fn load(root: &Path, system: &str) -> Result<Project> {
        Project::load_with(root, system, &|_| {})
    }

    /// [`load`](Project::load), calling `fetch` with each relative path before it is
    /// looked at.
    pub fn load_with(root: &Path, system: &str, fetch: &dyn Fn(&str)) -> Result<Project> {
        let mut loader = Loader {
            root,
            fetch,
            containers: Vec::new(),
            config_files: IndexMap::new(),
        };
        let top = loader.stretch_file("stretch.yml")?.ok_or_else(|| {
            Error::invalid_with_help(
                "missing `stretch.yml` at the root of the sources",
                "a source declares one node (`name:`) or several (`nodes:`) in its root `stretch.yml`",
            )
        })?;
        let mut nodes = Vec::new();
        let mut plugins = Vec::new();
        if let Some(node_dirs) = &top.nodes {
            if top.name.is_some() || top.container.is_some() {
                return Err(loader.path_error(
                    "stretch.yml",
                    "nodes",
                    "a root `stretch.yml` with `nodes` cannot also have `name` or `container`"
                        .into(),
                ));
            }
            plugins = loader.plugins("stretch.yml", top.plugins.as_ref(), None)?;
            for (name, local) in &top.local_stretch {
                for inc in &local.includes {
                    if !node_dirs.contains_key(inc) {
                        return Err(loader.path_error(
                            "stretch.yml",
                            inc,
                            format!("`local_stretch.{name}` includes unknown node `{inc}`"),
                        ));
                    }
                }
            }
            let root_config = loader.config_file("")?;
            for (name, folder) in node_dirs {
                if !super::valid_name(name) {
                    return Err(loader.path_error(
                        "stretch.yml",
                        name,
                        format!("invalid node name `{name}`"),
                    ));
                }
                let dir = resolve(root, "", folder)
                    .map_err(|m| loader.path_error("stretch.yml", folder, m))?;
                if !root.join(&dir).is_dir() {
                    return Err(loader.path_error(
                        "stretch.yml",
                        folder,
                        format!("node `{name}`: folder `{folder}` does not exist"),
                    ));
                }
                let own_file = join(&dir, "stretch.yml");
                let own = loader.stretch_file(&own_file)?.unwrap_or_default();
                if own.nodes.is_some() || !own.local_stretch.is_empty() {
                    return Err(loader.path_error(
                        &own_file,
                        "nodes",
                        "`nodes` and `local_stretch` belong in the root `stretch.yml`".into(),
                    ));
                }
                let mut node_plugins = Vec::new();
                for local in top
                    .local_stretch
                    .values()
                    .filter(|l| l.includes.contains(name))
                {
                    node_plugins.extend(loader.plugins(
                        "stretch.yml",
                        local.plugins.as_ref(),
                        Some(name),
                    )?);
                }
                node_plugins.extend(loader.plugins(&own_file, own.plugins.as_ref(), Some(name))?);
                let container = loader.node_container(&own_file, &dir, own.container.as_deref())?;
                let config = loader.config_file(&dir)?;
                let image = loader.containers[container]
                    .name
                    .clone()
                    .unwrap_or_else(|| name.clone());
                nodes.push(Node {
                    name: name.clone(),
                    dir,
                    container,
                    image,
                    plugins: node_plugins,
                    root_config: root_config.clone(),
                    config,
                });
            }
        } else {
            if !top.local_stretch.is_empty() {
                return Err(loader.path_error(
                    "stretch.yml",
                    "local_stretch",
                    "`local_stretch` needs `nodes` (several-nodes layout)".into(),
                ));
            }
            let name = top.name.clone().unwrap_or_else(|| system.to_string());
            if !super::valid_name(&name) {
                return Err(loader.path_error(
                    "stretch.yml",
                    "name",
                    format!("invalid node name `{name}`"),
                ));
            }
            let node_plugins = loader.plugins("stretch.yml", top.plugins.as_ref(), Some(&name))?;
            let container = loader.node_container("stretch.yml", "", top.container.as_deref())?;
            let config = loader.config_file("")?;
            let image = loader.containers[container]
                .name
                .clone()
                .unwrap_or_else(|| name.clone());
            nodes.push(Node {
                name,
                dir: String::new(),
                container,
                image,
                plugins: node_plugins,
                root_config: None,
                config,
            });
        }
        let mut secrets_files: Vec<String> = loader
            .config_files
            .values()
            .filter_map(|c| c.secrets.clone())
            .collect();
        secrets_files.dedup();
        for f in &secrets_files {
            fetch(f);
        }
        let project = Project {
            root: root.to_path_buf(),
            plugins,
            nodes,
            containers: loader.containers,
            config_files: loader.config_files,
            secrets_files,
        };
        project.check_configs()?;
        Ok(project)
    }

    /// Check every `config.yml`: it compiles, yields YAML of the right shape, and every
    /// `!secret` path exists in its `secrets.yml` (keys are in clear, so no key is needed).
    fn check_configs(&self) -> Result<()> {
        let node_names: BTreeSet<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        for cf in self.config_files.values() {
            let Some(rendered) = template::render_lenient(&cf.path, &cf.template)? else {
                continue;
            };
            let value: Yaml = if yaml::is_blank(&rendered) {
                Yaml::Null
            } else {
                serde_yaml_ng::from_str(&rendered)
                    .map_err(|e| yaml::error(&cf.path, &rendered, &e))?
            };
            let is_root = self
                .nodes
                .iter()
                .any(|n| n.root_config.as_deref() == Some(cf.path.as_str()));
            if is_root {
                let root: RootConfig = yaml::parse(&cf.path, &rendered)?;
                let blocks = match root.local_config {
                    None => Vec::new(),
                    Some(OneOrMany::One(b)) => vec![b],
                    Some(OneOrMany::Many(v)) => v,
                };
                for b in &blocks {
                    for inc in &b.includes {
                        if !node_names.contains(inc.as_str()) {
                            let (line, col) = yaml::line_of(&rendered, inc);
                            return Err(Error::config(
                                &cf.path,
                                &rendered,
                                line,
                                col,
                                format!("`local_config` includes unknown node `{inc}`"),
                                None,
                            ));
                        }
                    }
                }
            } else if !matches!(value, Yaml::Mapping(_) | Yaml::Null) {
                return Err(Error::config(
                    &cf.path,
                    &rendered,
                    1,
                    1,
                    "a node's `config.yml` must yield a map",
                    None,
                ));
            }
            let mut refs = Vec::new();
            secret_refs(&value, &mut refs);
            if refs.is_empty() {
                continue;
            }
            let secrets: Yaml = match &cf.secrets {
                Some(s) => {
                    let text = std::fs::read_to_string(self.root.join(s))
                        .map_err(|e| Error::invalid(format!("cannot read `{s}`: {e}")))?;
                    if yaml::is_blank(&text) {
                        Yaml::Null
                    } else {
                        serde_yaml_ng::from_str(&text).map_err(|e| yaml::error(s, &text, &e))?
                    }
                }
                None => Yaml::Null,
            };
            for r in refs {
                let path = match &r {
                    Ok(p) => p,
                    Err(()) => {
                        let (line, col) = yaml::line_of(&rendered, "!secret");
                        return Err(Error::config(
                            &cf.path,
                            &rendered,
                            line,
                            col,
                            "`!secret` needs a dotted path to a value of `secrets.yml`, e.g. `!secret db.password`",
                            None,
                        ));
                    }
                };
                if lookup(&secrets, path).is_none() {
                    let (line, col) = yaml::line_of(&rendered, path);
                    let file = cf
                        .secrets
                        .clone()
                        .unwrap_or_else(|| join(&parent(&cf.path), "secrets.yml"));
                    return Err(Error::config(
                        &cf.path,
                        &rendered,
                        line,
                        col,
                        format!("`!secret {path}`: `{file}` has no value at `{path}`"),
                        Some(format!(
                            "add `{path}` to `{file}` and encrypt it with `stretch secrets encrypt`"
                        )),
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Every plugin in execution order: system-level, then each node's.
    pub fn all_plugins(&self) -> impl Iterator<Item = &PluginDecl> {
        self.plugins
            .iter()
            .chain(self.nodes.iter().flat_map(|n| n.plugins.iter()))
    }
}

/// Collect the paths of every `!secret PATH` tag (`Err` for a malformed one).
pub fn secret_refs(v: &Yaml, out: &mut Vec<std::result::Result<String, ()>>) {
    match v {
        Yaml::Tagged(t) if t.tag == "secret" => match t.value.as_str() {
            Some(p) if !p.trim().is_empty() => out.push(Ok(p.trim().to_string())),
            _ => out.push(Err(())),
        },
        Yaml::Tagged(t) => secret_refs(&t.value, out),
        Yaml::Mapping(m) => m.values().for_each(|v| secret_refs(v, out)),
        Yaml::Sequence(s) => s.iter().for_each(|v| secret_refs(v, out)),
        _ => {}
    }
}

/// The value at a dotted path (`a.b.0.c`) of a YAML document.
pub fn lookup<'a>(v: &'a Yaml, dotted: &str) -> Option<&'a Yaml> {
    dotted.split('.').try_fold(v, |cur, key| match cur {
        Yaml::Mapping(m) => m.get(key),
        Yaml::Sequence(s) => key.parse::<usize>().ok().and_then(|i| s.get(i)),
        _ => None,
    })
}

/// The `local_config` blocks of a rendered root `config.yml`, for the deploy step.
pub fn local_configs(root: &Yaml) -> Vec<LocalConfig> {
    let parsed: Option<RootConfig> = serde_yaml_ng::from_value(root.clone()).ok();
    match parsed.and_then(|r| r.local_config) {
        None => Vec::new(),
        Some(OneOrMany::One(b)) => vec![b],
        Some(OneOrMany::Many(v)) => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        dir
    }

    fn load(files: &[(&str, &str)]) -> Result<Project> {
        let t = tree(files);
        Project::load(t.path(), "shop")
    }

    fn err(files: &[(&str, &str)]) -> String {
        match load(files) {
            Ok(_) => "ok".into(),
            Err(Error::Config(c)) => format!("{}:{}:{} {}", c.file, c.line, c.column, c.message),
            Err(e) => e.to_string(),
        }
    }

    const DF: (&str, &str) = ("Dockerfile", "FROM x\n");

    #[test]
    fn one_node() {
        let p = load(&[
            (
                "stretch.yml",
                "name: web\nplugins: {exec: {build: 'true'}}\n",
            ),
            DF,
            ("config.yml", "a: 1\n"),
        ])
        .unwrap();
        assert_eq!(p.nodes.len(), 1);
        let n = &p.nodes[0];
        assert_eq!(
            (n.name.as_str(), n.image.as_str(), n.config.as_deref()),
            ("web", "web", Some("config.yml"))
        );
        assert_eq!(p.containers[0].file, "");
        assert_eq!(n.plugins[0].name, "exec");
        assert_eq!(n.plugins[0].node.as_deref(), Some("web"));
    }

    #[test]
    fn several_nodes_with_bases() {
        let p = load(&[
            (
                "stretch.yml",
                "nodes: {web: node_1, worker: node_2}\nplugins:\n  - exec: {build: a}\n  - exec: {build: b}\nlocal_stretch:\n  x: {includes: [worker], plugins: {p1: {}}}\n",
            ),
            ("config.yml", "config: {a: 1}\nlocal_config:\n  includes: [web]\n  config: {b: 2}\n"),
            ("containers/base/container.yml", "name: base\n"),
            ("containers/base/Dockerfile", "FROM x\n"),
            ("containers/mid/container.yml", "from: ../base/container.yml\n"),
            ("containers/mid/Dockerfile", "RUN true\n"),
            ("node_1/container.yml", "from: ../containers/mid\nport: 80\nhealth: {path: /h, interval: 500ms}\n"),
            ("node_1/Dockerfile", "RUN true\n"),
            ("node_2/stretch.yml", "plugins: {p2: {}}\n"),
            ("node_2/Dockerfile", "FROM x\n"),
        ])
        .unwrap();
        let files: Vec<&str> = p.containers.iter().map(|c| c.file.as_str()).collect();
        assert_eq!(
            files,
            [
                "containers/base/container.yml",
                "containers/mid/container.yml",
                "node_1/container.yml",
                "node_2"
            ]
        );
        assert_eq!(p.containers[2].from, Some(1));
        assert_eq!(p.containers[2].health.interval, Duration::from_millis(500));
        assert_eq!(p.plugins.len(), 2);
        let w = p.node("worker").unwrap();
        let names: Vec<&str> = w.plugins.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["p1", "p2"]);
        assert_eq!(w.plugins[1].dir, "node_2");
        assert_eq!(
            p.node("web").unwrap().root_config.as_deref(),
            Some("config.yml")
        );
        assert_eq!(p.all_plugins().count(), 4);
    }

    #[test]
    fn plugin_env_declarations() {
        let p = load(&[
            (
                "stretch.yml",
                "name: web\nplugins: {exec: {build: 'true', env: [NPM_TOKEN, LC_ALL]}}\n",
            ),
            DF,
        ])
        .unwrap();
        assert_eq!(p.nodes[0].plugins[0].options["env"][0], "NPM_TOKEN");
        assert_eq!(
            err(&[
                (
                    "stretch.yml",
                    "name: web\nplugins:\n  exec:\n    build: 'true'\n    env: [NPM_TOKEN, STRETCH_AGENT_TOKEN]\n",
                ),
                DF,
            ]),
            "stretch.yml:5:22 plugin `exec`: env `STRETCH_AGENT_TOKEN` is a stretch credential, never given to plugins"
        );
        let deploy_tool = err(&[
            (
                "stretch.yml",
                "name: web\nplugins:\n  - notify: {env: [STRETCH_IDENTITY]}\n",
            ),
            DF,
        ]);
        assert!(
            deploy_tool.starts_with("stretch.yml:3:20 plugin `notify`: env `STRETCH_IDENTITY`"),
            "{deploy_tool}"
        );
        assert_eq!(
            err(&[
                (
                    "stretch.yml",
                    "name: web\nplugins: {exec: {env: [STRETCH_HOME]}}\n"
                ),
                DF,
            ]),
            "stretch.yml:2:24 plugin `exec`: env `STRETCH_HOME`: `STRETCH_*` variables are stretch's own (plugins get their facts without declaring them)"
        );
        assert_eq!(
            err(&[
                (
                    "stretch.yml",
                    "name: web\nplugins: {exec: {env: NPM_TOKEN}}\n"
                ),
                DF,
            ]),
            "stretch.yml:2:18 plugin `exec`: `env` must be a list of variable names"
        );
        assert_eq!(
            err(&[
                ("stretch.yml", "name: web\nplugins: {exec: {env: [A-B]}}\n"),
                DF,
            ]),
            "stretch.yml:2:24 plugin `exec`: env `A-B` is not a variable name"
        );
    }

    #[test]
    fn bad_inputs() {
        assert_eq!(
            err(&[DF]),
            "missing `stretch.yml` at the root of the sources"
        );
        assert_eq!(
            err(&[("stretch.yml", "name: web\n")]),
            "missing Dockerfile: `Dockerfile` does not exist (container ``)"
        );
        assert_eq!(
            err(&[("stretch.yml", "nmae: web\n"), DF]),
            "stretch.yml:1:1 unknown field `nmae`, expected one of `name`, `container`, `nodes`, `plugins`, `local_stretch`"
        );
        assert_eq!(
            err(&[("stretch.yml", "nodes: {web: nope}\n")]),
            "stretch.yml:1:14 node `web`: folder `nope` does not exist"
        );
        assert_eq!(
            err(&[("stretch.yml", "nodes: {web: ../x}\n")]),
            "stretch.yml:1:14 `../x` escapes the sources (`..` above the root)"
        );
        assert_eq!(
            err(&[
                ("stretch.yml", "name: web\n"),
                ("container.yml", "from: a/container.yml\n"),
                DF,
                ("a/container.yml", "from: ../container.yml\n"),
                ("a/Dockerfile", "")
            ]),
            "container `from` loop: container.yml -> a/container.yml -> container.yml"
        );
        assert_eq!(
            err(&[
                ("stretch.yml", "name: web\n"),
                DF,
                ("config.yml", "p: !secret db.pass\n"),
                ("secrets.yml", "db: {user: x}\n")
            ]),
            "config.yml:1:12 `!secret db.pass`: `secrets.yml` has no value at `db.pass`"
        );
        assert_eq!(
            err(&[("stretch.yml", "name: web\n"), DF, ("config.yml", "a: [\n")]),
            "config.yml:2:1 did not find expected node content"
        );
        assert_eq!(
            err(&[
                ("stretch.yml", "name: web\n"),
                ("container.yml", "health: {interval: soon}\n"),
                DF
            ]),
            "container.yml:1:10 `interval: soon` is not a duration (expected e.g. `500ms`, `1s`, `2m`)"
        );
        assert_eq!(
            err(&[
                ("stretch.yml", "name: web\n"),
                ("container.yml", "reload: [x]\nreload_signal: HUP\n"),
                DF
            ]),
            "container.yml:2:1 `reload` and `reload_signal` exclude each other: declare one way to reload"
        );
        assert!(
            err(&[
                ("stretch.yml", "name: web\n"),
                ("container.yml", "reload_signal: KILL\n"),
                DF
            ])
            .starts_with(
                "container.yml:1:1 `reload_signal: KILL` is not a signal (expected one of SIGHUP"
            )
        );
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name("hup").as_deref(), Some("SIGHUP"));
        assert_eq!(signal_name("SIGUSR2").as_deref(), Some("SIGUSR2"));
        assert_eq!(signal_name(" usr1 ").as_deref(), Some("SIGUSR1"));
        assert_eq!(signal_name("TERM"), None);
        assert_eq!(signal_name("9"), None);
    }

    #[cfg(unix)]
    #[test]
    fn symlink_escape() {
        let t = tree(&[("stretch.yml", "nodes: {web: link}\n")]);
        std::os::unix::fs::symlink("/tmp", t.path().join("link")).unwrap();
        match Project::load(t.path(), "shop") {
            Err(Error::Config(c)) => assert!(
                c.message.contains("escapes the sources through a symlink"),
                "{}",
                c.message
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("1d"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1w"), None);
    }

    #[test]
    fn lookups() {
        let v: Yaml = serde_yaml_ng::from_str("a: {b: [x, {c: 1}]}").unwrap();
        assert!(lookup(&v, "a.b.1.c").is_some());
        assert!(lookup(&v, "a.b.2").is_none());
        let r: Yaml =
            serde_yaml_ng::from_str("local_config: [{includes: [web], config: {a: 1}}]").unwrap();
        assert_eq!(local_configs(&r)[0].includes, ["web"]);
    }
}
