//! Containers, for the agent: pull an image, create and start an instance (labels, one
//! port published on 127.0.0.1 at a random host port, a read-only bind mount), stop,
//! remove, list by label, inspect, read the last lines of logs, and `exec` a command.
//!
//! Published ports are only ever read back from the engine (`inspect`): callers talk
//! to `127.0.0.1:HOST_PORT`, never to a container's own address on a docker network.
//! Errors are [`Error::Failed`] with stage `docker` (stage `pull` for pulls) and name
//! the container or image.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use bollard::models::{
    ContainerCreateBody, CreateImageInfo, HostConfig, Mount, MountType, PortBinding, RestartPolicy,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, InspectContainerOptions, KillContainerOptions,
    ListContainersOptions, LogsOptions, RemoveContainerOptions, StopContainerOptions,
};
use futures_util::StreamExt;

use super::auth::Lookup;
use super::{Docker, describe, is_not_found, registry_of, split_reference};
use crate::log::Log;
use crate::{Error, Result};

/// How much output of an `exec` is kept (the rest is dropped, the end is kept).
const EXEC_OUTPUT_LIMIT: usize = 16 * 1024;

/// What to create; see [`Docker::create_container`].
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    pub env: Vec<String>,
    /// The command, instead of the image's `CMD` (none: the image's).
    pub cmd: Option<Vec<String>>,
    /// The port the app listens on inside; published on `127.0.0.1:RANDOM`.
    pub port: Option<u16>,
    /// A host folder mounted read-only at `mount_target`.
    pub mount_source: PathBuf,
    pub mount_target: String,
    pub stop_timeout: Option<Duration>,
}

impl ContainerSpec {
    /// Its folder, bound read-only.
    pub fn mount(&self) -> Mount {
        Mount {
            target: Some(self.mount_target.clone()),
            source: Some(self.mount_source.display().to_string()),
            typ: Some(MountType::BIND),
            read_only: Some(true),
            ..Default::default()
        }
    }
}

/// A container as the list or inspect calls see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Docker's state: `created`, `running`, `exited`, …
    pub state: String,
    /// Only filled by [`Docker::inspect_container`]: the host port (on 127.0.0.1) of the
    /// container's first published port, and when it last started.
    pub host_port: Option<u16>,
    pub started_at: Option<String>,
}

impl ContainerInfo {
    pub fn running(&self) -> bool {
        self.state == "running"
    }
}

/// The result of [`Docker::exec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i64,
    /// stdout and stderr interleaved, at most the last 16 KiB.
    pub output: String,
}

fn docker_error(what: String, e: &bollard::errors::Error) -> Error {
    Error::failed("docker", format!("{what}: {}", describe(e)))
}

impl Docker {
    /// Pull `reference` from its registry, logging one line per finished layer.
    /// Returns the image id. `auth`: the login for its registry, when there is one.
    pub async fn pull(&self, reference: &str, auth: Option<&Lookup>, log: &Log) -> Result<String> {
        self.pull_reporting(reference, auth, log, &|_, _| {}).await
    }

