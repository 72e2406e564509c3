//! Git blobs read straight from a mirror's object files (pack files through their
//! version-2 indexes, and loose objects), in process: no `git cat-file` to start, no
//! pipe to copy through, and as many readers as the archive has feeders, each
//! inflating its own share. What is not found this way (alternates, other index
//! versions) is left to `git cat-file` by the caller.
//!
//! The mirror was written by git's own fetch, which checks every object it receives;
//! this reader still trusts nothing it reads: every offset, size and delta
//! instruction is checked, and a blob must inflate to exactly its size.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use miniz_oxide::inflate::TINFLStatus;
use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};
use miniz_oxide::inflate::stream::InflateState;
use miniz_oxide::{DataFormat, MZFlush, MZStatus};

/// Pack entry types (git's `object_type`).
const BLOB: u8 = 3;
const OFS_DELTA: u8 = 6;
const REF_DELTA: u8 = 7;

/// Most bytes of rebuilt delta bases kept for the next blobs (per reader).
const BASE_CACHE: usize = 32 << 20;

/// Longest delta chain followed (git's own `pack.depth` cannot exceed 4095).
const MAX_DEPTH: usize = 10_000;

/// Largest read from a file at once.
const READ: usize = 1 << 20;

/// Blobs up to this size are inflated whole even when read in parts (tests stream
/// smaller ones).
const WHOLE: u64 = if cfg!(test) { 1 << 20 } else { 8 << 20 };

/// Where an object is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loc {
    Packed { pack: usize, offset: u64 },
    Loose(PathBuf),
}

/// One pack and its index.
struct Pack {
    pack: File,
    idx: File,
    /// Objects in the pack.
    count: u64,
    /// The index's fan-out table: objects whose first byte is at most `i`.
    fanout: Vec<u32>,
    pack_len: u64,
}

/// The object files of one mirror.
pub struct Odb {
    objects: PathBuf,
    /// Bytes in an object id: 20 (SHA-1) or 32 (SHA-256).
    hash_len: usize,
    packs: Vec<Pack>,
    /// Compressed input, reused across reads.
    input: Vec<u8>,
    bases: Bases,
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn read_exact_at(f: &File, buf: &mut [u8], at: u64) -> io::Result<()> {
    f.read_exact_at(buf, at)
}

fn parse_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Pack {
    /// A pack whose index is version 2 with ids of `hash_len` bytes, or `None`.
    fn open(idx_path: &Path, hash_len: usize) -> Option<Pack> {
        let idx = File::open(idx_path).ok()?;
        let pack = File::open(idx_path.with_extension("pack")).ok()?;
        let mut head = vec![0u8; 8 + 256 * 4];
        read_exact_at(&idx, &mut head, 0).ok()?;
        if head[..4] != *b"\xfftOc" || be32(&head[4..8]) != 2 {
            return None;
        }
        let fanout: Vec<u32> = head[8..].chunks_exact(4).map(be32).collect();
        if fanout.windows(2).any(|w| w[0] > w[1]) {
            return None;
        }
        let count = u64::from(*fanout.last()?);
        // Header, fan-out, ids, CRCs, offsets, and the two trailing checksums at least.
        let least = 8 + 1024 + count * (hash_len as u64 + 8) + 2 * hash_len as u64;
        let idx_len = idx.metadata().ok()?.len();
        let pack_len = pack.metadata().ok()?.len();
        if idx_len < least || pack_len < 12 {
            return None;
        }
        let mut magic = [0u8; 8];
        read_exact_at(&pack, &mut magic, 0).ok()?;
        if magic[..4] != *b"PACK" || !matches!(be32(&magic[4..]), 2 | 3) {
            return None;
        }
        Some(Pack {
            pack,
            idx,
            count,
            fanout,
            pack_len,
        })
    }

    /// The offset of the object `id`, if this pack holds it.
    fn find(&self, id: &[u8]) -> io::Result<Option<u64>> {
        let hl = id.len() as u64;
        let Some(&first) = id.first() else {
            return Ok(None);
        };
        let first = usize::from(first);
        let mut lo = if first == 0 {
            0
        } else {
            u64::from(self.fanout[first - 1])
        };
        let mut hi = u64::from(self.fanout[first]);
        let ids_at = 8 + 1024;
        let mut probe = vec![0u8; id.len()];
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            read_exact_at(&self.idx, &mut probe, ids_at + mid * hl)?;
            match probe.as_slice().cmp(id) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return self.offset(mid, hl).map(Some),
            }
        }
        Ok(None)
    }

    /// The pack offset of the object at position `i` of the index.
    fn offset(&self, i: u64, hl: u64) -> io::Result<u64> {
        let offsets_at = 8 + 1024 + self.count * (hl + 4);
        let mut b = [0u8; 4];
        read_exact_at(&self.idx, &mut b, offsets_at + i * 4)?;
        let small = be32(&b);
        let offset = if small & 0x8000_0000 == 0 {
            u64::from(small)
        } else {
            // An index into the table of 64-bit offsets that follows.
            let large_at = offsets_at + self.count * 4 + u64::from(small & 0x7fff_ffff) * 8;
            let mut b = [0u8; 8];
            read_exact_at(&self.idx, &mut b, large_at)?;
            u64::from_be_bytes(b)
        };
        if offset < 12 || offset >= self.pack_len {
            return Err(bad(format!(
                "the pack index gives offset {offset}, out of its pack"
            )));
        }
        Ok(offset)
    }
}

