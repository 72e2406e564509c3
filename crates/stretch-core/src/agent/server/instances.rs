//! Instances of a group: start them (a fresh container with its folder, or a kept
//! stopped one), wait until they are healthy, stop and remove them. Everything here
//! goes through `docker/`; a failure message names the instance and quotes the last
//! lines of its output.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::files::{self, MOUNT_TARGET};
use super::health::{self, HealthClient};
use super::state::{DataDir, InstanceRecord, random_hex};
use crate::agent::api::{GroupKey, GroupSpec};
use crate::docker::{ContainerSpec, Docker};
use crate::{Error, Result};

/// Lines of a failing container's output quoted in errors.
const LOG_TAIL: usize = 20;

/// Default `docker stop` grace period when the node declares no `stop_timeout`.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The first pause between health checks of a starting instance; it doubles up to the
/// node's `interval`.
const STARTING_PAUSE: Duration = Duration::from_millis(50);

/// The labels every container of a group carries (and the agent's own).
pub fn labels(agent_id: &str, spec: &GroupSpec, index: u32) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("stretch.system".into(), spec.key.system.clone()),
        ("stretch.environment".into(), spec.key.environment.clone()),
        ("stretch.group".into(), spec.key.group.clone()),
        ("stretch.node".into(), spec.node.clone()),
        ("stretch.release".into(), spec.release.id.clone()),
        ("stretch.host".into(), spec.host.clone()),
        ("stretch.config".into(), spec.config_version.clone()),
        ("stretch.instance".into(), index.to_string()),
        ("stretch.agent".into(), agent_id.to_string()),
    ])
}

/// The `STRETCH_*` variables of instance `index`.
pub fn environment(spec: &GroupSpec, index: u32) -> Vec<String> {
    vec![
        format!("STRETCH_SYSTEM={}", spec.key.system),
        format!("STRETCH_ENVIRONMENT={}", spec.environment_name),
        format!("STRETCH_NODE={}", spec.node),
        format!("STRETCH_HOST={}", spec.host),
        format!("STRETCH_RELEASE_ID={}", spec.release.id),
        format!("STRETCH_RELEASE_NAME={}", spec.release.name),
        format!("STRETCH_INSTANCE={index}"),
    ]
}

/// `system/environment/group`, for messages.
pub fn display(key: &GroupKey) -> String {
    format!("{}/{}/{}", key.system, key.environment, key.group)
}

fn sanitize(part: &str) -> String {
    part.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

pub fn stop_timeout(spec: &GroupSpec) -> Duration {
    spec.stop_timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_STOP_TIMEOUT)
}

/// Docker-facing operations on instances.
pub struct Instances<'a> {
    pub docker: &'a Docker,
    pub data: &'a DataDir,
    pub health: &'a HealthClient,
}