    /// Like [`Docker::pull`], calling `bytes(done, total)` as layers download (the
    /// total grows as the engine learns the layers' sizes).
    pub async fn pull_reporting(
        &self,
        reference: &str,
        auth: Option<&Lookup>,
        log: &Log,
        bytes: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<String> {
        let (repo, tag) = split_reference(reference);
        let options = CreateImageOptions {
            from_image: Some(repo.to_string()),
            tag: Some(tag.to_string()),
            ..Default::default()
        };
        let registry = registry_of(reference);
        let credentials = auth
            .and_then(|a| a.credentials.as_ref())
            .map(|c| c.for_engine(registry));
        let mut stream = self.inner.create_image(Some(options), None, credentials);
        let mut progress = PullProgress::default();
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| {
                let cause = describe(&e);
                if let Some(refused) =
                    auth.and_then(|a| super::auth::refused(registry, &cause, a, "pull"))
                {
                    return refused;
                }
                Error::failed(
                    "pull",
                    format!(
                        "pulling {reference} from {}: {}",
                        registry_of(reference),
                        cause
                    ),
                )
            })?;
            if let Some(line) = progress.update(&info) {
                log.line(line);
            }
            if progress.track(&info) {
                let (done, total) = progress.bytes();
                bytes(done, total);
            }
        }
        self.image_id(reference).await?.ok_or_else(|| {
            Error::failed(
                "pull",
                format!("the pulled image {reference} is not in the engine"),
            )
        })
    }

    /// Create (not start) a container; returns its id.
    pub async fn create_container(&self, spec: &ContainerSpec) -> Result<String> {
        let exposed = spec.port.map(|p| format!("{p}/tcp"));
        let port_bindings = exposed.as_ref().map(|key| {
            HashMap::from([(
                key.clone(),
                Some(vec![PortBinding {
                    host_ip: Some("127.0.0.1".to_string()),
                    // Empty: the engine picks a free port; read it back with inspect.
                    host_port: Some(String::new()),
                }]),
            )])
        });
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            labels: Some(spec.labels.clone().into_iter().collect()),
            env: Some(spec.env.clone()),
            cmd: spec.cmd.clone(),
            exposed_ports: exposed.map(|k| vec![k]),
            stop_timeout: spec.stop_timeout.map(|t| t.as_secs() as i64),
            host_config: Some(HostConfig {
                port_bindings,
                mounts: Some(vec![spec.mount()]),
                // Instances come back after a reboot of the machine; the agent
                // re-adopts them. A container we stop stays stopped.
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                    maximum_retry_count: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(spec.name.clone()),
            ..Default::default()
        };
        let created = self
            .inner
            .create_container(Some(options), body)
            .await
            .map_err(|e| {
                docker_error(
                    format!("creating container {} from {}", spec.name, spec.image),
                    &e,
                )
            })?;
        Ok(created.id)
    }

    /// Start a created or stopped container. Starting a running one is fine.
    pub async fn start_container(&self, id: &str) -> Result<()> {
        match self.inner.start_container(id, None).await {
            Ok(()) => Ok(()),
            // 304: already started.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(docker_error(format!("starting container {id}"), &e)),
        }
    }

    /// Stop a container: SIGTERM, then SIGKILL after `timeout`. Absent or already
    /// stopped is fine.
    pub async fn stop_container(&self, id: &str, timeout: Duration) -> Result<()> {
        let options = StopContainerOptions {
            signal: None,
            t: Some(timeout.as_secs().min(i32::MAX as u64) as i32),
        };
        match self.inner.stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(docker_error(format!("stopping container {id}"), &e)),
        }
    }

    /// Send `signal` (`SIGHUP`, …) to a running container's main process.
    pub async fn signal(&self, id: &str, signal: &str) -> Result<()> {
        let options = KillContainerOptions {
            signal: signal.to_string(),
        };
        self.inner
            .kill_container(id, Some(options))
            .await
            .map_err(|e| docker_error(format!("sending {signal} to container {id}"), &e))
    }

    /// Remove a container, stopping it first if it runs (`force`). Absent is fine.
    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            link: false,
        };
        match self.inner.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // 409: removal already in progress.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409,
                message,
            }) if message.contains("already in progress") => Ok(()),
            Err(e) => Err(docker_error(format!("removing container {id}"), &e)),
        }
    }

    /// Every container (running or not) that has all `labels` (`key=value`).
    pub async fn list_containers(&self, labels: &[(&str, &str)]) -> Result<Vec<ContainerInfo>> {
        let filter = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("label".to_string(), filter)])),
            ..Default::default()
        };
        let list = self
            .inner
            .list_containers(Some(options))
            .await
            .map_err(|e| docker_error("listing containers".to_string(), &e))?;
        Ok(list
            .into_iter()
            .map(|c| ContainerInfo {
                id: c.id.unwrap_or_default(),
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .map(|n| n.trim_start_matches('/').to_string())
                    .unwrap_or_default(),
                labels: c.labels.unwrap_or_default().into_iter().collect(),
                state: c.state.map(|s| s.to_string()).unwrap_or_default(),
                host_port: None,
                started_at: None,
            })
            .collect())
    }

    /// A container's state and published port, or `None` if there is no such container.
    pub async fn inspect_container(&self, id: &str) -> Result<Option<ContainerInfo>> {
        let c = match self
            .inner
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => c,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(docker_error(format!("inspecting container {id}"), &e)),
        };
        let host_port = c
            .network_settings
            .as_ref()
            .and_then(|n| n.ports.as_ref())
            .and_then(|ports| {
                ports
                    .values()
                    .flatten()
                    .flatten()
                    .filter(|b| {
                        b.host_ip
                            .as_deref()
                            .is_none_or(|ip| ip == "127.0.0.1" || ip.is_empty())
                    })
                    .find_map(|b| b.host_port.as_deref().and_then(|p| p.parse().ok()))
            });
        let state = c.state.as_ref();
        Ok(Some(ContainerInfo {
            id: c.id.clone().unwrap_or_default(),
            name: c
                .name
                .as_deref()
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_string(),
            labels: c
                .config
                .as_ref()
                .and_then(|cfg| cfg.labels.clone())
                .unwrap_or_default()
                .into_iter()
                .collect(),
            state: state
                .and_then(|s| s.status)
                .map(|s| s.to_string())
                .unwrap_or_default(),
            host_port,
            started_at: state.and_then(|s| s.started_at.clone()),
        }))
    }

    /// The last `lines` lines of a container's output (stdout and stderr), for error
    /// messages; empty if they cannot be read.
    pub async fn logs_tail(&self, id: &str, lines: usize) -> String {
        let options = LogsOptions {
            stdout: true,
            stderr: true,
            tail: lines.to_string(),
            ..Default::default()
        };
        let mut out = String::new();
        let mut stream = self.inner.logs(id, Some(options));
        while let Some(Ok(chunk)) = stream.next().await {
            out.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
        }
        out.trim_end().to_string()
    }

    /// Run `cmd` in the running container `id`; waits for it to end and returns its
    /// exit code and output. A command that cannot start is an error.
    pub async fn exec(&self, id: &str, cmd: &[String]) -> Result<ExecOutput> {
        let (exec_id, mut attached) = self.exec_attached(id, cmd, false, false).await?;
        let mut output = String::new();
        while let Some(chunk) = attached.output.next().await {
            let (_, bytes) = chunk?;
            output.push_str(&String::from_utf8_lossy(&bytes));
            if output.len() > 2 * EXEC_OUTPUT_LIMIT {
                let cut = output.len() - EXEC_OUTPUT_LIMIT;
                let cut = (cut..output.len())
                    .find(|i| output.is_char_boundary(*i))
                    .unwrap_or(cut);
                output.drain(..cut);
            }
        }
        // The output stream ends when the process does; its exit code may still lag.
        Ok(ExecOutput {
            exit_code: self.exec_exit_code(&exec_id).await?,
            output: output.trim_end().to_string(),
        })
    }
}

