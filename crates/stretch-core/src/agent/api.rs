//! The agent protocol: JSON over HTTP/1.1, every request with `Authorization: Bearer
//! TOKEN`. The controller (deploy) is the client; `stretch agent` is the server.
//!
//! | method and path                         | body          | answer                 |
//! | --------------------------------------- | ------------- | ---------------------- |
//! | `GET /v1/state`                         |               | [`AgentState`]         |
//! | `PUT /v1/groups/{system}/{env}/{group}` | [`GroupSpec`] | [`Prepared`]           |
//! | `POST …/{group}/switch`                 | [`Switch`]    | [`GroupStatus`]        |
//! | `POST …/{group}/config`                 | [`GroupSpec`] | [`GroupStatus`]        |
//! | `DELETE …/{group}`                      |               | 204                    |
//! | `GET …/{group}`                         |               | [`GroupSpec`] (current)|
//! | `POST …/{group}/restart`                |               | [`GroupStatus`]        |
//! | `GET …/{group}/activity`                |               | [`GroupActivity`]      |
//! | `GET …/{group}/logs?…` ([`LogQuery`])   |               | [`LogLine`] per line (NDJSON, streamed) |
//! | `POST …/{group}/exec` (upgrade)         | [`ExecRequest`] | 101, then [`exec`] frames |
//! | `POST /v1/leases/{system}/{env}`        | [`LeaseRequest`] | [`LeaseGrant`]      |
//! | `DELETE /v1/leases/{system}/{env}`      |               | 204                    |
//!
//! * `PUT` stores a spec as the group's *pending* spec and pulls its image (when
//!   `pull`); nothing running changes.
//! * `switch` makes the pending spec (which must match `release_id` and
//!   `config_version`) current: start the new instances, wait until healthy, point the
//!   proxy at them, drain and stop the old ones. On failure the new instances are
//!   removed, the old ones keep serving, and the answer is an error.
//! * `config` (config-only deploy) gives running instances of the *same release* a new
//!   configuration: rewrite `/stretch/`, run `reload`, or replace the instances with
//!   the same image without downtime when the node declares no `reload`.
//! * `DELETE` stops the group's instances and closes its proxy.
//! * `restart` replaces the group's instances with fresh ones of the same spec, the
//!   way a switch does (healthy first, then the proxy, then drain): no downtime.
//! * `logs` streams the output of the group's instances, one JSON object a line, each
//!   instance's lines in order; with `follow` it also streams instances that start
//!   later (a deploy's), and an empty line every [`LOG_KEEPALIVE_SECS`] while nothing
//!   is said.
//! * `exec` runs a command in an instance (or a one-off container of the current
//!   release with `new`) and, after `101 Switching Protocols` (`Upgrade:`
//!   [`EXEC_UPGRADE`]), carries its streams both ways as [`exec`] frames; the last
//!   frame from the agent is the exit status or an error.
//!
//! * A lease gives one run (deploy, rollback, apply) an environment of a system on this
//!   agent for a time to live, renewed while the run lives, and a fencing token. Once an
//!   environment was leased, every write to its groups (`PUT`, `switch`, `config`,
//!   `DELETE`) must carry the newest token in [`LEASE_HEADER`]: a run whose lease was
//!   taken over after it expired cannot write any more. A lease held by another run is
//!   refused with 423 naming its holder; an expired one is taken over, and the grant
//!   says whose it was.
//!
//! Errors are a status code and an [`ErrorBody`]; 401 for a missing or wrong token.
//!
//! The transport is TLS only (the agent's own certificate, pinned by the controller:
//! see [`crate::agent::trust`]); failed authentications are slowed per client address.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One group of one environment of one system, on a host.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupKey {
    pub system: String,
    pub environment: String,
    pub group: String,
}

impl GroupKey {
    /// The URL path of this group: `/v1/groups/{system}/{environment}/{group}`.
    pub fn path(&self) -> String {
        format!(
            "/v1/groups/{}/{}/{}",
            self.system, self.environment, self.group
        )
    }
}

