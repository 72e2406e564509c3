//! The agent's data dir: its id, its desired state (`state.json`) and one folder per
//! instance (bind-mounted at `/stretch`).
//!
//! ```text
//! DATA_DIR/            0700
//!   agent-id           random, made on first start: the `stretch.agent` label
//!   tls/               0700: cert.pem, key.pem (0600), made on first start
//!   state.json         0600, rewritten atomically after every change
//!   instances/NAME/    one per container: config.json, templates/
//! ```
//!
//! The state file is the truth: a container of this agent that it does not list is an
//! orphan (e.g. a new instance of a switch interrupted by a kill) and is removed on
//! start.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::agent::api::{GroupKey, GroupSpec};
use crate::home::write_private;
use crate::{Error, Result};

/// One instance (container) the agent manages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// The container's id.
    pub container: String,
    /// The container's name, also its folder's name under `instances/`.
    pub name: String,
    pub index: u32,
    pub release_id: String,
    /// What its folder holds now (a reload changes it, not the container's label).
    pub config_version: String,
    /// The host port on 127.0.0.1, as last read from the engine.
    pub port: Option<u16>,
}

/// One group's desired state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub key: GroupKey,
    /// The spec the proxy serves (none before the first switch).
    pub current: Option<GroupSpec>,
    /// The spec stored by the last `PUT`, waiting for a switch.
    pub pending: Option<GroupSpec>,
    /// The running instances of `current`.
    pub instances: Vec<InstanceRecord>,
    /// Stopped instances of earlier releases, newest first, kept for fast rollbacks.
    pub kept: Vec<InstanceRecord>,
}

impl GroupRecord {
    pub fn new(key: GroupKey) -> Self {
        GroupRecord {
            key,
            current: None,
            pending: None,
            instances: Vec::new(),
            kept: Vec::new(),
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    groups: Vec<GroupRecord>,
}

/// The data dir, opened.
#[derive(Debug)]
pub struct DataDir {
    pub root: PathBuf,
    pub agent_id: String,
    /// Serializes writes of `state.json`.
    write: Mutex<()>,
}

impl DataDir {
    /// Create (mode 0700) or open the data dir and read or make the agent's id.
    pub fn open(root: &Path) -> Result<DataDir> {
        let cannot = |what: &str, path: &Path, e: std::io::Error| {
            Error::invalid(format!("cannot {what} `{}`: {e}", path.display()))
        };
        fs::create_dir_all(root).map_err(|e| cannot("create the data dir", root, e))?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o700))
            .map_err(|e| cannot("set the mode of", root, e))?;
        let root = root
            .canonicalize()
            .map_err(|e| cannot("resolve", root, e))?;
        let instances = root.join("instances");
        fs::create_dir_all(&instances).map_err(|e| cannot("create", &instances, e))?;
        let id_path = root.join("agent-id");
        let agent_id = match fs::read_to_string(&id_path) {
            Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
            Ok(_) => return Err(Error::invalid(format!("`{}` is empty", id_path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = random_hex(8)?;
                write_private(&id_path, format!("{id}\n").as_bytes())
                    .map_err(|e| cannot("write", &id_path, e))?;
                id
            }
            Err(e) => return Err(cannot("read", &id_path, e)),
        };
        Ok(DataDir {
            root,
            agent_id,
            write: Mutex::new(()),
        })
    }

    pub fn state_path(&self) -> PathBuf {
        self.root.join("state.json")
    }

    pub fn instances(&self) -> PathBuf {
        self.root.join("instances")
    }

    /// The folder of the instance (container) named `name`.
    pub fn instance_dir(&self, name: &str) -> PathBuf {
        self.instances().join(name)
    }

    /// The saved groups; none when there is no state file yet.
    pub fn load(&self) -> Result<BTreeMap<GroupKey, GroupRecord>> {
        let path = self.state_path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => {
                return Err(Error::invalid(format!(
                    "cannot read `{}`: {e}",
                    path.display()
                )));
            }
        };
        let state: StateFile = serde_json::from_str(&text).map_err(|e| {
            Error::invalid(format!(
                "`{}` is not a valid state file: {e}",
                path.display()
            ))
        })?;
        Ok(state
            .groups
            .into_iter()
            .map(|g| (g.key.clone(), g))
            .collect())
    }

    /// Write every group's record atomically (temp file, fsync, rename; mode 0600).
    pub fn save(&self, groups: &BTreeMap<GroupKey, GroupRecord>) -> Result<()> {
        let state = StateFile {
            groups: groups.values().cloned().collect(),
        };
        let text = serde_json::to_vec_pretty(&state)
            .map_err(|e| Error::failed("agent", format!("encoding the state: {e}")))?;
        let _guard = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.state_path();
        write_private(&path, &text)
            .map_err(|e| Error::failed("agent", format!("writing `{}`: {e}", path.display())))
    }
}

/// `bytes` random bytes from the kernel, as hex.
pub fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| Error::failed("agent", format!("reading /dev/urandom: {e}")))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_keeps_its_id_and_state() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("agent");
        let dir = DataDir::open(&root).unwrap();
        assert_eq!(dir.agent_id.len(), 16);
        let mode = fs::metadata(&root).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(dir.load().unwrap().is_empty());

        let key = GroupKey {
            system: "shop".into(),
            environment: "prod".into(),
            group: "web".into(),
        };
        let mut groups = BTreeMap::new();
        groups.insert(key.clone(), GroupRecord::new(key.clone()));
        dir.save(&groups).unwrap();
        let mode = fs::metadata(dir.state_path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let again = DataDir::open(&root).unwrap();
        assert_eq!(again.agent_id, dir.agent_id);
        assert_eq!(again.load().unwrap(), groups);
    }
}