/// Folds the engine's pull messages into the few lines worth logging.
#[derive(Default)]
struct PullProgress {
    done: usize,
    last: Option<String>,
    /// Per layer: bytes downloaded, size.
    layers: std::collections::BTreeMap<String, (u64, u64)>,
}

impl PullProgress {
    /// Note a layer's download progress; whether the byte counts changed.
    fn track(&mut self, info: &CreateImageInfo) -> bool {
        let (Some(layer), Some(status)) = (info.id.as_deref(), info.status.as_deref()) else {
            return false;
        };
        let detail = info.progress_detail.as_ref();
        let current = detail.and_then(|d| d.current).unwrap_or(0).max(0) as u64;
        let total = detail.and_then(|d| d.total).unwrap_or(0).max(0) as u64;
        let entry = self.layers.entry(layer.to_string()).or_insert((0, 0));
        let before = *entry;
        match status.trim() {
            "Downloading" if total > 0 => *entry = (current.min(total), total),
            "Download complete" | "Pull complete" | "Already exists" | "Extracting" => {
                entry.0 = entry.1
            }
            _ => {}
        }
        *entry != before
    }

    fn bytes(&self) -> (u64, u64) {
        self.layers
            .values()
            .fold((0, 0), |(d, t), (ld, lt)| (d + ld, t + lt))
    }

