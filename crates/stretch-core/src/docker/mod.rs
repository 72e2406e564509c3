//! The only module that talks to the Docker Engine API (through bollard): build, tag,
//! push, inspect and remove images.
//!
//! * [`Docker::connect`] follows bollard's `connect_with_defaults` rules (`DOCKER_HOST`
//!   if set: unix, tcp or http; else the local socket), pings the engine and negotiates
//!   the API version down to the engine's (20.10 speaks 1.41).
//! * [`Docker::build`] uses the classic builder and never pulls; the Dockerfile is
//!   given as text. `context.rs` says how the context is sent, `build.rs` how output
//!   and failures are reported.
//! * [`Docker::push`] logs one line per finished layer; see `push.rs`.
//! * Containers, for the agent (pull, create with labels and a port published on
//!   127.0.0.1, start, stop, remove, list by label, inspect, logs, exec): `containers.rs`.
//!
//! Errors are [`Error::Failed`] with stage `build` (build, tag), `push` (push) or
//! `docker` (connecting, inspecting, removing), and carry the engine's own message.
//!
//! Beyond the first sketch of this API: [`BuildRequest::skip`] is `dyn Fn + Sync` (not
//! just `dyn Fn`) so that the build future is `Send`; [`Docker::connect_to`] takes an
//! explicit host; [`registry_of`] names a reference's registry for error messages.

pub mod attach;
pub mod auth;
mod build;
pub mod containers;
mod context;
mod push;
pub mod registry;

use std::time::Duration;

use bollard::errors::Error as EngineError;
use bollard::query_parameters::{RemoveImageOptions, TagImageOptions};

pub use build::BuildRequest;
pub use containers::{ContainerInfo, ContainerSpec, ExecOutput};

use crate::{Error, Result};

/// Where the engine is when `DOCKER_HOST` is not set (bollard's default too).
const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// A ping that takes longer than this means the engine is not usable.
const PING_TIMEOUT: Duration = Duration::from_secs(15);

/// A connection to the Docker engine; cheap to clone (clones share the connection).
#[derive(Debug, Clone)]
pub struct Docker {
    inner: bollard::Docker,
}

impl Docker {
    /// Connect to the engine at `DOCKER_HOST`, or the local socket, check that it
    /// answers, and settle on an API version both sides speak.
    pub async fn connect() -> Result<Docker> {
        let host = std::env::var("DOCKER_HOST").unwrap_or_else(|_| DEFAULT_HOST.to_string());
        Docker::connect_to(&host).await
    }

    /// Like [`Docker::connect`], to the engine at `host` (`unix://`, `tcp://`, `http://`).
    pub async fn connect_to(host: &str) -> Result<Docker> {
        let unreachable = |cause: String| Error::Failed {
            stage: "docker".to_string(),
            message: format!("the Docker engine at {host} is unreachable: {cause}"),
            help: Some(
                "is the Docker daemon running? `DOCKER_HOST` selects another engine".to_string(),
            ),
        };
        let inner =
            bollard::Docker::connect_with_host(host).map_err(|e| unreachable(describe(&e)))?;
        match tokio::time::timeout(PING_TIMEOUT, inner.ping()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(unreachable(describe(&e))),
            Err(_) => {
                return Err(unreachable(format!(
                    "no answer to a ping within {PING_TIMEOUT:?}"
                )));
            }
        }
        let inner = inner
            .negotiate_version()
            .await
            .map_err(|e| unreachable(describe(&e)))?;
        Ok(Docker { inner })
    }

    /// Give `image` (an id or reference) the name `reference` (`REPO[:TAG]`).
    pub async fn tag(&self, image: &str, reference: &str) -> Result<()> {
        let (repo, tag) = split_reference(reference);
        let options = TagImageOptions {
            repo: Some(repo.to_string()),
            tag: Some(tag.to_string()),
        };
        self.inner
            .tag_image(image, Some(options))
            .await
            .map_err(|e| {
                Error::failed(
                    "build",
                    format!("tagging {image} as {reference}: {}", describe(&e)),
                )
            })
    }

    /// The id (`sha256:…`) of the local image `reference`, or `None` if there is none.
    pub async fn image_id(&self, reference: &str) -> Result<Option<String>> {
        match self.inner.inspect_image(reference).await {
            Ok(image) => Ok(image.id),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(Error::failed(
                "docker",
                format!("inspecting image {reference}: {}", describe(&e)),
            )),
        }
    }

