//! The registry as release store: a release travels as the OCI artifact
//! `REGISTRY/SYSTEM/release:ID` (artifact type `application/vnd.stretch.release.v1`)
//! whose blobs are the archive's index, its chunks and the sealed configuration, and
//! whose annotation is the release's record. A build pushes it; a deploy in a home
//! that lacks the release pulls it, checks it against its id and keeps it. Logins are
//! the images' (Docker's configuration, `docker::auth`). Chunks are shared between
//! releases: those the registry already has are not sent again, those the home already
//! has are not fetched again.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::docker::auth::{self, Lookup};
use crate::docker::registry::{Registry, loopback};
use crate::home::{Home, write_private};
use crate::log::{Log, Unit};
use crate::release::{archive, sealed};
use crate::store::{ReleaseRecord, Store};
use crate::system::System;
use crate::{Error, Result};

pub const ARTIFACT_TYPE: &str = "application/vnd.stretch.release.v1";
/// The archive of releases built before chunked archives: one blob.
pub const ARCHIVE_TYPE: &str = "application/vnd.stretch.release.archive.v1.tar+zstd";
pub const INDEX_TYPE: &str = "application/vnd.stretch.release.index.v2+json";
pub const CHUNK_TYPE: &str = "application/vnd.stretch.release.chunk.v2+zstd";
/// The annotation naming a chunk blob's blake3 hash (its name in the index).
const CHUNK_NAME: &str = "dev.stretch.chunk";
/// Chunks sent or fetched at once.
const PARALLEL: usize = 4;
/// Largest index blob taken from a registry.
const MAX_INDEX: u64 = 64 << 20;
pub const CONFIG_TYPE: &str = "application/vnd.stretch.release.config.v1+age";
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY: &[u8] = b"{}";
/// The annotation holding the release's record (JSON).
const RECORD: &str = "dev.stretch.release";
/// The repository of a system's releases, under the registry.
pub const REPOSITORY: &str = "release";
/// Streaming reads and writes of blobs.
const CHUNK: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