    fn update(&mut self, info: &CreateImageInfo) -> Option<String> {
        let status = info.status.as_deref()?.trim();
        let layer = info.id.as_deref().unwrap_or("");
        let line = match status {
            // Ticks and intermediate steps of a layer: the compact log skips them.
            "Waiting" | "Downloading" | "Extracting" | "Verifying Checksum"
            | "Download complete" | "Pulling fs layer" | "" => return None,
            "Pull complete" | "Already exists" => {
                self.done += 1;
                format!("layer {} ({layer}): {status}", self.done)
            }
            s => s.to_string(),
        };
        if self.last.as_deref() == Some(line.as_str()) {
            return None;
        }
        self.last = Some(line.clone());
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use stretch_test::{ImageGuard, Registry, base_image, http_get, unique, write};

    use super::*;

    /// Removes a container by name when dropped, even if the test failed.
    struct ContainerGuard(String);

    impl Drop for ContainerGuard {
        fn drop(&mut self) {
            let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
        }
    }

    #[test]
    fn pull_bytes_are_summed_over_layers() {
        let info = |id: &str, status: &str, current: i64, total: i64| CreateImageInfo {
            id: Some(id.into()),
            status: Some(status.into()),
            progress_detail: Some(bollard::models::ProgressDetail {
                current: Some(current),
                total: Some(total),
            }),
            ..Default::default()
        };
        let mut p = PullProgress::default();
        assert!(!p.track(&info("a", "Pulling fs layer", 0, 0)));
        assert!(p.track(&info("a", "Downloading", 100, 1000)));
        assert!(p.track(&info("b", "Downloading", 50, 500)));
        assert_eq!(p.bytes(), (150, 1500));
        assert!(p.track(&info("a", "Download complete", 0, 0)));
        assert_eq!(p.bytes(), (1050, 1500));
        // A layer the engine already had counts as nothing to fetch.
        assert!(!p.track(&info("c", "Already exists", 0, 0)));
        assert!(p.track(&info("b", "Pull complete", 0, 0)));
        assert_eq!(p.bytes(), (1500, 1500));
    }

    #[tokio::test]
    async fn container_lifecycle() {
        let docker = Docker::connect().await.unwrap();
        let name = unique("stretch-core-ctr");
        let _guard = ContainerGuard(name.clone());
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "index.html", "hello from the mount");
        let label = unique("label");
        let spec = ContainerSpec {
            name: name.clone(),
            image: base_image(),
            labels: BTreeMap::from([("stretch.test".to_string(), label.clone())]),
            env: vec!["GREETING=hi".to_string()],
            cmd: Some(
                ["httpd", "-f", "-p", "8080", "-h", "/stretch"]
                    .map(String::from)
                    .to_vec(),
            ),
            port: Some(8080),
            mount_source: dir.path().to_path_buf(),
            mount_target: "/stretch".to_string(),
            stop_timeout: Some(Duration::from_secs(1)),
        };
        let id = docker.create_container(&spec).await.unwrap();
        docker.start_container(&id).await.unwrap();
        docker.start_container(&id).await.unwrap();
        let info = docker.inspect_container(&id).await.unwrap().unwrap();
        assert!(info.running(), "{info:?}");
        assert_eq!(info.name, name);
        assert_eq!(info.labels.get("stretch.test"), Some(&label));
        let port = info.host_port.expect("a published port");

        let addr = format!("127.0.0.1:{port}");
        let mut body = String::new();
        for _ in 0..100 {
            if let Ok((200, b)) = http_get(&addr, "/index.html") {
                body = b;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(body, "hello from the mount");

        let listed = docker
            .list_containers(&[("stretch.test", &label)])
            .await
            .unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].id.as_str(), listed[0].state.as_str()),
            (id.as_str(), "running")
        );

        let sh = |script: &str| ["sh", "-c", script].map(String::from).to_vec();
        let out = docker
            .exec(
                &id,
                // One write to stdout: stdout and stderr arrive in either order.
                &sh("echo \"$(cat /stretch/index.html) $GREETING\"; echo oops >&2; exit 3"),
            )
            .await
            .unwrap();
        assert_eq!(out.exit_code, 3);
        assert!(out.output.contains("hello from the mount hi"), "{out:?}");
        assert!(out.output.contains("oops"), "{out:?}");
        let out = docker
            .exec(&id, &sh("echo x > /stretch/new"))
            .await
            .unwrap();
        assert_ne!(out.exit_code, 0, "the mount is read-only: {out:?}");
        let err = docker
            .exec(&id, &["/no/such/command".to_string()])
            .await
            .map(|o| o.exit_code);
        assert!(matches!(err, Err(_) | Ok(126) | Ok(127)), "{err:?}");

