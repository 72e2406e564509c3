//! The release configuration at rest: sealed with age to the system's
//! `release_recipients` (`releases/ID.config.age`, in every home and in the registry),
//! or, for a `registry: local` system without them, plain JSON (`releases/ID.json`,
//! 0600). Opening a sealed one takes a release identity, never the build's.

use std::path::{Path, PathBuf};

use crate::home::{Home, write_private};
use crate::release::config::ReleaseConfig;
use crate::secrets::{self, Identities};
use crate::{Error, Result};

/// The environment variable naming the release identity file.
pub const IDENTITY_ENV: &str = "STRETCH_RELEASE_IDENTITY";

/// Where release `id`'s configuration is kept in `home`, and whether it is sealed.
pub fn stored(home: &Home, id: &str) -> Option<(PathBuf, bool)> {
    let sealed = home.sealed_config(id);
    if sealed.exists() {
        return Some((sealed, true));
    }
    let plain = home.release_config(id);
    plain.exists().then_some((plain, false))
}

/// Seal `json` to `recipients` (armored age).
pub fn seal(recipients: &[String], json: &[u8]) -> Result<Vec<u8>> {
    Ok(secrets::encrypt_armored(recipients, json)?.into_bytes())
}

/// Keep release `id`'s configuration in `home`: sealed when there are recipients.
pub fn write(home: &Home, id: &str, recipients: &[String], json: &[u8]) -> Result<()> {
    let (path, data) = if recipients.is_empty() {
        (home.release_config(id), json.to_vec())
    } else {
        (home.sealed_config(id), seal(recipients, json)?)
    };
    write_private(&path, &data).map_err(|e| {
        Error::failed(
            "archive",
            format!("cannot write the release configuration: {e}"),
        )
    })
}

/// The release identity: `--release-identity FILE`, else `STRETCH_RELEASE_IDENTITY`.
pub fn identity_path(given: Option<&Path>) -> Option<PathBuf> {
    given
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(IDENTITY_ENV).map(PathBuf::from))
        .filter(|p| !p.as_os_str().is_empty())
}

fn missing_identity(id: &str) -> Error {
    Error::Failed {
        stage: "pull release".into(),
        message: format!(
            "the configuration of release {id} is sealed to the system's `release_recipients`, and no release identity was given"
        ),
        help: Some(format!(
            "give the release key with `--release-identity FILE` or {IDENTITY_ENV} (the build's `--identity` does not open it)"
        )),
    }
}

/// The clear bytes of a stored configuration (plain or sealed) of release `id`.
pub fn clear(id: &str, data: &[u8], sealed: bool, identity: Option<&Path>) -> Result<Vec<u8>> {
    if !sealed {
        return Ok(data.to_vec());
    }
    let path = identity_path(identity).ok_or_else(|| missing_identity(id))?;
    let ids = Identities::from_file(&path).map_err(|e| Error::Failed {
        stage: "pull release".into(),
        message: e.to_string(),
        help: e.help().map(String::from),
    })?;
    secrets::decrypt(&ids, data).map_err(|e| Error::Failed {
        stage: "pull release".into(),
        message: format!(
            "cannot open the configuration of release {id} with `{}`: {e}",
            path.display()
        ),
        help: Some(
            "the release identity must be the key of one of the system's `release_recipients`"
                .into(),
        ),
    })
}

/// Open a stored configuration (plain or sealed) of release `id`.
pub fn open_bytes(
    id: &str,
    data: &[u8],
    sealed: bool,
    identity: Option<&Path>,
) -> Result<ReleaseConfig> {
    let json = clear(id, data, sealed, identity)?;
    serde_json::from_slice(&json).map_err(|e| {
        Error::failed(
            "pull release",
            format!("the configuration of release {id} is damaged: {e}"),
        )
    })
}

/// Load release `id`'s configuration from `home`.
pub fn open(home: &Home, id: &str, identity: Option<&Path>) -> Result<ReleaseConfig> {
    let (path, sealed) = stored(home, id).ok_or_else(|| {
        Error::failed(
            "pull release",
            format!("this home has no configuration of release {id}"),
        )
    })?;
    let data = std::fs::read(&path).map_err(|e| {
        Error::failed(
            "pull release",
            format!("cannot read the configuration of release {id}: {e}"),
        )
    })?;
    open_bytes(id, &data, sealed, identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_configurations_open_only_with_a_release_identity() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::open(&dir.path().join("home")).unwrap();
        let (key, recipient) = secrets::generate();
        let key_file = dir.path().join("release.key");
        std::fs::write(&key_file, &key).unwrap();
        let cfg = ReleaseConfig {
            format: 1,
            system: "s".into(),
            registry: "r".into(),
            plugins: vec![],
            nodes: vec![],
            config_files: Default::default(),
            secrets: [(
                "a/secrets.yml".to_string(),
                serde_json::json!({"pw": "hunter2-clear"}),
            )]
            .into(),
            files: Default::default(),
        };
        let json = serde_json::to_vec(&cfg).unwrap();
        write(&home, "id1", &[recipient], &json).unwrap();
        let on_disk = std::fs::read(home.sealed_config("id1")).unwrap();
        assert!(!String::from_utf8_lossy(&on_disk).contains("hunter2-clear"));
        assert!(!home.release_config("id1").exists());
        let err = open(&home, "id1", Some(Path::new("/nonexistent/key"))).unwrap_err();
        assert_eq!(err.stage(), Some("pull release"));
        assert_eq!(open(&home, "id1", Some(&key_file)).unwrap(), cfg);
        let (other, _) = secrets::generate();
        let other_file = dir.path().join("other.key");
        std::fs::write(&other_file, other).unwrap();
        let err = open(&home, "id1", Some(&other_file)).unwrap_err();
        assert!(
            err.to_string().contains("cannot open the configuration"),
            "{err}"
        );
        // Without recipients (registry: local) it stays plain, 0600.
        write(&home, "id2", &[], &json).unwrap();
        assert_eq!(open(&home, "id2", None).unwrap(), cfg);
    }
}