/// The header carrying a run's lease token on writes.
pub const LEASE_HEADER: &str = "x-stretch-lease";

/// Body of `POST /v1/leases/…`: take a lease (no `token`) or renew one (`token`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRequest {
    /// Who holds it: `user@host, run N` (for messages).
    pub holder: String,
    pub ttl_ms: u64,
    #[serde(default)]
    pub token: Option<u64>,
}

/// A lease granted or renewed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    /// The fencing token: every write of the run carries it.
    pub token: u64,
    /// The expired lease this one took over.
    #[serde(default)]
    pub took_over: Option<StaleLease>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleLease {
    pub holder: String,
    pub expired_ms_ago: u64,
}

/// A release as templates and labels see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRef {
    pub id: String,
    pub name: String,
    pub created_at: String,
}

/// Health check of an instance: HTTP GET `path` on its port, 2xx = healthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSpec {
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

/// Most instances of a group on one host: each costs a container, a folder of rendered
/// templates and a health check; more is a mistake, not a deployment.
pub const MAX_INSTANCES: u32 = 64;

/// Everything an agent needs to run a group's instances of one release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupSpec {
    pub key: GroupKey,
    /// This host's name in `system.yml`.
    pub host: String,
    pub node: String,
    pub release: ReleaseRef,
    pub existing_release: Option<ReleaseRef>,
    /// Full image reference: `REGISTRY/SYSTEM/NODE@sha256:…` (the manifest the build
    /// pushed), or by tag `…:RELEASE_ID` for `registry: local` and older releases.
    pub image: String,
    /// The image id the release was built as (`registry: local`): the agent refuses
    /// to run an image whose id differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// Pull the image from its registry first (false for `registry: local`).
    pub pull: bool,
    pub instances: u32,
    /// The port this host's proxy listens on for the group (none for workers).
    pub listen: Option<u16>,
    /// The port the app listens on inside its container (none: no proxy, healthy while running).
    pub port: Option<u16>,
    pub health: HealthSpec,
    /// Run inside running instances after a config-only update.
    pub reload: Option<Vec<String>>,
    /// Or: sent to each running instance's main process (`SIGHUP`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload_signal: Option<String>,
    pub stop_timeout_ms: Option<u64>,
    /// How long the proxy waits for an instance's response head (default 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_timeout_ms: Option<u64>,
    /// The node's configuration tree, written to `/stretch/config.json`.
    pub config: serde_json::Value,
    /// A hash of `config` and `templates`: what the instances were given.
    pub config_version: String,
    /// Container templates (path relative to `templates/`, as in the sources) → text.
    /// Rendered by the agent per instance into `/stretch/templates/` (`.jinja` dropped).
    pub templates: BTreeMap<String, String>,
    /// The environment's name (templates see it as `environment`).
    pub environment_name: String,
    /// Decrypted `*.age` files of the node's container folder (path without `.age` →
    /// base64), written to `/stretch/secrets/PATH` of every instance.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
    /// Host names the group answers on its `listen` port (lowercase; `*.` prefix for
    /// one label of any name). None: the port's default group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
    /// The port speaks HTTPS with this certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

/// Where a group's HTTPS certificate comes from.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsSpec {
    /// A chain (leaf first) and its private key, PEM, taken from the release.
    Files { certificate: String, key: String },
    /// Obtained and renewed by the agent from an ACME directory (HTTP-01 challenges on
    /// its HTTP port).
    Acme {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        email: Option<String>,
        directory: String,
    },
}

impl std::fmt::Debug for TlsSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Never the key.
            TlsSpec::Files { certificate, .. } => f
                .debug_struct("Files")
                .field("certificate_bytes", &certificate.len())
                .finish_non_exhaustive(),
            TlsSpec::Acme { email, directory } => f
                .debug_struct("Acme")
                .field("email", email)
                .field("directory", directory)
                .finish(),
        }
    }
}

