//! The agent's groups and what the API does to them: store a pending spec (`PUT`),
//! switch to it, give running instances a new configuration, remove a group, report
//! the state.
//!
//! Operations on one group are serialized by its mutex and run in their own task (see
//! `mod.rs`), so a client that hangs up never leaves a switch half done. `GET
//! /v1/state` reads the saved records and the proxies' health flags, never waiting for
//! a running operation.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::acme::{Acme, Want};
use super::certs::{served_from_pem, uncovered};
use super::edge::{self, CertSlot, Edge, Route};
use super::files;
use super::health::{HealthClient, Monitor};
use super::instances::{Instances, display, stop_timeout};
use super::proxy::{Pool, Upstream, drain};
use super::state::{DataDir, GroupRecord, InstanceRecord};
use super::{ApiError, ApiResult};
use crate::agent::api::{
    GroupActivity, GroupKey, GroupSpec, GroupStatus, InstanceStatus, MAX_INSTANCES, Prepared,
    Switch, TlsSpec,
};
use crate::docker::Docker;
use crate::log::Log;
use crate::{Error, Result};

/// How long old instances may take to finish their requests (longer if the node's
/// `stop_timeout` is longer).
const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

/// Stopped instances of this many releases are kept per group for fast rollbacks.
const KEPT_RELEASES: usize = 2;

/// A group's live parts: its proxy's upstream set (read without the lock) and, behind
/// the operation lock, its health monitor. Its listener is the edge's.
pub struct Group {
    pub pool: Arc<Pool>,
    pub ops: tokio::sync::Mutex<Runtime>,
}

#[derive(Default)]
pub struct Runtime {
    pub monitor: Option<Monitor>,
}

pub struct Agent {
    pub docker: Docker,
    /// Where this host's registry logins are (`--docker-config`; default Docker's).
    pub docker_config: Option<std::path::PathBuf>,
    pub data: DataDir,
    pub proxy_bind: IpAddr,
    pub log: Log,
    pub health: HealthClient,
    /// The proxy ports and their routes.
    pub edge: Arc<Edge>,
    pub acme: Acme,
    /// The desired state, as saved in `state.json`.
    pub records: Mutex<BTreeMap<GroupKey, GroupRecord>>,
    pub groups: Mutex<HashMap<GroupKey, Arc<Group>>>,
    /// Who may change each environment now (see [`super::leases`]).
    pub leases: super::leases::Leases,
    /// What is being done to each group now (pulls, health checks), for progress.
    pub activity: Mutex<HashMap<GroupKey, GroupActivity>>,
    /// Slots for log streams and exec sessions (see `logs.rs`, `exec.rs`).
    pub log_streams: Arc<tokio::sync::Semaphore>,
    pub exec_sessions: Arc<tokio::sync::Semaphore>,
}

