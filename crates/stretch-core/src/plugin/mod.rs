//! Plugins: code run at the pipeline's hooks (`build`, `pre_deploy`, `post_deploy`).
//! Kinds are a closed set: the built-ins `exec` and `migrations`, and external
//! executables speaking the JSON-on-stdin protocol. Every command gets the facts as
//! `STRETCH_*` env vars and has its output streamed to the log.
//!
//! Commands start from an empty environment: only [`inherited`] variables and those
//! the plugin declares in its `env` option pass, never stretch's credentials.

mod exec;
mod external;
mod migrations;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::log::Log;
use crate::system::project::PluginDecl;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    Build,
    PreDeploy,
    PostDeploy,
}

impl Hook {
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Build => "build",
            Hook::PreDeploy => "pre_deploy",
            Hook::PostDeploy => "post_deploy",
        }
    }
}

/// A release as plugins see it: its id, name and the folder holding its files.
#[derive(Debug, Clone, Serialize)]
pub struct ReleaseFacts {
    pub id: String,
    pub name: String,
    pub path: PathBuf,
}

/// What a hook runs about.
#[derive(Debug, Clone)]
pub struct Facts {
    pub system: String,
    pub environment: Option<String>,
    /// `deploy` or `rollback` (deploy hooks only).
    pub kind: Option<String>,
    pub release: ReleaseFacts,
    pub existing_release: Option<ReleaseFacts>,
}

/// One plugin invocation: which plugin, which hook, and where its files are.
pub struct Call<'a> {
    pub decl: &'a PluginDecl,
    pub hook: Hook,
    pub facts: &'a Facts,
    /// The tree the plugin's files are read from (the merged tree, or a release buffer).
    pub tree: &'a Path,
}

impl Call<'_> {
    /// The plugin's folder in `tree`, plus an optional relative `path` option.
    fn folder(&self, tree: &Path, sub: Option<&str>) -> Result<PathBuf> {
        let dir = match sub {
            Some(p) => crate::system::project::resolve(tree, &self.decl.dir, p).map_err(|m| {
                Error::invalid(format!(
                    "plugin `{}` ({}): {m}",
                    self.decl.name,
                    self.label()
                ))
            })?,
            None => self.decl.dir.clone(),
        };
        Ok(tree.join(dir))
    }

    fn label(&self) -> String {
        let file = if self.decl.dir.is_empty() {
            "stretch.yml".to_string()
        } else {
            format!("{}/stretch.yml", self.decl.dir)
        };
        match &self.decl.node {
            Some(n) => format!("node `{n}`, {file}"),
            None => file,
        }
    }

    /// The `STRETCH_*` variables for this call.
    fn env(&self) -> Vec<(&'static str, String)> {
        let f = self.facts;
        let mut env = vec![
            ("STRETCH_HOOK", self.hook.as_str().to_string()),
            ("STRETCH_SYSTEM", f.system.clone()),
        ];
        if let Some(e) = &f.environment {
            env.push(("STRETCH_ENVIRONMENT", e.clone()));
        }
        if let Some(k) = &f.kind {
            env.push(("STRETCH_KIND", k.clone()));
        }
        if let Some(n) = &self.decl.node {
            env.push(("STRETCH_NODE", n.clone()));
        }
        env.push(("STRETCH_RELEASE_ID", f.release.id.clone()));
        env.push(("STRETCH_RELEASE_NAME", f.release.name.clone()));
        env.push(("STRETCH_RELEASE_PATH", f.release.path.display().to_string()));
        if let Some(x) = &f.existing_release {
            env.push(("STRETCH_EXISTING_RELEASE_ID", x.id.clone()));
            env.push((
                "STRETCH_EXISTING_RELEASE_PATH",
                x.path.display().to_string(),
            ));
        }
        env
    }

    /// A command for `program` with the plugin's environment: the [`inherited`]
    /// variables, those the plugin declares (`env: [NAME, …]`) and the facts; nothing
    /// else of stretch's own environment.
    fn new_command(&self, program: impl AsRef<OsStr>) -> Result<tokio::process::Command> {
        // Checked at build too; again here for releases built before the check existed.
        let declared = declared_env(&self.decl.name, &self.decl.options)
            .map_err(|(_, message)| Error::invalid(format!("{message} ({})", self.label())))?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.env_clear();
        for (name, value) in std::env::vars_os() {
            let passes = name
                .to_str()
                .is_some_and(|n| inherited(n) || declared.iter().any(|d| d == n));
            if passes {
                cmd.env(name, value);
            }
        }
        cmd.envs(self.env());
        Ok(cmd)
    }

    /// Run a program, streaming its output to the log; a non-zero exit fails the hook.
    async fn command(
        &self,
        mut cmd: tokio::process::Command,
        stdin: Option<Vec<u8>>,
        log: &Log,
    ) -> Result<()> {
        let stage = format!("{} plugins", self.hook.as_str());
        let stage = stage.as_str();
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.kill_on_drop(true);
        let what = format!("plugin `{}` ({})", self.decl.name, self.label());
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::failed(stage, format!("{what}: cannot start: {e}")))?;
        if let (Some(data), Some(mut input)) = (stdin, child.stdin.take()) {
            use tokio::io::AsyncWriteExt;
            // A plugin may exit without reading its input: a broken pipe is not an error.
            let _ = input.write_all(&data).await;
        }
        let out = child.stdout.take().map(|o| stream(o, log.clone()));
        let err = child.stderr.take().map(|o| stream(o, log.clone()));
        let status = child
            .wait()
            .await
            .map_err(|e| Error::failed(stage, format!("{what}: {e}")))?;
        if let Some(t) = out {
            let _ = t.await;
        }
        if let Some(t) = err {
            let _ = t.await;
        }
        if !status.success() {
            let code = status
                .code()
                .map(|c| format!("status {c}"))
                .unwrap_or_else(|| "a signal".into());
            return Err(Error::failed(
                stage,
                format!("{what}: `{}` hook exited with {code}", self.hook.as_str()),
            ));
        }
        Ok(())
    }
}