/// A pack entry's header.
struct Entry {
    /// Its offset in the pack.
    at: u64,
    kind: u8,
    size: u64,
    /// Where its compressed data starts.
    data: u64,
    base: Option<Base>,
}

enum Base {
    Offset(u64),
    Id(Vec<u8>),
}

impl Odb {
    /// The objects of `mirror` whose ids have `hash_len` bytes. Packs that cannot be
    /// read here are left out (their objects are then not found).
    pub fn open(mirror: &Path, hash_len: usize) -> Odb {
        // A bare mirror; a work tree's repository (tests, a local path) also reads.
        let objects = [mirror.join("objects"), mirror.join(".git/objects")]
            .into_iter()
            .find(|p| p.is_dir())
            .unwrap_or_else(|| mirror.join("objects"));
        let mut idx: Vec<PathBuf> = std::fs::read_dir(objects.join("pack"))
            .map(|dir| {
                dir.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "idx"))
                    .collect()
            })
            .unwrap_or_default();
        idx.sort();
        let packs = idx.iter().filter_map(|p| Pack::open(p, hash_len)).collect();
        Odb {
            objects,
            hash_len,
            packs,
            input: Vec::new(),
            bases: Bases::default(),
        }
    }

    /// Where the object `oid` (hex) is, if in a pack or loose. Read errors count as
    /// not found: the caller then asks git.
    pub fn locate(&self, oid: &str) -> Option<Loc> {
        let id = parse_hex(oid).filter(|id| id.len() == self.hash_len)?;
        for (i, pack) in self.packs.iter().enumerate() {
            if let Ok(Some(offset)) = pack.find(&id) {
                return Some(Loc::Packed { pack: i, offset });
            }
        }
        let loose = self.objects.join(&oid[..2]).join(&oid[2..]);
        loose.is_file().then_some(Loc::Loose(loose))
    }

    /// Append the whole blob at `loc`, which must hold `size` bytes, to `out`.
    pub fn read_whole(&mut self, loc: &Loc, size: u64, out: &mut Vec<u8>) -> io::Result<()> {
        let start = out.len();
        let result = match loc {
            Loc::Packed { pack, offset } => self.packed(*pack, *offset, size, out),
            Loc::Loose(path) => {
                let mut stream = Stream::loose(path)?;
                if stream.size != size {
                    return Err(bad(format!(
                        "loose object {} holds {} bytes, not {size}",
                        path.display(),
                        stream.size
                    )));
                }
                stream.read(size, out)
            }
        };
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    /// The size of the object at `loc`, read from its header (for a delta, from the
    /// start of the delta).
    pub fn size(&mut self, loc: &Loc) -> io::Result<u64> {
        match loc {
            Loc::Loose(path) => Ok(Stream::loose(path)?.size),
            Loc::Packed { pack, offset } => {
                let p = self.packs.get(*pack).ok_or_else(|| bad("no such pack"))?;
                let e = entry(p, *offset, self.hash_len)?;
                if e.base.is_none() {
                    return Ok(e.size);
                }
                // A delta starts with its base's size and its result's: varints.
                let mut head = [0u8; 20];
                let n = head
                    .len()
                    .min(usize::try_from(e.size).unwrap_or(head.len()));
                inflate(&p.pack, e.data, &mut head[..n], &mut self.input, true)?;
                let mut at = 0;
                varint(&head[..n], &mut at)?;
                varint(&head[..n], &mut at)
            }
        }
    }

    /// The blob at `loc`, to be read in parts; it must hold `size` bytes.
    pub fn open_blob(&mut self, loc: &Loc, size: u64) -> io::Result<Blob> {
        if let Loc::Packed { pack, offset } = loc
            && size > WHOLE
        {
            let p = self.pack(*pack)?;
            let entry = entry(p, *offset, self.hash_len)?;
            if entry.kind == BLOB {
                if entry.size != size {
                    return Err(bad(format!("a blob of {} bytes, not {size}", entry.size)));
                }
                let file = p.pack.try_clone()?;
                return Ok(Blob::Stream(Stream::packed(
                    file,
                    entry.data,
                    size,
                    256 << 10,
                )));
            }
        }
        let mut data = Vec::new();
        self.read_whole(loc, size, &mut data)?;
        Ok(Blob::Whole(data, 0))
    }

    fn pack(&self, i: usize) -> io::Result<&Pack> {
        self.packs.get(i).ok_or_else(|| bad("no such pack"))
    }

    /// Append the blob at `offset` of pack `p`, of `size` bytes, to `out`: inflated
    /// straight into place, or rebuilt from its delta chain.
    fn packed(&mut self, p: usize, offset: u64, size: u64, out: &mut Vec<u8>) -> io::Result<()> {
        let Odb {
            packs,
            input,
            hash_len,
            bases,
            ..
        } = self;
        let pack = packs.get(p).ok_or_else(|| bad("no such pack"))?;
        let first = entry(pack, offset, *hash_len)?;
        if first.base.is_none() {
            if first.kind != BLOB || first.size != size {
                return Err(bad(format!(
                    "object at {offset} is not a blob of {size} bytes"
                )));
            }
            let start = out.len();
            grow(out, size)?;
            return inflate_into(&pack.pack, first.data, &mut out[start..], input);
        }
        // Follow the chain down to its base (or to a base met before), then apply
        // the deltas from there up.
        let mut chain = vec![first];
        let mut below: Option<Arc<Vec<u8>>> = None;
        loop {
            if chain.len() > MAX_DEPTH {
                return Err(bad("a delta chain is too long"));
            }
            let Some(last) = chain.last() else { break };
            let at = match &last.base {
                None => break,
                Some(Base::Offset(at)) => *at,
                Some(Base::Id(id)) => pack
                    .find(id)?
                    .ok_or_else(|| bad("a delta's base is not in its pack"))?,
            };
            if let Some(hit) = bases.get(p, at) {
                below = Some(hit);
                break;
            }
            chain.push(entry(pack, at, *hash_len)?);
        }
        let mut data = match below {
            Some(data) => data,
            None => {
                let Some(base) = chain.pop() else {
                    return Err(bad("an empty delta chain"));
                };
                if base.kind != BLOB {
                    return Err(bad("a blob's delta chain ends in another kind of object"));
                }
                let mut data = Vec::new();
                grow(&mut data, base.size)?;
                inflate_into(&pack.pack, base.data, &mut data, input)?;
                let data = Arc::new(data);
                bases.put(p, base.at, &data);
                data
            }
        };
        let mut delta = Vec::new();
        while let Some(e) = chain.pop() {
            delta.clear();
            grow(&mut delta, e.size)?;
            inflate_into(&pack.pack, e.data, &mut delta, input)?;
            data = Arc::new(apply(&data, &delta)?);
            if !chain.is_empty() {
                bases.put(p, e.at, &data);
            }
        }
        if data.len() as u64 != size {
            return Err(bad(format!(
                "a delta chain gave {} bytes, not {size}",
                data.len()
            )));
        }
        out.extend_from_slice(&data);
        Ok(())
    }
}

