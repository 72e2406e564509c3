//! Deterministic release archives, stored as chunks: a tree becomes one tar stream
//! (fixed entry order, times, owners and modes) cut at entry boundaries into chunks
//! (files of 4 MiB or more in 4 MiB pieces of their own), each chunk one zstd frame in
//! the home's chunk store named by the blake3 hash of its bytes, and an index listing
//! them in order.
//!
//! The archive's hash is blake3 over its chunks' hashes and sizes, so a rebuild gets it
//! without reading the files whose stat is unchanged since the last build (the stat
//! cache), and content already stored is never compressed, stored or pushed again. The
//! chunk files concatenated in order are a valid `.tar.zst` of the tree. Archives of
//! the earlier format (one `.tar.zst` hashed as a whole) are still read. Files of git
//! sources not written into the tree are read from their mirrors' objects, files of
//! `path:` sources not linked into it from where they are.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tar::{EntryType, Header};
use zstd::bulk::Compressor;

use crate::log::Meter;
use crate::source::git::Blobs;
use crate::source::odb::{Blob as OdbBlob, Loc, Odb};
use crate::source::{GitFile, SourceFile};
use crate::{Error, Result};

const STAGE: &str = "archive";

/// The index format, part of every archive hash.
pub const FORMAT: &str = "stretch-archive-v2";

/// zstd level: level 3 is zstd's default, a good speed/size balance for mixed trees.
const LEVEL: i32 = 3;
/// Just under zstd's 128 KiB block: see `compressor`.
const MAX_BLOCK: u32 = 127 * 1024;

/// Read size for file contents.
const READ: usize = 1 << 20;

/// Files this big or bigger are cut into pieces of this size, each a chunk of its own:
/// a change to a big file rewrites only its pieces, and workers share the work.
const PIECE: u64 = 4 << 20;

/// Smaller entries share a chunk until it holds this much...
const GROUP: u64 = 4 << 20;

/// ...or until an entry whose path hash picks it as a cut (one in this many), so that
/// an added or removed file regroups only its neighbours, not everything after it.
const CUT_ONE_IN: u8 = 64;

/// Most worker threads (hashing and compressing chunks): the cap bounds memory.
const MAX_WORKERS: usize = 8;

/// Largest chunk accepted from an index: a group is at most [`GROUP`] plus one entry
/// smaller than [`PIECE`], with its headers.
const MAX_CHUNK: u64 = 16 << 20;

/// Largest compressed chunk accepted from elsewhere (a registry): zstd's worst case
/// for [`MAX_CHUNK`] bytes is a little above it.
pub const MAX_STORED_CHUNK: u64 = MAX_CHUNK + (1 << 20);

/// Most threads reading the chunks' contents (each inflating its own git objects).
const MAX_FEEDERS: usize = 4;

/// Threads flushing new chunk files to disk.
const SYNCERS: usize = 8;

/// Largest index read back (a million chunks is far beyond any real tree).
const MAX_INDEX: u64 = 256 << 20;

/// Files modified this recently are not trusted to the stat cache: a later write in
/// the same clock tick would not change their stat (git's "racy clean" problem).
const RACY: Duration = Duration::from_secs(2);

/// What identifies an archive, with counts for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    /// blake3 hex (64 lowercase characters); see [`archive_hash`].
    pub hash: String,
    /// Regular files and symlinks (folders are not counted).
    pub files: u64,
    /// Total size of the regular files' contents.
    pub bytes: u64,
}

/// One chunk of an archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// blake3 hex of the chunk's uncompressed bytes.
    pub hash: String,
    /// Uncompressed size.
    pub size: u64,
    /// Compressed size (its file in the chunk store).
    pub stored: u64,
}

/// An archive: its chunks in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    pub format: String,
    pub hash: String,
    pub files: u64,
    pub bytes: u64,
    pub chunks: Vec<ChunkRef>,
}

impl Index {
    /// Read and check an index file: its hash must be the hash of its chunk list.
    pub fn read(path: &Path) -> Result<Index> {
        let bad = |why: String| {
            Error::failed(
                STAGE,
                format!("archive index `{}` is damaged: {why}", path.display()),
            )
        };
        let file = File::open(path).map_err(|e| {
            let msg = format!("cannot open archive `{}`: {e}", path.display());
            if e.kind() == io::ErrorKind::NotFound {
                Error::invalid(msg)
            } else {
                Error::failed(STAGE, msg)
            }
        })?;
        let mut raw = Vec::new();
        file.take(MAX_INDEX)
            .read_to_end(&mut raw)
            .map_err(|e| bad(e.to_string()))?;
        Index::parse(&raw).map_err(bad)
    }

    /// Parse and check an index (as [`Index::read`]).
    pub fn parse(raw: &[u8]) -> std::result::Result<Index, String> {
        let index: Index = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
        if index.format != FORMAT {
            return Err(format!("unknown format `{}`", index.format));
        }
        if let Some(c) = index.chunks.iter().find(|c| c.size > MAX_CHUNK) {
            return Err(format!("chunk {} claims {} bytes", short(&c.hash), c.size));
        }
        let hash = archive_hash(&index.chunks)?;
        if hash != index.hash {
            return Err(format!("its chunks hash to {hash}, it says {}", index.hash));
        }
        Ok(index)
    }