/// stretch's credentials (tokens, and the identity file's path): no plugin gets them,
/// even declared.
pub const CREDENTIALS: [&str; 4] = [
    "STRETCH_AGENT_TOKEN",
    "STRETCH_SERVER_TOKEN",
    "STRETCH_IDENTITY",
    "STRETCH_RELEASE_IDENTITY",
];

/// Variables every plugin command inherits: where programs are, the home folder, the
/// locale (`LANG`, `LC_*`: tools sort and print by it) and the time zone.
pub fn inherited(name: &str) -> bool {
    matches!(name, "PATH" | "HOME" | "LANG" | "TZ") || name.starts_with("LC_")
}

/// The variable names `options.env` declares for plugin `plugin`. An error is (the text
/// to point at in the plugin's file, the message).
pub fn declared_env(
    plugin: &str,
    options: &serde_json::Value,
) -> std::result::Result<Vec<String>, (String, String)> {
    let list = match options.get("env") {
        None | Some(serde_json::Value::Null) => return Ok(Vec::new()),
        Some(serde_json::Value::Array(list)) => list,
        Some(_) => {
            return Err((
                "env:".into(),
                format!("plugin `{plugin}`: `env` must be a list of variable names"),
            ));
        }
    };
    let mut names = Vec::new();
    for item in list {
        let Some(name) = item.as_str() else {
            return Err((
                "env:".into(),
                format!("plugin `{plugin}`: `env` must be a list of variable names"),
            ));
        };
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let refused = if !valid {
            Some(format!("`{name}` is not a variable name"))
        } else if CREDENTIALS.contains(&name) {
            Some(format!(
                "`{name}` is a stretch credential, never given to plugins"
            ))
        } else if name.starts_with("STRETCH_") {
            Some(format!(
                "`{name}`: `STRETCH_*` variables are stretch's own (plugins get their facts without declaring them)"
            ))
        } else {
            None
        };
        if let Some(why) = refused {
            return Err((name.to_string(), format!("plugin `{plugin}`: env {why}")));
        }
        names.push(name.to_string());
    }
    Ok(names)
}

fn stream<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    r: R,
    log: Log,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            log.line(line);
        }
    })
}

/// Check a plugin's declaration before anything runs: known options, an executable
/// for external plugins.
pub fn validate(decl: &PluginDecl, tree: &Path) -> Result<()> {
    match decl.name.as_str() {
        "exec" => exec::validate(decl),
        "migrations" => migrations::validate(decl),
        _ => external::find(decl, tree).map(|_| ()),
    }
}

/// Run one hook of one plugin.
pub async fn run(call: &Call<'_>, log: &Log) -> Result<()> {
    match call.decl.name.as_str() {
        "exec" => exec::run(call, log).await,
        "migrations" => migrations::run(call, log).await,
        _ => external::run(call, log).await,
    }
}

/// Run `hook` of every plugin in order, stopping at the first failure.
pub async fn run_all(
    plugins: &[&PluginDecl],
    hook: Hook,
    facts: &Facts,
    tree: &Path,
    log: &Log,
) -> Result<()> {
    for decl in plugins {
        run(
            &Call {
                decl,
                hook,
                facts,
                tree,
            },
            log,
        )
        .await?;
    }
    Ok(())
}

/// Read an optional string option.
fn opt_str<'a>(decl: &'a PluginDecl, key: &str) -> Result<Option<&'a str>> {
    match decl.options.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Error::invalid(format!(
            "plugin `{}`: option `{key}` must be a string",
            decl.name
        ))),
    }
}

/// Reject options a built-in does not know.
fn known_options(decl: &PluginDecl, known: &[&str]) -> Result<()> {
    match &decl.options {
        serde_json::Value::Null => Ok(()),
        serde_json::Value::Object(m) => {
            for k in m.keys() {
                if !known.contains(&k.as_str()) {
                    let hint = known
                        .iter()
                        .min_by_key(|c| crate::system::yaml::levenshtein(k, c))
                        .map(|c| {
                            format!(
                                "did you mean `{c}`? ({} knows: {})",
                                decl.name,
                                known.join(", ")
                            )
                        })
                        .unwrap_or_default();
                    return Err(Error::invalid_with_help(
                        format!("plugin `{}`: unknown option `{k}`", decl.name),
                        hint,
                    ));
                }
            }
            Ok(())
        }
        _ => Err(Error::invalid(format!(
            "plugin `{}`: options must be a map",
            decl.name
        ))),
    }
}
