//! `docker push` with compact progress: one log line per layer that finishes, not one
//! per progress tick.
//!
//! bollard's `PushImageInfo` has no layer `id` field (the engine sends one, serde drops
//! it), so layers are counted rather than named: `Preparing` messages give the number
//! of layers, and each `Pushed` / `Layer already exists` / `Mounted from …` becomes
//! `layer 2/3: Pushed`.

use bollard::models::PushImageInfo;
use bollard::query_parameters::PushImageOptions;
use futures_util::StreamExt;

use super::auth::Lookup;
use super::{Docker, describe, registry_of, split_reference};
use crate::log::{Log, Unit};
use crate::{Error, Result};

impl Docker {
    /// Push `reference` (`REGISTRY/REPO:TAG`), streaming compact progress to `log`.
    /// Returns the manifest digest the registry took (`sha256:…`).
    /// `auth`: the login for its registry, and where it was looked for.
    pub async fn push(&self, reference: &str, auth: &Lookup, log: &Log) -> Result<String> {
        let (repo, tag) = split_reference(reference);
        let options = PushImageOptions {
            tag: Some(tag.to_string()),
            platform: None,
        };
        let registry = registry_of(reference);
        let credentials = auth.credentials.as_ref().map(|c| c.for_engine(registry));
        let mut stream = self.inner.push_image(repo, Some(options), credentials);
        let mut progress = Progress::default();
        let layers = log.meter(
            super::build::image_task(&[reference.to_string()]).replacen("image", "push", 1),
            Unit::Layers,
            None,
        );
        let mut digest = None;
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| push_error(reference, &describe(&e), auth))?;
            if let Some(d) = info.status.as_deref().and_then(|s| pushed_digest(s, tag)) {
                digest = Some(d);
            }
            if let Some(line) = progress.update(&info) {
                log.line(line);
            }
            let (total, done) = (
                progress.layers.max(progress.done) as u64,
                progress.done as u64,
            );
            if layers.progress().done != done {
                layers.set_total(total);
                layers.set(done);
                // A layer pushed is rare: each is worth a report.
                layers.flush();
            } else {
                layers.set_total(total);
            }
        }
        layers.finish();
        digest.ok_or_else(|| {
            Error::failed(
                "push",
                format!("the registry did not say which digest it took for {reference}"),
            )
        })
    }
}

/// The digest of the engine's last push message, `TAG: digest: sha256:… size: N`.
fn pushed_digest(status: &str, tag: &str) -> Option<String> {
    let rest = status.strip_prefix(tag)?.strip_prefix(": digest: ")?;
    let digest = rest.split_whitespace().next()?;
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| digest.to_string())
}

/// The error of a failed push; an unreachable registry is said so plainly, a refused
/// login with where it was looked for.
fn push_error(reference: &str, cause: &str, auth: &Lookup) -> Error {
    let registry = registry_of(reference);
    if let Some(e) = super::auth::refused(registry, cause, auth, "push") {
        return e;
    }
    const NETWORK: [&str; 6] = [
        "dial tcp",
        "connection refused",
        "no such host",
        "no route to host",
        "network is unreachable",
        "i/o timeout",
    ];
    if NETWORK.iter().any(|n| cause.contains(n)) {
        Error::failed(
            "push",
            format!("registry {registry} is unreachable: {cause}"),
        )
    } else if cause.contains("does not exist locally") {
        Error::failed(
            "push",
            format!("there is no local image {reference} to push: {cause}"),
        )
    } else {
        Error::failed(
            "push",
            format!("pushing {reference} to {registry}: {cause}"),
        )
    }
}

/// Folds the engine's push messages into the few lines worth logging.
#[derive(Default)]
struct Progress {
    layers: usize,
    done: usize,
    last: Option<String>,
}

impl Progress {
    fn update(&mut self, info: &PushImageInfo) -> Option<String> {
        let status = info.status.as_deref()?.trim();
        let line = match status {
            "Preparing" => {
                self.layers += 1;
                return None;
            }
            // Ticks and queueing: the compact log skips them.
            "Waiting" | "Pushing" | "" => return None,
            s if s == "Pushed" || s == "Layer already exists" || s.starts_with("Mounted from") => {
                self.done += 1;
                format!("layer {}/{}: {s}", self.done, self.layers.max(self.done))
            }
            s => s.to_string(),
        };
        // Retries repeat themselves; say it once.
        if self.last.as_deref() == Some(line.as_str()) {
            return None;
        }
        self.last = Some(line.clone());
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(statuses: &[&str]) -> Vec<String> {
        let mut p = Progress::default();
        statuses
            .iter()
            .filter_map(|s| {
                p.update(&PushImageInfo {
                    status: Some(s.to_string()),
                    ..Default::default()
                })
            })
            .collect()
    }

    #[test]
    fn progress_is_one_line_per_layer() {
        let lines = feed(&[
            "The push refers to repository [127.0.0.1:5000/shop/web]",
            "Preparing",
            "Preparing",
            "Waiting",
            "Pushing",
            "Pushing",
            "Pushing",
            "Layer already exists",
            "Pushing",
            "Pushed",
            "v1: digest: sha256:abc size: 739",
        ]);
        assert_eq!(
            lines,
            vec![
                "The push refers to repository [127.0.0.1:5000/shop/web]",
                "layer 1/2: Layer already exists",
                "layer 2/2: Pushed",
                "v1: digest: sha256:abc size: 739",
            ]
        );
        assert_eq!(
            feed(&["Retrying in 5 seconds", "Retrying in 5 seconds"]).len(),
            1
        );
    }

    #[test]
    fn the_pushed_digest_is_read_from_the_last_message() {
        let d = "sha256:".to_string() + &"ab".repeat(32);
        assert_eq!(
            pushed_digest(&format!("v1: digest: {d} size: 739"), "v1"),
            Some(d.clone())
        );
        assert_eq!(
            pushed_digest(&format!("v2: digest: {d} size: 739"), "v1"),
            None
        );
        assert_eq!(pushed_digest("v1: digest: sha256:abc size: 1", "v1"), None);
        assert_eq!(pushed_digest("Pushed", "v1"), None);
    }

    fn anonymous() -> Lookup {
        Lookup {
            credentials: None,
            searched: "/nowhere/config.json".into(),
        }
    }

    #[test]
    fn errors_name_the_registry() {
        let e = push_error(
            "127.0.0.1:5999/shop/web:1",
            "Get \"http://127.0.0.1:5999/v2/\": dial tcp 127.0.0.1:5999: connect: connection refused",
            &anonymous(),
        );
        assert!(
            e.to_string()
                .starts_with("push failed: registry 127.0.0.1:5999 is unreachable: Get"),
            "{e}"
        );
        let e = push_error(
            "r.example:5000/a:1",
            "An image does not exist locally with the tag: r.example:5000/a",
            &anonymous(),
        );
        assert!(
            e.to_string().contains("no local image r.example:5000/a:1"),
            "{e}"
        );
        let e = push_error(
            "r.example/a:1",
            "unauthorized: authentication required",
            &anonymous(),
        );
        assert_eq!(
            e.to_string(),
            "push failed: registry r.example needs a login: none found in /nowhere/config.json"
        );
    }
}