    /// Write the index to `path` atomically and durably (its chunks must be synced
    /// already: see [`sync_chunks`]).
    pub fn write(&self, path: &Path) -> Result<()> {
        let raw = serde_json::to_vec(self).map_err(|e| Error::failed(STAGE, e.to_string()))?;
        let dir = parent(path);
        let err =
            |e: io::Error| Error::failed(STAGE, format!("cannot write `{}`: {e}", path.display()));
        let mut tmp = tempfile::Builder::new()
            .prefix(".index")
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(err)?;
        tmp.write_all(&raw).map_err(err)?;
        tmp.as_file().sync_all().map_err(err)?;
        tmp.persist(path).map_err(|e| err(e.error))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// The hash of an archive made of `chunks`: blake3 over the format name, then each
/// chunk's hash (32 bytes) and size (8 bytes, little-endian).
pub fn archive_hash(chunks: &[ChunkRef]) -> std::result::Result<String, String> {
    let mut h = blake3::Hasher::new();
    h.update(FORMAT.as_bytes());
    h.update(b"\0");
    for c in chunks {
        let hash = blake3::Hash::from_hex(&c.hash)
            .map_err(|_| format!("`{}` is not a chunk hash", c.hash))?;
        h.update(hash.as_bytes());
        h.update(&c.size.to_le_bytes());
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Where the chunk `hash` lives in the chunk store `store`.
pub fn chunk_path(store: &Path, hash: &str) -> PathBuf {
    let fan = hash.get(..2).unwrap_or("__");
    store.join(fan).join(format!("{hash}.zst"))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// What [`write_archive`] did.
#[derive(Debug)]
pub struct Written {
    pub digest: Digest,
    /// Chunk files this call added to the store (a failed build removes them).
    pub created: Vec<PathBuf>,
    /// Chunks taken from the stat cache, their files not read.
    pub cached: usize,
    /// Chunks in the archive.
    pub chunks: usize,
}

/// Files of the tree read from elsewhere than its folder: git blobs (whether or not
/// they are written in the folder too), archived from the mirrors, and files of
/// `path:` sources not linked in, archived from where they are.
#[derive(Debug, Clone, Copy)]
pub struct Outside<'a> {
    pub mirrors: &'a [PathBuf],
    pub git: &'a std::collections::BTreeMap<PathBuf, GitFile>,
    pub sources: &'a std::collections::BTreeMap<PathBuf, SourceFile>,
}

/// Archive the tree at `root` (with the `outside` files): new chunks into the chunk store `store` (0600, fan-out
/// folders 0700), the index to `index_out` (atomically, fsynced after the chunks). The
/// stat cache at `cache` (if given) is read and rewritten. `skip(rel_path)` excludes
/// entries (paths relative to `root`); a skipped folder excludes everything under it.
pub fn write_archive(
    root: &Path,
    outside: Option<Outside<'_>>,
    store: &Path,
    index_out: &Path,
    skip: &dyn Fn(&Path) -> bool,
    cache: Option<&Path>,
) -> Result<Written> {
    write_archive_with(root, outside, store, index_out, skip, cache, None)
}

/// [`write_archive`], counting on `meter` the file bytes archived (of the tree's
/// total) and, as its second count, the compressed bytes of the new chunks.
pub fn write_archive_with(
    root: &Path,
    outside: Option<Outside<'_>>,
    store: &Path,
    index_out: &Path,
    skip: &dyn Fn(&Path) -> bool,
    cache: Option<&Path>,
    meter: Option<&Meter>,
) -> Result<Written> {
    let started = SystemTime::now();
    // Walk first: a tree we cannot archive fails before anything is created.
    let items = scan(root, outside, skip)?;
    let plan = plan(&items);
    let old = cache.map(StatCache::load).unwrap_or_default();
    let store_err =
        |e: io::Error| Error::failed(STAGE, format!("cannot write `{}`: {e}", store.display()));
    fs::create_dir_all(store).map_err(store_err)?;
    fs::set_permissions(store, fs::Permissions::from_mode(0o700)).map_err(store_err)?;

    let racy_after = started
        .checked_sub(RACY)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as i64);
    let mut keys: Vec<Option<[u8; 32]>> = vec![None; plan.len()];
    // What the stat cache gives, before reading anything: the git blobs to stream
    // are those of the other chunks.
    let mut refs: Vec<Option<ChunkRef>> = plan
        .iter()
        .enumerate()
        .map(|(seq, chunk)| {
            let key = chunk_key(&items, chunk);
            if !is_racy(&items, chunk, racy_after) {
                keys[seq] = Some(key);
            }
            old.get(&key)
                .filter(|r| {
                    fs::metadata(chunk_path(store, &r.hash)).is_ok_and(|m| m.len() == r.stored)
                })
                .cloned()
        })
        .collect();
    let cached = refs.iter().flatten().count();
    let data_of = |chunk: &Planned| chunk.iter().map(|p| p.to - p.from).sum::<u64>();
    if let Some(m) = meter {
        m.set_total(counts(&items).1);
        let skipped: u64 = plan
            .iter()
            .zip(&refs)
            .filter(|(_, r)| r.is_some())
            .map(|(c, _)| data_of(c))
            .sum();
        m.add(skipped);
    }
    let workers = workers();
    // Several feeders read the chunks, each its own share through its own git reader:
    // a git source's objects are inflated on as many threads, not one.
    let feeders = workers.min(MAX_FEEDERS);
    // The pieces of one git file go to one feeder: a blob is inflated from its start.
    let mut owner: Vec<usize> = Vec::with_capacity(plan.len());
    let mut turn = 0;
    for chunk in &plan {
        let goes_on = chunk
            .first()
            .is_some_and(|p| p.from > 0 && items[p.item].git.is_some());
        match owner.last() {
            Some(&last) if goes_on => owner.push(last),
            _ => {
                owner.push(turn % feeders);
                turn += 1;
            }
        }
    }
    let readers: Vec<GitReader> = (0..feeders)
        .map(|f| GitReader::new(outside, &items, &plan, &refs, &|seq| owner[seq] == f))
        .collect();
    let (work_tx, work_rx) = mpsc::sync_channel::<(usize, Vec<u8>)>(workers);
    let work_rx = Mutex::new(work_rx);
    let (done_tx, done_rx) = mpsc::channel::<(usize, io::Result<(ChunkRef, bool)>)>();
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    let free_rx = Mutex::new(free_rx);
    // New chunk files are flushed to disk one by one as they are written, while the
    // work goes on, and not the whole file system at the end: a build tree just
    // written (a git source's) has nothing to do with the archive's durability.
    // Several syncers, so that the file system commits their flushes together.
    let (sync_tx, sync_rx) = mpsc::channel::<PathBuf>();
    let sync_rx = Mutex::new(sync_rx);
    let synced: Mutex<io::Result<()>> = Mutex::new(Ok(()));
    // Set by a feeder that failed, so that the others stop early.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let produced = std::thread::scope(|s| {
        for _ in 0..SYNCERS {
            let (rx, synced) = (&sync_rx, &synced);
            s.spawn(move || {
                loop {
                    let next = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok(path) = next else { return };
                    if let Err(e) = File::open(&path).and_then(|f| f.sync_data())
                        && let Ok(mut first) = synced.lock()
                        && first.is_ok()
                    {
                        *first = Err(e);
                    }
                }
            });
        }
        for _ in 0..workers {
            let (rx, done, free, sync) =
                (&work_rx, done_tx.clone(), free_tx.clone(), sync_tx.clone());
            s.spawn(move || worker(store, rx, done, free, sync, meter));
        }
        drop((done_tx, free_tx, sync_tx));
        let (items, plan, refs, free_rx, stop, owner) =
            (&items, &plan, &refs, &free_rx, &stop, &owner);
        let handles: Vec<_> = readers
            .into_iter()
            .enumerate()
            .map(|(f, mut blobs)| {
                // Taking the sender by value: any return hangs up, so the workers end.
                let work = work_tx.clone();
                s.spawn(move || -> Result<()> {
                    let mut headers = Headers::new();
                    for (seq, chunk) in plan.iter().enumerate() {
                        if owner[seq] != f || refs[seq].is_some() {
                            continue;
                        }
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            return Ok(());
                        }
                        let mut buf = free_rx
                            .lock()
                            .ok()
                            .and_then(|rx| rx.try_recv().ok())
                            .unwrap_or_default();
                        buf.clear();
                        let filled = fill(root, items, chunk, &mut headers, &mut blobs, &mut buf);
                        if filled.is_err() {
                            stop.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        filled?;
                        if let Some(m) = meter {
                            m.add(data_of(chunk));
                        }
                        work.send((seq, buf))
                            .map_err(|_| Error::failed(STAGE, "the archive workers stopped"))?;
                    }
                    Ok(())
                })
            })
            .collect();
        drop(work_tx);
        let mut first = Ok(());
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(Error::failed(STAGE, "an archive feeder panicked")));
            if first.is_ok() {
                first = r;
            }
        }
        first
    });
    let mut created = Vec::new();
    let mut failed = None;
    for (seq, result) in done_rx {
        match result {
            Ok((r, new)) => {
                if new {
                    created.push(chunk_path(store, &r.hash));
                }
                refs[seq] = Some(r);
            }
            Err(e) => {
                failed.get_or_insert(Error::failed(
                    STAGE,
                    format!("cannot write a chunk into `{}`: {e}", store.display()),
                ));
            }
        }
    }
    // Two equal chunks of one archive may both have been written.
    created.sort();
    created.dedup();
    let finish = || -> Result<Written> {
        produced?;
        if let Some(e) = failed {
            return Err(e);
        }
        let chunks: Vec<ChunkRef> = refs
            .iter()
            .map(|r| {
                r.clone()
                    .ok_or_else(|| Error::failed(STAGE, "a chunk went missing"))
            })
            .collect::<Result<_>>()?;
        let hash = archive_hash(&chunks).map_err(|e| Error::failed(STAGE, e))?;
        let (files, bytes) = counts(&items);
        // Every chunk on disk before the index that names them.
        synced
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .map_err(store_err)?;
        sync_dirs(&created).map_err(store_err)?;
        let index = Index {
            format: FORMAT.into(),
            hash: hash.clone(),
            files,
            bytes,
            chunks,
        };
        index.write(index_out)?;
        if let Some(cache) = cache {
            let fresh = StatCache(
                keys.iter()
                    .zip(&index.chunks)
                    .filter_map(|(k, r)| k.map(|k| (k, r.clone())))
                    .collect(),
            );
            // Only a cache: failing to write it costs the next build time, nothing else.
            let _ = fresh.save(cache);
        }
        Ok(Written {
            digest: Digest { hash, files, bytes },
            created: Vec::new(),
            cached,
            chunks: index.chunks.len(),
        })
    };
    match finish() {
        Ok(w) => Ok(Written { created, ..w }),
        Err(e) => {
            for path in &created {
                let _ = fs::remove_file(path);
            }
            Err(e)
        }
    }
}

/// A worker: hash each chunk it is given and, if the store lacks it, compress and
/// store it. Reports `(chunk, newly stored)` by sequence number.
fn worker(
    store: &Path,
    work: &Mutex<mpsc::Receiver<(usize, Vec<u8>)>>,
    done: mpsc::Sender<(usize, io::Result<(ChunkRef, bool)>)>,
    free: mpsc::Sender<Vec<u8>>,
    sync: mpsc::Sender<PathBuf>,
    meter: Option<&Meter>,
) {
    let mut zstd = compressor();
    loop {
        let job = match work.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((seq, buf)) = job else { return };
        let result = match &mut zstd {
            Ok(z) => store_chunk(store, z, &buf),
            Err(e) => Err(io::Error::new(e.kind(), format!("cannot start zstd: {e}"))),
        };
        if let Ok((chunk, true)) = &result {
            let _ = sync.send(chunk_path(store, &chunk.hash));
            if let Some(m) = meter {
                m.add_out(chunk.stored);
            }
        }
        let _ = done.send((seq, result));
        let _ = free.send(buf);
    }
}

fn compressor() -> io::Result<Compressor<'static>> {
    let mut z = Compressor::new(LEVEL)?;
    // Like the zstd CLI: a frame checksum catches corruption before the tar is parsed.
    z.include_checksum(true)?;
    // zstd 1.5.7 samples every full 128 KiB block to find where to split it, which
    // doubled the time of compressing our chunks for a gain under 0.1 %; blocks a
    // little under 128 KiB are never split (`scripts/bench-build --only speed`).
    z.set_parameter(zstd::zstd_safe::CParameter::MaxBlockSize(MAX_BLOCK))?;
    Ok(z)
}

