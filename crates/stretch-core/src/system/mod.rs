//! The operator's `system.yml` and the build files inside sources: types, loading and
//! validation. Every error points at a file, line and column.

pub mod project;
pub mod yaml;

use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde::Deserialize;

use crate::agent::api::MAX_INSTANCES;
use crate::{Error, Result};

/// `system.yml`, as written by the operator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemFile {
    pub system: String,
    #[serde(default = "default_registry")]
    pub registry: String,
    /// Age recipients the release configuration (decrypted secrets) is sealed to.
    #[serde(default)]
    pub release_recipients: Vec<String>,
    pub sources: Vec<SourceSpec>,
    #[serde(default)]
    pub environments: IndexMap<String, Environment>,
}

fn default_registry() -> String {
    "local".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    pub name: Option<String>,
    pub git: Option<String>,
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    pub path: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    #[serde(default)]
    pub auto_deploy: bool,
    pub agent_token_file: Option<String>,
    /// A PEM file (relative to the system file) of the CA that signed the agents'
    /// certificates; without it, hosts are pinned (`fingerprint`) or trusted on first use.
    pub agent_ca: Option<String>,
    /// How long a deploy's lease on the agents lives unless renewed (`2m`, `30s`): a
    /// killed deploy's lease expires after it.
    pub lease_ttl: Option<String>,
    #[serde(default)]
    pub services: IndexMap<String, serde_json::Value>,
    #[serde(default)]
    pub hosts: IndexMap<String, Host>,
    #[serde(default)]
    pub groups: IndexMap<String, Group>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub agent: String,
    /// The agent's certificate, pinned: `sha256:` + 64 hex digits.
    pub fingerprint: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub node: String,
    pub hosts: Vec<String>,
    pub instances: Option<u32>,
    pub batch: Option<u32>,
    pub listen: Option<u16>,
    /// Host names this group answers on its `listen` port, shared with other groups.
    #[serde(default)]
    pub domains: Vec<String>,
    /// HTTPS on the `listen` port.
    pub tls: Option<TlsSettings>,
    pub proxy: Option<ProxySettings>,
}

/// A group's HTTPS: a certificate and key from the release, or ACME.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// Path in the release (PEM, leaf first).
    pub certificate: Option<String>,
    /// Path in the release (PEM); `certs/x.key` is also found as `certs/x.key.age`.
    pub key: Option<String>,
    pub acme: Option<AcmeSettings>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AcmeSettings {
    pub email: Option<String>,
    /// The directory URL (default: Let's Encrypt's).
    pub directory: Option<String>,
}

/// Where certificates come from when `acme:` names no directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// How the agent's proxy treats a group's requests.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    /// How long the proxy waits for an instance's response head (`60s`, `2m`).
    pub response_timeout: Option<String>,
}

/// How long a lease lives unless renewed, by default.
pub const DEFAULT_LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(120);

impl Environment {
    /// The lease time to live (validated at load).
    pub fn lease_ttl(&self) -> std::time::Duration {
        self.lease_ttl
            .as_deref()
            .and_then(project::parse_duration)
            .unwrap_or(DEFAULT_LEASE_TTL)
    }
}

impl Group {
    /// The proxy's response timeout, if set (validated at load).
    pub fn response_timeout(&self) -> Option<std::time::Duration> {
        self.proxy
            .as_ref()
            .and_then(|p| p.response_timeout.as_deref())
            .and_then(project::parse_duration)
    }
}

/// A source, resolved: where it comes from and its label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    pub kind: SourceKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// A git repository: a URL, or a local path made absolute.
    Git {
        url: String,
        git_ref: Option<String>,
    },
    /// A plain directory, absolute.
    Path { path: PathBuf },
}

/// A loaded, validated system file.
#[derive(Debug, Clone)]
pub struct System {
    pub file: PathBuf,
    pub dir: PathBuf,
    pub spec: SystemFile,
    pub sources: Vec<Source>,
    text: String,
}