/// Recently rebuilt delta bases, by pack and offset, as git keeps them: files of one
/// tree are often deltas of each other, so a chain's lower part is met again.
#[derive(Default)]
struct Bases {
    map: HashMap<(usize, u64), Arc<Vec<u8>>>,
    bytes: usize,
}

impl Bases {
    fn get(&self, pack: usize, at: u64) -> Option<Arc<Vec<u8>>> {
        self.map.get(&(pack, at)).cloned()
    }

    fn put(&mut self, pack: usize, at: u64, data: &Arc<Vec<u8>>) {
        if data.len() > BASE_CACHE / 4 {
            return;
        }
        if self.bytes + data.len() > BASE_CACHE {
            self.map.clear();
            self.bytes = 0;
        }
        if self.map.insert((pack, at), Arc::clone(data)).is_none() {
            self.bytes += data.len();
        }
    }
}

/// The header of the entry at `offset` of pack `p`.
fn entry(p: &Pack, offset: u64, hash_len: usize) -> io::Result<Entry> {
    let mut head = [0u8; 80];
    let n = (p.pack_len - offset).min(head.len() as u64) as usize;
    read_exact_at(&p.pack, &mut head[..n], offset)?;
    let head = &head[..n];
    let mut at = 0;
    let mut next = || -> io::Result<u8> {
        let b = *head
            .get(at)
            .ok_or_else(|| bad("a pack entry's header is cut short"))?;
        at += 1;
        Ok(b)
    };
    let mut c = next()?;
    let kind = (c >> 4) & 7;
    let mut size = u64::from(c & 15);
    let mut shift = 4;
    while c & 0x80 != 0 {
        c = next()?;
        if shift > 57 {
            return Err(bad("a pack entry's size is too large"));
        }
        size |= u64::from(c & 0x7f) << shift;
        shift += 7;
    }
    let base = match kind {
        OFS_DELTA => {
            c = next()?;
            let mut back = u64::from(c & 0x7f);
            while c & 0x80 != 0 {
                c = next()?;
                back = back
                    .checked_add(1)
                    .and_then(|b| b.checked_mul(128))
                    .ok_or_else(|| bad("a delta's base offset is too large"))?
                    | u64::from(c & 0x7f);
            }
            let base = offset
                .checked_sub(back)
                .filter(|b| *b >= 12 && back > 0)
                .ok_or_else(|| bad("a delta's base is out of its pack"))?;
            Some(Base::Offset(base))
        }
        REF_DELTA => {
            let mut id = vec![0u8; hash_len];
            for b in &mut id {
                *b = next()?;
            }
            Some(Base::Id(id))
        }
        1..=4 => None,
        _ => return Err(bad(format!("a pack entry of unknown type {kind}"))),
    };
    Ok(Entry {
        at: offset,
        kind,
        size,
        data: offset + at as u64,
        base,
    })
}