fn store_chunk(
    store: &Path,
    zstd: &mut Compressor<'static>,
    data: &[u8],
) -> io::Result<(ChunkRef, bool)> {
    let hash = blake3::hash(data).to_hex().to_string();
    let path = chunk_path(store, &hash);
    let size = data.len() as u64;
    if let Ok(m) = fs::metadata(&path) {
        return Ok((
            ChunkRef {
                hash,
                size,
                stored: m.len(),
            },
            false,
        ));
    }
    let compressed = zstd.compress(data)?;
    put_chunk(&path, &compressed)?;
    Ok((
        ChunkRef {
            hash,
            size,
            stored: compressed.len() as u64,
        },
        true,
    ))
}

/// Flush chunk files to disk, then the folders that name them.
pub fn sync_chunks(paths: &[PathBuf]) -> io::Result<()> {
    for p in paths {
        File::open(p)?.sync_data()?;
    }
    sync_dirs(paths)
}

/// fsync the distinct folders holding `paths` (their new names).
fn sync_dirs(paths: &[PathBuf]) -> io::Result<()> {
    let mut dirs: Vec<&Path> = paths.iter().map(|p| parent(p)).collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        File::open(d)?.sync_all()?;
    }
    Ok(())
}

/// Write a chunk file (0600) into place through a temp file; its fan-out folder is
/// made 0700. The caller syncs.
pub fn put_chunk(path: &Path, compressed: &[u8]) -> io::Result<()> {
    let dir = parent(path);
    if !dir.is_dir() {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(".chunk")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(compressed)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Decompress a chunk and check it against its reference: exactly `size` bytes
/// hashing to `hash`, or an error saying what was found.
pub fn open_chunk(compressed: &[u8], chunk: &ChunkRef) -> std::result::Result<Vec<u8>, String> {
    let size = usize::try_from(chunk.size.min(MAX_CHUNK)).unwrap_or(0);
    let data = zstd::bulk::decompress(compressed, size)
        .map_err(|e| format!("chunk {}: {e}", short(&chunk.hash)))?;
    let found = blake3::hash(&data).to_hex();
    if data.len() as u64 != chunk.size || found.as_str() != chunk.hash {
        return Err(format!(
            "chunk {}: {} bytes hashing to {}",
            short(&chunk.hash),
            data.len(),
            short(found.as_str())
        ));
    }
    Ok(data)
}

/// Remove every chunk of `store` that no index in `keep` lists; returns the count and
/// compressed bytes removed.
pub fn sweep(store: &Path, keep: &std::collections::HashSet<String>) -> (u64, u64) {
    let (mut count, mut bytes) = (0, 0);
    let Ok(fans) = fs::read_dir(store) else {
        return (0, 0);
    };
    for fan in fans.flatten() {
        if !fan.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(entries) = fs::read_dir(fan.path()) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let hash = name.strip_suffix(".zst").unwrap_or(&name);
            if keep.contains(hash) {
                continue;
            }
            let len = e.metadata().map_or(0, |m| m.len());
            if fs::remove_file(e.path()).is_ok() {
                count += 1;
                bytes += len;
            }
        }
    }
    (count, bytes)
}

/// The stat cache: a chunk's key (the paths, kinds and stats of what it holds) → the
/// chunk, as written by the last build.
#[derive(Debug, Default)]
struct StatCache(HashMap<[u8; 32], ChunkRef>);

#[derive(Serialize, Deserialize)]
struct StatCacheFile {
    format: String,
    chunks: Vec<(String, ChunkRef)>,
}

impl StatCache {
    fn load(path: &Path) -> StatCache {
        let parsed = fs::read(path)
            .ok()
            .and_then(|raw| serde_json::from_slice::<StatCacheFile>(&raw).ok());
        let Some(file) = parsed.filter(|f| f.format == FORMAT) else {
            return StatCache::default();
        };
        StatCache(
            file.chunks
                .into_iter()
                .filter_map(|(k, r)| Some((*blake3::Hash::from_hex(k).ok()?.as_bytes(), r)))
                .collect(),
        )
    }

    fn get(&self, key: &[u8; 32]) -> Option<&ChunkRef> {
        self.0.get(key)
    }

    fn save(&self, path: &Path) -> io::Result<()> {
        let mut chunks: Vec<(String, ChunkRef)> = self
            .0
            .iter()
            .map(|(k, r)| (blake3::Hash::from_bytes(*k).to_hex().to_string(), r.clone()))
            .collect();
        chunks.sort_by(|a, b| a.0.cmp(&b.0));
        let raw = serde_json::to_vec(&StatCacheFile {
            format: FORMAT.into(),
            chunks,
        })?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".cache")
            .suffix(".tmp")
            .tempfile_in(parent(path))?;
        tmp.write_all(&raw)?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}

/// The digest [`write_archive`] would return for the same tree, without writing
/// anything.
pub fn hash_tree(root: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<Digest> {
    let items = scan(root, None, skip)?;
    let mut headers = Headers::new();
    let mut blobs = GitReader::default();
    let mut buf = Vec::new();
    let mut chunks = Vec::new();
    for chunk in plan(&items) {
        buf.clear();
        fill(root, &items, &chunk, &mut headers, &mut blobs, &mut buf)?;
        chunks.push(ChunkRef {
            hash: blake3::hash(&buf).to_hex().to_string(),
            size: buf.len() as u64,
            stored: 0,
        });
    }
    let hash = archive_hash(&chunks).map_err(|e| Error::failed(STAGE, e))?;
    let (files, bytes) = counts(&items);
    Ok(Digest { hash, files, bytes })
}

fn counts(items: &[Item]) -> (u64, u64) {
    items.iter().fold((0, 0), |(f, b), i| match i.kind {
        Kind::Dir => (f, b),
        Kind::Symlink => (f + 1, b),
        Kind::File => (f + 1, b + i.size),
    })
}

/// The number of workers: all cores, up to [`MAX_WORKERS`]. The output does not
/// depend on it.
fn workers() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.clamp(1, MAX_WORKERS)
}

/// What to archive at a path relative to the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
}

#[derive(Debug)]
struct Item {
    rel: PathBuf,
    kind: Kind,
    /// Content size (files only).
    size: u64,
    exec: bool,
    /// What the stat cache compares: modification time, inode, device.
    mtime: (i64, i64),
    ino: u64,
    dev: u64,
    /// A git file: its mirror's index and blob, read from there.
    git: Option<(usize, String)>,
    /// A file of a source not linked in: where it is.
    from: Option<PathBuf>,
}

/// Every entry under `root` (and every git file) not skipped, sorted byte-wise by
/// relative path.
fn scan(
    root: &Path,
    outside: Option<Outside<'_>>,
    skip: &dyn Fn(&Path) -> bool,
) -> Result<Vec<Item>> {
    match fs::metadata(root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::invalid(format!(
                "`{}` is not a folder",
                root.display()
            )));
        }
        Err(e) => {
            return Err(Error::invalid(format!(
                "cannot read `{}`: {e}",
                root.display()
            )));
        }
    }
    let rel = |p: &Path| {
        p.strip_prefix(root)
            .map(Path::to_path_buf)
            .unwrap_or_default()
    };
    let mut items = Vec::new();
    let walk = walkdir::WalkDir::new(root)
        .min_depth(1)
        .follow_links(false)
        .into_iter()
        .filter_entry(|e| !skip(&rel(e.path())));
    for entry in walk {
        let read_err = |path: Option<&Path>, e: &dyn std::fmt::Display| {
            let path = path
                .map(|p| rel(p).display().to_string())
                .unwrap_or_default();
            Error::failed(
                STAGE,
                format!("cannot read `{path}` in `{}`: {e}", root.display()),
            )
        };
        let entry = entry.map_err(|e| read_err(e.path(), &e))?;
        if entry.file_type().is_file()
            && outside.is_some_and(|o| {
                let rel = rel(entry.path());
                o.git.contains_key(&rel) || o.sources.contains_key(&rel)
            })
        {
            // Brought in from elsewhere: archived from there, below.
            continue;
        }
        let meta = entry
            .metadata()
            .map_err(|e| read_err(Some(entry.path()), &e))?;
        let ft = entry.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_symlink() {
            Kind::Symlink
        } else {
            return Err(Error::invalid(format!(
                "cannot archive `{}`: it is a socket, fifo or device; only files, folders and symlinks can be archived",
                rel(entry.path()).display()
            )));
        };
        items.push(Item {
            rel: rel(entry.path()),
            kind,
            size: if kind == Kind::File { meta.len() } else { 0 },
            exec: meta.permissions().mode() & 0o111 != 0,
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ino: meta.ino(),
            dev: meta.dev(),
            git: None,
            from: None,
        });
    }
    let skipped = |rel: &Path| {
        rel.ancestors()
            .any(|a| !a.as_os_str().is_empty() && skip(a))
    };
    for (rel, g) in outside.iter().flat_map(|o| o.git) {
        if skipped(rel) {
            continue;
        }
        items.push(Item {
            rel: rel.clone(),
            kind: Kind::File,
            size: g.size,
            exec: g.exec,
            mtime: (0, 0),
            ino: 0,
            dev: 0,
            git: Some((g.mirror, g.oid.clone())),
            from: None,
        });
    }
    for (rel, f) in outside.iter().flat_map(|o| o.sources) {
        if skipped(rel) {
            continue;
        }
        items.push(Item {
            rel: rel.clone(),
            kind: Kind::File,
            size: f.size,
            exec: f.mode & 0o111 != 0,
            mtime: f.mtime,
            ino: f.ino,
            dev: f.dev,
            git: None,
            from: Some(f.path.clone()),
        });
    }
    // Byte-wise order of the whole path, independent of the file system's listing order.
    items.sort_unstable_by(|a, b| {
        a.rel
            .as_os_str()
            .as_bytes()
            .cmp(b.rel.as_os_str().as_bytes())
    });
    Ok(items)
}

