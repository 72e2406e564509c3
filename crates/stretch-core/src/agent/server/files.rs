//! An instance's folder, mounted read-only at `/stretch`: `config.json` (the node's
//! configuration tree), `templates/` (the container templates rendered with the
//! instance's application context, `.jinja` dropped) and `secrets/` (the node's
//! decrypted `*.age` files, `.age` dropped).
//!
//! The folder itself is the mount, so a config-only update replaces files inside it
//! one by one, each atomically (temp file + rename): an app never reads a half-written
//! file. Files are 0644 in 0755 folders so that apps running as another user can read
//! them; the data dir (0700) keeps other users of the host out.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use base64::Engine;

use crate::agent::api::GroupSpec;
use crate::template::render_templates;
use crate::{Error, Result};

/// Where the folder is mounted inside the container.
pub const MOUNT_TARGET: &str = "/stretch";

/// The files of instance `index` of `spec`: (`config.json` | `templates/PATH` |
/// `secrets/PATH`, content).
pub fn render(spec: &GroupSpec, index: u32) -> Result<Vec<(String, Vec<u8>)>> {
    for path in spec.templates.keys().chain(spec.secrets.keys()) {
        check_template_path(path)?;
    }
    let config = serde_json::to_string_pretty(&spec.config)
        .map_err(|e| Error::invalid(format!("the configuration cannot be encoded: {e}")))?;
    let mut files = vec![("config.json".to_string(), (config + "\n").into_bytes())];
    let rendered = render_templates(&spec.templates, &spec.app_context(index))?;
    files.extend(
        rendered
            .into_iter()
            .map(|(path, text)| (format!("templates/{path}"), text.into_bytes())),
    );
    for (path, data) in &spec.secrets {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| Error::invalid(format!("secret file `{path}` is damaged: {e}")))?;
        files.push((format!("secrets/{path}"), bytes));
    }
    Ok(files)
}

/// A template path must stay inside `templates/`: relative, no `..`.
pub fn check_template_path(path: &str) -> Result<()> {
    let p = Path::new(path);
    let ok = !path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "template path `{path}` must be relative and stay inside `templates/`"
        )))
    }
}

/// Make `dir` hold exactly the files of instance `index` of `spec` (templates that are
/// gone are removed).
pub fn write_instance(dir: &Path, spec: &GroupSpec, index: u32) -> Result<()> {
    let files = render(spec, index)?;
    write_files(dir, &files)
}

/// [`write_instance`] on a blocking thread: rendering is bounded work, but still work
/// the async runtime's threads must not do.
pub async fn write_instance_blocking(dir: PathBuf, spec: &GroupSpec, index: u32) -> Result<()> {
    let spec = spec.clone();
    tokio::task::spawn_blocking(move || write_instance(&dir, &spec, index))
        .await
        .map_err(|e| Error::failed("agent", format!("writing an instance's files: {e}")))?
}

fn write_files(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    let failed = |what: &str, path: &Path, e: std::io::Error| {
        Error::failed("agent", format!("{what} `{}`: {e}", path.display()))
    };
    mkdir(dir).map_err(|e| failed("creating", dir, e))?;
    let templates = dir.join("templates");
    mkdir(&templates).map_err(|e| failed("creating", &templates, e))?;
    let mut wanted = BTreeSet::new();
    for (rel, text) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            mkdir_all(dir, parent).map_err(|e| failed("creating", parent, e))?;
        }
        write_atomic(&path, text).map_err(|e| failed("writing", &path, e))?;
        wanted.insert(path);
    }
    // Templates and secrets of the previous configuration that this one no longer has.
    let stale: Vec<PathBuf> = walkdir::WalkDir::new(&templates)
        .into_iter()
        .chain(walkdir::WalkDir::new(dir.join("secrets")))
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_type().is_dir() && !wanted.contains(e.path()))
        .map(|e| e.into_path())
        .collect();
    for path in stale {
        fs::remove_file(&path).map_err(|e| failed("removing", &path, e))?;
    }
    Ok(())
}