/// Make room for `n` more bytes at the end of `v` (zeroed), failing rather than
/// aborting when memory runs out.
fn grow(v: &mut Vec<u8>, n: u64) -> io::Result<()> {
    let n = usize::try_from(n).map_err(|_| bad("an object too large for memory"))?;
    v.try_reserve_exact(n)
        .map_err(|_| bad("an object too large for memory"))?;
    v.resize(v.len() + n, 0);
    Ok(())
}

/// zlib's bound on the compressed size of `n` bytes: enough input to read at once.
fn bound(n: usize) -> usize {
    n.saturating_add(n >> 12)
        .saturating_add(n >> 14)
        .saturating_add(64)
}

/// Inflate the zlib stream at `at` of `file` into `dst`, which it must fill exactly.
fn inflate_into(file: &File, at: u64, dst: &mut [u8], input: &mut Vec<u8>) -> io::Result<()> {
    inflate(file, at, dst, input, false)
}

/// Inflate the zlib stream at `at` of `file` into `dst`: all of it, or (`prefix`) only
/// its first `dst.len()` bytes.
fn inflate(
    file: &File,
    mut at: u64,
    dst: &mut [u8],
    input: &mut Vec<u8>,
    prefix: bool,
) -> io::Result<()> {
    let mut d = DecompressorOxide::new();
    let flags = inflate_flags::TINFL_FLAG_PARSE_ZLIB_HEADER
        | inflate_flags::TINFL_FLAG_COMPUTE_ADLER32
        | inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF
        | inflate_flags::TINFL_FLAG_HAS_MORE_INPUT;
    // At first as much as the whole stream can take, up to a bound.
    let mut want = bound(dst.len()).min(READ);
    let mut written = 0;
    loop {
        if input.len() < want {
            input.resize(want, 0);
        }
        let n = file.read_at(&mut input[..want], at)?;
        if n == 0 {
            return Err(bad("a pack entry is cut short"));
        }
        let (status, used, out) = decompress(&mut d, &input[..n], dst, written, flags);
        at += used as u64;
        written += out;
        match status {
            TINFLStatus::Done if written == dst.len() => return Ok(()),
            TINFLStatus::HasMoreOutput if prefix && written == dst.len() => return Ok(()),
            TINFLStatus::Done | TINFLStatus::HasMoreOutput => {
                return Err(bad("an object does not inflate to its size"));
            }
            TINFLStatus::NeedsMoreInput => want = READ,
            other => return Err(bad(format!("cannot inflate an object: {other:?}"))),
        }
    }
}