/// Part of a chunk: the bytes `from..to` of an item's content, with its header when
/// `from` is 0 and its padding when `to` is its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Part {
    item: usize,
    from: u64,
    to: u64,
}

/// A planned chunk; the empty one is the end-of-archive blocks.
type Planned = Vec<Part>;

/// Cut the tar stream of `items` into chunks (see the constants above). Depends only
/// on paths, kinds and sizes, so the same tree always gives the same chunks.
fn plan(items: &[Item]) -> Vec<Planned> {
    let mut chunks = Vec::new();
    let mut group: Planned = Vec::new();
    let mut group_size = 0u64;
    for (i, item) in items.iter().enumerate() {
        if item.kind == Kind::File && item.size >= PIECE {
            if !group.is_empty() {
                chunks.push(std::mem::take(&mut group));
                group_size = 0;
            }
            let mut from = 0;
            while from < item.size {
                let to = (from + PIECE).min(item.size);
                chunks.push(vec![Part { item: i, from, to }]);
                from = to;
            }
            continue;
        }
        group.push(Part {
            item: i,
            from: 0,
            to: item.size,
        });
        group_size += item.size + 512;
        let cut =
            blake3::hash(item.rel.as_os_str().as_bytes()).as_bytes()[0].is_multiple_of(CUT_ONE_IN);
        if group_size >= GROUP || cut {
            chunks.push(std::mem::take(&mut group));
            group_size = 0;
        }
    }
    if !group.is_empty() {
        chunks.push(group);
    }
    // The end-of-archive blocks: a chunk of their own, the same in every archive.
    chunks.push(Vec::new());
    chunks
}

/// The stat cache's key of a chunk: what it holds and the stat of each file in it.
fn chunk_key(items: &[Item], chunk: &[Part]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(FORMAT.as_bytes());
    for p in chunk {
        let item = &items[p.item];
        let rel = item.rel.as_os_str().as_bytes();
        h.update(&(rel.len() as u64).to_le_bytes());
        h.update(rel);
        h.update(&[item.kind as u8, u8::from(item.exec)]);
        for n in [p.from, p.to, item.size, item.ino, item.dev] {
            h.update(&n.to_le_bytes());
        }
        if let Some((_, oid)) = &item.git {
            // A blob is its content: nothing racy about it.
            h.update(b"git\0");
            h.update(oid.as_bytes());
        } else if item.kind != Kind::Dir {
            h.update(&item.mtime.0.to_le_bytes());
            h.update(&item.mtime.1.to_le_bytes());
        }
    }
    *h.finalize().as_bytes()
}

/// Does the chunk hold something modified too recently to trust its stat?
fn is_racy(items: &[Item], chunk: &[Part], after: i64) -> bool {
    chunk.iter().any(|p| {
        let item = &items[p.item];
        item.kind != Kind::Dir && item.git.is_none() && item.mtime.0 >= after
    })
}

/// Reads the git files' contents for one feeder: straight from each mirror's object
/// files ([`Odb`]) where they are found there, the others streamed from one
/// `git cat-file --batch` per mirror, asked for them in the order they will be read.
#[derive(Default)]
struct GitReader {
    mirrors: Vec<PathBuf>,
    odbs: Vec<Option<Odb>>,
    /// Where each git item to read is in its mirror's object files, if found there.
    located: HashMap<usize, Loc>,
    /// Per mirror: the blobs left to `git cat-file`, in order.
    wanted: Vec<Vec<String>>,
    streams: Vec<Option<Blobs>>,
    /// Per mirror: the `git cat-file` item being read and how far.
    current: Vec<Option<(usize, u64)>>,
    /// The item read in parts from the object files, and how far.
    open: Option<(usize, u64, OdbBlob)>,
}

impl GitReader {
    fn new(
        outside: Option<Outside<'_>>,
        items: &[Item],
        plan: &[Planned],
        done: &[Option<ChunkRef>],
        mine: &dyn Fn(usize) -> bool,
    ) -> GitReader {
        let mirrors = outside.map(|o| o.mirrors.to_vec()).unwrap_or_default();
        let mut odbs: Vec<Option<Odb>> = (0..mirrors.len()).map(|_| None).collect();
        let mut located = HashMap::new();
        let mut wanted = vec![Vec::new(); mirrors.len()];
        let mut last = vec![None; mirrors.len()];
        let todo = plan.iter().zip(done).enumerate();
        for (_, (chunk, _)) in todo.filter(|(seq, (_, d))| d.is_none() && mine(*seq)) {
            for p in chunk {
                let Some((m, oid)) = &items[p.item].git else {
                    continue;
                };
                let (Some(w), Some(mirror)) = (wanted.get_mut(*m), mirrors.get(*m)) else {
                    continue;
                };
                if last[*m] == Some(p.item) {
                    continue;
                }
                last[*m] = Some(p.item);
                let odb = odbs[*m].get_or_insert_with(|| Odb::open(mirror, oid.len() / 2));
                match odb.locate(oid) {
                    Some(loc) => {
                        located.insert(p.item, loc);
                    }
                    None => w.push(oid.clone()),
                }
            }
        }
        GitReader {
            streams: (0..mirrors.len()).map(|_| None).collect(),
            current: vec![None; mirrors.len()],
            mirrors,
            odbs,
            located,
            wanted,
            open: None,
        }
    }

    /// Append bytes `from..to` of git file `idx` to `out`.
    fn read(
        &mut self,
        idx: usize,
        item: &Item,
        from: u64,
        to: u64,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        let Some((m, oid)) = &item.git else {
            return Err(io::Error::other("not a git file"));
        };
        let m = *m;
        if let (Some(loc), Some(Some(odb))) = (self.located.get(&idx), self.odbs.get_mut(m)) {
            if from == 0 && to == item.size {
                return odb.read_whole(loc, item.size, out);
            }
            let (blob, pos) = match &mut self.open {
                Some((i, pos, blob)) if *i == idx && *pos <= from => (blob, pos),
                open => {
                    let (_, pos, blob) = open.insert((idx, 0, odb.open_blob(loc, item.size)?));
                    (blob, pos)
                }
            };
            blob.skip(from - *pos)?;
            blob.read(to - from, out)?;
            *pos = to;
            if to == item.size {
                self.open = None;
            }
            return Ok(());
        }
        let (Some(slot), Some(mirror)) = (self.streams.get_mut(m), self.mirrors.get(m)) else {
            return Err(io::Error::other("no mirror for a git file"));
        };
        if slot.is_none() {
            *slot = Some(Blobs::open(mirror, std::mem::take(&mut self.wanted[m]))?);
        }
        let Some(blobs) = slot.as_mut() else {
            return Err(io::Error::other("git cat-file did not start"));
        };
        let pos = match self.current[m] {
            Some((i, pos)) if i == idx => pos,
            _ => {
                let size = blobs.start(oid)?;
                if size != item.size {
                    return Err(io::Error::other(format!(
                        "blob {oid} holds {size} bytes, its listing said {}",
                        item.size
                    )));
                }
                0
            }
        };
        blobs.skip(from.saturating_sub(pos))?;
        blobs.read(to - from, out)?;
        if to == item.size {
            blobs.end()?;
            self.current[m] = None;
        } else {
            self.current[m] = Some((idx, to));
        }
        Ok(())
    }
}

/// Writes tar headers: one builder for the whole archive, its output taken after
/// every header (the builder writes the end-of-archive blocks only when finished).
struct Headers {
    builder: tar::Builder<Vec<u8>>,
}