/// What an agent is doing to a group right now, for progress displays: pulling its
/// image (bytes of the layers known so far) or starting and checking instances.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupActivity {
    /// `pulling`, `checking`, or `idle`.
    pub phase: String,
    #[serde(default)]
    pub bytes_done: u64,
    #[serde(default)]
    pub bytes_total: u64,
    /// Instances that passed their health check, of `instances`.
    #[serde(default)]
    pub healthy: u32,
    #[serde(default)]
    pub instances: u32,
}

/// The certificate a group's port presents, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateStatus {
    /// The names it is valid for.
    pub names: Vec<String>,
    pub issuer: String,
    /// RFC 3339.
    pub not_after: String,
    /// `release` (files of the release) or `acme`.
    pub source: String,
    /// The last renewal attempt failed: why (the certificate above is still served).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal_error: Option<String>,
}

/// A host name as `domains` takes it: lowercase labels of letters, digits and `-`,
/// maybe `*.` first.
pub fn valid_domain(d: &str) -> bool {
    let name = d.strip_prefix("*.").unwrap_or(d);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

impl GroupSpec {
    /// The application context of instance `index`, for its container templates:
    /// `environment` (the name), `config`, `node`, `host`, `instance`, `release` and,
    /// after a first deploy, `existing_release`.
    pub fn app_context(&self, index: u32) -> serde_json::Value {
        let mut ctx = serde_json::json!({
            "environment": self.environment_name,
            "config": self.config,
            "node": {"name": self.node},
            "host": {"name": self.host},
            "instance": {"index": index},
            "release": self.release,
        });
        // `existing_release` stays undefined on a first deploy.
        if let (Some(x), Some(map)) = (&self.existing_release, ctx.as_object_mut()) {
            map.insert("existing_release".into(), serde_json::json!(x));
        }
        ctx
    }
}

/// The answer to `PUT`: the image is there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepared {
    pub image_id: String,
}

/// Body of `switch`: which pending spec to make current.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switch {
    pub release_id: String,
    pub config_version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    pub version: String,
    pub groups: Vec<GroupStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub key: GroupKey,
    pub node: String,
    pub host: String,
    /// The release the proxy sends traffic to.
    pub release: Option<ReleaseRef>,
    /// The release it replaced (what a rollback goes back to).
    #[serde(default)]
    pub existing_release: Option<ReleaseRef>,
    pub config_version: Option<String>,
    pub listen: Option<u16>,
    pub instances: Vec<InstanceStatus>,
    /// Every current instance is running and healthy.
    pub healthy: bool,
    /// The host names it answers on its port (none: every name the port has no group for).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
    /// The port's HTTPS certificate for this group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub container: String,
    pub index: u32,
    pub release_id: String,
    pub config_version: String,
    /// Docker's state: `running`, `exited`, …
    pub state: String,
    pub healthy: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// The hash that names a configuration: the tree and the templates.
pub fn config_version(config: &serde_json::Value, templates: &BTreeMap<String, String>) -> String {
    config_version_with(config, templates, &BTreeMap::new())
}

/// [`config_version`] with the secret files too (none: the same hash as without).
pub fn config_version_with(
    config: &serde_json::Value,
    templates: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, String>,
) -> String {
    let mut h = blake3::Hasher::new();
    for (k, v) in secrets {
        h.update(b"secret\0");
        h.update(k.as_bytes());
        h.update(b"\0");
        h.update(v.as_bytes());
    }
    h.update(serde_json::to_string(config).unwrap_or_default().as_bytes());
    for (k, v) in templates {
        h.update(b"\0");
        h.update(k.as_bytes());
        h.update(b"\0");
        h.update(v.as_bytes());
    }
    h.finalize().to_hex()[..12].to_string()
}