/// The little-endian base-128 number at `at` of `bytes` (a delta's sizes); moves `at`
/// past it.
fn varint(bytes: &[u8], at: &mut usize) -> io::Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at).ok_or_else(|| bad("a delta is cut short"))?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(bad("a delta's size is too large"))
}

/// Apply a git delta to `base`.
fn apply(base: &[u8], delta: &[u8]) -> io::Result<Vec<u8>> {
    let mut at = 0;
    let from = varint(delta, &mut at)?;
    let to = varint(delta, &mut at)?;
    if from != base.len() as u64 {
        return Err(bad("a delta does not fit its base"));
    }
    let mut out = Vec::new();
    out.try_reserve_exact(usize::try_from(to).map_err(|_| bad("a delta too large"))?)
        .map_err(|_| bad("a delta too large for memory"))?;
    while at < delta.len() {
        let op = delta[at];
        at += 1;
        if op & 0x80 != 0 {
            // Copy from the base: offset and size bytes present as the bits say.
            let mut field = |bits: u8, n: usize| -> io::Result<usize> {
                let mut v = 0usize;
                for i in 0..n {
                    if bits & (1 << i) != 0 {
                        let b = *delta.get(at).ok_or_else(|| bad("a delta is cut short"))?;
                        at += 1;
                        v |= usize::from(b) << (8 * i);
                    }
                }
                Ok(v)
            };
            let offset = field(op & 0x0f, 4)?;
            let size = match field((op >> 4) & 0x07, 3)? {
                0 => 0x10000,
                n => n,
            };
            let piece = offset
                .checked_add(size)
                .and_then(|end| base.get(offset..end))
                .ok_or_else(|| bad("a delta copies from outside its base"))?;
            out.extend_from_slice(piece);
        } else if op != 0 {
            let piece = delta
                .get(at..at + usize::from(op))
                .ok_or_else(|| bad("a delta is cut short"))?;
            out.extend_from_slice(piece);
            at += usize::from(op);
        } else {
            return Err(bad("a delta holds the reserved instruction 0"));
        }
        if out.len() as u64 > to {
            return Err(bad("a delta gives more than its size"));
        }
    }
    if out.len() as u64 != to {
        return Err(bad("a delta gives less than its size"));
    }
    Ok(out)
}

/// Where `n` bytes from `pos` of `data` end, if within it.
fn past(data: &[u8], pos: usize, n: u64) -> io::Result<usize> {
    usize::try_from(n)
        .ok()
        .and_then(|n| pos.checked_add(n))
        .filter(|end| *end <= data.len())
        .ok_or_else(|| bad("read past a blob's end"))
}