impl Headers {
    fn new() -> Headers {
        Headers {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    /// Append `item`'s header (and a GNU long-name entry if needed) to `out`.
    fn append(&mut self, root: &Path, item: &Item, out: &mut Vec<u8>) -> Result<()> {
        let write_err = |e: io::Error| {
            Error::failed(
                STAGE,
                format!(
                    "cannot write `{}` into the archive: {e}",
                    item.rel.display()
                ),
            )
        };
        // A GNU header with every field we do not set left zero: uid/gid 0, no owner names.
        let mut header = Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(0);
        match item.kind {
            Kind::Dir => {
                header.set_entry_type(EntryType::Directory);
                header.set_mode(0o755);
                self.builder
                    .append_data(&mut header, &item.rel, io::empty())
                    .map_err(write_err)?;
            }
            Kind::Symlink => {
                let path = root.join(&item.rel);
                let target = fs::read_link(&path).map_err(|e| {
                    Error::failed(STAGE, format!("cannot read `{}`: {e}", path.display()))
                })?;
                header.set_entry_type(EntryType::Symlink);
                header.set_mode(0o777);
                self.builder
                    .append_link(&mut header, &item.rel, &target)
                    .map_err(write_err)?;
            }
            Kind::File => {
                header.set_entry_type(EntryType::Regular);
                header.set_mode(if item.exec { 0o755 } else { 0o644 });
                header.set_size(item.size);
                // Given no data the builder writes only the header; the body follows.
                self.builder
                    .append_data(&mut header, &item.rel, io::empty())
                    .map_err(write_err)?;
            }
        }
        out.append(self.builder.get_mut());
        Ok(())
    }
}

/// The tar bytes of a planned chunk, appended to `out`.
fn fill(
    root: &Path,
    items: &[Item],
    chunk: &[Part],
    headers: &mut Headers,
    blobs: &mut GitReader,
    out: &mut Vec<u8>,
) -> Result<()> {
    if chunk.is_empty() {
        out.extend_from_slice(&[0u8; 1024]);
        return Ok(());
    }
    for p in chunk {
        let item = &items[p.item];
        if p.from == 0 {
            headers.append(root, item, out)?;
        }
        if item.kind != Kind::File {
            continue;
        }
        if item.git.is_some() {
            blobs.read(p.item, item, p.from, p.to, out).map_err(|e| {
                Error::failed(
                    STAGE,
                    format!("cannot read `{}` from git: {e}", item.rel.display()),
                )
            })?;
        } else {
            read_part(root, item, p, out)?;
        }
        if p.to == item.size {
            // Pad the body to a whole 512-byte block, as tar requires.
            let pad = (512 - item.size % 512) % 512;
            out.extend_from_slice(&[0u8; 512][..pad as usize]);
        }
    }
    Ok(())
}

/// Append bytes of a file of the folder to `out`.
fn read_part(root: &Path, item: &Item, p: &Part, out: &mut Vec<u8>) -> Result<()> {
    {
        let path = item.from.clone().unwrap_or_else(|| root.join(&item.rel));
        let read_err =
            |e: io::Error| Error::failed(STAGE, format!("cannot read `{}`: {e}", path.display()));
        if p.to > p.from {
            let mut file = File::open(&path).map_err(read_err)?;
            if p.from > 0 {
                file.seek(SeekFrom::Start(p.from)).map_err(read_err)?;
            }
            let want = p.to - p.from;
            let start = out.len();
            out.reserve(usize::try_from(want).unwrap_or(0));
            let got = (&mut file).take(want).read_to_end(out).map_err(read_err)?;
            if (got as u64) < want {
                out.truncate(start);
                return Err(Error::failed(
                    STAGE,
                    format!("`{}` shrank while it was being archived", path.display()),
                ));
            }
        }
    }
    Ok(())
}

/// Extract `archive` (an index whose chunks are in `store`, or an archive of the
/// earlier one-file format) into `dest`, which must be an empty folder or absent (it
/// is created, with its parents). If `expected` is given, the archive's hash must
/// equal it; every chunk is checked against its hash as it is read. Everything is
/// extracted into a temporary sibling first and renamed into place only on success,
/// so a bad archive leaves nothing behind.
///
/// A `dest` created here is owner-only (0700), like the archive; an existing empty
/// `dest` keeps its mode.
pub fn extract_archive(
    archive: &Path,
    store: &Path,
    dest: &Path,
    expected: Option<&str>,
) -> Result<Digest> {
    let dest_err = |e: io::Error| {
        Error::failed(
            STAGE,
            format!("cannot extract into `{}`: {e}", dest.display()),
        )
    };
    let keep_mode = match fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => {
            if fs::read_dir(dest).map_err(dest_err)?.next().is_some() {
                return Err(Error::invalid(format!(
                    "cannot extract into `{}`: the folder is not empty",
                    dest.display()
                )));
            }
            Some(m.permissions().mode())
        }
        Ok(_) => {
            return Err(Error::invalid(format!(
                "cannot extract into `{}`: it exists and is not a folder",
                dest.display()
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(dest_err(e)),
    };
    let corrupted = |detail: String| {
        Error::failed(
            STAGE,
            format!(
                "archive `{}` was tampered with or corrupted ({detail})",
                archive.display()
            ),
        )
    };
    let mut file = File::open(archive).map_err(|e| {
        let msg = format!("cannot open archive `{}`: {e}", archive.display());
        if e.kind() == io::ErrorKind::NotFound {
            Error::invalid(msg)
        } else {
            Error::failed(STAGE, msg)
        }
    })?;
    let mut magic = [0u8; 4];
    let legacy = file.read_exact(&mut magic).is_ok() && magic == ZSTD_MAGIC;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| corrupted(e.to_string()))?;
    let index = if legacy {
        None
    } else {
        let index = Index::read(archive).map_err(|_| corrupted("not an archive index".into()))?;
        if let Some(expected) = expected
            && !expected.eq_ignore_ascii_case(&index.hash)
        {
            return Err(corrupted(format!(
                "expected {expected}, found {}",
                index.hash
            )));
        }
        Some(index)
    };

    fs::create_dir_all(parent(dest)).map_err(dest_err)?;
    let name = dest.file_name().ok_or_else(|| {
        Error::invalid(format!(
            "cannot extract into `{}`: no folder name",
            dest.display()
        ))
    })?;
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".extract-");
    let tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .tempdir_in(parent(dest))
        .map_err(dest_err)?;

    let (files, bytes, hash) = match &index {
        Some(index) => {
            let mut reader = ChunkReader::new(store, &index.chunks);
            let unpacked = unpack_all(&mut reader, tmp.path());
            if let Some(detail) = reader.corrupt {
                return Err(corrupted(detail));
            }
            let (files, bytes) = unpacked.map_err(|e| {
                Error::failed(
                    STAGE,
                    format!("cannot extract `{}`: {e}", archive.display()),
                )
            })?;
            (files, bytes, index.hash.clone())
        }
        None => {
            let decoder =
                zstd::stream::read::Decoder::new(file).map_err(|e| corrupted(e.to_string()))?;
            let mut reader = HashingReader::new(decoder);
            let unpacked = unpack_all(&mut reader, tmp.path());
            let (files, bytes) = match unpacked {
                Ok(counts) => counts,
                // An error from the decoder means the compressed bytes are bad, not the disk.
                Err(e) if reader.read_failed => return Err(corrupted(e.to_string())),
                Err(e) => {
                    return Err(Error::failed(
                        STAGE,
                        format!("cannot extract `{}`: {e}", archive.display()),
                    ));
                }
            };
            let hash = reader.hasher.finalize().to_hex().to_string();
            if let Some(expected) = expected
                && !expected.eq_ignore_ascii_case(&hash)
            {
                return Err(corrupted(format!("expected {expected}, found {hash}")));
            }
            (files, bytes, hash)
        }
    };

    let mode = keep_mode.unwrap_or(0o700);
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode)).map_err(dest_err)?;
    let path = tmp.keep();
    // Renaming a folder onto an empty folder replaces it, so an existing empty dest works.
    if let Err(e) = fs::rename(&path, dest) {
        let _ = fs::remove_dir_all(&path);
        return Err(dest_err(e));
    }
    Ok(Digest { hash, files, bytes })
}

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Unpack the tar stream `reader` under `dir` and read it to its end (everything
/// after the end-of-archive blocks is part of what was hashed).
fn unpack_all<R: Read>(reader: &mut R, dir: &Path) -> io::Result<(u64, u64)> {
    let mut tar = tar::Archive::new(BufReader::with_capacity(READ, reader));
    tar.set_preserve_permissions(true);
    tar.set_mask(0);
    // mtimes are all 0 in the archive; fresh times are less surprising on disk.
    tar.set_preserve_mtime(false);
    let counts = unpack(&mut tar, dir)?;
    io::copy(&mut tar.into_inner(), &mut io::sink())?;
    Ok(counts)
}

/// Unpack every entry of `tar` under `dir`, returning (files, bytes) as in [`Digest`].
fn unpack<R: Read>(tar: &mut tar::Archive<R>, dir: &Path) -> io::Result<(u64, u64)> {
    let (mut files, mut bytes) = (0, 0);
    for entry in tar.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        match kind {
            EntryType::Regular => {
                files += 1;
                bytes += entry.size();
            }
            EntryType::Symlink => files += 1,
            EntryType::Directory => {}
            // We never write anything else (long names are folded in by `entries`).
            other => {
                return Err(io::Error::other(format!(
                    "unexpected entry `{}` of type {other:?}",
                    String::from_utf8_lossy(&entry.path_bytes())
                )));
            }
        }
        if !entry.unpack_in(dir)? {
            return Err(io::Error::other(format!(
                "entry `{}` points outside the archive",
                String::from_utf8_lossy(&entry.path_bytes())
            )));
        }
    }
    Ok((files, bytes))
}

/// The tar stream of an index: its chunks in order, each decompressed and checked
/// against its size and hash before any of its bytes is handed out. A failed check
/// sets `corrupt` and fails the read.
struct ChunkReader<'a> {
    store: &'a Path,
    chunks: &'a [ChunkRef],
    next: usize,
    current: Vec<u8>,
    pos: usize,
    corrupt: Option<String>,
}

