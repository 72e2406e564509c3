//! The agents of one environment, as one run (deploy, rollback, apply, status) talks to
//! them: one client per host, made once, so that every stage reuses the connection and
//! its TLS session. [`Fleet::connect`] contacts every host before anything changes:
//! a refused certificate, an unreachable agent or a rejected token fails the run there,
//! naming each host, with nothing sent to any of them. First contacts are recorded in
//! the home's `known_agents`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use super::api::{AgentState, LeaseRequest};
use super::client::{AgentClient, AgentError};
use super::trust::{Basis, EnvTrust};
use crate::home::Home;
use crate::log::Log;
use crate::system::{Environment, Host, System};
use crate::{Error, Result};

pub struct Fleet {
    home: Home,
    token: String,
    trust: Mutex<EnvTrust>,
    hosts: BTreeMap<String, Host>,
    /// Host name → client; hosts gone from system.yml are added by address on demand.
    clients: Mutex<BTreeMap<String, AgentClient>>,
}

impl std::fmt::Debug for Fleet {
    // Not derived: the token stays out of debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("hosts", &self.hosts.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// The agents of environment `env_name` (no network yet).
    pub fn new(
        system: &System,
        env_name: &str,
        env: &Environment,
        home: &Home,
        token: &str,
    ) -> Result<Fleet> {
        Ok(Fleet {
            home: home.clone(),
            token: token.to_string(),
            trust: Mutex::new(EnvTrust::load(system, env_name, env, home)?),
            hosts: env
                .hosts
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            clients: Mutex::new(BTreeMap::new()),
        })
    }

