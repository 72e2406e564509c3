//! Where an environment stands: the release its record says it runs (or, for a home
//! with no record of it, what most of its hosts run) and, per host and group, what that
//! host's agent says it runs. One builder for `stretch status` and the
//! web view, so both show the same thing. Nothing here reads a release configuration
//! or an environment's `services` (they may hold secrets).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::agent::fleet::{Fleet, prefixed};
use crate::home::Home;
use crate::log::Log;
use crate::store::Store;
use crate::system::System;
use crate::{Result, deploy};

/// How long one agent may take to say what it runs.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvironmentStatus {
    pub name: String,
    pub auto_deploy: bool,
    pub release: Option<ReleaseName>,
    pub existing_release: Option<ReleaseName>,
    pub updated_at: Option<String>,
    pub hosts: Vec<HostStatus>,
    /// Why the hosts were not asked (e.g. no agent token), when they were not.
    pub health_error: Option<String>,
}

/// A release by id, with its name when this home knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseName {
    pub id: String,
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    pub host: String,
    pub agent: String,
    /// `None`: not asked.
    pub reachable: Option<bool>,
    pub error: Option<String>,
    pub groups: Vec<HostGroupStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostGroupStatus {
    pub group: String,
    pub node: String,
    pub release: Option<String>,
    pub config_version: Option<String>,
    pub instances: usize,
    pub healthy: bool,
    /// The proxy port and the names it answers there, as the agent serves them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
    /// The HTTPS certificate of those names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<crate::agent::api::CertificateStatus>,
}

fn release_name(store: Option<&Store>, id: Option<String>) -> Option<ReleaseName> {
    let id = id?;
    let name = store
        .and_then(|s| s.release_by_id(&id).ok().flatten())
        .map(|r| r.name);
    Some(ReleaseName { id, name })
}

/// Where environment `name` stands; with `ask_agents`, every host's agent is asked
/// (in parallel, each within [`AGENT_TIMEOUT`]). `store`: the home's, if it has one.
pub async fn environment(
    system: &System,
    home: &Home,
    store: Option<&Store>,
    name: &str,
    ask_agents: bool,
    log: &Log,
) -> Result<EnvironmentStatus> {
    let env = deploy::environment(system, name)?;
    let record = match store {
        Some(s) => s.environment(name)?,
        None => None,
    };
    let mut out = EnvironmentStatus {
        name: name.to_string(),
        auto_deploy: env.auto_deploy,
        release: release_name(store, record.as_ref().and_then(|r| r.release.clone())),
        existing_release: release_name(
            store,
            record.as_ref().and_then(|r| r.existing_release.clone()),
        ),
        updated_at: record.map(|r| r.updated_at),
        hosts: Vec::new(),
        health_error: None,
    };
    let fleet = if ask_agents {
        match deploy::agent_token(system, name, env)
            .and_then(|token| Fleet::new(system, name, env, home, &token))
        {
            Ok(f) => Some(f),
            Err(e) => {
                out.health_error = Some(e.to_string());
                None
            }
        }
    } else {
        None
    };
    let fleet = fleet.as_ref();
    let states = futures_util::future::join_all(env.hosts.iter().map(|(host, h)| async move {
        let fleet = fleet?;
        let one = async {
            let (_, r) = fleet
                .states([(host.as_str(), h.agent.as_str())], log)
                .await
                .pop()?;
            Some(r)
        };
        let state = match tokio::time::timeout(AGENT_TIMEOUT, one).await {
            Ok(None) => Err("no answer".to_string()),
            Ok(Some(r)) => r.map_err(|e| prefixed(host, &e)),
            Err(_) => Err(format!(
                "host `{host}` ({}): no answer within {}s",
                h.agent,
                AGENT_TIMEOUT.as_secs()
            )),
        };
        Some(state)
    }))
    .await;
    // A home with no record of the environment: its hosts say what runs.
    if out.release.is_none() {
        let answered = states.iter().flatten().flatten();
        if let Some((current, before)) = deploy::known::majority(answered, system.name(), name) {
            let named = |r: crate::agent::api::ReleaseRef| ReleaseName {
                id: r.id,
                name: Some(r.name),
            };
            out.release = Some(named(current));
            out.existing_release = before.map(named);
        }
    }
    for ((host, h), state) in env.hosts.iter().zip(states) {
        let groups = env
            .groups
            .iter()
            .filter(|(_, g)| g.hosts.contains(host))
            .map(|(gname, g)| {
                let found = state.as_ref().and_then(|s| s.as_ref().ok()).and_then(|s| {
                    s.groups.iter().find(|x| {
                        x.key.system == system.name()
                            && x.key.environment == name
                            && &x.key.group == gname
                    })
                });
                HostGroupStatus {
                    group: gname.clone(),
                    node: g.node.clone(),
                    release: found.and_then(|f| f.release.as_ref().map(|r| r.id.clone())),
                    config_version: found.and_then(|f| f.config_version.clone()),
                    instances: found.map(|f| f.instances.len()).unwrap_or(0),
                    healthy: found.is_some_and(|f| f.healthy),
                    listen: found.and_then(|f| f.listen),
                    domains: found.map(|f| f.domains.clone()).unwrap_or_default(),
                    certificate: found.and_then(|f| f.certificate.clone()),
                }
            })
            .collect();
        out.hosts.push(HostStatus {
            host: host.clone(),
            agent: h.agent.clone(),
            reachable: state.as_ref().map(|s| s.is_ok()),
            error: state.and_then(|s| s.err()),
            groups,
        });
    }
    Ok(out)
}