impl<'a> ChunkReader<'a> {
    fn new(store: &'a Path, chunks: &'a [ChunkRef]) -> Self {
        ChunkReader {
            store,
            chunks,
            next: 0,
            current: Vec::new(),
            pos: 0,
            corrupt: None,
        }
    }

    fn fail(&mut self, detail: String) -> io::Error {
        let e = io::Error::other(detail.clone());
        self.corrupt.get_or_insert(detail);
        e
    }
}

impl Read for ChunkReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            let Some(chunk) = self.chunks.get(self.next) else {
                return Ok(0);
            };
            let path = chunk_path(self.store, &chunk.hash);
            let compressed = match fs::read(&path) {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let detail = format!("chunk {} is missing", short(&chunk.hash));
                    return Err(self.fail(detail));
                }
                Err(e) => return Err(e),
            };
            self.current = match open_chunk(&compressed, chunk) {
                Ok(data) => data,
                Err(detail) => {
                    // A damaged chunk would be trusted by every later build that holds
                    // the same content: it goes, and the next build or pull makes it anew.
                    let _ = fs::remove_file(&path);
                    return Err(self.fail(format!("{detail}; the damaged chunk was removed")));
                }
            };
            self.pos = 0;
            self.next += 1;
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Hashes what it reads, and remembers whether reading failed (a corrupt stream).
struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
    read_failed: bool,
}