impl Agent {
    pub fn instances(&self) -> Instances<'_> {
        Instances {
            docker: &self.docker,
            data: &self.data,
            health: &self.health,
        }
    }

    pub fn group(&self, key: &GroupKey) -> Arc<Group> {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        groups
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Group {
                    pool: Arc::new(Pool::default()),
                    ops: tokio::sync::Mutex::new(Runtime::default()),
                })
            })
            .clone()
    }

    pub fn activity_of(&self, key: &GroupKey) -> GroupActivity {
        let activity = self.activity.lock().unwrap_or_else(|e| e.into_inner());
        activity.get(key).cloned().unwrap_or_else(|| GroupActivity {
            phase: "idle".into(),
            ..GroupActivity::default()
        })
    }

    fn set_activity(&self, key: &GroupKey, change: impl FnOnce(&mut GroupActivity)) {
        let mut activity = self.activity.lock().unwrap_or_else(|e| e.into_inner());
        change(activity.entry(key.clone()).or_default());
    }

    fn clear_activity(&self, key: &GroupKey) {
        let mut activity = self.activity.lock().unwrap_or_else(|e| e.into_inner());
        activity.remove(key);
    }

    pub fn record(&self, key: &GroupKey) -> Option<GroupRecord> {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        records.get(key).cloned()
    }

    /// Store a group's record and write the state file.
    pub fn commit(&self, record: GroupRecord) -> Result<()> {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        records.insert(record.key.clone(), record);
        self.data.save(&records)
    }

    fn forget(&self, key: &GroupKey) -> Result<()> {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        records.remove(key);
        self.data.save(&records)
    }

    fn say(&self, key: &GroupKey, text: impl AsRef<str>) {
        self.log
            .line(format!("{}: {}", display(key), text.as_ref()));
    }

    /// The health monitor of a group whose instances have a port.
    pub fn monitor(&self, group: &Group, spec: &GroupSpec) -> Option<Monitor> {
        spec.port.map(|_| {
            Monitor::start(
                group.pool.clone(),
                self.health.clone(),
                self.docker.clone(),
                spec.health.clone(),
                display(&spec.key),
                self.log.clone(),
            )
        })
    }

    // -----------------------------------------------------------------------------------
    // PUT

    pub async fn prepare(&self, key: GroupKey, spec: GroupSpec) -> ApiResult<Prepared> {
        self.validate(&key, &spec)?;
        render_check(&spec).await?;
        // A certificate to obtain is obtained now, before anything changes.
        if let Some(want) = acme_want(&spec) {
            self.acme.slot(&want, true).await?;
        }
        // The pull runs outside the group's lock: it changes nothing of the group.
        let image_id = if spec.pull {
            self.say(&key, format!("pulling {}", spec.image));
            self.set_activity(&key, |a| a.phase = "pulling".into());
            let pulled = self.pull_reporting(&key, &spec.image).await;
            self.clear_activity(&key);
            pulled?
        } else {
            self.docker.image_id(&spec.image).await?.ok_or_else(|| {
                Error::failed(
                    "prepare",
                    format!(
                        "image {} is not in this host's Docker engine (the spec says not to pull it)",
                        spec.image
                    ),
                )
            })?
        };
        self.verify_image(&spec, &image_id).await?;
        let group = self.group(&key);
        let _ops = group.ops.lock().await;
        let mut record = self
            .record(&key)
            .unwrap_or_else(|| GroupRecord::new(key.clone()));
        self.say(
            &key,
            format!(
                "release {} ({}), config {} is pending",
                spec.release.name, spec.release.id, spec.config_version
            ),
        );
        record.pending = Some(spec);
        self.commit(record)?;
        Ok(Prepared { image_id })
    }

    /// Bad specs are refused before anything changes.
    fn validate(&self, key: &GroupKey, spec: &GroupSpec) -> ApiResult<()> {
        let bad = |m: String| Err(ApiError::bad_request(m));
        if &spec.key != key {
            return bad(format!(
                "the spec is for group {}, not {}",
                display(&spec.key),
                display(key)
            ));
        }
        if spec.image.trim().is_empty() {
            return bad("the spec has no image".into());
        }
        if spec.instances == 0 || spec.instances > MAX_INSTANCES {
            return bad(format!(
                "`instances` must be between 1 and {MAX_INSTANCES}, not {}",
                spec.instances
            ));
        }
        if spec.listen.is_some() && spec.port.is_none() {
            return bad("`listen` needs a node with a `port`".into());
        }
        if spec.listen == Some(0) || spec.port == Some(0) {
            return bad("ports must not be 0".into());
        }
        if !spec.health.path.starts_with('/') {
            return bad(format!(
                "health path `{}` must start with `/`",
                spec.health.path
            ));
        }
        if spec.health.interval_ms == 0 || spec.health.timeout_ms == 0 {
            return bad("health interval and timeout must be above 0".into());
        }
        if spec.reload.as_ref().is_some_and(|r| r.is_empty()) {
            return bad("`reload` must not be an empty command".into());
        }
        if spec.listen.is_none() && (spec.tls.is_some() || !spec.domains.is_empty()) {
            return bad("`domains` and `tls` need a `listen` port".into());
        }
        if let Some(d) = spec
            .domains
            .iter()
            .find(|d| !crate::agent::api::valid_domain(d))
        {
            return bad(format!(
                "`{d}` is not a host name (lowercase letters, digits, `-` and `.`; `*.` first for a wildcard)"
            ));
        }
        match &spec.tls {
            Some(TlsSpec::Files {
                certificate,
                key: k,
            }) => {
                let served = served_from_pem(certificate, k, "release")
                    .map_err(|e| ApiError::bad_request(format!("the TLS certificate: {e}")))?;
                let missing = uncovered(&served.info.names, &spec.domains);
                if !missing.is_empty() {
                    return bad(format!(
                        "the TLS certificate is for {}, not for {}",
                        served.info.names.join(", "),
                        missing.join(", ")
                    ));
                }
                if served.not_after <= crate::util::unix_now() {
                    return bad(format!(
                        "the TLS certificate expired on {}",
                        served.info.not_after
                    ));
                }
            }
            Some(TlsSpec::Acme { directory, .. }) => {
                if spec.domains.is_empty() {
                    return bad("ACME needs `domains` to ask certificates for".into());
                }
                if let Some(d) = spec.domains.iter().find(|d| d.starts_with("*.")) {
                    return bad(format!(
                        "`{d}`: ACME certificates over HTTP-01 cannot be wildcards"
                    ));
                }
                if !directory.starts_with("https://") {
                    return bad(format!(
                        "the ACME directory `{directory}` must be an https:// URL"
                    ));
                }
            }
            None => {}
        }
        if let Some(listen) = spec.listen {
            let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            let others: Vec<(&GroupKey, u16, &[String], bool)> = records
                .values()
                .filter(|r| &r.key != key)
                .filter_map(|r| r.current.as_ref())
                .filter_map(|c| {
                    c.listen
                        .map(|l| (&c.key, l, c.domains.as_slice(), c.tls.is_some()))
                })
                .collect();
            if let Some(why) = edge::clash(
                listen,
                &spec.domains,
                spec.tls.is_some(),
                others,
                self.edge.http_port(),
            ) {
                return Err(ApiError::conflict(why));
            }
        }
        Ok(())
    }

    /// The edge route of a group's spec (none without a `listen` port).
    async fn route(&self, spec: &GroupSpec, pool: Arc<Pool>) -> Result<Option<Route>> {
        let Some(port) = spec.listen else {
            return Ok(None);
        };
        let cert = match &spec.tls {
            None => None,
            Some(TlsSpec::Files { certificate, key }) => Some(CertSlot::new(
                served_from_pem(certificate, key, "release")
                    .map_err(|e| Error::invalid(format!("the TLS certificate: {e}")))?,
            )),
            Some(TlsSpec::Acme { .. }) => match acme_want(spec) {
                Some(want) => Some(self.acme.slot(&want, true).await?),
                None => None,
            },
        };
        Ok(Some(Route {
            key: spec.key.clone(),
            port,
            domains: spec.domains.clone(),
            cert,
            pool,
        }))
    }

    /// Point the edge at the group as `spec` says; what it no longer needs is returned.
    pub async fn reroute(&self, group: &Group, spec: &GroupSpec) -> Result<edge::Retired> {
        match self.route(spec, group.pool.clone()).await? {
            Some(route) => self.edge.set(route).await,
            None => Ok(self.edge.remove(&spec.key).await),
        }
    }

    /// The certificates ACME groups use now, for renewal.
    pub fn acme_wants(&self) -> Vec<Want> {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Want> = records
            .values()
            .filter_map(|r| r.current.as_ref())
            .filter_map(acme_want)
            .collect();
        out.dedup();
        out
    }

    // -----------------------------------------------------------------------------------
    // switch

    pub async fn switch(&self, key: GroupKey, switch: Switch) -> ApiResult<GroupStatus> {
        let group = self.group(&key);
        let mut rt = group.ops.lock().await;
        let Some(record) = self.record(&key) else {
            return Err(ApiError::not_found(format!(
                "group {} has no spec on this agent: PUT one first",
                display(&key)
            )));
        };
        let matches = |s: &GroupSpec| {
            s.release.id == switch.release_id && s.config_version == switch.config_version
        };
        let spec = match (&record.pending, &record.current) {
            (Some(p), _) if matches(p) => p.clone(),
            // Already switched (e.g. a retry after a lost answer): nothing to do.
            (_, Some(c)) if matches(c) && !record.instances.is_empty() => {
                return Ok(self.status(&key).await);
            }
            (pending, _) => {
                let what = pending.as_ref().map_or("no pending spec".to_string(), |p| {
                    format!(
                        "the pending spec is release {} config {}",
                        p.release.id, p.config_version
                    )
                });
                return Err(ApiError::conflict(format!(
                    "cannot switch group {} to release {} config {}: {what}",
                    display(&key),
                    switch.release_id,
                    switch.config_version
                )));
            }
        };
        self.replace(&group, &mut rt, spec, false).await?;
        Ok(self.status(&key).await)
    }

    /// Replace the group's instances with fresh ones of its current spec, the way a
    /// switch does: the new ones healthy first, then the proxy, then the drain.
    pub async fn restart(&self, key: GroupKey) -> ApiResult<GroupStatus> {
        let group = self.group(&key);
        let mut rt = group.ops.lock().await;
        let Some(spec) = self.record(&key).and_then(|r| r.current) else {
            return Err(ApiError::not_found(format!(
                "group `{}` of `{}/{}` runs nothing here",
                key.group, key.system, key.environment
            )));
        };
        self.say(&key, "restarting");
        self.replace(&group, &mut rt, spec, true).await?;
        Ok(self.status(&key).await)
    }

    /// Make `spec` current: start its instances (reusing kept ones), wait until they
    /// are healthy, point the proxy at them, drain and stop the old ones, prune the
    /// kept ones. On failure the new instances go and the old ones keep serving.
    /// `fresh`: new containers even where a stopped one of the same spec is kept.
    async fn replace(
        &self,
        group: &Group,
        rt: &mut Runtime,
        spec: GroupSpec,
        fresh: bool,
    ) -> ApiResult<()> {
        let key = spec.key.clone();
        let old = self
            .record(&key)
            .unwrap_or_else(|| GroupRecord::new(key.clone()));
        let inst = self.instances();
        self.say(
            &key,
            format!(
                "switching to release {} ({}), config {}",
                spec.release.name, spec.release.id, spec.config_version
            ),
        );

        // 1. Start the new instances.
        let mut started: Vec<InstanceRecord> = Vec::new();
        let mut reused: Vec<String> = Vec::new();
        for index in 0..spec.instances {
            let kept = old.kept.iter().find(|k| {
                !fresh
                    && k.index == index
                    && k.release_id == spec.release.id
                    && k.config_version == spec.config_version
            });
            let result = match kept {
                Some(k) => match inst.start(k.clone(), spec.port.is_some()).await {
                    Ok(r) => {
                        reused.push(r.container.clone());
                        Ok(r)
                    }
                    Err(e) => {
                        self.say(&key, format!("kept instance {} cannot start: {e}", k.name));
                        inst.start_fresh(&spec, index).await
                    }
                },
                None => inst.start_fresh(&spec, index).await,
            };
            match result {
                Ok(r) => {
                    self.say(
                        &key,
                        format!(
                            "started instance {index} ({}){}",
                            r.name,
                            r.port
                                .map(|p| format!(" on 127.0.0.1:{p}"))
                                .unwrap_or_default()
                        ),
                    );
                    started.push(r);
                }
                Err(e) => {
                    self.undo(&started, &reused, &spec).await;
                    return Err(e.into());
                }
            }
        }

        // 2. Wait until they are healthy.
        self.set_activity(&key, |a| {
            *a = GroupActivity {
                phase: "checking".into(),
                instances: started.len() as u32,
                ..GroupActivity::default()
            }
        });
        let healthy = inst
            .wait_healthy_reporting(&spec, &started, &|n| {
                self.set_activity(&key, |a| a.healthy = n)
            })
            .await;
        self.clear_activity(&key);
        if let Err(e) = healthy {
            self.say(&key, format!("switch failed: {e}"));
            self.undo(&started, &reused, &spec).await;
            return Err(e.into());
        }

        // 3. Point the proxy at them: a new listener first if the port changed.
        let retired = match self.reroute(group, &spec).await {
            Ok(r) => r,
            Err(e) => {
                self.undo(&started, &reused, &spec).await;
                return Err(e.into());
            }
        };
        let upstreams = started
            .iter()
            .filter_map(|i| i.port.map(|p| Upstream::new(&i.container, p)))
            .collect();
        group.pool.set_response_timeout(spec.response_timeout_ms);
        let old_set = group.pool.replace(upstreams);
        rt.monitor = self.monitor(group, &spec);
        if let Some(port) = spec.listen {
            let scheme = if spec.tls.is_some() { "https" } else { "http" };
            let addr = SocketAddr::new(self.proxy_bind, port);
            self.say(
                &key,
                format!(
                    "proxy on {scheme}://{addr} now serves release {}",
                    spec.release.name
                ),
            );
        }

        // 4. Commit: from here on the new instances are the group's.
        let mut record = old.clone();
        let previous = std::mem::take(&mut record.instances);
        record.kept.retain(|k| !reused.contains(&k.container));
        record.kept = previous.iter().cloned().chain(record.kept).collect();
        record.instances = started;
        if record.pending.as_ref().is_some_and(|p| {
            p.release.id == spec.release.id && p.config_version == spec.config_version
        }) {
            record.pending = None;
        }
        let stop = old
            .current
            .as_ref()
            .map_or(stop_timeout(&spec), stop_timeout);
        record.current = Some(spec);
        self.commit(record.clone())?;

        // 5. Drain and stop the old instances, then forget the oldest kept ones.
        // Not bounded by `stop_timeout`: that is how long the app takes to stop, and a
        // request slowed by a busy host must not be cut because the app stops fast.
        let bound = old
            .current
            .as_ref()
            .and_then(|c| c.stop_timeout_ms)
            .map_or(DEFAULT_DRAIN, |t| {
                DEFAULT_DRAIN.max(Duration::from_millis(t))
            });
        if !drain(&old_set, bound).await {
            self.say(
                &key,
                format!("old instances still had requests in flight after {bound:?}"),
            );
        }
        drop(retired);
        for e in inst.stop_all(&previous, stop).await {
            self.say(&key, format!("stopping an old instance: {e}"));
        }
        let (keep, gone) = prune(record.kept);
        inst.remove_all(&gone).await;
        record.kept = keep;
        self.commit(record)?;
        self.say(&key, "switch done");
        Ok(())
    }

    /// Undo step 1 of a failed switch: fresh instances go, kept ones stop again.
    async fn undo(&self, started: &[InstanceRecord], reused: &[String], spec: &GroupSpec) {
        let inst = self.instances();
        let (kept, fresh): (Vec<_>, Vec<_>) = started
            .iter()
            .cloned()
            .partition(|i| reused.contains(&i.container));
        inst.remove_all(&fresh).await;
        inst.stop_all(&kept, stop_timeout(spec)).await;
    }

    // -----------------------------------------------------------------------------------
    // config

    pub async fn update_config(&self, key: GroupKey, spec: GroupSpec) -> ApiResult<GroupStatus> {
        self.validate(&key, &spec)?;
        render_check(&spec).await?;
        let group = self.group(&key);
        let mut rt = group.ops.lock().await;
        let record = self.record(&key);
        let current = record.as_ref().and_then(|r| r.current.clone());
        let Some(current) = current else {
            // A host new to the group: a full start of the given release.
            self.ensure_image(&spec).await?;
            self.replace(&group, &mut rt, spec, false).await?;
            return Ok(self.status(&key).await);
        };
        if current.release.id != spec.release.id || current.image != spec.image {
            return Err(ApiError::conflict(format!(
                "group {} runs release {}, not {}: a config-only update keeps the release",
                display(&key),
                current.release.id,
                spec.release.id
            )));
        }
        let mut record = record.unwrap_or_else(|| GroupRecord::new(key.clone()));
        group.pool.set_response_timeout(spec.response_timeout_ms);
        // Only the proxy's response timeout changed: nothing to restart or reload.
        let same_but_proxy = GroupSpec {
            response_timeout_ms: spec.response_timeout_ms,
            domains: spec.domains.clone(),
            tls: spec.tls.clone(),
            ..current.clone()
        };
        let routing_changed = current.domains != spec.domains || current.tls != spec.tls;
        if same_but_proxy == spec && record.instances.len() == spec.instances as usize {
            if routing_changed {
                drop(self.reroute(&group, &spec).await?);
            }
            if current != spec {
                record.current = Some(spec);
                self.commit(record)?;
            }
            return Ok(self.status(&key).await);
        }
        let reloadable = (spec.reload.is_some() || spec.reload_signal.is_some())
            && current.instances == spec.instances
            && current.port == spec.port
            && current.listen == spec.listen
            && record.instances.len() == spec.instances as usize;
        if reloadable {
            if routing_changed {
                drop(self.reroute(&group, &spec).await?);
            }
            self.reload(record, &current, spec).await?;
        } else {
            self.replace(&group, &mut rt, spec, false).await?;
        }
        Ok(self.status(&key).await)
    }

    async fn ensure_image(&self, spec: &GroupSpec) -> Result<()> {
        let id = match self.docker.image_id(&spec.image).await? {
            Some(id) => id,
            None if !spec.pull => {
                return Err(Error::failed(
                    "config",
                    format!("image {} is not in this host's Docker engine", spec.image),
                ));
            }
            None => self.pull(&spec.image).await?,
        };
        self.verify_image(spec, &id).await
    }

    /// [`Agent::pull`], its bytes noted as the group's activity.
    async fn pull_reporting(&self, key: &GroupKey, image: &str) -> Result<String> {
        let registry = crate::docker::registry_of(image);
        let auth = crate::docker::auth::lookup(registry, self.docker_config.as_deref())?;
        let note = |done: u64, total: u64| {
            self.set_activity(key, |a| {
                a.bytes_done = done;
                a.bytes_total = total;
            })
        };
        self.docker
            .pull_reporting(image, Some(&auth), &self.log, &note)
            .await
    }

    /// Pull with this host's own login for the image's registry.
    async fn pull(&self, image: &str) -> Result<String> {
        let registry = crate::docker::registry_of(image);
        let auth = crate::docker::auth::lookup(registry, self.docker_config.as_deref())?;
        self.docker.pull(image, Some(&auth), &self.log).await
    }

    /// The image found for `spec` is the one its release was built as: the id it
    /// names, and for a digest reference an image the engine holds under that digest.
    async fn verify_image(&self, spec: &GroupSpec, image_id: &str) -> Result<()> {
        if let Some(expected) = &spec.image_id
            && expected != image_id
        {
            return Err(Error::failed(
                "prepare",
                format!(
                    "image {} is {image_id} here, but the release was built as {expected}: refusing to run it",
                    spec.image
                ),
            ));
        }
        if spec.image.contains('@') {
            let digests = self.docker.repo_digests(&spec.image).await?;
            if !digests.iter().any(|d| d == &spec.image) {
                return Err(Error::failed(
                    "prepare",
                    format!(
                        "image {} pulled as {}: refusing to run it",
                        spec.image,
                        digests.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Rewrite every instance's files and reload it (`reload` run in it, or
    /// `reload_signal` sent to it). If one fails, every instance gets its old files back
    /// (and those already reloaded reload again).
    async fn reload(
        &self,
        mut record: GroupRecord,
        old: &GroupSpec,
        spec: GroupSpec,
    ) -> ApiResult<()> {
        let key = spec.key.clone();
        let mut touched: Vec<&InstanceRecord> = Vec::new();
        let mut reloaded: Vec<&InstanceRecord> = Vec::new();
        let mut failure = None;
        for inst in &record.instances {
            touched.push(inst);
            let dir = self.data.instance_dir(&inst.name);
            let done = match files::write_instance_blocking(dir, &spec, inst.index).await {
                Ok(()) => self.reload_one(inst, &spec).await,
                Err(e) => Err(e),
            };
            match done {
                Ok(()) => reloaded.push(inst),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failure {
            self.say(&key, format!("reload failed, restoring the old files: {e}"));
            for inst in &touched {
                let dir = self.data.instance_dir(&inst.name);
                if let Err(e) = files::write_instance_blocking(dir, old, inst.index).await {
                    self.say(&key, format!("restoring {}: {e}", inst.name));
                }
            }
            for inst in &reloaded {
                let _ = self.reload_one(inst, old).await;
            }
            return Err(e.into());
        }
        for inst in &mut record.instances {
            inst.config_version = spec.config_version.clone();
        }
        if record
            .pending
            .as_ref()
            .is_some_and(|p| p.config_version == spec.config_version)
        {
            record.pending = None;
        }
        self.say(
            &key,
            format!("config {} reloaded in every instance", spec.config_version),
        );
        record.current = Some(spec);
        self.commit(record)?;
        Ok(())
    }

    /// Reload one instance as `spec` says: its `reload_signal` sent, or its `reload`
    /// command run (a non-zero exit fails, with the command's output).
    async fn reload_one(&self, inst: &InstanceRecord, spec: &GroupSpec) -> Result<()> {
        if let Some(signal) = &spec.reload_signal {
            return self.docker.signal(&inst.container, signal).await;
        }
        let Some(command) = &spec.reload else {
            return Ok(());
        };
        let out = self.docker.exec(&inst.container, command).await?;
        if out.exit_code == 0 {
            return Ok(());
        }
        let output = if out.output.is_empty() {
            String::new()
        } else {
            format!(":\n  {}", out.output.replace('\n', "\n  "))
        };
        Err(Error::failed(
            "reload",
            format!(
                "`{}` in instance {} ({}) exited with {}{output}",
                command.join(" "),
                inst.index,
                inst.name,
                out.exit_code
            ),
        ))
    }

    // -----------------------------------------------------------------------------------
    // DELETE

    pub async fn remove_group(&self, key: GroupKey) -> ApiResult<()> {
        let group = self.group(&key);
        let mut rt = group.ops.lock().await;
        rt.monitor = None;
        let old_set = group.pool.replace(Vec::new());
        let record = self.record(&key);
        let bound = record
            .as_ref()
            .and_then(|r| r.current.as_ref())
            .and_then(|c| c.stop_timeout_ms)
            .map_or(Duration::from_secs(10), Duration::from_millis);
        drain(&old_set, bound).await;
        drop(self.edge.remove(&key).await);
        let mut all: Vec<InstanceRecord> = record
            .iter()
            .flat_map(|r| r.instances.iter().chain(&r.kept).cloned())
            .collect();
        // Containers of the group that the state lost track of go too.
        let strays = self
            .docker
            .list_containers(&[
                ("stretch.agent", &self.data.agent_id),
                ("stretch.system", &key.system),
                ("stretch.environment", &key.environment),
                ("stretch.group", &key.group),
            ])
            .await?;
        for c in strays {
            if !all.iter().any(|i| i.container == c.id) {
                all.push(InstanceRecord {
                    container: c.id,
                    name: c.name,
                    index: 0,
                    release_id: String::new(),
                    config_version: String::new(),
                    port: None,
                });
            }
        }
        self.instances().remove_all(&all).await;
        if record.is_some() {
            self.forget(&key)?;
            self.say(&key, format!("removed ({} containers)", all.len()));
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------
    // state

    pub async fn status(&self, key: &GroupKey) -> GroupStatus {
        let record = self
            .record(key)
            .unwrap_or_else(|| GroupRecord::new(key.clone()));
        let pool = self.group(key).pool.current();
        let spec = record.current.as_ref().or(record.pending.as_ref());
        let mut instances = Vec::new();
        for inst in &record.instances {
            let state = match self.docker.inspect_container(&inst.container).await {
                Ok(Some(c)) => c.state,
                Ok(None) => "missing".to_string(),
                Err(_) => "unknown".to_string(),
            };
            let running = state == "running";
            let healthy = running
                && match inst.port {
                    Some(_) => pool
                        .iter()
                        .any(|u| u.container == inst.container && u.healthy()),
                    None => true,
                };
            instances.push(InstanceStatus {
                container: inst.container.clone(),
                index: inst.index,
                release_id: inst.release_id.clone(),
                config_version: inst.config_version.clone(),
                state,
                healthy,
            });
        }
        let current = record.current.as_ref();
        GroupStatus {
            key: key.clone(),
            node: spec.map(|s| s.node.clone()).unwrap_or_default(),
            host: spec.map(|s| s.host.clone()).unwrap_or_default(),
            release: current.map(|c| c.release.clone()),
            existing_release: current.and_then(|c| c.existing_release.clone()),
            config_version: current.map(|c| c.config_version.clone()),
            listen: current.and_then(|c| c.listen),
            domains: current.map(|c| c.domains.clone()).unwrap_or_default(),
            certificate: self.edge.certificate(key).await,
            healthy: current.is_some()
                && !instances.is_empty()
                && instances.iter().all(|i| i.healthy),
            instances,
        }
    }

    pub async fn statuses(&self) -> Vec<GroupStatus> {
        let keys: Vec<GroupKey> = {
            let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            records.keys().cloned().collect()
        };
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.status(&key).await);
        }
        out
    }
}

/// What an ACME group's certificate must cover.
fn acme_want(spec: &GroupSpec) -> Option<Want> {
    match &spec.tls {
        Some(TlsSpec::Acme { email, directory }) if spec.listen.is_some() => Some(Want {
            domains: spec.domains.clone(),
            email: email.clone(),
            directory: directory.clone(),
        }),
        _ => None,
    }
}

/// Render every instance's templates now, so that a bad one fails the PUT, not the
/// switch. Off the async runtime: a template that runs out its fuel fails its own
/// request while the agent keeps serving every other group.
async fn render_check(spec: &GroupSpec) -> ApiResult<()> {
    let spec = spec.clone();
    tokio::task::spawn_blocking(move || {
        (0..spec.instances).try_for_each(|index| files::render(&spec, index).map(|_| ()))
    })
    .await
    .map_err(|e| Error::failed("agent", format!("rendering the templates: {e}")))??;
    Ok(())
}

/// Split kept instances (newest first) into those to keep — the instances of the
/// newest [`KEPT_RELEASES`] releases, one per release, config and index — and the rest.
fn prune(kept: Vec<InstanceRecord>) -> (Vec<InstanceRecord>, Vec<InstanceRecord>) {
    let mut releases: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    let (mut keep, mut gone) = (Vec::new(), Vec::new());
    for k in kept {
        if !releases.contains(&k.release_id) {
            releases.push(k.release_id.clone());
        }
        let recent = releases
            .iter()
            .position(|r| r == &k.release_id)
            .is_some_and(|p| p < KEPT_RELEASES);
        let first = seen.insert((k.release_id.clone(), k.config_version.clone(), k.index));
        if recent && first {
            keep.push(k);
        } else {
            gone.push(k);
        }
    }
    (keep, gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, release: &str, config: &str, index: u32) -> InstanceRecord {
        InstanceRecord {
            container: id.into(),
            name: id.into(),
            index,
            release_id: release.into(),
            config_version: config.into(),
            port: None,
        }
    }

    #[test]
    fn prune_keeps_two_releases() {
        let (keep, gone) = prune(vec![
            rec("a", "r3", "c", 0),
            rec("b", "r3", "c", 1),
            rec("c", "r2", "c", 0),
            rec("d", "r3", "c", 0),
            rec("e", "r1", "c", 0),
        ]);
        let ids = |v: &[InstanceRecord]| v.iter().map(|r| r.container.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&keep), ["a", "b", "c"]);
        assert_eq!(ids(&gone), ["d", "e"]);
    }
}