/// `GET …/logs` query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogQuery {
    /// Only lines since this time (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    /// Only the last N lines of each instance (at most [`MAX_LOG_TAIL`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<usize>,
    /// Keep streaming new lines, and the lines of instances that start later.
    #[serde(default)]
    pub follow: bool,
}

/// Most lines of one instance a `tail` may ask for.
pub const MAX_LOG_TAIL: usize = 100_000;
/// Longest line the agent sends (longer ones are cut, ending in `…`).
pub const MAX_LOG_LINE: usize = 16 * 1024;
/// Seconds between keepalive lines of a quiet followed log.
pub const LOG_KEEPALIVE_SECS: u64 = 15;

/// One line of an instance's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When the engine read it: RFC 3339 with nanoseconds, UTC.
    pub time: String,
    pub host: String,
    pub group: String,
    pub instance: u32,
    pub container: String,
    pub release_id: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub line: String,
}

/// The `Upgrade:` protocol of `exec`.
pub const EXEC_UPGRADE: &str = "stretch-exec";

/// Body of `POST …/exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The command and its arguments (not run through a shell).
    pub cmd: Vec<String>,
    /// Which instance (default: the first healthy one, else the first running one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<u32>,
    /// Run in a fresh container of the current release instead, removed afterwards.
    #[serde(default)]
    pub new: bool,
    /// Attach the client's input.
    #[serde(default)]
    pub stdin: bool,
    /// Allocate a terminal (output then comes as one stream).
    #[serde(default)]
    pub tty: bool,
    /// The terminal's size (columns, rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<(u16, u16)>,
}

/// The frames of an `exec` connection after the upgrade: one kind byte, a 4-byte
/// big-endian length, then that many bytes (at most [`exec::MAX_FRAME`]).
pub mod exec {
    /// Client → agent: bytes for the command's input.
    pub const STDIN: u8 = 0;
    /// Agent → client: output.
    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
    /// Agent → client, last: the exit status, 4 bytes big-endian (signed).
    pub const EXIT: u8 = 3;
    /// Agent → client, last: why the command could not run (UTF-8).
    pub const ERROR: u8 = 4;
    /// Client → agent: the input ended.
    pub const STDIN_END: u8 = 5;
    /// Client → agent: the terminal's new size, columns then rows (2 bytes each).
    pub const RESIZE: u8 = 6;
    /// Largest frame payload.
    pub const MAX_FRAME: usize = 64 * 1024;

    /// A frame's bytes.
    pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + payload.len());
        out.push(kind);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Read one frame; `None` at a clean end of the stream before a frame.
    pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
        r: &mut R,
    ) -> std::io::Result<Option<(u8, Vec<u8>)>> {
        use tokio::io::AsyncReadExt;
        let mut head = [0u8; 5];
        match r.read_exact(&mut head[..1]).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        r.read_exact(&mut head[1..]).await?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_FRAME {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("an exec frame of {len} bytes (at most {MAX_FRAME})"),
            ));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        Ok(Some((head[0], payload)))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[tokio::test]
        async fn frames_read_back_and_oversize_ones_are_refused() {
            let mut bytes = frame(STDOUT, b"hello");
            bytes.extend(frame(STDIN_END, b""));
            let mut r = &bytes[..];
            assert_eq!(
                read_frame(&mut r).await.unwrap(),
                Some((STDOUT, b"hello".to_vec()))
            );
            assert_eq!(read_frame(&mut r).await.unwrap(), Some((STDIN_END, vec![])));
            assert_eq!(read_frame(&mut r).await.unwrap(), None);
            // A length over the bound is refused before anything is allocated.
            let mut big = vec![STDIN];
            big.extend_from_slice(&((MAX_FRAME + 1) as u32).to_be_bytes());
            let e = read_frame(&mut &big[..]).await.unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
            // A frame cut short is an error, not a clean end.
            let cut = &frame(STDOUT, b"hello")[..7];
            assert!(read_frame(&mut &cut[..]).await.is_err());
        }
    }
}