impl<R> HashingReader<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: blake3::Hasher::new(),
            read_failed: false,
        }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.read_failed = true;
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use tempfile::TempDir;

    fn no_skip(_: &Path) -> bool {
        false
    }

    fn write(root: &Path, rel: &str, data: &[u8]) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    }

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Set every file's and symlink's mtime an hour back, so the stat cache trusts them.
    fn age(root: &Path) {
        let ok = std::process::Command::new("sh")
            .arg("-c")
            .arg("find \"$1\" -exec touch -h -d '1 hour ago' {} +")
            .arg("sh")
            .arg(root)
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    const LONG: &str = "a-rather-long-folder-name-that-goes-on/and-on-and-on-for-quite-a-while/\
                        past-the-hundred-byte-limit-of-a-tar-header/and-past-the-ustar-prefix-of-\
                        one-hundred-and-fifty-five-bytes-too/file-with-a-long-name.txt";

    /// The sample tree's archive hash.
    const PINNED_SAMPLE_HASH: &str =
        "45328cd6aadf0db125d686fc80911e0f913710ab1c11b586e45799009c40933d";

    /// The blake3 of the sample tree's tar stream, as the first archive format hashed
    /// it: the stream is unchanged, only how it is stored and hashed.
    const PINNED_V1_STREAM_HASH: &str =
        "68c931c66ec8cd26ad0f827e317b36869b54a7e2e1d869b8ca3682843a320fae";

    /// A tree with nested folders, an executable, symlinks, an empty folder, long names.
    fn sample() -> TempDir {
        let dir = TempDir::new().unwrap();
        let r = dir.path();
        write(r, "README.md", b"hello\n");
        write(r, "app/main.py", b"print('hi')\n");
        write(r, "app/run.sh", b"#!/bin/sh\necho run\n");
        chmod(&r.join("app/run.sh"), 0o750);
        write(
            r,
            "app-data/z.bin",
            &(0..=255u8).cycle().take(70_000).collect::<Vec<_>>(),
        );
        write(r, "empty.txt", b"");
        write(r, LONG, b"deep\n");
        fs::create_dir_all(r.join("logs/empty")).unwrap();
        symlink("app/main.py", r.join("main-link")).unwrap();
        symlink(format!("../{}", "x".repeat(150)), r.join("app/long-link")).unwrap();
        dir
    }

    fn hash(root: &Path) -> String {
        hash_tree(root, &no_skip).unwrap().hash
    }

    /// A place for archives: a chunk store, indexes and a stat cache.
    struct Place {
        dir: TempDir,
    }

    impl Place {
        fn new() -> Place {
            Place {
                dir: TempDir::new().unwrap(),
            }
        }
        fn store(&self) -> PathBuf {
            self.dir.path().join("chunks")
        }
        fn index(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
        fn cache(&self) -> PathBuf {
            self.dir.path().join("cache.json")
        }
        fn write(&self, tree: &Path, name: &str) -> Written {
            write_archive(tree, None, &self.store(), &self.index(name), &no_skip, None).unwrap()
        }
        fn write_cached(&self, tree: &Path, name: &str) -> Written {
            let cache = self.cache();
            write_archive(
                tree,
                None,
                &self.store(),
                &self.index(name),
                &no_skip,
                Some(&cache),
            )
            .unwrap()
        }
        fn extract(&self, name: &str, dest: &Path, expected: Option<&str>) -> Result<Digest> {
            extract_archive(&self.index(name), &self.store(), dest, expected)
        }
        /// The chunk files of an index, concatenated: a `.tar.zst`.
        fn concatenated(&self, name: &str) -> Vec<u8> {
            let index = Index::read(&self.index(name)).unwrap();
            let mut out = Vec::new();
            for c in &index.chunks {
                out.extend(fs::read(chunk_path(&self.store(), &c.hash)).unwrap());
            }
            out
        }
        fn chunk_files(&self) -> Vec<PathBuf> {
            let mut out: Vec<PathBuf> = walkdir::WalkDir::new(self.store())
                .into_iter()
                .map(|e| e.unwrap())
                .filter(|e| e.file_type().is_file())
                .map(|e| e.into_path())
                .collect();
            out.sort();
            out
        }
    }

    /// Copy `src` into a fresh temp folder with `cp -a` (keeps modes and symlinks).
    fn copy(src: &Path) -> TempDir {
        let dir = TempDir::new().unwrap();
        let ok = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", src.display()))
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok);
        dir
    }

    #[test]
    fn same_tree_same_bytes() {
        let tree = sample();
        let (a, b) = (Place::new(), Place::new());
        let da = a.write(tree.path(), "i").digest;
        let copied = copy(tree.path());
        let db = b.write(copied.path(), "i").digest;
        assert_eq!(da, db);
        assert_eq!(
            fs::read(a.index("i")).unwrap(),
            fs::read(b.index("i")).unwrap()
        );
        assert_eq!(a.concatenated("i"), b.concatenated("i"));
        assert_eq!(da.hash.len(), 64);
        // README, main.py, run.sh, z.bin, empty.txt, LONG, two symlinks.
        assert_eq!(da.files, 8);
        assert_eq!(da.bytes, 6 + 12 + 19 + 70_000 + 5);
        assert_eq!(hash_tree(tree.path(), &no_skip).unwrap(), da);
    }

    /// The archive format is part of every release id: the sample tree's hash is
    /// pinned, so a change to the format cannot pass unnoticed (it would need a
    /// migration note). The tar stream itself is still the first format's.
    #[test]
    fn the_format_is_stable() {
        let tree = sample();
        assert_eq!(
            hash(tree.path()),
            PINNED_SAMPLE_HASH,
            "the archive format changed: release ids of existing trees would change"
        );
        let place = Place::new();
        place.write(tree.path(), "i");
        let stream = zstd::decode_all(&place.concatenated("i")[..]).unwrap();
        assert_eq!(
            blake3::hash(&stream).to_hex().as_str(),
            PINNED_V1_STREAM_HASH
        );
    }

    /// Archives of the first format (one `.tar.zst`, hashed as a whole) still extract,
    /// checked against that hash.
    #[test]
    fn first_format_archives_still_extract() {
        let tree = sample();
        let place = Place::new();
        place.write(tree.path(), "i");
        let legacy = place.index("old.tar.zst");
        fs::write(&legacy, place.concatenated("i")).unwrap();
        let dest = place.dir.path().join("dest");
        let d =
            extract_archive(&legacy, &place.store(), &dest, Some(PINNED_V1_STREAM_HASH)).unwrap();
        assert_eq!((d.hash.as_str(), d.files), (PINNED_V1_STREAM_HASH, 8));
        assert_eq!(hash(&dest), hash(tree.path()));
        let err = extract_archive(
            &legacy,
            &place.store(),
            &place.dir.path().join("d2"),
            Some(&"0".repeat(64)),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("was tampered with or corrupted"), "{err}");
    }

    /// A tree whose files are hard links (as `path:` sources are brought into a build)
    /// archives exactly as its source does.
    #[test]
    fn linked_trees_archive_like_their_sources() {
        use crate::source::{Tree, path};
        let tree = sample();
        let linked = TempDir::new().unwrap();
        let to = linked.path().join("t");
        let layer = path::Layer {
            name: "s".into(),
            root: tree.path().to_path_buf(),
            exclude: vec![],
            listed: None,
        };
        let synced = path::sync_tree(&[layer], &to, &Default::default()).unwrap();
        let linked_tree = Tree::new(to.clone(), vec![], synced, linked.path().join("blobs"));
        assert!(linked_tree.ensure(&|_| true).unwrap() > 0);
        fs::create_dir_all(to.join("logs/empty")).unwrap();
        assert_eq!(hash(&to), hash(tree.path()));
    }

    #[test]
    fn archive_is_private_and_leaves_no_temp_files() {
        let tree = sample();
        let place = Place::new();
        fs::write(place.index("i"), b"old").unwrap();
        place.write_cached(tree.path(), "i");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&place.index("i")), 0o600);
        assert_eq!(mode(&place.store()), 0o700);
        for f in place.chunk_files() {
            assert!(f.extension().is_some_and(|e| e == "zst"), "{f:?}");
            assert_eq!(mode(&f), 0o600, "{f:?}");
            assert_eq!(mode(f.parent().unwrap()), 0o700, "{f:?}");
        }
        let mut names: Vec<_> = fs::read_dir(place.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["cache.json", "chunks", "i"]);
    }

    #[test]
    fn entries_are_sorted_and_normalized() {
        let tree = sample();
        let place = Place::new();
        place.write(tree.path(), "i");
        let stream = place.concatenated("i");
        let mut ar = tar::Archive::new(zstd::stream::read::Decoder::new(&stream[..]).unwrap());
        let mut paths = Vec::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            assert_eq!(
                (h.mtime().unwrap(), h.uid().unwrap(), h.gid().unwrap()),
                (0, 0, 0)
            );
            assert_eq!(h.username_bytes(), Some(&b""[..]));
            assert_eq!(h.groupname_bytes(), Some(&b""[..]));
            let mode = h.mode().unwrap();
            match h.entry_type() {
                EntryType::Directory => assert_eq!(mode, 0o755),
                EntryType::Regular => assert!(mode == 0o644 || mode == 0o755),
                EntryType::Symlink => {}
                other => panic!("{other:?}"),
            }
            paths.push(e.path_bytes().into_owned());
        }
        let mut sorted = paths.clone();
        sorted.sort();
        assert_eq!(paths, sorted);
        // "app-data" sorts before "app/..." byte-wise ('-' < '/'), after "app" itself.
        let pos = |p: &[u8]| paths.iter().position(|x| x == p).unwrap();
        assert!(pos(b"app") < pos(b"app-data") && pos(b"app-data") < pos(b"app/main.py"));
        assert!(paths.contains(&LONG.as_bytes().to_vec()));
    }

    #[test]
    fn any_change_changes_the_hash() {
        let tree = sample();
        let base = hash(tree.path());
        type Change = fn(&Path);
        let changes: [(&str, Change); 7] = [
            ("byte", |r| write(r, "app/main.py", b"print('hI')\n")),
            ("rename", |r| {
                fs::rename(r.join("README.md"), r.join("README.txt")).unwrap()
            }),
            ("chmod +x", |r| chmod(&r.join("README.md"), 0o744)),
            ("chmod -x", |r| chmod(&r.join("app/run.sh"), 0o640)),
            ("empty dir", |r| fs::create_dir(r.join("app/new")).unwrap()),
            ("symlink target", |r| {
                fs::remove_file(r.join("main-link")).unwrap();
                symlink("app/run.sh", r.join("main-link")).unwrap();
            }),
            ("long file", |r| write(r, LONG, b"deeP\n")),
        ];
        for (what, change) in changes {
            let copied = copy(tree.path());
            change(copied.path());
            assert_ne!(hash(copied.path()), base, "{what}");
        }
    }

    #[test]
    fn times_and_non_exec_mode_bits_do_not_matter() {
        let tree = sample();
        let base = hash(tree.path());
        let copied = copy(tree.path());
        let r = copied.path();
        let old = UNIX_EPOCH + Duration::from_secs(1_000_000);
        File::options()
            .write(true)
            .open(r.join("README.md"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        chmod(&r.join("README.md"), 0o600);
        chmod(&r.join("app/run.sh"), 0o700);
        chmod(&r.join("app"), 0o700);
        assert_eq!(hash(r), base);
    }

    #[test]
    fn skip_excludes_files_and_folders() {
        let tree = sample();
        let r = tree.path();
        write(r, "secrets/db.yml", b"password: hunter2\n");
        write(r, "config.yml", b"token: x\n");
        let skip = |p: &Path| p == Path::new("secrets") || p == Path::new("config.yml");
        let skipped = hash_tree(r, &skip).unwrap();
        let place = Place::new();
        let written =
            write_archive(r, None, &place.store(), &place.index("i"), &skip, None).unwrap();
        assert_eq!(skipped, written.digest);
        let stream = zstd::decode_all(&place.concatenated("i")[..]).unwrap();
        assert!(!stream.windows(7).any(|w| w == b"hunter2"));
        fs::remove_dir_all(r.join("secrets")).unwrap();
        fs::remove_file(r.join("config.yml")).unwrap();
        assert_eq!(hash_tree(r, &no_skip).unwrap(), skipped);
    }

    #[test]
    fn round_trip_restores_content_modes_and_symlinks() {
        let tree = sample();
        let place = Place::new();
        let written = place.write(tree.path(), "i").digest;
        let dest = place.dir.path().join("nested/x");
        let read = place.extract("i", &dest, Some(&written.hash)).unwrap();
        assert_eq!(read, written);
        assert_eq!(hash(&dest), written.hash);

        assert_eq!(fs::read(dest.join("README.md")).unwrap(), b"hello\n");
        assert_eq!(fs::read(dest.join(LONG)).unwrap(), b"deep\n");
        assert_eq!(fs::read(dest.join("app-data/z.bin")).unwrap().len(), 70_000);
        let mode = |p: &str| {
            fs::symlink_metadata(dest.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("app/run.sh"), 0o755);
        assert_eq!(mode("app/main.py"), 0o644);
        assert_eq!(mode("logs/empty"), 0o755);
        assert_eq!(
            fs::read_link(dest.join("main-link")).unwrap(),
            Path::new("app/main.py")
        );
        assert_eq!(
            fs::read_link(dest.join("app/long-link"))
                .unwrap()
                .as_os_str()
                .len(),
            153
        );
        assert_eq!(
            fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o700
        );

        // An existing empty folder works too, and keeps its mode; no expected hash is fine.
        let empty = place.dir.path().join("empty");
        fs::create_dir(&empty).unwrap();
        chmod(&empty, 0o750);
        assert_eq!(place.extract("i", &empty, None).unwrap(), written);
        assert_eq!(
            fs::metadata(&empty).unwrap().permissions().mode() & 0o777,
            0o750
        );
        assert_eq!(hash(&empty), written.hash);
    }

    /// Entries of `dir` other than `keep`: what a failed extraction would leave behind.
    fn leftovers(dir: &Path, keep: &[&str]) -> Vec<std::ffi::OsString> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| !keep.iter().any(|k| n == k))
            .collect()
    }

    #[test]
    fn flipped_byte_is_detected_and_leaves_nothing() {
        let tree = sample();
        let place = Place::new();
        let written = place.write(tree.path(), "i").digest;
        let files = place.chunk_files();
        assert!(files.len() >= 2, "{files:?}");
        for file in &files {
            let good = fs::read(file).unwrap();
            for at in [good.len() / 3, good.len() / 2, good.len() - 6] {
                let mut bad = good.clone();
                bad[at] ^= 0x01;
                fs::write(file, &bad).unwrap();
                let dest = place.dir.path().join("dest");
                let err = place
                    .extract("i", &dest, Some(&written.hash))
                    .unwrap_err()
                    .to_string();
                assert!(err.contains("was tampered with or corrupted"), "{err}");
                assert!(err.contains("the damaged chunk was removed"), "{err}");
                assert!(!file.exists(), "{file:?}");
                assert!(!dest.exists());
                assert!(leftovers(place.dir.path(), &["i", "chunks"]).is_empty());
            }
            fs::write(file, &good).unwrap();
        }
        // A build of the same tree stores the removed chunk anew.
        fs::remove_file(&files[0]).unwrap();
        let again = place.write(tree.path(), "i");
        assert_eq!(again.created, vec![files[0].clone()]);
        place
            .extract("i", &place.dir.path().join("dest2"), Some(&written.hash))
            .unwrap();
        // The index itself: a changed chunk hash no longer matches the archive hash.
        let raw = fs::read_to_string(place.index("i")).unwrap();
        let index = Index::read(&place.index("i")).unwrap();
        let first = &index.chunks[0].hash;
        let flipped = format!(
            "{}{}",
            if &first[..1] == "0" { "1" } else { "0" },
            &first[1..]
        );
        fs::write(place.index("i"), raw.replacen(first.as_str(), &flipped, 1)).unwrap();
        let err = place
            .extract("i", &place.dir.path().join("dest"), Some(&written.hash))
            .unwrap_err()
            .to_string();
        assert!(err.contains("was tampered with or corrupted"), "{err}");
    }

    /// A chunk replaced by another valid chunk of the same size is caught by its hash.
    #[test]
    fn swapped_chunk_is_detected() {
        let tree = sample();
        let place = Place::new();
        let written = place.write(tree.path(), "i").digest;
        let index = Index::read(&place.index("i")).unwrap();
        let victim = chunk_path(&place.store(), &index.chunks[0].hash);
        let other = vec![b'x'; index.chunks[0].size as usize];
        fs::write(&victim, zstd::encode_all(&other[..], 3).unwrap()).unwrap();
        let err = place
            .extract("i", &place.dir.path().join("dest"), Some(&written.hash))
            .unwrap_err()
            .to_string();
        assert!(err.contains("hashing to"), "{err}");
    }

    #[test]
    fn different_valid_archive_is_detected() {
        let tree = sample();
        let place = Place::new();
        let written = place.write(tree.path(), "i").digest;
        write(tree.path(), "README.md", b"hellO\n");
        let other = place.write(tree.path(), "i").digest;
        let dest = place.dir.path().join("dest");
        let err = place.extract("i", &dest, Some(&written.hash)).unwrap_err();
        assert_eq!(err.exit_code(), 1);
        let err = err.to_string();
        assert!(
            err.contains(&format!(
                "was tampered with or corrupted (expected {}, found {})",
                written.hash, other.hash
            )),
            "{err}"
        );
        assert!(!dest.exists());
        assert!(leftovers(place.dir.path(), &["i", "chunks"]).is_empty());
    }

    #[test]
    fn truncated_missing_or_garbage_fails() {
        let tree = sample();
        let place = Place::new();
        place.write(tree.path(), "i");
        let dest = place.dir.path().join("dest");
        let files = place.chunk_files();
        let victim = files
            .iter()
            .max_by_key(|f| fs::metadata(f).unwrap().len())
            .unwrap();
        let good = fs::read(victim).unwrap();
        fs::write(victim, &good[..good.len() / 2]).unwrap();
        assert!(place.extract("i", &dest, None).is_err());
        // The damaged chunk was removed: now it is missing.
        assert!(!victim.exists());
        let err = place.extract("i", &dest, None).unwrap_err().to_string();
        assert!(err.contains("is missing"), "{err}");
        fs::write(victim, &good).unwrap();
        assert!(place.extract("i", &dest, None).is_ok());
        let dest = place.dir.path().join("dest2");
        fs::write(place.index("i"), b"not an archive").unwrap();
        assert!(place.extract("i", &dest, None).is_err());
        assert!(!dest.exists());
        assert!(leftovers(place.dir.path(), &["i", "chunks", "dest"]).is_empty());
    }

    #[test]
    fn bad_destinations_and_inputs_are_invalid() {
        let tree = sample();
        let place = Place::new();
        place.write(tree.path(), "i");
        let full = place.dir.path().join("full");
        write(&full, "x", b"x");
        let err = place.extract("i", &full, None).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
        let err = place
            .extract("missing", &place.dir.path().join("d"), None)
            .unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
        let err = hash_tree(&place.dir.path().join("nope"), &no_skip).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
    }

    #[test]
    fn sockets_are_refused_by_name() {
        let tree = sample();
        let _sock =
            std::os::unix::net::UnixListener::bind(tree.path().join("app/ctl.sock")).unwrap();
        let place = Place::new();
        let err = write_archive(
            tree.path(),
            None,
            &place.store(),
            &place.index("i"),
            &no_skip,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("app/ctl.sock"), "{err}");
        assert!(!place.index("i").exists());
        assert!(hash_tree(tree.path(), &|p| p.ends_with("ctl.sock")).is_ok());
    }

    fn noise(len: usize, mut state: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// A big file is cut into pieces: changing one byte stores one new chunk.
    #[test]
    fn a_change_in_a_big_file_stores_one_piece() {
        let dir = TempDir::new().unwrap();
        let big = noise(9 << 20, 7);
        write(dir.path(), "big.bin", &big);
        write(dir.path(), "small.txt", b"small\n");
        let place = Place::new();
        let first = place.write(dir.path(), "a");
        // Three pieces, the small file, the end blocks.
        assert_eq!(first.created.len(), 5, "{:?}", first.created);
        let mut changed = big.clone();
        changed[5 << 20] ^= 1;
        write(dir.path(), "big.bin", &changed);
        let second = place.write(dir.path(), "b");
        assert_eq!(second.created.len(), 1, "{:?}", second.created);
        assert_ne!(first.digest.hash, second.digest.hash);
        assert_eq!(second.digest, hash_tree(dir.path(), &no_skip).unwrap());
        let dest = place.dir.path().join("dest");
        place
            .extract("b", &dest, Some(&second.digest.hash))
            .unwrap();
        assert_eq!(fs::read(dest.join("big.bin")).unwrap(), changed);
    }

    /// Adding one file among many regroups only its neighbours.
    #[test]
    fn an_added_file_regroups_only_its_neighbours() {
        let dir = TempDir::new().unwrap();
        for i in 0..2000 {
            write(dir.path(), &format!("f/{i:04}.txt"), &noise(3000, i + 1));
        }
        let place = Place::new();
        let first = place.write(dir.path(), "a");
        assert!(first.created.len() > 20, "{}", first.created.len());
        write(dir.path(), "f/0500x.txt", b"new\n");
        let second = place.write(dir.path(), "b");
        assert!(
            second.created.len() <= 2,
            "{} new chunks",
            second.created.len()
        );
    }

    /// With the stat cache, unchanged files are not read; a changed stat is.
    #[test]
    fn the_stat_cache_skips_unchanged_files() {
        let tree = sample();
        age(tree.path());
        let place = Place::new();
        let first = place.write_cached(tree.path(), "a");
        let chunks = Index::read(&place.index("a")).unwrap().chunks.len();
        assert_eq!(first.cached, 0);
        let second = place.write_cached(tree.path(), "b");
        assert_eq!(second.cached, chunks);
        assert_eq!(second.digest, first.digest);
        assert!(second.created.is_empty());
        // Same size, new content, new time: read again.
        write(tree.path(), "README.md", b"HELLO\n");
        age(tree.path());
        let third = place.write_cached(tree.path(), "c");
        assert!(third.cached < chunks);
        assert_eq!(third.digest, hash_tree(tree.path(), &no_skip).unwrap());
        // A file changed just now is read, and not trusted to the cache afterwards.
        write(tree.path(), "README.md", b"hello\n");
        let fourth = place.write_cached(tree.path(), "d");
        assert_eq!(fourth.digest, first.digest);
        let fifth = place.write_cached(tree.path(), "e");
        assert!(fifth.cached < chunks);
        // A chunk gone from the store is made again, not trusted.
        for f in place.chunk_files() {
            fs::remove_file(f).unwrap();
        }
        let sixth = place.write_cached(tree.path(), "f");
        assert_eq!(sixth.cached, 0);
        let dest = place.dir.path().join("dest");
        place.extract("f", &dest, Some(&first.digest.hash)).unwrap();
    }

    #[test]
    fn open_chunk_checks_size_and_hash() {
        let data = b"some chunk bytes".to_vec();
        let good = ChunkRef {
            hash: blake3::hash(&data).to_hex().to_string(),
            size: data.len() as u64,
            stored: 0,
        };
        let z = zstd::encode_all(&data[..], 3).unwrap();
        assert!(open_chunk(&z, &good).is_ok());
        let other = zstd::encode_all(&b"other chunk bytes"[..], 3).unwrap();
        assert!(open_chunk(&other, &good).is_err());
        assert!(open_chunk(b"garbage", &good).is_err());
        let big = zstd::encode_all(&vec![0u8; 1 << 20][..], 3).unwrap();
        assert!(open_chunk(&big, &good).is_err());
    }

    #[test]
    fn sweep_keeps_what_is_listed() {
        let tree = sample();
        let place = Place::new();
        place.write(tree.path(), "i");
        let index = Index::read(&place.index("i")).unwrap();
        let before = place.chunk_files().len();
        write(tree.path(), "README.md", b"other\n");
        place.write(tree.path(), "j");
        assert!(place.chunk_files().len() > before);
        let keep = index.chunks.iter().map(|c| c.hash.clone()).collect();
        let (removed, _) = sweep(&place.store(), &keep);
        assert!(removed >= 1);
        assert_eq!(place.chunk_files().len(), before);
        place
            .extract("i", &place.dir.path().join("d"), Some(&index.hash))
            .unwrap();
    }
}