/// A blob being read in parts.
pub enum Blob {
    Whole(Vec<u8>, usize),
    Stream(Stream),
}

impl Blob {
    /// Append the next `n` bytes to `out`.
    pub fn read(&mut self, n: u64, out: &mut Vec<u8>) -> io::Result<()> {
        match self {
            Blob::Whole(data, pos) => {
                let end = past(data, *pos, n)?;
                out.extend_from_slice(&data[*pos..end]);
                *pos = end;
                Ok(())
            }
            Blob::Stream(s) => s.read(n, out),
        }
    }

    /// Pass over the next `n` bytes.
    pub fn skip(&mut self, n: u64) -> io::Result<()> {
        match self {
            Blob::Whole(data, pos) => {
                *pos = past(data, *pos, n)?;
                Ok(())
            }
            Blob::Stream(s) => {
                let mut scratch = Vec::new();
                let mut left = n;
                while left > 0 {
                    let step = left.min(READ as u64);
                    scratch.clear();
                    s.read(step, &mut scratch)?;
                    left -= step;
                }
                Ok(())
            }
        }
    }
}

/// A zlib stream inflated as it is read: a big blob of a pack, or a loose object.
pub struct Stream {
    file: File,
    at: u64,
    state: Box<InflateState>,
    input: Vec<u8>,
    /// Input read but not inflated yet: `input[used..have]`.
    used: usize,
    have: usize,
    /// Content bytes still to come.
    left: u64,
    size: u64,
}

impl Stream {
    /// The zlib stream at `at` of `file`, of `size` bytes, read `read` bytes at a time.
    fn packed(file: File, at: u64, size: u64, read: usize) -> Stream {
        Stream {
            file,
            at,
            state: InflateState::new_boxed(DataFormat::Zlib),
            input: vec![0; read],
            used: 0,
            have: 0,
            left: size,
            size,
        }
    }

