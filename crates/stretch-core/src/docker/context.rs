//! The build context as a tar stream: the context folder's files (minus those the caller
//! skips) in name order and owned by root, plus the generated Dockerfile.
//!
//! The Dockerfile text is written into the tar as [`DOCKERFILE`], with a generated
//! `.dockerignore` that lists it and itself: the classic builder reads `.dockerignore`
//! only to drop the Dockerfile and `.dockerignore` from the context once parsed, so
//! neither ends up in the image through `COPY . …`. Filtering the context is the
//! caller's `skip` (the engine never applies `.dockerignore` patterns itself; the docker
//! CLI does), so the folder's own `.dockerignore`, if any, is not sent.
//!
//! Entries are collected first (a walk, no file content), then the tar is written on a
//! blocking thread into a channel that becomes the request body, so the context is
//! never held in memory as a whole.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use crate::{Error, Result};

/// Name of the generated Dockerfile inside the context tar.
pub const DOCKERFILE: &str = ".stretch.Dockerfile";
const DOCKERIGNORE: &str = ".dockerignore";

/// Size of the chunks sent to the engine.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
}

/// One file, folder or symlink of the context.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    path: PathBuf,
    rel: PathBuf,
    kind: Kind,
}

/// Walk `context` (without following symlinks), leaving out what `skip` says and our
/// own two generated names. Skipping a folder skips everything under it.
pub(super) fn collect(context: &Path, skip: &(dyn Fn(&Path) -> bool + Sync)) -> Result<Vec<Entry>> {
    if !context.is_dir() {
        return Err(Error::failed(
            "build",
            format!("the build context {} is not a folder", context.display()),
        ));
    }
    let reserved = |rel: &Path| rel == Path::new(DOCKERFILE) || rel == Path::new(DOCKERIGNORE);
    let walk = walkdir::WalkDir::new(context)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| match e.path().strip_prefix(context) {
            Ok(rel) => !reserved(rel) && !skip(rel),
            Err(_) => false,
        });
    let mut entries = Vec::new();
    for item in walk {
        let item = item.map_err(|e| {
            Error::failed(
                "build",
                format!("reading the build context {}: {e}", context.display()),
            )
        })?;
        let ft = item.file_type();
        let kind = if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else {
            // Sockets, fifos and devices have no place in an image.
            continue;
        };
        let rel = item
            .path()
            .strip_prefix(context)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        entries.push(Entry {
            path: item.path().to_path_buf(),
            rel,
            kind,
        });
    }
    Ok(entries)
}

/// Write the context tar (generated files first, then `entries`) into `out`.
pub(super) fn write_tar<W: Write>(out: W, entries: &[Entry], dockerfile: &str) -> io::Result<W> {
    let mut tar = tar::Builder::new(out);
    let ignore = format!("{DOCKERIGNORE}\n{DOCKERFILE}\n");
    for (name, text) in [(DOCKERFILE, dockerfile), (DOCKERIGNORE, ignore.as_str())] {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(text.len() as u64);
        tar.append_data(&mut header, name, text.as_bytes())?;
    }
    for entry in entries {
        append(&mut tar, entry)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", entry.path.display())))?;
    }
    tar.into_inner()
}

fn append<W: Write>(tar: &mut tar::Builder<W>, entry: &Entry) -> io::Result<()> {
    let header_for = |meta: &fs::Metadata| {
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
        // Owned by root, like the docker CLI sends it: the engine's cache keys include
        // ownership, and the builder's uid means nothing inside the image.
        header.set_uid(0);
        header.set_gid(0);
        header
    };
    match entry.kind {
        Kind::Dir => {
            let mut header = header_for(&fs::symlink_metadata(&entry.path)?);
            tar.append_data(&mut header, &entry.rel, io::empty())
        }
        Kind::Symlink => {
            let mut header = header_for(&fs::symlink_metadata(&entry.path)?);
            let target = fs::read_link(&entry.path)?;
            tar.append_link(&mut header, &entry.rel, target)
        }
        Kind::File => {
            let file = File::open(&entry.path)?;
            // Metadata of the open file, so size and content belong together.
            let meta = file.metadata()?;
            let mut header = header_for(&meta);
            tar.append_data(
                &mut header,
                &entry.rel,
                Exact {
                    inner: file.take(meta.len()),
                    left: meta.len(),
                },
            )
        }
    }
}