    /// The `REPO@sha256:…` names the engine holds image `reference` under (what
    /// registries it was pulled from or pushed to, by manifest digest).
    pub async fn repo_digests(&self, reference: &str) -> Result<Vec<String>> {
        match self.inner.inspect_image(reference).await {
            Ok(image) => Ok(image.repo_digests.unwrap_or_default()),
            Err(e) if is_not_found(&e) => Ok(Vec::new()),
            Err(e) => Err(Error::failed(
                "docker",
                format!("inspecting image {reference}: {}", describe(&e)),
            )),
        }
    }

    /// Remove the local image name `reference` (the image itself goes with its last
    /// name). Absent is fine; an image a container still uses is an error.
    pub async fn remove_image(&self, reference: &str) -> Result<()> {
        let options = RemoveImageOptions {
            force: false,
            noprune: false,
            platforms: None,
        };
        match self
            .inner
            .remove_image(reference, Some(options), None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(Error::failed(
                "docker",
                format!("removing image {reference}: {}", describe(&e)),
            )),
        }
    }

    /// The bollard client, for modules that need more of the API (the agent).
    pub fn inner(&self) -> &bollard::Docker {
        &self.inner
    }
}

/// Split an image reference into repository and tag: `127.0.0.1:5000/shop/web:abc` =>
/// (`127.0.0.1:5000/shop/web`, `abc`); no tag => `latest`. A digest reference
/// (`repo@sha256:…`) gives the digest as the second part.
pub fn split_reference(reference: &str) -> (&str, &str) {
    if let Some((repo, digest)) = reference.split_once('@') {
        return (repo, digest);
    }
    // A `:` before the last `/` belongs to the registry's port, not to a tag.
    let name_start = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[name_start..].rfind(':') {
        Some(i) => (
            &reference[..name_start + i],
            &reference[name_start + i + 1..],
        ),
        None => (reference, "latest"),
    }
}

/// The registry host of a reference, as docker decides it: the first component if it
/// looks like a host (has a `.` or `:`, or is `localhost`), else Docker Hub.
pub fn registry_of(reference: &str) -> &str {
    match reference.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first
        }
        _ => "docker.io",
    }
}