        docker
            .stop_container(&id, Duration::from_secs(1))
            .await
            .unwrap();
        let info = docker.inspect_container(&id).await.unwrap().unwrap();
        assert_eq!(info.state, "exited");
        docker
            .stop_container(&id, Duration::from_secs(1))
            .await
            .unwrap();
        docker.remove_container(&id).await.unwrap();
        assert_eq!(docker.inspect_container(&id).await.unwrap(), None);
        docker.remove_container(&id).await.unwrap();
        docker
            .stop_container(&id, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(
            docker
                .list_containers(&[("stretch.test", &label)])
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn failing_start_names_the_container() {
        let docker = Docker::connect().await.unwrap();
        let name = unique("stretch-core-ctr");
        let _guard = ContainerGuard(name.clone());
        let dir = tempfile::tempdir().unwrap();
        let spec = ContainerSpec {
            name: name.clone(),
            image: base_image(),
            labels: BTreeMap::new(),
            env: Vec::new(),
            cmd: Some(vec!["/no/such/binary".to_string()]),
            port: None,
            mount_source: dir.path().to_path_buf(),
            mount_target: "/stretch".to_string(),
            stop_timeout: None,
        };
        let id = docker.create_container(&spec).await.unwrap();
        let err = docker.start_container(&id).await.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("docker failed: starting container {id}: ")),
            "{err}"
        );
        let err = docker
            .create_container(&spec)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("creating container {name}")), "{err}");
    }

    #[tokio::test]
    async fn pull_from_a_registry() {
        let docker = Docker::connect().await.unwrap();
        let registry = Registry::start();
        let reference = format!("{}/{}/app:1", registry.addr, unique("stretch-core-pull"));
        let _guard = ImageGuard(vec![reference.clone()]);
        docker.tag(&base_image(), &reference).await.unwrap();
        docker
            .push(
                &reference,
                &crate::docker::auth::tests_anonymous(),
                &Log::null(),
            )
            .await
            .unwrap();
        docker.remove_image(&reference).await.unwrap();
        let memory = std::sync::Arc::new(crate::log::Memory::default());
        let log = Log::new(vec![memory.clone()]);
        let id = docker.pull(&reference, None, &log).await.unwrap();
        assert_eq!(docker.image_id(&reference).await.unwrap(), Some(id));
        let lines = memory.0.lock().unwrap().len();
        assert!(lines > 0 && lines < 10, "compact progress: {lines} lines");

        let missing = format!("{}/{}/none:1", registry.addr, unique("stretch-core-pull"));
        let err = docker
            .pull(&missing, None, &Log::null())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "pull failed: pulling {missing} from {}",
                registry.addr
            )),
            "{err}"
        );
    }

    fn feed(messages: &[(&str, &str)]) -> Vec<String> {
        let mut p = PullProgress::default();
        messages
            .iter()
            .filter_map(|(id, s)| {
                p.update(&CreateImageInfo {
                    id: Some(id.to_string()).filter(|i| !i.is_empty()),
                    status: Some(s.to_string()),
                    ..Default::default()
                })
            })
            .collect()
    }

    #[test]
    fn pull_progress_is_one_line_per_layer() {
        let lines = feed(&[
            ("1", "Pulling from shop/web"),
            ("a1", "Pulling fs layer"),
            ("b2", "Already exists"),
            ("a1", "Downloading"),
            ("a1", "Downloading"),
            ("a1", "Verifying Checksum"),
            ("a1", "Download complete"),
            ("a1", "Extracting"),
            ("a1", "Pull complete"),
            ("", "Digest: sha256:abc"),
            ("", "Status: Downloaded newer image for r/shop/web:1"),
        ]);
        assert_eq!(
            lines,
            vec![
                "Pulling from shop/web",
                "layer 1 (b2): Already exists",
                "layer 2 (a1): Pull complete",
                "Digest: sha256:abc",
                "Status: Downloaded newer image for r/shop/web:1",
            ]
        );
    }
}