fn mkdir(path: &Path) -> std::io::Result<()> {
    match fs::create_dir(path) {
        Ok(()) => fs::set_permissions(path, fs::Permissions::from_mode(0o755)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Create `path` and its parents below `root`, each 0755.
fn mkdir_all(root: &Path, path: &Path) -> std::io::Result<()> {
    if path == root || path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        mkdir_all(root, parent)?;
    }
    mkdir(path)
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".tmp").tempfile_in(dir)?;
    // Set after creation: a mode given at creation is cut by the umask.
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))?;
    tmp.write_all(data)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Remove an instance's folder; absent is fine.
pub fn remove_instance(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::failed(
            "agent",
            format!("removing `{}`: {e}", dir.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::agent::api::{GroupKey, HealthSpec, ReleaseRef};

    pub(crate) fn spec(templates: &[(&str, &str)]) -> GroupSpec {
        GroupSpec {
            key: GroupKey {
                system: "shop".into(),
                environment: "prod".into(),
                group: "web".into(),
            },
            host: "web-1".into(),
            node: "web".into(),
            release: ReleaseRef {
                id: "r1".into(),
                name: "brave-otter".into(),
                created_at: "2024-01-01T00:00:00Z".into(),
            },
            existing_release: None,
            image: "x:1".into(),
            image_id: None,
            pull: false,
            instances: 1,
            listen: None,
            port: None,
            health: HealthSpec {
                path: "/".into(),
                interval_ms: 100,
                timeout_ms: 1000,
            },
            reload: None,
            reload_signal: None,
            stop_timeout_ms: None,
            response_timeout_ms: None,
            config: serde_json::json!({"greeting": "hi"}),
            config_version: "v".into(),
            templates: templates
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            environment_name: "prod".into(),
            secrets: BTreeMap::new(),
            domains: vec![],
            tls: None,
        }
    }

    #[test]
    fn secret_files_are_written_and_removed_when_gone() {
        use base64::Engine;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("inst");
        let mut s = spec(&[]);
        let b64 = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
        s.secrets = [
            ("db/password".to_string(), b64("p4ss")),
            ("tls.key".to_string(), b64("KEY")),
        ]
        .into();
        write_instance(&dir, &s, 0).unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("secrets/db/password")).unwrap(),
            "p4ss"
        );
        s.secrets.remove("tls.key");
        write_instance(&dir, &s, 0).unwrap();
        assert!(!dir.join("secrets/tls.key").exists());
        s.secrets = [("../escape".to_string(), b64("x"))].into();
        assert!(write_instance(&dir, &s, 0).is_err());
    }

    #[test]
    fn writes_renders_and_prunes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("i");
        let one = spec(&[
            (
                "app.conf.jinja",
                "{{ config.greeting }} {{ instance.index }} {{ host.name }}\n",
            ),
            ("sub/old.txt", "old"),
        ]);
        write_instance(&dir, &one, 3).unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("templates/app.conf")).unwrap(),
            "hi 3 web-1\n"
        );
        assert!(dir.join("templates/sub/old.txt").exists());
        let config: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(config, serde_json::json!({"greeting": "hi"}));
        let mode = fs::metadata(dir.join("config.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o644);

        let two = spec(&[("app.conf.jinja", "{{ environment }}\n")]);
        write_instance(&dir, &two, 0).unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("templates/app.conf")).unwrap(),
            "prod\n"
        );
        assert!(!dir.join("templates/sub/old.txt").exists());
    }

    #[test]
    fn bad_templates_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let err = write_instance(tmp.path(), &spec(&[("../x", "a")]), 0).unwrap_err();
        assert!(err.to_string().contains("`../x`"), "{err}");
        let err = render(&spec(&[("/etc/x", "a")]), 0).unwrap_err();
        assert!(err.to_string().contains("`/etc/x`"), "{err}");
        let err = render(&spec(&[("a.jinja", "{{ nope }}")]), 0).unwrap_err();
        assert!(err.to_string().contains("templates/a.jinja"), "{err}");
    }
}