/// A reader that fails if the file shrank while being archived (a short entry would
/// corrupt the rest of the tar).
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file changed while the build context was sent",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A `Write` that sends chunks into a channel read by the request body.
pub(super) struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    pub(super) fn new(tx: mpsc::Sender<io::Result<Vec<u8>>>) -> Self {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx.blocking_send(Ok(chunk)).map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the engine stopped reading the build context",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(tar: &[u8]) -> Vec<(String, tar::EntryType, u32, u64)> {
        let mut archive = tar::Archive::new(tar);
        let mut out = Vec::new();
        for e in archive.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            out.push((
                e.path().unwrap().display().to_string(),
                h.entry_type(),
                h.mode().unwrap() & 0o777,
                h.uid().unwrap(),
            ));
        }
        out
    }

    #[test]
    fn context_tar_has_generated_files_and_skips() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        stretch_test::write(dir, "app.txt", "app");
        stretch_test::write(dir, "secret.txt", "no");
        stretch_test::write(dir, "sub/deep/file.txt", "deep");
        stretch_test::write(dir, "skipped/x.txt", "x");
        stretch_test::write(dir, ".dockerignore", "mine");
        stretch_test::write(dir, DOCKERFILE, "stale");
        std::os::unix::fs::symlink("app.txt", dir.join("link")).unwrap();

        let skip = |p: &Path| p == Path::new("secret.txt") || p == Path::new("skipped");
        let entries = collect(dir, &skip).unwrap();
        let tar = write_tar(Vec::new(), &entries, "FROM x\n").unwrap();
        let got: Vec<_> = names(&tar)
            .into_iter()
            .map(|(n, t, _, uid)| (n, t, uid))
            .collect();
        let want = vec![
            (DOCKERFILE.to_string(), tar::EntryType::Regular, 0),
            (DOCKERIGNORE.to_string(), tar::EntryType::Regular, 0),
            ("app.txt".to_string(), tar::EntryType::Regular, 0),
            ("link".to_string(), tar::EntryType::Symlink, 0),
            ("sub".to_string(), tar::EntryType::Directory, 0),
            ("sub/deep".to_string(), tar::EntryType::Directory, 0),
            ("sub/deep/file.txt".to_string(), tar::EntryType::Regular, 0),
        ];
        assert_eq!(got, want);

        let mut archive = tar::Archive::new(tar.as_slice());
        let mut first = archive.entries().unwrap().next().unwrap().unwrap();
        let mut text = String::new();
        first.read_to_string(&mut text).unwrap();
        assert_eq!(text, "FROM x\n");
    }

    #[test]
    fn missing_context_is_a_build_failure() {
        let err = collect(Path::new("/nonexistent/stretch/context"), &|_| false).unwrap_err();
        assert!(
            matches!(&err, Error::Failed { stage, .. } if stage == "build"),
            "{err}"
        );
    }

    #[test]
    fn channel_writer_chunks_and_reports_a_closed_reader() {
        let (tx, mut rx) = mpsc::channel(4);
        let mut w = ChannelWriter::new(tx);
        w.write_all(&[1u8; 100]).unwrap();
        assert!(rx.try_recv().is_err(), "small writes are buffered");
        w.write_all(&vec![1u8; CHUNK]).unwrap();
        assert_eq!(rx.try_recv().unwrap().unwrap().len(), CHUNK + 100);
        w.write_all(b"tail").unwrap();
        w.flush().unwrap();
        assert_eq!(rx.try_recv().unwrap().unwrap(), b"tail");
        drop(rx);
        w.write_all(b"x").unwrap();
        assert_eq!(w.flush().unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }
}