    /// The client of host `name` at `addr` (a host of system.yml, or one that was
    /// removed from it but still runs something: then trusted as `known_agents` says).
    pub fn client(&self, name: &str, addr: &str) -> std::result::Result<AgentClient, AgentError> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(name)
            && c.addr() == addr
        {
            return Ok(c.clone());
        }
        let host = match self.hosts.get(name) {
            Some(h) if h.agent == addr => h.clone(),
            _ => Host {
                agent: addr.to_string(),
                fingerprint: None,
            },
        };
        let (expect, basis) = self
            .trust
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .expect(&host);
        let client = AgentClient::new(name, addr, &self.token, expect, basis)?;
        clients.insert(name.to_string(), client.clone());
        Ok(client)
    }

    /// Every host's state, asked in parallel; first contacts are recorded.
    pub async fn states<'a>(
        &self,
        hosts: impl IntoIterator<Item = (&'a str, &'a str)>,
        log: &Log,
    ) -> Vec<(String, std::result::Result<AgentState, AgentError>)> {
        let calls = hosts.into_iter().map(|(name, addr)| async move {
            let r = match self.client(name, addr) {
                Ok(c) => c.state().await.map(|s| (s, c)),
                Err(e) => Err(e),
            };
            (name.to_string(), r)
        });
        let mut out = Vec::new();
        for (name, r) in futures_util::future::join_all(calls).await {
            out.push(match r {
                Ok((state, client)) => {
                    if let Err(e) = self.remember(&client, log) {
                        log.line(format!("warning: {e}"));
                    }
                    (name, Ok(state))
                }
                Err(e) => (name, Err(e)),
            });
        }
        out
    }

    /// Contact every one of `hosts` (name, address) before anything changes; fail
    /// naming every host that cannot be trusted or reached.
    pub async fn connect<'a>(
        &self,
        hosts: impl IntoIterator<Item = (&'a str, &'a str)>,
        stage: &str,
        log: &Log,
    ) -> Result<BTreeMap<String, AgentState>> {
        self.contact(hosts, stage, false, log).await
    }

    /// Like [`Fleet::connect`], failing only on refused certificates: an unreachable
    /// agent is left for the caller to report (apply converges the others).
    pub async fn check_identities<'a>(
        &self,
        hosts: impl IntoIterator<Item = (&'a str, &'a str)>,
        stage: &str,
        log: &Log,
    ) -> Result<BTreeMap<String, AgentState>> {
        self.contact(hosts, stage, true, log).await
    }

    async fn contact<'a>(
        &self,
        hosts: impl IntoIterator<Item = (&'a str, &'a str)>,
        stage: &str,
        identities_only: bool,
        log: &Log,
    ) -> Result<BTreeMap<String, AgentState>> {
        let mut ok = BTreeMap::new();
        let mut failures = Vec::new();
        let mut help = None;
        for (name, r) in self.states(hosts, log).await {
            match r {
                Ok(s) => {
                    ok.insert(name, s);
                }
                Err(e) if identities_only && !matches!(e, AgentError::Identity(_)) => {}
                Err(e) => {
                    if help.is_none()
                        && let Error::Failed { help: h, .. } = Error::from(e.clone())
                    {
                        help = h;
                    }
                    failures.push(prefixed(&name, &e));
                }
            }
        }
        if failures.is_empty() {
            return Ok(ok);
        }
        Err(Error::Failed {
            stage: stage.to_string(),
            message: format!("nothing was changed on any host; {}", failures.join("; ")),
            help,
        })
    }

    /// After a successful exchange: record the agent in `known_agents` if it is not
    /// there (a first contact warns; pinned and CA-signed agents are recorded too, so
    /// that a host later removed from system.yml can still be reached safely).
    pub fn remember(&self, client: &AgentClient, log: &Log) -> Result<()> {
        let Some(fp) = client.presented() else {
            return Ok(());
        };
        let mut trust = self.trust.lock().unwrap_or_else(|e| e.into_inner());
        if trust.known.get(client.addr()).is_some() {
            return Ok(());
        }
        trust.known.record(&self.home, client.addr(), &fp)?;
        if let Basis::Known { file, first: true } = client.basis() {
            log.line(format!(
                "warning: host `{}` ({}): first contact, trusting its certificate {fp} from now on (recorded in `{}`; pin it with `fingerprint:` in system.yml)",
                client.name(),
                client.addr(),
                file.display()
            ));
        }
        Ok(())
    }

    /// Full TLS handshakes made so far, over every client.
    /// Take the lease of `system`'s environment `env` on every host of `hosts`, one
    /// after another in name order (so two runs never hold part each). Renewed in the
    /// background until [`Leases::release`]. A host whose lease another run holds
    /// refuses, naming the holder: the leases taken so far are given back, and the run
    /// fails (busy) or, with `wait`, tries again until it gets them all.
    #[allow(clippy::too_many_arguments)]
    pub async fn lease<'a>(
        &self,
        system: &str,
        env: &str,
        hosts: impl IntoIterator<Item = (&'a str, &'a str)>,
        holder: &str,
        ttl: Duration,
        wait: bool,
        stage: &str,
        log: &Log,
    ) -> Result<Leases> {
        let mut hosts: Vec<(&str, &str)> = hosts.into_iter().collect();
        hosts.sort();
        let req = LeaseRequest {
            holder: holder.to_string(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            token: None,
        };
        let mut said_waiting = false;
        'again: loop {
            let mut held: Vec<(String, AgentClient, u64)> = Vec::new();
            for &(name, addr) in &hosts {
                let client = self.client(name, addr).map_err(Error::from)?;
                match client.take_lease(system, env, &req).await {
                    Ok(grant) => {
                        if let Some(stale) = &grant.took_over {
                            log.line(format!(
                                "host `{name}`: took over the stale lease of {} (expired {}s ago)",
                                stale.holder,
                                stale.expired_ms_ago / 1000
                            ));
                        }
                        held.push((name.to_string(), client, grant.token));
                    }
                    Err(e) => {
                        for (_, c, _) in &held {
                            c.release_lease(system, env).await;
                        }
                        let busy = matches!(e, AgentError::Failed { status: 423, .. });
                        if busy && wait {
                            if !said_waiting {
                                log.line(format!("waiting: {}", prefixed(name, &e)));
                                said_waiting = true;
                            }
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue 'again;
                        }
                        if busy {
                            return Err(Error::busy(
                                stage,
                                format!("nothing was changed on any host; {}", prefixed(name, &e)),
                                Some(
                                    "wait for it with `--wait`; the lease of a run that died expires by itself (`lease_ttl`)"
                                        .into(),
                                ),
                            ));
                        }
                        return Err(Error::failed(
                            stage,
                            format!("nothing was changed on any host; {}", prefixed(name, &e)),
                        ));
                    }
                }
            }
            log.line(format!(
                "leased `{env}` on {} host(s) for {}s, renewed while this run lives",
                held.len(),
                ttl.as_secs()
            ));
            let renew = {
                let held = held.clone();
                let (system, env, log) = (system.to_string(), env.to_string(), log.clone());
                let holder = holder.to_string();
                tokio::spawn(async move {
                    let every = (ttl / 3).max(Duration::from_millis(200));
                    loop {
                        tokio::time::sleep(every).await;
                        for (name, c, token) in &held {
                            let req = LeaseRequest {
                                holder: holder.clone(),
                                ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
                                token: Some(*token),
                            };
                            if let Err(e) = c.take_lease(&system, &env, &req).await {
                                log.line(format!(
                                    "warning: could not renew the lease: {}",
                                    prefixed(name, &e)
                                ));
                            }
                        }
                    }
                })
            };
            return Ok(Leases {
                system: system.to_string(),
                env: env.to_string(),
                held,
                renew,
            });
        }
    }

    pub fn handshakes(&self) -> usize {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.values().map(AgentClient::handshakes).sum()
    }
}

/// The leases a run holds; given back by [`Leases::release`], or left to expire if
/// the process dies.
pub struct Leases {
    system: String,
    env: String,
    held: Vec<(String, AgentClient, u64)>,
    renew: tokio::task::JoinHandle<()>,
}

impl Leases {
    /// Stop renewing and give every lease back.
    pub async fn release(self) {
        self.renew.abort();
        for (_, c, _) in &self.held {
            c.release_lease(&self.system, &self.env).await;
        }
    }
}

impl Drop for Leases {
    fn drop(&mut self) {
        self.renew.abort();
    }
}

/// `host `NAME` (ADDR): error`, unless the error already names the host.
pub fn prefixed(name: &str, e: &AgentError) -> String {
    match e {
        AgentError::Identity(_) => e.to_string(),
        AgentError::Unreachable { addr, .. }
        | AgentError::Unauthorized { addr }
        | AgentError::Failed { addr, .. }
        | AgentError::Protocol { addr, .. } => format!("host `{name}` ({addr}): {e}"),
    }
}