impl std::fmt::Display for EnvironmentStatus {
    /// The human form: one line for the environment, one per host, one per group.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.release {
            Some(r) => write!(f, "environment `{}`: release {}", self.name, r.id)?,
            None => write!(f, "environment `{}`: release (never deployed)", self.name)?,
        }
        if let Some(n) = self.release.as_ref().and_then(|r| r.name.as_ref()) {
            write!(f, " ({n})")?;
        }
        writeln!(f)?;
        if let Some(e) = &self.health_error {
            writeln!(f, "  hosts not asked: {e}")?;
        }
        for h in &self.hosts {
            let reach = match (h.reachable, &h.error) {
                (Some(true), _) => "reachable".to_string(),
                (Some(false), e) => format!("UNREACHABLE ({})", e.as_deref().unwrap_or("")),
                (None, _) => "not asked".to_string(),
            };
            writeln!(f, "  host {} ({}): {reach}", h.host, h.agent)?;
            for g in &h.groups {
                writeln!(
                    f,
                    "    group {:<12} node {:<10} release {:<22} config {:<14} instances {} {}",
                    g.group,
                    g.node,
                    g.release.as_deref().unwrap_or("-"),
                    g.config_version.as_deref().unwrap_or("-"),
                    g.instances,
                    if g.healthy { "healthy" } else { "NOT HEALTHY" }
                )?;
                let scheme = if g.certificate.is_some() {
                    "https"
                } else {
                    "http"
                };
                let port = g.listen.map(|p| format!(":{p}")).unwrap_or_default();
                for d in &g.domains {
                    write!(f, "      {scheme}://{d}{port}")?;
                    if let Some(c) = &g.certificate {
                        write!(
                            f,
                            "  certificate from {}, until {} ({})",
                            c.issuer, c.not_after, c.source
                        )?;
                        if let Some(e) = &c.renewal_error {
                            write!(f, ", RENEWAL FAILED: {e}")?;
                        }
                    }
                    writeln!(f)?;
                }
                if g.domains.is_empty()
                    && let Some(c) = &g.certificate
                {
                    writeln!(
                        f,
                        "      {scheme}://*{port}  certificate from {}, until {} ({})",
                        c.issuer, c.not_after, c.source
                    )?;
                }
            }
        }
        Ok(())
    }
}