impl Instances<'_> {
    /// A new container for instance `index` of `spec`: its folder written, created,
    /// started, its published port read back. On failure nothing is left behind.
    pub async fn start_fresh(&self, spec: &GroupSpec, index: u32) -> Result<InstanceRecord> {
        let name = format!(
            "stretch-{}-{}-{}-{index}-{}",
            sanitize(&spec.key.system),
            sanitize(&spec.key.environment),
            sanitize(&spec.key.group),
            random_hex(4)?
        );
        let dir = self.data.instance_dir(&name);
        if let Err(e) = files::write_instance_blocking(dir.clone(), spec, index).await {
            let _ = files::remove_instance(&dir);
            return Err(e);
        }
        let container = ContainerSpec {
            name: name.clone(),
            image: spec.image.clone(),
            labels: labels(&self.data.agent_id, spec, index),
            env: environment(spec, index),
            cmd: None,
            port: spec.port,
            mount_source: dir.clone(),
            mount_target: MOUNT_TARGET.to_string(),
            stop_timeout: Some(stop_timeout(spec)),
        };
        let id = match self.docker.create_container(&container).await {
            Ok(id) => id,
            Err(e) => {
                let _ = files::remove_instance(&dir);
                return Err(e);
            }
        };
        let record = InstanceRecord {
            container: id.clone(),
            name,
            index,
            release_id: spec.release.id.clone(),
            config_version: spec.config_version.clone(),
            port: None,
        };
        match self.start(record, spec.port.is_some()).await {
            Ok(r) => Ok(r),
            Err(e) => {
                self.remove(&id, &dir).await;
                Err(e)
            }
        }
    }

    /// Start an existing container (kept, or adopted but stopped) and read its port
    /// back (the engine may give it a new one).
    pub async fn start(
        &self,
        mut record: InstanceRecord,
        has_port: bool,
    ) -> Result<InstanceRecord> {
        self.docker.start_container(&record.container).await?;
        let info = self
            .docker
            .inspect_container(&record.container)
            .await?
            .ok_or_else(|| {
                Error::failed(
                    "agent",
                    format!("container {} vanished after it started", record.name),
                )
            })?;
        record.port = info.host_port;
        if has_port && record.port.is_none() {
            let tail = self.docker.logs_tail(&record.container, LOG_TAIL).await;
            return Err(Error::failed(
                "agent",
                format!(
                    "instance {} ({}) has no published port (state: {}){}",
                    record.index,
                    record.name,
                    info.state,
                    quote(&tail)
                ),
            ));
        }
        Ok(record)
    }

    /// Wait until every instance is healthy, at most `health.timeout_ms` in all. An
    /// instance without a port is healthy while its container runs (checked twice,
    /// one interval apart, so that one that crashes at once fails). `healthy(n)` is
    /// called each time one more passes.
    pub async fn wait_healthy_reporting(
        &self,
        spec: &GroupSpec,
        instances: &[InstanceRecord],
        healthy: &(dyn Fn(u32) + Send + Sync),
    ) -> Result<()> {
        let deadline = Instant::now() + Duration::from_millis(spec.health.timeout_ms);
        let passed = std::sync::atomic::AtomicU32::new(0);
        let waits = instances.iter().map(|i| async {
            let r = self.wait_one(spec, i, deadline).await;
            if r.is_ok() {
                healthy(passed.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
            }
            r
        });
        for result in futures_util::future::join_all(waits).await {
            result?;
        }
        Ok(())
    }

    async fn wait_one(
        &self,
        spec: &GroupSpec,
        inst: &InstanceRecord,
        deadline: Instant,
    ) -> Result<()> {
        let interval = Duration::from_millis(spec.health.interval_ms.max(50));
        let attempt = health::attempt_timeout(&spec.health);
        // A starting app is checked early and then less often, up to `interval`: the
        // switch should not wait a whole interval for an app that is up in 200 ms.
        let mut pause = STARTING_PAUSE.min(interval);
        let mut runs = 0;
        loop {
            let running = self
                .docker
                .inspect_container(&inst.container)
                .await?
                .filter(|c| c.running());
            if running.is_none() {
                return Err(self.unhealthy(inst, "its container stopped").await);
            }
            let last = match inst.port {
                Some(port) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match health::check(self.health, port, &spec.health.path, attempt.min(left))
                        .await
                    {
                        Ok(()) => return Ok(()),
                        Err(cause) => cause,
                    }
                }
                None => {
                    runs += 1;
                    if runs >= 2 {
                        return Ok(());
                    }
                    // A worker is healthy once it has run for one whole interval.
                    pause = interval;
                    "its container had not run for one interval yet".to_string()
                }
            };
            if Instant::now() >= deadline {
                let timeout = Duration::from_millis(spec.health.timeout_ms);
                return Err(self
                    .unhealthy(
                        inst,
                        &format!("not healthy within {timeout:?} (last check: {last})"),
                    )
                    .await);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(interval);
        }
    }

    async fn unhealthy(&self, inst: &InstanceRecord, why: &str) -> Error {
        let tail = self.docker.logs_tail(&inst.container, LOG_TAIL).await;
        Error::failed(
            "switch",
            format!(
                "instance {} ({}): {why}{}",
                inst.index,
                inst.name,
                quote(&tail)
            ),
        )
    }

    /// Stop containers in parallel; failures are returned as messages (the caller
    /// logs them: a stop that fails must not undo a switch that succeeded).
    pub async fn stop_all(&self, instances: &[InstanceRecord], timeout: Duration) -> Vec<String> {
        let stops = instances
            .iter()
            .map(|i| async move { self.docker.stop_container(&i.container, timeout).await });
        futures_util::future::join_all(stops)
            .await
            .into_iter()
            .filter_map(|r| r.err().map(|e| e.to_string()))
            .collect()
    }

    /// Remove a container and its folder, ignoring failures (best effort cleanup).
    pub async fn remove(&self, container: &str, dir: &std::path::Path) {
        let _ = self.docker.remove_container(container).await;
        let _ = files::remove_instance(dir);
    }

    /// Remove instances (containers and folders) in parallel.
    pub async fn remove_all(&self, instances: &[InstanceRecord]) {
        let removals = instances.iter().map(|i| async move {
            self.remove(&i.container, &self.data.instance_dir(&i.name))
                .await
        });
        futures_util::future::join_all(removals).await;
    }
}

/// `tail` as the end of an error message.
fn quote(tail: &str) -> String {
    if tail.trim().is_empty() {
        return String::new();
    }
    let mut out = String::from("; last lines of its output:");
    for line in tail.lines() {
        out.push_str("\n  ");
        out.push_str(line);
    }
    out
}