impl Descriptor {
    fn new(media_type: &str, digest: String, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            annotations: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: String,
    #[serde(rename = "artifactType", default)]
    artifact_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// A release as the registry holds it.
#[derive(Debug, Clone)]
pub struct Remote {
    pub record: ReleaseRecord,
    archive: RemoteArchive,
    config: Descriptor,
}

#[derive(Debug, Clone)]
enum RemoteArchive {
    /// One `.tar.zst` blob (releases built before chunked archives).
    Legacy(Descriptor),
    /// The index blob and every chunk blob, by chunk hash.
    Chunked {
        index: Descriptor,
        chunks: BTreeMap<String, Descriptor>,
    },
}

/// A system's releases in its registry.
pub struct ReleaseStore {
    client: Client,
    auth: RegistryAuth,
    lookup: Lookup,
    host: String,
    repository: String,
}

fn sha256_hex(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

impl ReleaseStore {
    /// The release store of `system`; `None` with `registry: local` (the home is the
    /// store). `stage` names failures.
    pub async fn open(system: &System, stage: &str) -> Result<Option<ReleaseStore>> {
        let host = system.spec.registry.clone();
        if host == "local" {
            return Ok(None);
        }
        let lookup = auth::lookup(&host, None)?;
        let scheme = Registry::new(&host, &lookup)?
            .scheme()
            .await
            .map_err(|e| Error::failed(stage, e.to_string()))?;
        // reqwest underneath takes the process's rustls provider: ours is ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = ClientConfig {
            protocol: if scheme == "http" {
                ClientProtocol::HttpsExcept(vec![host.clone()])
            } else {
                ClientProtocol::Https
            },
            // As Docker does, a loopback registry may present a self-made certificate.
            accept_invalid_certificates: scheme == "https" && loopback(&host),
            use_monolithic_push: true,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        let auth = match &lookup.credentials {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.secret().to_string()),
            None => RegistryAuth::Anonymous,
        };
        Ok(Some(ReleaseStore {
            client: Client::new(config),
            auth,
            lookup,
            host,
            repository: format!("{}/{REPOSITORY}", system.name()),
        }))
    }

    /// Where release `id` lives: `REGISTRY/SYSTEM/release:ID`.
    pub fn reference(&self, id: &str) -> String {
        format!("{}/{}:{id}", self.host, self.repository)
    }

    fn tag(&self, tag: &str) -> Reference {
        Reference::with_tag(self.host.clone(), self.repository.clone(), tag.to_string())
    }

    fn error(&self, stage: &str, what: &str, e: OciDistributionError) -> Error {
        let cause = e.to_string();
        let denied = matches!(
            e,
            OciDistributionError::UnauthorizedError { .. }
                | OciDistributionError::AuthenticationFailure(_)
        ) || cause.to_lowercase().contains("unauthorized")
            || cause.to_lowercase().contains("denied");
        if denied
            && let Some(refused) = auth::refused(&self.host, "unauthorized", &self.lookup, stage)
        {
            return refused;
        }
        Error::failed(
            stage,
            format!("registry {}: cannot {what}: {cause}", self.host),
        )
    }

    /// Push release `record` (its archive and stored configuration, from `home`).
    /// Returns the manifest's digest.
    pub async fn push(&self, home: &Home, record: &ReleaseRecord, log: &Log) -> Result<String> {
        const STAGE: &str = "push";
        let started = std::time::Instant::now();
        let id = &record.id;
        let reference = self.tag(id);
        self.client
            .auth(&reference, &self.auth, RegistryOperation::Push)
            .await
            .map_err(|e| self.error(STAGE, "log in", e))?;
        let config = home.sealed_config(id);
        let config = std::fs::read(&config).map_err(|e| {
            Error::failed(
                STAGE,
                format!("cannot read the sealed configuration of release {id}: {e}"),
            )
        })?;
        let index_raw = std::fs::read(home.archive(id)).map_err(|e| {
            Error::failed(
                STAGE,
                format!("cannot read the archive index of release {id}: {e}"),
            )
        })?;
        let index = archive::Index::parse(&index_raw)
            .map_err(|e| Error::failed(STAGE, format!("release {id}: {e}")))?;
        let index_blob =
            Descriptor::new(INDEX_TYPE, sha256_hex(&index_raw), index_raw.len() as u64);
        let sealed = Descriptor::new(CONFIG_TYPE, sha256_hex(&config), config.len() as u64);
        let empty = Descriptor::new(EMPTY_TYPE, sha256_hex(EMPTY), EMPTY.len() as u64);
        let mut sent = 0u64;
        for (d, data) in [
            (&empty, EMPTY.to_vec()),
            (&sealed, config),
            (&index_blob, index_raw),
        ] {
            if !self.has_blob(&reference, &d.digest).await? {
                sent += data.len() as u64;
                self.client
                    .push_blob(&reference, data, &d.digest)
                    .await
                    .map_err(|e| self.error(STAGE, "push a blob", e))?;
            }
        }
        // Each distinct chunk once, in the order the archive first uses it.
        let mut seen = std::collections::HashSet::new();
        let unique: Vec<&archive::ChunkRef> = index
            .chunks
            .iter()
            .filter(|c| seen.insert(c.hash.as_str()))
            .collect();
        let store = home.chunks();
        let reference = &reference;
        let meter = log.meter(
            "release",
            Unit::Bytes,
            Some(unique.iter().map(|c| c.stored).sum()),
        );
        let meter = &meter;
        let pushed: Vec<(Descriptor, u64)> = futures_util::stream::iter(unique)
            .map(|c| {
                let path = archive::chunk_path(&store, &c.hash);
                async move {
                    let data = tokio::fs::read(&path).await.map_err(|e| {
                        Error::failed(
                            STAGE,
                            format!("cannot read chunk `{}`: {e}", path.display()),
                        )
                    })?;
                    let mut d = Descriptor::new(CHUNK_TYPE, sha256_hex(&data), data.len() as u64);
                    d.annotations.insert(CHUNK_NAME.into(), c.hash.clone());
                    let n = data.len() as u64;
                    if self.has_blob(reference, &d.digest).await? {
                        meter.add(n);
                        return Ok::<_, Error>((d, 0));
                    }
                    self.client
                        .push_blob(reference, data, &d.digest)
                        .await
                        .map_err(|e| self.error(STAGE, "push a chunk", e))?;
                    meter.add(n);
                    Ok((d, n))
                }
            })
            .buffered(PARALLEL)
            .try_collect()
            .await?;
        let total = pushed.len();
        let new = pushed.iter().filter(|(_, n)| *n > 0).count();
        sent += pushed.iter().map(|(_, n)| n).sum::<u64>();
        let mut layers = vec![index_blob, sealed];
        layers.extend(pushed.into_iter().map(|(d, _)| d));
        let record_json = serde_json::to_string(record)
            .map_err(|e| Error::failed(STAGE, format!("cannot encode the record: {e}")))?;
        let manifest = Manifest {
            schema_version: 2,
            media_type: MANIFEST_TYPE.into(),
            artifact_type: Some(ARTIFACT_TYPE.into()),
            config: empty,
            layers,
            annotations: BTreeMap::from([
                (
                    "org.opencontainers.image.created".to_string(),
                    record.created_at.clone(),
                ),
                (RECORD.to_string(), record_json),
            ]),
        };
        let body = serde_json::to_vec(&manifest)
            .map_err(|e| Error::failed(STAGE, format!("cannot encode the manifest: {e}")))?;
        let digest = sha256_hex(&body);
        self.client
            .push_manifest_raw(
                reference,
                body,
                hyper::header::HeaderValue::from_static(MANIFEST_TYPE),
            )
            .await
            .map_err(|e| self.error(STAGE, "push the release manifest", e))?;
        log.line(format!(
            "release pushed: {} ({} sent in {:.2}s, {new} of {total} chunk(s) new, {})",
            self.reference(id),
            human_bytes(sent),
            started.elapsed().as_secs_f64(),
            short(&digest)
        ));
        Ok(digest)
    }

    async fn has_blob(&self, reference: &Reference, digest: &str) -> Result<bool> {
        self.client
            .blob_exists(reference, digest)
            .await
            .map_err(|e| self.error("push", "look up a blob", e))
    }

    /// The release tagged `tag`, if the registry has it.
    pub async fn get(&self, tag: &str, stage: &str) -> Result<Option<Remote>> {
        let reference = self.tag(tag);
        let raw = match self
            .client
            .pull_manifest_raw(&reference, &self.auth, &[MANIFEST_TYPE])
            .await
        {
            Ok((raw, _)) => raw,
            Err(OciDistributionError::ImageManifestNotFoundError(_)) => return Ok(None),
            Err(OciDistributionError::RegistryError { envelope, .. })
                if envelope.errors.iter().any(|e| {
                    matches!(
                        e.code,
                        oci_client::errors::OciErrorCode::ManifestUnknown
                            | oci_client::errors::OciErrorCode::NameUnknown
                    )
                }) =>
            {
                return Ok(None);
            }
            Err(OciDistributionError::ServerError { code: 404, .. }) => return Ok(None),
            Err(e) => return Err(self.error(stage, "read a release manifest", e)),
        };
        let bad = |why: String| {
            Error::failed(
                stage,
                format!("{} is not a stretch release: {why}", self.reference(tag)),
            )
        };
        let m: Manifest = serde_json::from_slice(&raw).map_err(|e| bad(e.to_string()))?;
        if m.artifact_type.as_deref() != Some(ARTIFACT_TYPE) {
            return Err(bad(format!("artifact type {:?}", m.artifact_type)));
        }
        let record: ReleaseRecord = m
            .annotations
            .get(RECORD)
            .ok_or_else(|| bad("no release record".into()))
            .and_then(|r| serde_json::from_str(r).map_err(|e| bad(e.to_string())))?;
        if record.id != tag {
            return Err(bad(format!("it names release {}", record.id)));
        }
        let layer = |t: &str| {
            m.layers
                .iter()
                .find(|l| l.media_type == t)
                .cloned()
                .ok_or_else(|| bad(format!("no {t} blob")))
        };
        let archive = match layer(INDEX_TYPE) {
            Ok(index) => RemoteArchive::Chunked {
                index,
                chunks: m
                    .layers
                    .iter()
                    .filter(|l| l.media_type == CHUNK_TYPE)
                    .filter_map(|l| Some((l.annotations.get(CHUNK_NAME)?.clone(), l.clone())))
                    .collect(),
            },
            Err(_) => RemoteArchive::Legacy(layer(ARCHIVE_TYPE)?),
        };
        Ok(Some(Remote {
            archive,
            config: layer(CONFIG_TYPE)?,
            record,
        }))
    }

    /// The ids of every release in the registry.
    pub async fn ids(&self, stage: &str) -> Result<Vec<String>> {
        let reference = self.tag("latest");
        let mut out: Vec<String> = Vec::new();
        loop {
            let last = out.last().cloned();
            let page = match self
                .client
                .list_tags(&reference, &self.auth, Some(1000), last.as_deref())
                .await
            {
                Ok(p) => p,
                Err(OciDistributionError::RegistryError { envelope, .. })
                    if envelope.errors.iter().any(|e| {
                        matches!(e.code, oci_client::errors::OciErrorCode::NameUnknown)
                    }) =>
                {
                    return Ok(Vec::new());
                }
                Err(OciDistributionError::ServerError { code: 404, .. }) => return Ok(Vec::new()),
                Err(e) => return Err(self.error(stage, "list releases", e)),
            };
            let n = page.tags.len();
            out.extend(page.tags);
            if n < 1000 {
                break;
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Every release in the registry, newest first.
    pub async fn list(&self, stage: &str) -> Result<Vec<ReleaseRecord>> {
        let mut out = Vec::new();
        for id in self.ids(stage).await? {
            if let Some(r) = self.get(&id, stage).await? {
                out.push(r.record);
            }
        }
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        Ok(out)
    }

    /// The release `key` names: an id, a unique id prefix (6 or more characters) or
    /// a name.
    pub async fn find(&self, key: &str, stage: &str) -> Result<Option<Remote>> {
        if let Some(r) = self.get(key, stage).await? {
            return Ok(Some(r));
        }
        let ids = self.ids(stage).await?;
        let by_prefix: Vec<&String> = if key.len() >= 6 {
            ids.iter().filter(|id| id.starts_with(key)).collect()
        } else {
            Vec::new()
        };
        match by_prefix.as_slice() {
            [one] => return self.get(one, stage).await,
            [] => {}
            many => {
                return Err(Error::invalid(format!(
                    "`{key}` is the prefix of {} releases in the registry",
                    many.len()
                )));
            }
        }
        for id in &ids {
            if let Some(r) = self.get(id, stage).await?
                && r.record.name == key
            {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// Bring `remote` into `home`: download its blobs (each checked against its
    /// digest), check the release against its id (which needs the release identity),
    /// and record it in `store`.
    pub async fn pull(
        &self,
        home: &Home,
        store: &Store,
        remote: &Remote,
        identity: Option<&Path>,
        log: &Log,
    ) -> Result<()> {
        const STAGE: &str = "pull release";
        let started = std::time::Instant::now();
        let id = &remote.record.id;
        let reference = self.tag(id);
        let tmp_archive = home.releases().join(format!(".pull-{id}.tar.zst.tmp"));
        let tmp_config = home.releases().join(format!(".pull-{id}.config.age.tmp"));
        let cleanup = || {
            let _ = std::fs::remove_file(&tmp_archive);
            let _ = std::fs::remove_file(&tmp_config);
        };
        let result = async {
            self.client
                .auth(&reference, &self.auth, RegistryOperation::Pull)
                .await
                .map_err(|e| self.error(STAGE, "log in", e))?;
            self.download(&reference, &remote.config, &tmp_config)
                .await?;
            let sealed_bytes = std::fs::read(&tmp_config)
                .map_err(|e| Error::failed(STAGE, format!("cannot read a pulled blob: {e}")))?;
            let clear = sealed::clear(id, &sealed_bytes, true, identity)?;
            if crate::build::release_id(&remote.record.archive_hash, &clear) != *id {
                return Err(Error::failed(
                    STAGE,
                    format!(
                        "{} does not match its id: it was tampered with",
                        self.reference(id)
                    ),
                ));
            }
            drop(clear);
            let fetched = match &remote.archive {
                RemoteArchive::Legacy(d) => {
                    self.download(&reference, d, &tmp_archive).await?;
                    // The content is checked against its hash when it is extracted.
                    std::fs::rename(&tmp_archive, home.legacy_archive(id)).map_err(|e| {
                        Error::failed(STAGE, format!("cannot keep release {id}: {e}"))
                    })?;
                    human_bytes(d.size)
                }
                RemoteArchive::Chunked { index, chunks } => {
                    self.pull_chunks(home, remote, &reference, index, chunks, log)
                        .await?
                }
            };
            std::fs::rename(&tmp_config, home.sealed_config(id))
                .map_err(|e| Error::failed(STAGE, format!("cannot keep release {id}: {e}")))?;
            if store.release_by_id(id)?.is_none() {
                store.insert_release(&remote.record)?;
            }
            log.line(format!(
                "pulled release {} ({}) from {}: {fetched} in {:.2}s",
                remote.record.name,
                id,
                self.reference(id),
                started.elapsed().as_secs_f64()
            ));
            Ok(())
        }
        .await;
        cleanup();
        result
    }

    /// Fetch a chunked archive: its index (which must hash to the record's archive
    /// hash), then the chunks the home lacks, each checked against its hash before it
    /// is kept. Returns what was fetched, for the log.
    async fn pull_chunks(
        &self,
        home: &Home,
        remote: &Remote,
        reference: &Reference,
        index_blob: &Descriptor,
        blobs: &BTreeMap<String, Descriptor>,
        log: &Log,
    ) -> Result<String> {
        const STAGE: &str = "pull release";
        let id = &remote.record.id;
        let tampered = |why: String| {
            Error::failed(
                STAGE,
                format!("{} was tampered with: {why}", self.reference(id)),
            )
        };
        if index_blob.size > MAX_INDEX {
            return Err(tampered(format!("its index has {} bytes", index_blob.size)));
        }
        let raw = self.fetch(reference, index_blob).await?;
        let index = archive::Index::parse(&raw).map_err(|e| tampered(format!("its index: {e}")))?;
        if index.hash != remote.record.archive_hash {
            return Err(tampered("its index is not the release's archive".into()));
        }
        let store = home.chunks();
        let mut seen = std::collections::HashSet::new();
        let missing: Vec<&archive::ChunkRef> = index
            .chunks
            .iter()
            .filter(|c| seen.insert(c.hash.as_str()))
            .filter(|c| !archive::chunk_path(&store, &c.hash).exists())
            .collect();
        let (have, wanted) = (seen.len() - missing.len(), seen.len());
        let store_ref = &store;
        let total = missing
            .iter()
            .filter_map(|c| blobs.get(&c.hash))
            .map(|d| d.size)
            .sum();
        let meter = log.meter("release", Unit::Bytes, Some(total));
        let meter = &meter;
        let got: Vec<(u64, std::path::PathBuf)> = futures_util::stream::iter(missing)
            .map(|c| async move {
                let d = blobs
                    .get(&c.hash)
                    .ok_or_else(|| tampered(format!("chunk {} has no blob", short(&c.hash))))?;
                // A chunk is at most a few MiB: a registry claiming more is not trusted.
                if d.size > archive::MAX_STORED_CHUNK {
                    return Err(tampered(format!(
                        "chunk {} claims {} bytes",
                        short(&c.hash),
                        d.size
                    )));
                }
                let data = self.fetch(reference, d).await?;
                let (c2, path) = (c.clone(), archive::chunk_path(store_ref, &c.hash));
                let kept = path.clone();
                tokio::task::spawn_blocking(move || {
                    archive::open_chunk(&data, &c2)?;
                    archive::put_chunk(&path, &data)
                        .map_err(|e| format!("cannot write `{}`: {e}", path.display()))?;
                    Ok::<_, String>(data.len() as u64)
                })
                .await
                .map_err(|e| Error::failed(STAGE, e.to_string()))?
                .map_err(tampered)
                .map(|n| {
                    meter.add(n);
                    (n, kept)
                })
            })
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        let paths: Vec<std::path::PathBuf> = got.iter().map(|(_, p)| p.clone()).collect();
        tokio::task::spawn_blocking(move || archive::sync_chunks(&paths))
            .await
            .map_err(|e| Error::failed(STAGE, e.to_string()))?
            .map_err(|e| Error::failed(STAGE, format!("cannot sync `{}`: {e}", store.display())))?;
        index.write(&home.archive(id))?;
        let bytes: u64 = got.iter().map(|(n, _)| n).sum::<u64>() + raw.len() as u64;
        Ok(format!(
            "{} ({} of {wanted} chunk(s) were already here)",
            human_bytes(bytes),
            have
        ))
    }

    /// A blob into memory, at most its descriptor's size.
    async fn fetch(&self, reference: &Reference, d: &Descriptor) -> Result<Vec<u8>> {
        const STAGE: &str = "pull release";
        let mut out = Bounded {
            inner: Vec::with_capacity(usize::try_from(d.size.min(16 << 20)).unwrap_or(0)),
            left: d.size,
        };
        // oci-client checks the bytes against the digest as they come.
        self.client
            .pull_blob(reference, d.digest.as_str(), &mut out)
            .await
            .map_err(|e| self.error(STAGE, &format!("pull blob {}", short(&d.digest)), e))?;
        if out.inner.len() as u64 != d.size {
            return Err(Error::failed(
                STAGE,
                format!(
                    "blob {} has {} bytes, the manifest says {}",
                    short(&d.digest),
                    out.inner.len(),
                    d.size
                ),
            ));
        }
        Ok(out.inner)
    }

    async fn download(&self, reference: &Reference, d: &Descriptor, to: &Path) -> Result<()> {
        const STAGE: &str = "pull release";
        write_private(to, b"")
            .map_err(|e| Error::failed(STAGE, format!("cannot write `{}`: {e}", to.display())))?;
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(to)
            .await
            .map_err(|e| Error::failed(STAGE, format!("cannot write `{}`: {e}", to.display())))?;
        // A registry may not send more than the manifest says: the write stops there.
        let out = Bounded {
            inner: tokio::io::BufWriter::with_capacity(CHUNK, file),
            left: d.size,
        };
        // oci-client checks the bytes against the digest as they come.
        self.client
            .pull_blob(reference, d.digest.as_str(), out)
            .await
            .map_err(|e| self.error(STAGE, &format!("pull blob {}", short(&d.digest)), e))?;
        let len = std::fs::metadata(to).map(|m| m.len()).unwrap_or(0);
        if len != d.size {
            return Err(Error::failed(
                STAGE,
                format!(
                    "blob {} has {len} bytes, the manifest says {}",
                    short(&d.digest),
                    d.size
                ),
            ));
        }
        Ok(())
    }
}

/// A writer that takes at most `left` more bytes and fails past them.
struct Bounded<W> {
    inner: W,
    left: u64,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Bounded<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if buf.len() as u64 > self.left {
            return std::task::Poll::Ready(Err(std::io::Error::other(
                "the blob is larger than its manifest says",
            )));
        }
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            this.left -= *n as u64;
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn short(digest: &str) -> &str {
    let d = digest.strip_prefix("sha256:").unwrap_or(digest);
    &d[..d.len().min(12)]
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}