fn is_not_found(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// The engine's message without bollard's wrapping, with the causes of transport
/// errors (which alone say e.g. "connection refused").
fn describe(e: &EngineError) -> String {
    match e {
        EngineError::DockerResponseServerError { message, .. } => message.trim().to_string(),
        EngineError::DockerStreamError { error } => error.trim().to_string(),
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(s) = source {
                let msg = s.to_string();
                if !text.contains(&msg) {
                    text.push_str(": ");
                    text.push_str(&msg);
                }
                source = s.source();
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::Arc;

    use stretch_test::{ImageGuard, PrefixGuard, Registry, base_image, docker, unique, write};

    use super::*;
    use crate::log::{Event, Log, Memory};

    #[test]
    fn references() {
        assert_eq!(
            split_reference("127.0.0.1:5000/shop/web:abc"),
            ("127.0.0.1:5000/shop/web", "abc")
        );
        assert_eq!(
            split_reference("127.0.0.1:5000/shop/web"),
            ("127.0.0.1:5000/shop/web", "latest")
        );
        assert_eq!(split_reference("busybox"), ("busybox", "latest"));
        assert_eq!(
            split_reference("stretch-test/busybox:1"),
            ("stretch-test/busybox", "1")
        );
        assert_eq!(split_reference("r/a@sha256:00"), ("r/a", "sha256:00"));
        assert_eq!(registry_of("127.0.0.1:5000/shop/web:abc"), "127.0.0.1:5000");
        assert_eq!(registry_of("localhost/a"), "localhost");
        assert_eq!(registry_of("shop/web:1"), "docker.io");
        assert_eq!(registry_of("web"), "docker.io");
    }

    fn memory_log() -> (Log, Arc<Memory>) {
        let memory = Arc::new(Memory::default());
        (Log::new(vec![memory.clone()]), memory)
    }

    fn lines(memory: &Memory) -> Vec<String> {
        memory
            .0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                Event::Line { text, .. } => Some(text.clone()),
                _ => None,
            })
            .collect()
    }

    fn failure(err: Error) -> (String, String) {
        match err {
            Error::Failed { stage, message, .. } => (stage, message),
            other => panic!("expected a failed stage, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn build_tag_push_remove() {
        let base = base_image();
        let registry = Registry::start();
        let repo = unique("stretch-core-build");
        let _cleanup = PrefixGuard(repo.clone());
        let docker = Docker::connect().await.unwrap();

        let ctx = tempfile::tempdir().unwrap();
        write(ctx.path(), "app.txt", "hello");
        write(ctx.path(), "secret.txt", "never in the image");
        write(ctx.path(), "sub/file.txt", "deep");
        let dockerfile = "ARG GREETING\nCOPY . /ctx/\nRUN echo \"$GREETING\" > /greeting && ls -A /ctx > /listing\n";
        let local = format!("{repo}/web:one");
        let remote = format!("{}/{repo}/web:r1", registry.addr);
        let label = unique("label");
        let skip = |p: &Path| p == Path::new("secret.txt");
        let req = BuildRequest {
            context: ctx.path(),
            dockerfile: format!("FROM {base}\n{dockerfile}"),
            tags: vec![local.clone(), remote.clone()],
            build_args: BTreeMap::from([("GREETING".to_string(), "hi there".to_string())]),
            labels: BTreeMap::from([("stretch.test".to_string(), label.clone())]),
            skip: &skip,
        };
        let (log, memory) = memory_log();
        let started = std::time::Instant::now();
        let id = docker.build(req, &log).await.unwrap();
        let build_time = started.elapsed();
        assert!(id.starts_with("sha256:"), "{id}");
        assert_eq!(
            docker.image_id(&local).await.unwrap().as_deref(),
            Some(id.as_str())
        );
        assert_eq!(
            docker.image_id(&remote).await.unwrap().as_deref(),
            Some(id.as_str())
        );
        let logged = lines(&memory);
        assert!(
            logged
                .iter()
                .any(|l| l.starts_with("Step 2/") && l.ends_with(" : ARG GREETING")),
            "{logged:#?}"
        );

        let inspect = docker.inner().inspect_image(&id).await.unwrap();
        let labels = inspect.config.and_then(|c| c.labels).unwrap_or_default();
        assert_eq!(labels.get("stretch.test"), Some(&label));
        let out = docker_run(&local, "cat /greeting; cat /listing; cat /ctx/sub/file.txt");
        assert_eq!(
            out, "hi there\napp.txt\nsub\ndeep",
            "secret.txt, .stretch.Dockerfile and .dockerignore stay out"
        );

        let (log, memory) = memory_log();
        let started = std::time::Instant::now();
        docker
            .push(&remote, &auth::tests_anonymous(), &log)
            .await
            .unwrap();
        let push_time = started.elapsed();
        assert_eq!(
            registry.catalog_tags(&format!("{repo}/web")),
            vec!["r1".to_string()]
        );
        let logged = lines(&memory);
        assert!(
            logged
                .iter()
                .any(|l| l.starts_with("layer ") && l.ends_with("Pushed")),
            "{logged:#?}"
        );
        assert!(
            logged.iter().any(|l| l.contains("digest: sha256:")),
            "{logged:#?}"
        );
        assert!(!logged.iter().any(|l| l == "Pushing"), "{logged:#?}");
        eprintln!("build {build_time:?}, push {push_time:?}");

        // The same image under a third name; removing one name keeps the others.
        let third = format!("{repo}/web:three");
        docker.tag(&id, &third).await.unwrap();
        docker.remove_image(&local).await.unwrap();
        assert_eq!(docker.image_id(&local).await.unwrap(), None);
        assert_eq!(
            docker.image_id(&third).await.unwrap().as_deref(),
            Some(id.as_str())
        );
        docker.remove_image(&third).await.unwrap();
        docker.remove_image(&remote).await.unwrap();
        assert_eq!(
            docker.image_id(&id).await.unwrap(),
            None,
            "the last name took the image with it"
        );
        docker.remove_image(&remote).await.unwrap();
    }

    fn docker_run(image: &str, script: &str) -> String {
        let name = unique("stretch-core-run");
        docker(&["run", "--rm", "--name", &name, image, "sh", "-c", script])
    }

    #[tokio::test]
    async fn failing_step_is_named_with_its_output() {
        let base = base_image();
        let repo = unique("stretch-core-fail");
        let _cleanup = PrefixGuard(repo.clone());
        let docker = Docker::connect().await.unwrap();
        let ctx = tempfile::tempdir().unwrap();
        let marker = unique("marker");
        let mut req = BuildRequest::new(
            ctx.path(),
            format!("FROM {base}\nRUN echo {marker} && echo oops >&2 && exit 3\nRUN echo never\n"),
        );
        req.tags = vec![format!("{repo}/x:1")];
        let (log, memory) = memory_log();
        let (stage, message) = failure(docker.build(req, &log).await.unwrap_err());
        assert_eq!(stage, "build");
        assert!(
            message.starts_with(&format!(
                "step 2/3 `RUN echo {marker} && echo oops >&2 && exit 3`: "
            )),
            "{message}"
        );
        assert!(message.contains("returned a non-zero code: 3"), "{message}");
        assert!(
            message.contains(&format!("\n  {marker}")) && message.contains("\n  oops"),
            "{message}"
        );
        assert!(lines(&memory).contains(&marker));
        // `forcerm`: the failed step's container is gone too.
        let left = docker_cli_containers(&marker);
        assert!(left.is_empty(), "containers left behind: {left}");
    }

    fn docker_cli_containers(marker: &str) -> String {
        docker(&["ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Command}}"])
            .lines()
            .filter(|l| l.contains(marker))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[tokio::test]
    async fn bad_dockerfile_and_missing_base_fail_the_build() {
        let docker = Docker::connect().await.unwrap();
        let ctx = tempfile::tempdir().unwrap();
        let (stage, message) = failure(
            docker
                .build(
                    BuildRequest::new(ctx.path(), "FROM x\nFROBNICATE\n"),
                    &Log::null(),
                )
                .await
                .unwrap_err(),
        );
        assert_eq!(stage, "build");
        assert!(
            message.to_lowercase().contains("unknown instruction"),
            "{message}"
        );

        // Rejected before the context is read: the upload must not hang.
        write(ctx.path(), "big.bin", vec![7u8; 3 << 20]);
        let mut req = BuildRequest::new(ctx.path(), "FROM x\n");
        req.tags = vec!["Not A Valid:Tag".to_string()];
        let (stage, message) = failure(docker.build(req, &Log::null()).await.unwrap_err());
        assert_eq!(stage, "build");
        assert!(message.contains("invalid"), "{message}");

        let missing = unique("stretch-core-missing");
        let req = BuildRequest::new(ctx.path(), format!("FROM 127.0.0.1:1/{missing}:1\n"));
        let (stage, message) = failure(docker.build(req, &Log::null()).await.unwrap_err());
        assert_eq!(stage, "build");
        assert!(
            message.starts_with(&format!("step 1/1 `FROM 127.0.0.1:1/{missing}:1`")),
            "{message}"
        );
    }

    #[tokio::test]
    async fn push_to_an_unreachable_registry() {
        let docker = Docker::connect().await.unwrap();
        let port = stretch_test::free_port();
        let reference = format!("127.0.0.1:{port}/{}/x:1", unique("stretch-core-push"));
        let _guard = ImageGuard(vec![reference.clone()]);
        docker.tag(&base_image(), &reference).await.unwrap();
        let (stage, message) = failure(
            docker
                .push(&reference, &auth::tests_anonymous(), &Log::null())
                .await
                .unwrap_err(),
        );
        assert_eq!(stage, "push");
        assert!(
            message.starts_with(&format!("registry 127.0.0.1:{port} is unreachable: ")),
            "{message}"
        );

        let absent = format!("127.0.0.1:{port}/{}/none:1", unique("stretch-core-push"));
        let (stage, message) = failure(
            docker
                .push(&absent, &auth::tests_anonymous(), &Log::null())
                .await
                .unwrap_err(),
        );
        assert_eq!(stage, "push");
        assert!(message.contains("no local image"), "{message}");
    }

    #[tokio::test]
    async fn absent_images() {
        let docker = Docker::connect().await.unwrap();
        let name = format!("{}:1", unique("stretch-core-absent"));
        assert_eq!(docker.image_id(&name).await.unwrap(), None);
        docker.remove_image(&name).await.unwrap();
    }

    #[tokio::test]
    async fn unreachable_engine_is_a_clear_error() {
        let err = Docker::connect_to("unix:///nonexistent/docker.sock")
            .await
            .unwrap_err();
        let (stage, message) = failure(err);
        assert_eq!(stage, "docker");
        assert!(
            message.starts_with(
                "the Docker engine at unix:///nonexistent/docker.sock is unreachable: "
            ),
            "{message}"
        );
        let port = stretch_test::free_port();
        let (_, message) = failure(
            Docker::connect_to(&format!("tcp://127.0.0.1:{port}"))
                .await
                .unwrap_err(),
        );
        assert!(
            message.contains("is unreachable") && message.contains("refused"),
            "{message}"
        );
    }
}