    /// A loose object file, its `blob SIZE\0` header read.
    fn loose(path: &Path) -> io::Result<Stream> {
        let file = File::open(path)?;
        let mut s = Stream::packed(file, 0, u64::MAX, 64 << 10);
        let mut head = Vec::new();
        loop {
            let mut byte = [0u8; 1];
            s.fill(&mut byte)?;
            if byte[0] == 0 {
                break;
            }
            if head.len() >= 32 {
                return Err(bad("a loose object's header is too long"));
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        let size = head
            .strip_prefix("blob ")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| bad(format!("a loose object is not a blob: `{head}`")))?;
        s.left = size;
        s.size = size;
        Ok(s)
    }

    /// Append the next `n` bytes of the blob to `out`.
    fn read(&mut self, n: u64, out: &mut Vec<u8>) -> io::Result<()> {
        if n > self.left {
            return Err(bad("read past a blob's end"));
        }
        let start = out.len();
        grow(out, n)?;
        self.fill(&mut out[start..])?;
        self.left -= n;
        if self.left == 0 {
            // The stream must end here, its checksum checked.
            let mut extra = [0u8; 1];
            if self.fill(&mut extra).is_ok() {
                return Err(bad("a blob is longer than its size"));
            }
            if !self.ended() {
                return Err(bad("a blob's stream does not end at its size"));
            }
        }
        Ok(())
    }

    fn ended(&self) -> bool {
        self.state.last_status() == TINFLStatus::Done
    }

    /// Fill `dst` from the stream.
    fn fill(&mut self, dst: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < dst.len() {
            if self.used == self.have && !self.ended() {
                let n = self.file.read_at(&mut self.input, self.at)?;
                self.at += n as u64;
                self.used = 0;
                self.have = n;
            }
            let r = miniz_oxide::inflate::stream::inflate(
                &mut self.state,
                &self.input[self.used..self.have],
                &mut dst[done..],
                MZFlush::None,
            );
            self.used += r.bytes_consumed;
            done += r.bytes_written;
            match r.status {
                Ok(MZStatus::StreamEnd) if done < dst.len() => {
                    return Err(bad("a blob's stream ends before its size"));
                }
                Ok(_) => {}
                Err(_) if r.bytes_written > 0 => {}
                Err(e) => {
                    if self.have == 0 {
                        return Err(bad("a blob's stream is cut short"));
                    }
                    return Err(bad(format!("cannot inflate a blob: {e:?}")));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A delta: sizes, then the given instructions.
    fn delta(from: u8, to: u8, ops: &[u8]) -> Vec<u8> {
        let mut d = vec![from, to];
        d.extend_from_slice(ops);
        d
    }

    #[test]
    fn deltas_copy_and_insert_within_bounds() {
        let base = b"hello world";
        // Copy 5 bytes from offset 6 ("world"), insert "!", copy "hello" from 0.
        let d = delta(11, 11, &[0x91, 6, 5, 1, b'!', 0x90, 5]);
        assert_eq!(apply(base, &d).ok().as_deref(), Some(&b"world!hello"[..]));
        // Size 0 means 0x10000: out of this base.
        assert!(apply(base, &delta(11, 5, &[0x80])).is_err());
        // Copy past the base's end.
        assert!(apply(base, &delta(11, 5, &[0x91, 8, 5])).is_err());
        // Wrong base size, wrong result size, reserved op, cut short.
        assert!(apply(base, &delta(10, 5, &[0x91, 6, 5])).is_err());
        assert!(apply(base, &delta(11, 6, &[0x91, 6, 5])).is_err());
        assert!(apply(base, &delta(11, 5, &[0])).is_err());
        assert!(apply(base, &delta(11, 5, &[5, b'a'])).is_err());
        assert!(apply(base, &[0x80]).is_err());
    }

    use super::super::run_git as git;

    /// Every blob of HEAD: path, id, size.
    fn blobs(repo: &Path) -> Vec<(String, String, u64)> {
        let out = git(repo, &["ls-tree", "-r", "-l", "HEAD"]);
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| {
                let (head, path) = l.split_once('\t').unwrap();
                let f: Vec<&str> = head.split_whitespace().collect();
                (path.to_string(), f[2].to_string(), f[3].parse().unwrap())
            })
            .collect()
    }

    /// Each blob of HEAD read whole and in parts equals what `git cat-file` gives,
    /// in path order and again backwards (other delta bases kept from before);
    /// returns how many were found in packs.
    fn same_as_git(repo: &Path) -> usize {
        let mut odb = Odb::open(repo, 20);
        let mut packed = 0;
        let list = blobs(repo);
        for (path, oid, size) in list.iter().chain(list.iter().rev()).cloned() {
            let want = git(repo, &["cat-file", "blob", &oid]);
            let loc = odb
                .locate(&oid)
                .unwrap_or_else(|| panic!("{path} not found"));
            packed += usize::from(matches!(loc, Loc::Packed { .. }));
            assert_eq!(odb.size(&loc).unwrap(), size, "{path}: size");
            let mut got = b"before".to_vec();
            odb.read_whole(&loc, size, &mut got).unwrap();
            assert!(got[6..] == want[..], "{path} read whole");
            let mut blob = odb.open_blob(&loc, size).unwrap();
            let mut parts = Vec::new();
            let third = size / 3;
            blob.read(third, &mut parts).unwrap();
            blob.skip(third).unwrap();
            blob.read(size - 2 * third, &mut parts).unwrap();
            let mut expect = want[..third as usize].to_vec();
            expect.extend_from_slice(&want[2 * third as usize..]);
            assert!(parts == expect, "{path} read in parts");
            assert!(
                blob.read(1, &mut parts).is_err(),
                "{path}: read past the end"
            );
            // A wrong size is refused.
            assert!(odb.read_whole(&loc, size + 1, &mut Vec::new()).is_err());
        }
        packed
    }

    /// A repository of similar files (so that git makes deltas), one of them bigger
    /// than [`WHOLE`], and one empty.
    fn repo() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        git(r, &["init", "-q"]);
        let mut seed = 7u64;
        let mut noise = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 56) as u8
                })
                .collect()
        };
        let common = noise(40_000);
        for i in 0..20 {
            let mut data = common.clone();
            data.extend_from_slice(format!("file {i}\n").repeat(i * 50).as_bytes());
            data.extend_from_slice(&noise(100));
            std::fs::write(r.join(format!("f{i}.bin")), data).unwrap();
        }
        let mut big = noise(600_000);
        big.extend_from_slice(&b"text ".repeat(400_000));
        std::fs::write(r.join("big.bin"), big).unwrap();
        std::fs::write(r.join("empty"), b"").unwrap();
        git(r, &["add", "-A"]);
        git(r, &["commit", "-qm", "one"]);
        t
    }

    fn deltas(repo: &Path) -> usize {
        let mut n = 0;
        for e in std::fs::read_dir(repo.join(".git/objects/pack")).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "idx") {
                let out = git(repo, &["verify-pack", "-v", p.to_str().unwrap()]);
                // Delta entries name their depth and base: seven fields.
                n += String::from_utf8(out)
                    .unwrap()
                    .lines()
                    .filter(|l| l.split_whitespace().count() == 7)
                    .count();
            }
        }
        n
    }

    #[test]
    fn blobs_read_in_process_equal_git_loose_packed_and_deltified() {
        let t = repo();
        let r = t.path().join(".git");
        // Loose objects, as a small fetch leaves them.
        assert_eq!(same_as_git(&r), 0);
        // Packed, the similar files as deltas (offsets to their bases).
        git(t.path(), &["repack", "-q", "-a", "-d", "-f", "--window=50"]);
        assert!(deltas(t.path()) > 5, "git made no deltas");
        assert_eq!(same_as_git(&r), 44);
        // Deltas naming their bases by id.
        git(
            t.path(),
            &[
                "-c",
                "repack.useDeltaBaseOffset=false",
                "repack",
                "-q",
                "-a",
                "-d",
                "-f",
            ],
        );
        assert!(deltas(t.path()) > 5, "git made no deltas");
        assert_eq!(same_as_git(&r), 44);
        // Ids of another length or not hex are not found.
        let odb = Odb::open(&r, 20);
        assert_eq!(odb.locate("abcd"), None);
        assert_eq!(odb.locate(&"g".repeat(40)), None);
        assert_eq!(odb.locate(&"0".repeat(40)), None);
    }

    #[test]
    fn a_damaged_pack_fails_the_read_and_never_panics() {
        let t = repo();
        let r = t.path().join(".git");
        git(t.path(), &["repack", "-q", "-a", "-d", "-f"]);
        let pack = std::fs::read_dir(r.join("objects/pack"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "pack"))
            .unwrap();
        let list = blobs(&r);
        let clean = std::fs::read(&pack).unwrap();
        // Flip bytes across the pack, one place at a time: every read either gives
        // git's bytes or fails.
        let mut failed = 0;
        for at in (12..clean.len() - 20).step_by(clean.len() / 40) {
            let mut bytes = clean.clone();
            bytes[at] ^= 0x5a;
            std::fs::write(&pack, &bytes).unwrap();
            let mut odb = Odb::open(&r, 20);
            for (path, oid, size) in &list {
                let Some(loc) = odb.locate(oid) else { continue };
                let mut got = Vec::new();
                match odb.read_whole(&loc, *size, &mut got) {
                    Ok(()) => {
                        std::fs::write(&pack, &clean).unwrap();
                        let want = git(&r, &["cat-file", "blob", oid]);
                        std::fs::write(&pack, &bytes).unwrap();
                        assert!(got == want, "{path}: damage at {at} went unseen");
                    }
                    Err(_) => failed += 1,
                }
            }
        }
        assert!(failed > 10, "only {failed} reads failed");
        // Cut short: reads fail.
        std::fs::write(&pack, &clean[..clean.len() / 2]).unwrap();
        let mut odb = Odb::open(&r, 20);
        let mut cut = 0;
        for (_, oid, size) in &list {
            if let Some(loc) = odb.locate(oid) {
                cut += usize::from(odb.read_whole(&loc, *size, &mut Vec::new()).is_err());
            }
        }
        assert!(cut > 0);
    }

    #[test]
    fn hex_ids() {
        assert_eq!(parse_hex("00ff"), Some(vec![0, 255]));
        assert_eq!(parse_hex("0"), None);
        assert_eq!(parse_hex("zz"), None);
    }
}