impl System {
    pub fn load(file: &Path) -> Result<System> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            Error::invalid_with_help(
                format!("cannot read system file `{}`: {e}", file.display()),
                "pass `--system FILE`, or run `stretch init` to write an example",
            )
        })?;
        let label = file.display().to_string();
        let spec: SystemFile = yaml::parse(&label, &text)?;
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let dir = dir.canonicalize().unwrap_or(dir);
        let mut system = System {
            file: file.to_path_buf(),
            dir,
            spec,
            sources: Vec::new(),
            text,
        };
        system.validate()?;
        Ok(system)
    }

    /// An error pointing at the first place `needle` appears in system.yml.
    pub fn error_at(
        &self,
        needle: &str,
        message: impl Into<String>,
        help: Option<String>,
    ) -> Error {
        let (line, column) = yaml::line_of(&self.text, needle);
        Error::config(
            self.file.display().to_string(),
            &self.text,
            line,
            column,
            message,
            help,
        )
    }

    /// An error pointing at the first `needle` at or after the first line holding
    /// `anchor` (say, a group's `instances` rather than another group's).
    fn error_after(
        &self,
        anchor: &str,
        needle: &str,
        message: impl Into<String>,
        help: Option<String>,
    ) -> Error {
        let (from, _) = yaml::line_of(&self.text, anchor);
        let rest: String = self
            .text
            .lines()
            .skip(from - 1)
            .collect::<Vec<_>>()
            .join("\n");
        let (line, column) = if rest.contains(needle) {
            let (l, c) = yaml::line_of(&rest, needle);
            (from - 1 + l, c)
        } else {
            yaml::line_of(&self.text, anchor)
        };
        Error::config(
            self.file.display().to_string(),
            &self.text,
            line,
            column,
            message,
            help,
        )
    }

    /// Is there somewhere to seal release configurations to? Required with a registry:
    /// releases then travel to other homes, and must hold no clear secret.
    pub fn check_release_recipients(&self) -> Result<()> {
        if self.spec.registry != "local" && self.spec.release_recipients.is_empty() {
            return Err(self.error_at(
                "registry:",
                "a system with a registry needs `release_recipients`",
                Some(
                    "releases are stored in the registry with their secrets sealed to age \
                     recipients: make a release key with `stretch keys generate -o release.key` \
                     and list its public key (`age1…`) under `release_recipients:`; deploys then \
                     need that key (`--release-identity release.key`)"
                        .into(),
                ),
            ));
        }
        Ok(())
    }

    fn validate(&mut self) -> Result<()> {
        let name = self.spec.system.clone();
        for r in &self.spec.release_recipients {
            if let Err(e) = crate::secrets::parse_recipients(std::slice::from_ref(r)) {
                // A pasted secret key is never quoted back: no excerpt of its line.
                if r.starts_with("AGE-SECRET-KEY-") {
                    let (line, column) = yaml::line_of(&self.text, "release_recipients");
                    return Err(Error::invalid_with_help(
                        format!("{}:{line}:{column}: {e}", self.file.display()),
                        "list public keys (`age1…`, the `# public key:` line of a key file), never a secret key",
                    ));
                }
                return Err(self.error_at(r, e.to_string(), e.help().map(String::from)));
            }
        }
        if !valid_name(&name) {
            return Err(self.error_at(
                "system:",
                format!("invalid system name `{name}`"),
                Some("a system name matches `[a-z0-9][a-z0-9_-]*`".into()),
            ));
        }
        if self.spec.sources.is_empty() {
            return Err(self.error_at(
                "sources",
                "`sources` is empty",
                Some("list at least one `git:` or `path:` source".into()),
            ));
        }
        let mut sources = Vec::new();
        for (i, s) in self.spec.sources.iter().enumerate() {
            let name = s.name.clone().unwrap_or_else(|| (i + 1).to_string());
            if sources.iter().any(|x: &Source| x.name == name) {
                return Err(self.error_at(
                    &format!("name: {name}"),
                    format!("two sources are named `{name}`"),
                    None,
                ));
            }
            let kind = match (&s.git, &s.path) {
                (Some(url), None) => SourceKind::Git {
                    url: self.git_url(url),
                    git_ref: s.git_ref.clone(),
                },
                (None, Some(p)) if s.git_ref.is_none() => SourceKind::Path {
                    path: self.dir.join(p),
                },
                (None, Some(p)) => {
                    return Err(self.error_at(
                        p,
                        format!("source `{name}`: `ref` only applies to `git` sources"),
                        None,
                    ));
                }
                _ => {
                    return Err(self.error_at(
                        "sources",
                        format!("source `{name}` needs exactly one of `git` or `path`"),
                        None,
                    ));
                }
            };
            sources.push(Source { name, kind });
        }
        self.sources = sources;
        for (env_name, env) in &self.spec.environments {
            if !valid_name(env_name) {
                return Err(self.error_at(
                    env_name,
                    format!("invalid environment name `{env_name}`"),
                    None,
                ));
            }
            for (host_name, host) in &env.hosts {
                if let Some(fp) = &host.fingerprint
                    && crate::net::tls::parse_fingerprint(fp).is_none()
                {
                    return Err(self.error_at(
                        fp,
                        format!("host `{host_name}` of environment `{env_name}`: `{fp}` is not a certificate fingerprint"),
                        Some("write `sha256:` and 64 hex digits, as `stretch agent --print-fingerprint` prints it".into()),
                    ));
                }
            }
            if let Some(t) = &env.lease_ttl
                && project::parse_duration(t).is_none_or(|d| d < std::time::Duration::from_secs(1))
            {
                return Err(self.error_at(
                    &format!("lease_ttl: {t}"),
                    format!("environment `{env_name}`: `lease_ttl` `{t}` is not a duration of a second or more"),
                    Some("write e.g. `30s` or `2m`".into()),
                ));
            }
            for (group_name, group) in &env.groups {
                if let Some(t) = group
                    .proxy
                    .as_ref()
                    .and_then(|p| p.response_timeout.as_deref())
                    && project::parse_duration(t).is_none_or(|d| d.is_zero())
                {
                    return Err(self.error_at(
                        &format!("response_timeout: {t}"),
                        format!("group `{group_name}`: `response_timeout` `{t}` is not a duration"),
                        Some("write e.g. `500ms`, `30s` or `2m`".into()),
                    ));
                }
                for h in &group.hosts {
                    if !env.hosts.contains_key(h) {
                        let known: Vec<&str> = env.hosts.keys().map(String::as_str).collect();
                        return Err(self.error_at(
                            &format!("{group_name}:"),
                            format!("group `{group_name}` of environment `{env_name}` names unknown host `{h}`"),
                            Some(format!("hosts of `{env_name}`: {}", known.join(", "))),
                        ));
                    }
                }
                self.check_edge(env_name, env, group_name, group)?;
                if group.batch == Some(0) || group.instances == Some(0) {
                    return Err(self.error_at(
                        &format!("{group_name}:"),
                        format!("group `{group_name}`: `batch` and `instances` must be at least 1"),
                        None,
                    ));
                }
                if let Some(n) = group.instances.filter(|n| *n > MAX_INSTANCES) {
                    return Err(self.error_after(
                        &format!("{group_name}:"),
                        "instances",
                        format!(
                            "group `{group_name}` of environment `{env_name}`: `instances` is {n}; at most {MAX_INSTANCES} run per host"
                        ),
                        Some("run more hosts in the group instead".into()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A group's `domains` and `tls`, and its port shared with the groups before it.
    fn check_edge(
        &self,
        env_name: &str,
        env: &Environment,
        group_name: &str,
        group: &Group,
    ) -> Result<()> {
        let at = format!("{group_name}:");
        let err = |message: String, help: Option<String>| Err(self.error_at(&at, message, help));
        if group.listen.is_none() && (group.tls.is_some() || !group.domains.is_empty()) {
            return err(
                format!("group `{group_name}` has `domains` or `tls` but no `listen` port"),
                Some("add e.g. `listen: 443`".into()),
            );
        }
        for d in &group.domains {
            if !crate::agent::api::valid_domain(&d.to_ascii_lowercase()) {
                return Err(self.error_at(
                    d,
                    format!("group `{group_name}`: `{d}` is not a host name"),
                    Some("write names like `shop.example.com`, or `*.example.com` for one label of any name".into()),
                ));
            }
        }
        if let Some(tls) = &group.tls {
            match (&tls.certificate, &tls.key, &tls.acme) {
                (Some(c), Some(k), None) => {
                    for path in [c, k] {
                        if !relative_path(path) {
                            return Err(self.error_at(
                                path,
                                format!("group `{group_name}`: TLS file `{path}` must be a relative path inside the release"),
                                Some("paths are relative to the release root, without `..`".into()),
                            ));
                        }
                    }
                }
                (None, None, Some(acme)) => {
                    if group.domains.is_empty() {
                        return err(
                            format!(
                                "group `{group_name}`: `tls: {{acme: …}}` needs `domains` to ask certificates for"
                            ),
                            None,
                        );
                    }
                    if let Some(d) = group.domains.iter().find(|d| d.starts_with("*.")) {
                        return err(
                            format!(
                                "group `{group_name}`: `{d}`: ACME certificates (HTTP-01) cannot be wildcards"
                            ),
                            Some(
                                "give the names one by one, or use `tls: {certificate, key}`"
                                    .into(),
                            ),
                        );
                    }
                    if let Some(dir) = &acme.directory
                        && !dir.starts_with("https://")
                    {
                        return Err(self.error_at(
                            dir,
                            format!("group `{group_name}`: the ACME directory `{dir}` must be an https:// URL"),
                            None,
                        ));
                    }
                }
                _ => {
                    return err(
                        format!("group `{group_name}`: `tls` takes `certificate` and `key`, or `acme`"),
                        Some("e.g. `tls: {certificate: certs/shop.pem, key: certs/shop.key}` or `tls: {acme: {email: ops@example.com}}`".into()),
                    );
                }
            }
        }
        let Some(port) = group.listen else {
            return Ok(());
        };
        let lower = |g: &Group| -> Vec<String> {
            g.domains.iter().map(|d| d.to_ascii_lowercase()).collect()
        };
        let mine = lower(group);
        let earlier = env
            .groups
            .iter()
            .take_while(|(n, _)| *n != group_name)
            .filter(|(_, g)| {
                g.listen == Some(port) && g.hosts.iter().any(|h| group.hosts.contains(h))
            });
        for (other, g) in earlier {
            let theirs = lower(g);
            if mine.is_empty() && theirs.is_empty() {
                return err(
                    format!(
                        "groups `{other}` and `{group_name}` of environment `{env_name}` share a host and both listen on port {port}"
                    ),
                    Some("give each group its own `listen` port, or `domains` to share one".into()),
                );
            }
            if g.tls.is_some() != group.tls.is_some() {
                return err(
                    format!(
                        "groups `{other}` and `{group_name}` of environment `{env_name}` share port {port} on a host, but only one has `tls`"
                    ),
                    Some("a port is all HTTPS or all plain HTTP".into()),
                );
            }
            if let Some(d) = mine.iter().find(|d| theirs.contains(d)) {
                return err(
                    format!(
                        "groups `{other}` and `{group_name}` of environment `{env_name}` both claim `{d}` on port {port}"
                    ),
                    Some("a name belongs to one group per port".into()),
                );
            }
        }
        Ok(())
    }

    /// Local repository paths are made absolute, relative to the system file.
    fn git_url(&self, url: &str) -> String {
        let is_remote = url.contains("://") || (url.contains('@') && url.contains(':'));
        if is_remote {
            url.to_string()
        } else {
            self.dir.join(url).display().to_string()
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.system
    }

    /// Override a git source's ref (`--source NAME=REF`).
    pub fn override_ref(&mut self, name: &str, git_ref: &str) -> Result<()> {
        let known: Vec<String> = self.sources.iter().map(|s| s.name.clone()).collect();
        let source = self
            .sources
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                Error::invalid_with_help(
                    format!("`--source {name}=…`: no source is named `{name}`"),
                    format!("sources: {}", known.join(", ")),
                )
            })?;
        match &mut source.kind {
            SourceKind::Git { git_ref: r, .. } => {
                *r = Some(git_ref.to_string());
                Ok(())
            }
            SourceKind::Path { .. } => Err(Error::invalid(format!(
                "`--source {name}=…`: source `{name}` is a path, not a git source"
            ))),
        }
    }
}

/// `[a-z0-9][a-z0-9_-]*`
pub fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// A path inside a release: relative, no `..`, not empty.
fn relative_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && p.split('/').all(|c| !c.is_empty() && c != ".." && c != ".")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<System> {
        let dir = tempfile::tempdir().map_err(|e| Error::invalid(e.to_string()))?;
        let file = dir.path().join("system.yml");
        std::fs::write(&file, text).map_err(|e| Error::invalid(e.to_string()))?;
        System::load(&file)
    }

    fn message(text: &str) -> String {
        match load(text) {
            Ok(_) => "ok".into(),
            Err(Error::Config(c)) => format!("{}:{} {}", c.line, c.column, c.message),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn minimal() {
        let s = load("system: shop\nsources:\n  - path: ./app\n  - name: o\n    git: ../repo\n    ref: main\n").unwrap();
        assert_eq!(s.spec.registry, "local");
        assert_eq!(s.sources[0].name, "1");
        assert!(
            matches!(&s.sources[1].kind, SourceKind::Git { git_ref: Some(r), .. } if r == "main")
        );
    }

    #[test]
    fn domains_and_tls_errors() {
        let env = |groups: &str| {
            message(&format!(
                "system: shop\nsources: [{{path: .}}]\nenvironments:\n  p:\n    hosts: {{a: {{agent: x}}}}\n    groups:\n{groups}"
            ))
        };
        let tls = "tls: {certificate: c.pem, key: c.key}";
        assert_eq!(
            env(&format!(
                "      web: {{node: web, hosts: [a], listen: 443, domains: [shop.example.com], {tls}}}\n      api: {{node: api, hosts: [a], listen: 443, domains: [api.example.com, Shop.example.com], {tls}}}\n"
            )),
            "8:7 groups `web` and `api` of environment `p` both claim `shop.example.com` on port 443"
        );
        assert_eq!(
            env(&format!(
                "      web: {{node: web, hosts: [a], listen: 443, domains: [shop.example.com], {tls}}}\n      api: {{node: api, hosts: [a], listen: 443, domains: [api.example.com]}}\n"
            )),
            "8:7 groups `web` and `api` of environment `p` share port 443 on a host, but only one has `tls`"
        );
        assert_eq!(
            env("      web: {node: web, hosts: [a], domains: [shop.example.com]}\n"),
            "7:7 group `web` has `domains` or `tls` but no `listen` port"
        );
        assert_eq!(
            env("      web: {node: web, hosts: [a], listen: 443, domains: [shop_example.com]}\n"),
            "7:59 group `web`: `shop_example.com` is not a host name"
        );
        assert_eq!(
            env("      web: {node: web, hosts: [a], listen: 443, tls: {certificate: c.pem}}\n"),
            "7:7 group `web`: `tls` takes `certificate` and `key`, or `acme`"
        );
        assert_eq!(
            env(
                "      web: {node: web, hosts: [a], listen: 443, tls: {certificate: ../c.pem, key: c.key}}\n"
            ),
            "7:68 group `web`: TLS file `../c.pem` must be a relative path inside the release"
        );
        assert_eq!(
            env("      web: {node: web, hosts: [a], listen: 443, tls: {acme: {}}}\n"),
            "7:7 group `web`: `tls: {acme: …}` needs `domains` to ask certificates for"
        );
        assert_eq!(
            env(
                "      web: {node: web, hosts: [a], listen: 443, domains: ['*.example.com'], tls: {acme: {}}}\n"
            ),
            "7:7 group `web`: `*.example.com`: ACME certificates (HTTP-01) cannot be wildcards"
        );
        assert_eq!(
            env(
                "      web: {node: web, hosts: [a], listen: 443, domains: [a.example.com], tls: {acme: {directory: 'http://x/dir'}}}\n"
            ),
            "7:100 group `web`: the ACME directory `http://x/dir` must be an https:// URL"
        );
        assert_eq!(
            env("      web: {node: web, hosts: [a], listen: 443, tls: {acme: {mail: x}}}\n"),
            "7:62 environments.p.groups.web.tls.acme: unknown field `mail`, expected `email` or `directory`"
        );
    }

    #[test]
    fn errors() {
        assert_eq!(
            message("system: Shop\nsources: [{path: .}]\n"),
            "1:1 invalid system name `Shop`"
        );
        assert_eq!(
            message("system: shop\nsources: []\n"),
            "2:1 `sources` is empty"
        );
        assert_eq!(
            message("system: shop\nsources: [{path: ., git: x}]\n"),
            "2:1 source `1` needs exactly one of `git` or `path`"
        );
        assert_eq!(
            message("system: shop\nsource: []\n"),
            "2:1 unknown field `source`, expected one of `system`, `registry`, `release_recipients`, `sources`, `environments`"
        );
        assert_eq!(
            message(
                "system: shop\nsources: [{path: .}]\nenvironments:\n  p:\n    hosts: {a: {agent: x}}\n    groups:\n      web: {node: web, hosts: [b]}\n"
            ),
            "7:7 group `web` of environment `p` names unknown host `b`"
        );
        assert_eq!(
            message(
                "system: shop\nsources: [{path: .}]\nenvironments:\n  p:\n    hosts: {a: {agnet: x}}\n"
            ),
            "5:17 environments.p.hosts.a: unknown field `agnet`, expected `agent` or `fingerprint`"
        );
        assert_eq!(
            message(
                "system: shop\nsources: [{path: .}]\nenvironments:\n  p:\n    hosts: {a: {agent: x}, b: {agent: y}}\n    groups:\n      web: {node: web, hosts: [a], listen: 80}\n      api: {node: api, hosts: [b, a], listen: 80}\n"
            ),
            "8:7 groups `web` and `api` of environment `p` share a host and both listen on port 80"
        );
        // The error points at this group's `instances`, not another group's.
        assert_eq!(
            message(
                "system: shop\nsources: [{path: .}]\nenvironments:\n  p:\n    hosts: {a: {agent: x}}\n    groups:\n      api: {node: api, hosts: [a], instances: 2}\n      web:\n        node: web\n        hosts: [a]\n        instances: 65\n"
            ),
            "11:9 group `web` of environment `p`: `instances` is 65; at most 64 run per host"
        );
        assert_eq!(
            message(
                "system: shop\nsources: [{path: .}]\nenvironments:\n  p:\n    hosts: {a: {agent: x}}\n    groups:\n      web: {node: web, hosts: [a], instances: 64}\n"
            ),
            "ok"
        );
    }

    #[test]
    fn names() {
        assert!(valid_name("shop"));
        assert!(valid_name("0a_b-c"));
        assert!(!valid_name("-a"));
        assert!(!valid_name(""));
        assert!(!valid_name("A"));
    }
}
