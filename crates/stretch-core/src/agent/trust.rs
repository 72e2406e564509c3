//! Which agent certificates the controller trusts, per host: the host's pinned
//! `fingerprint:`, else the environment's `agent_ca:`, else the fingerprint recorded in
//! the home's `known_agents` at the first contact (trust on first use, like ssh's
//! `accept-new`). Any other certificate is refused before a request is sent.
//!
//! `known_agents` holds one agent a line, `ADDRESS FINGERPRINT`; `#` starts a comment.
//! Deleting a line makes the next contact a first one again (after a deliberate key
//! change on that agent).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;

use crate::home::Home;
use crate::net::tls::{self, Expect};
use crate::system::{Environment, Host, System};
use crate::{Error, Result};

const HEADER: &str = "# stretch known_agents: ADDRESS FINGERPRINT, one agent a line, recorded at the\n# first contact. Delete a line to trust that agent's next certificate (after a key change).\n";

/// The agents this home has met: address → fingerprint.
#[derive(Debug, Clone, Default)]
pub struct KnownAgents {
    path: PathBuf,
    entries: BTreeMap<String, String>,
}

impl KnownAgents {
    /// The home's `known_agents` (empty when there is none yet).
    pub fn load(home: &Home) -> Result<KnownAgents> {
        let path = home.root.join("known_agents");
        let entries = read(&path)?;
        Ok(KnownAgents { path, entries })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, addr: &str) -> Option<&str> {
        self.entries.get(addr).map(String::as_str)
    }

    /// Record a first contact (re-reading the file under a lock, so that concurrent
    /// deploys of other environments keep each other's lines).
    pub fn record(&mut self, home: &Home, addr: &str, fingerprint: &str) -> Result<()> {
        let _lock = home.lock("known_agents", true)?;
        let mut entries = read(&self.path)?;
        if let Some(existing) = entries.get(addr)
            && existing != fingerprint
        {
            // Someone recorded another one meanwhile: keep theirs, refuse ours.
            return Err(Error::failed(
                "agent",
                format!(
                    "agent at {addr}: `{}` meanwhile records {existing}, not {fingerprint}",
                    self.path.display()
                ),
            ));
        }
        entries.insert(addr.to_string(), fingerprint.to_string());
        let mut text = String::from(HEADER);
        for (a, f) in &entries {
            text.push_str(&format!("{a} {f}\n"));
        }
        crate::home::write_private(&self.path, text.as_bytes()).map_err(|e| {
            Error::failed(
                "agent",
                format!("cannot write `{}`: {e}", self.path.display()),
            )
        })?;
        self.entries = entries;
        Ok(())
    }
}

fn read(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => {
            return Err(Error::invalid(format!(
                "cannot read `{}`: {e}",
                path.display()
            )));
        }
    };
    let mut entries = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let parsed = match (parts.next(), parts.next(), parts.next()) {
            (Some(addr), Some(fp), None) => tls::parse_fingerprint(fp).map(|fp| (addr, fp)),
            _ => None,
        };
        let Some((addr, fp)) = parsed else {
            return Err(Error::invalid_with_help(
                format!(
                    "`{}` line {}: expected `ADDRESS sha256:FINGERPRINT`",
                    path.display(),
                    n + 1
                ),
                "fix or delete that line (a deleted agent is trusted again at its next contact)",
            ));
        };
        entries.insert(addr.to_string(), fp);
    }
    Ok(entries)
}

/// Where a host's expected certificate comes from (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Basis {
    /// `fingerprint:` of the host in system.yml.
    Pinned,
    /// The environment's `agent_ca:` file.
    Ca(PathBuf),
    /// Recorded in `known_agents` (`None`: not yet: this is the first contact).
    Known { file: PathBuf, first: bool },
}

/// The trust of one environment's agents.
#[derive(Debug, Clone)]
pub struct EnvTrust {
    ca: Option<(PathBuf, Arc<RootCertStore>)>,
    pub known: KnownAgents,
}

impl EnvTrust {
    pub fn load(
        system: &System,
        env_name: &str,
        env: &Environment,
        home: &Home,
    ) -> Result<EnvTrust> {
        let ca = match &env.agent_ca {
            Some(file) => {
                let path = system.dir.join(file);
                let roots = tls::roots_from_pem(&path)
                    .map_err(|e| e.context(&format!("environment `{env_name}`: `agent_ca`")))?;
                Some((path, Arc::new(roots)))
            }
            None => None,
        };
        Ok(EnvTrust {
            ca,
            known: KnownAgents::load(home)?,
        })
    }

    /// What to expect of `host`'s certificate, and why.
    pub fn expect(&self, host: &Host) -> (Expect, Basis) {
        if let Some(fp) = host.fingerprint.as_deref().and_then(tls::parse_fingerprint) {
            return (Expect::Pinned(fp), Basis::Pinned);
        }
        if let Some((path, roots)) = &self.ca {
            return (
                Expect::Roots(roots.clone(), Vec::new()),
                Basis::Ca(path.clone()),
            );
        }
        let known = self.known.get(&host.agent).map(String::from);
        let first = known.is_none();
        (
            Expect::FirstUse(known),
            Basis::Known {
                file: self.known.path().to_path_buf(),
                first,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_agents_round_trip_and_reject_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::open(dir.path()).unwrap();
        let mut known = KnownAgents::load(&home).unwrap();
        assert_eq!(known.get("10.0.0.5:7420"), None);
        let fp = format!("sha256:{}", "a".repeat(64));
        known.record(&home, "10.0.0.5:7420", &fp).unwrap();
        let again = KnownAgents::load(&home).unwrap();
        assert_eq!(again.get("10.0.0.5:7420"), Some(fp.as_str()));
        // Another fingerprint for the same address is not silently recorded.
        let other = format!("sha256:{}", "b".repeat(64));
        let mut stale = KnownAgents {
            path: known.path().to_path_buf(),
            ..KnownAgents::default()
        };
        assert!(stale.record(&home, "10.0.0.5:7420", &other).is_err());

        std::fs::write(known.path(), "10.0.0.5:7420 md5:abc\n").unwrap();
        let err = KnownAgents::load(&home).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }
}
