//! The release store: an embedded SQLite database (WAL) in the home folder holding
//! releases, runs (builds and deploys) with their logs, and built images by input
//! digest. The CLI and a server may use one home at the same time.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::log::{Event, Sink};
use crate::source::Pulled;
use crate::util::now_rfc3339;
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub id: String,
    pub name: String,
    pub created_at: String,
    pub sources: Vec<Pulled>,
    pub images: Vec<Image>,
    /// blake3 of the archive's uncompressed tar, checked before every extraction.
    pub archive_hash: String,
}

/// An image a release runs: its reference by tag, and what the tag pointed at when
/// the build pushed it (the manifest digest in a registry, the image id for
/// `registry: local`). Releases recorded before digests were have none: they run by tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "ImageRepr")]
pub struct Image {
    pub name: String,
    pub digest: Option<String>,
}

/// An image as stored: a bare reference (older releases) or `{name, digest}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum ImageRepr {
    Name(String),
    Full {
        name: String,
        digest: Option<String>,
    },
}

impl From<ImageRepr> for Image {
    fn from(r: ImageRepr) -> Image {
        match r {
            ImageRepr::Name(name) => Image { name, digest: None },
            ImageRepr::Full { name, digest } => Image { name, digest },
        }
    }
}

/// What a run does. Stored (and sent as JSON) as its snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    Build,
    Deploy,
    Rollback,
    /// `stretch apply`: a config-only deploy.
    Config,
    /// `stretch app restart`: fresh instances of the running release.
    Restart,
}

/// Where a run stands. Stored (and sent as JSON) as its snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
}

impl RunKind {
    pub const ALL: [RunKind; 5] = [
        RunKind::Build,
        RunKind::Deploy,
        RunKind::Rollback,
        RunKind::Config,
        RunKind::Restart,
    ];

    /// The name stored and shown (as serde writes it).
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Build => "build",
            RunKind::Deploy => "deploy",
            RunKind::Rollback => "rollback",
            RunKind::Config => "config",
            RunKind::Restart => "restart",
        }
    }
}

impl RunStatus {
    pub const ALL: [RunStatus; 3] = [RunStatus::Running, RunStatus::Succeeded, RunStatus::Failed];

    /// The name stored and shown (as serde writes it).
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
        }
    }

    /// How a finished run ended.
    pub fn finished(ok: bool) -> RunStatus {
        if ok {
            RunStatus::Succeeded
        } else {
            RunStatus::Failed
        }
    }
}

impl std::str::FromStr for RunKind {
    type Err = ();
    fn from_str(s: &str) -> std::result::Result<RunKind, ()> {
        RunKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or(())
    }
}

impl std::str::FromStr for RunStatus {
    type Err = ();
    fn from_str(s: &str) -> std::result::Result<RunStatus, ()> {
        RunStatus::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or(())
    }
}

// `pad`, not `write_str`: tables align these with `{:<8}`.
impl std::fmt::Display for RunKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl rusqlite::ToSql for RunKind {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl rusqlite::ToSql for RunStatus {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: i64,
    pub kind: RunKind,
    pub environment: Option<String>,
    pub release: Option<String>,
    pub existing_release: Option<String>,
    pub status: RunStatus,
    pub started_at: String,
    pub ended_at: Option<String>,
}

/// One entry of a run's log. `text` is what a reader sees (`==> stage`, `<== stage done
/// in 1.23s`, a line); `event` says what it is, as data, so nobody parses the text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    pub seq: i64,
    pub at: String,
    pub stage: String,
    pub text: String,
    /// Absent only from servers older than the field: then [`LogLine::entry`] reads the
    /// text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<LogEntry>,
}

/// What a log line is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LogEntry {
    Line,
    StageStarted,
    StageFinished { ok: bool, elapsed_ms: u64 },
}

impl LogLine {
    /// What this line is: its `event`, or for lines stored before events were, what
    /// its text says.
    pub fn entry(&self) -> LogEntry {
        self.event
            .unwrap_or_else(|| legacy_entry(&self.stage, &self.text))
    }

    /// The log event this line records.
    pub fn to_event(&self) -> Event {
        match self.entry() {
            LogEntry::Line => Event::Line {
                stage: self.stage.clone(),
                text: self.text.clone(),
            },
            LogEntry::StageStarted => Event::StageStarted {
                stage: self.stage.clone(),
            },
            LogEntry::StageFinished { ok, elapsed_ms } => Event::StageFinished {
                stage: self.stage.clone(),
                elapsed: std::time::Duration::from_millis(elapsed_ms),
                ok,
            },
        }
    }
}

/// Lines stored before events were: `==> STAGE` and `<== STAGE done|failed in 1.23s`.
fn legacy_entry(stage: &str, text: &str) -> LogEntry {
    if text.strip_prefix("==> ") == Some(stage) {
        return LogEntry::StageStarted;
    }
    let finished = text
        .strip_prefix("<== ")
        .and_then(|rest| rest.strip_prefix(stage))
        .and_then(|rest| rest.strip_prefix(' '))
        .and_then(|rest| rest.split_once(" in "))
        .and_then(|(word, secs)| {
            let secs: f64 = secs.strip_suffix('s')?.parse().ok()?;
            let ok = match word {
                "done" => true,
                "failed" => false,
                _ => return None,
            };
            Some(LogEntry::StageFinished {
                ok,
                elapsed_ms: (secs * 1000.0).round() as u64,
            })
        });
    finished.unwrap_or(LogEntry::Line)
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

fn db_error(e: rusqlite::Error) -> Error {
    Error::failed("store", format!("release store: {e}"))
}

/// How long a connection waits for another one's lock.
const BUSY_WAIT: Duration = Duration::from_secs(10);

/// Run `f` again while SQLite answers "locked" at once. It does so without waiting
/// where waiting could deadlock: two processes switching a new file to WAL (a build
/// creating the store while `history` opens it), or a read that turns into a write.
fn retry_busy<T>(mut f: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let deadline = Instant::now() + BUSY_WAIT;
    let mut pause = Duration::from_millis(1);
    loop {
        match f() {
            Err(e)
                if matches!(
                    e.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            result => return result,
        }
    }
}

/// Open (creating it if needed) and bring the schema up to date.
fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_WAIT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(SCHEMA)?;
    // Homes made before runs recorded their origin.
    let has_origin: bool = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('runs') WHERE name = 'origin'",
        [],
        |r| r.get::<_, i64>(0),
    )? > 0;
    if !has_origin {
        conn.execute_batch("ALTER TABLE runs ADD COLUMN origin TEXT")?;
    }
    // Homes made before log lines recorded their event (NULL: read from the text).
    let has_event: bool = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('log_lines') WHERE name = 'event'",
        [],
        |r| r.get::<_, i64>(0),
    )? > 0;
    if !has_event {
        conn.execute_batch("ALTER TABLE log_lines ADD COLUMN event TEXT")?;
    }
    // Homes made before records stopped keeping agent specs (decrypted configuration):
    // forget them, so no clear secret stays at rest. A read first: most opens write nothing.
    let old_specs: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM environments WHERE specs IS NOT NULL)",
        [],
        |r| r.get(0),
    )?;
    if old_specs {
        conn.execute_batch("UPDATE environments SET specs = NULL")?;
    }
    Ok(conn)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS releases (
  id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL,
  sources TEXT NOT NULL, images TEXT NOT NULL, archive_hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
  id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, environment TEXT,
  release TEXT, existing_release TEXT, status TEXT NOT NULL,
  started_at TEXT NOT NULL, ended_at TEXT, pid INTEGER, origin TEXT);
CREATE TABLE IF NOT EXISTS log_lines (
  run INTEGER NOT NULL, seq INTEGER NOT NULL, at TEXT NOT NULL, stage TEXT NOT NULL,
  text TEXT NOT NULL, event TEXT, PRIMARY KEY (run, seq));
CREATE TABLE IF NOT EXISTS environments (
  name TEXT PRIMARY KEY, release TEXT, existing_release TEXT, updated_at TEXT NOT NULL,
  applied TEXT, specs TEXT);
CREATE TABLE IF NOT EXISTS images (
  input_digest TEXT PRIMARY KEY, image_id TEXT NOT NULL, created_at TEXT NOT NULL);
";

/// Where this process runs: the kernel's boot id and our pid namespace. Another
/// process can check a run's pid only if it runs in the same place (a run started in a
/// container, or before a reboot, is never judged from here).
fn origin() -> Option<&'static str> {
    static ORIGIN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ORIGIN
        .get_or_init(|| {
            let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
            let ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
            Some(format!("{} {}", boot.trim(), ns.display()))
        })
        .as_deref()
}

/// Whether the process `pid` that started a run from `origin` has certainly ended.
fn process_gone(pid: u32, origin: Option<&str>) -> bool {
    let here = self::origin();
    here.is_some()
        && origin == here
        && pid != std::process::id()
        && !Path::new(&format!("/proc/{pid}")).exists()
}

/// A run as stored, with the pid and origin of the process that started it.
type StoredRun = (RunRecord, Option<u32>, Option<String>);

/// A run's row as SQLite holds it: kind and status still text.
struct RawRun {
    id: i64,
    kind: String,
    environment: Option<String>,
    release: Option<String>,
    existing_release: Option<String>,
    status: String,
    started_at: String,
    ended_at: Option<String>,
    pid: Option<u32>,
    origin: Option<String>,
}

/// A run from a row with the columns `id, kind, environment, release,
/// existing_release, status, started_at, ended_at, pid, origin`.
fn raw_run(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawRun> {
    Ok(RawRun {
        id: row.get(0)?,
        kind: row.get(1)?,
        environment: row.get(2)?,
        release: row.get(3)?,
        existing_release: row.get(4)?,
        status: row.get(5)?,
        started_at: row.get(6)?,
        ended_at: row.get(7)?,
        pid: row.get(8)?,
        origin: row.get(9)?,
    })
}

impl RawRun {
    /// The run, or an error naming it if its kind or status is not one we know (a
    /// damaged store, or one written by a newer stretch).
    fn typed(self) -> Result<StoredRun> {
        let damaged = |what: &str, value: &str| Error::Failed {
            stage: "store".to_string(),
            message: format!(
                "the record of run {} is damaged: unknown {what} `{value}`",
                self.id
            ),
            help: None,
        };
        let kind = self
            .kind
            .parse()
            .map_err(|()| damaged("kind", &self.kind))?;
        let status = self
            .status
            .parse()
            .map_err(|()| damaged("status", &self.status))?;
        Ok((
            RunRecord {
                id: self.id,
                kind,
                environment: self.environment,
                release: self.release,
                existing_release: self.existing_release,
                status,
                started_at: self.started_at,
                ended_at: self.ended_at,
            },
            self.pid,
            self.origin,
        ))
    }
}

/// Append a line to a run's log (its `seq` is the next one).
fn insert_line(
    c: &Connection,
    run: i64,
    at: &str,
    stage: &str,
    text: &str,
    event: Option<&LogEntry>,
) -> rusqlite::Result<()> {
    let event = event.and_then(|e| serde_json::to_string(e).ok());
    c.execute(
        "INSERT INTO log_lines (run, seq, at, stage, text, event)
         VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM log_lines WHERE run = ?1), ?2, ?3, ?4, ?5)",
        params![run, at, stage, text, event],
    )
    .map(|_| ())
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let conn = retry_busy(|| connect(path)).map_err(db_error)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn with<T>(&self, f: impl Fn(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| Error::failed("store", "release store lock poisoned"))?;
        retry_busy(|| f(&conn)).map_err(db_error)
    }

    pub fn insert_release(&self, r: &ReleaseRecord) -> Result<()> {
        let sources = serde_json::to_string(&r.sources).unwrap_or_default();
        let images = serde_json::to_string(&r.images).unwrap_or_default();
        self.with(|c| {
            c.execute(
                "INSERT INTO releases (id, name, created_at, sources, images, archive_hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![r.id, r.name, r.created_at, sources, images, r.archive_hash],
            )
            .map(|_| ())
        })
    }

    fn release_rows(&self, sql: &str, arg: &str) -> Result<Vec<ReleaseRecord>> {
        self.with(|c| {
            let mut stmt = c.prepare(sql)?;
            let rows = stmt.query_map([arg], |row| {
                let sources: String = row.get(3)?;
                let images: String = row.get(4)?;
                Ok(ReleaseRecord {
                    id: row.get(0)?,
                    name: row.get(1)?,
                    created_at: row.get(2)?,
                    sources: serde_json::from_str(&sources).unwrap_or_default(),
                    images: serde_json::from_str(&images).unwrap_or_default(),
                    archive_hash: row.get(5)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Releases, newest first.
    pub fn releases(&self) -> Result<Vec<ReleaseRecord>> {
        self.release_rows(
            "SELECT id, name, created_at, sources, images, archive_hash FROM releases WHERE ?1 = ?1 ORDER BY created_at DESC, rowid DESC",
            "",
        )
    }

    pub fn release_by_id(&self, id: &str) -> Result<Option<ReleaseRecord>> {
        Ok(self
            .release_rows("SELECT id, name, created_at, sources, images, archive_hash FROM releases WHERE id = ?1", id)?
            .into_iter()
            .next())
    }

    /// Find a release by id, unique id prefix (at least 6 characters) or name.
    pub fn find_release(&self, key: &str) -> Result<ReleaseRecord> {
        let by_name = self.release_rows("SELECT id, name, created_at, sources, images, archive_hash FROM releases WHERE name = ?1", key)?;
        if let Some(r) = by_name.into_iter().next() {
            return Ok(r);
        }
        if key.len() >= 6 && key.chars().all(|c| c.is_ascii_hexdigit()) {
            let mut found = self.release_rows(
                "SELECT id, name, created_at, sources, images, archive_hash FROM releases WHERE substr(id, 1, length(?1)) = ?1",
                key,
            )?;
            match found.len() {
                1 => return Ok(found.remove(0)),
                0 => {}
                n => {
                    return Err(Error::invalid(format!(
                        "release prefix `{key}` is ambiguous ({n} releases match)"
                    )));
                }
            }
        }
        Err(Error::not_found(
            format!("unknown release `{key}`"),
            "`stretch releases` lists them; use an id, a unique id prefix of 6 or more characters, or a name",
        ))
    }

    pub fn name_taken(&self, name: &str) -> Result<bool> {
        self.with(|c| {
            c.query_row("SELECT 1 FROM releases WHERE name = ?1", [name], |_| Ok(()))
                .optional()
                .map(|o| o.is_some())
        })
    }

    pub fn start_run(
        &self,
        kind: RunKind,
        environment: Option<&str>,
        release: Option<&str>,
        existing: Option<&str>,
    ) -> Result<i64> {
        self.with(|c| {
            c.execute(
                "INSERT INTO runs (kind, environment, release, existing_release, status, started_at, pid, origin) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![kind, environment, release, existing, RunStatus::Running, now_rfc3339(), std::process::id(), origin()],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    /// Set what a run turned out to be about (a build learns its release late).
    pub fn set_run_release(&self, run: i64, release: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE runs SET release = ?2 WHERE id = ?1",
                params![run, release],
            )
            .map(|_| ())
        })
    }

    pub fn finish_run(&self, run: i64, ok: bool) -> Result<()> {
        let status = RunStatus::finished(ok);
        self.with(|c| {
            c.execute(
                "UPDATE runs SET status = ?2, ended_at = ?3 WHERE id = ?1",
                params![run, status, now_rfc3339()],
            )
            .map(|_| ())
        })
    }

    /// Forget a run that changed nothing (bad input).
    pub fn delete_run(&self, run: i64) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM log_lines WHERE run = ?1", [run])?;
            c.execute("DELETE FROM runs WHERE id = ?1", [run])
                .map(|_| ())
        })
    }

    /// Runs, newest first; only those of `environment` when given. A run still marked
    /// running whose process is gone (killed, crashed) is marked failed on the way.
    pub fn runs(&self, environment: Option<&str>) -> Result<Vec<RunRecord>> {
        let rows = self.select_runs(
            "WHERE ?1 IS NULL OR environment = ?1 ORDER BY id DESC",
            environment,
        )?;
        rows.into_iter().map(|row| self.checked(row)).collect()
    }

    /// One run, checked as in [`Store::runs`].
    pub fn run(&self, id: i64) -> Result<Option<RunRecord>> {
        let row = self.select_runs("WHERE id = ?1", id)?.into_iter().next();
        row.map(|row| self.checked(row)).transpose()
    }

    /// Runs as stored, with the pid and origin of the process that started each.
    fn select_runs(&self, filter: &str, arg: impl rusqlite::ToSql) -> Result<Vec<StoredRun>> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT id, kind, environment, release, existing_release, status, started_at, ended_at, pid, origin FROM runs {filter}"
            ))?;
            let rows = stmt.query_map([&arg], raw_run)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?
        .into_iter()
        .map(RawRun::typed)
        .collect()
    }

    /// The run, marked failed first if it is running but its process is gone.
    fn checked(&self, (run, pid, origin): StoredRun) -> Result<RunRecord> {
        match pid {
            Some(pid)
                if run.status == RunStatus::Running && process_gone(pid, origin.as_deref()) =>
            {
                self.abandon(run, pid)
            }
            _ => Ok(run),
        }
    }

    /// Mark a running run whose process `pid` is gone as failed, saying so in its log.
    /// One transaction: a follower that sees the run finished also sees that line.
    fn abandon(&self, run: RunRecord, pid: u32) -> Result<RunRecord> {
        let text =
            format!("abandoned: the process running this (pid {pid}) ended before it finished");
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let now = now_rfc3339();
            let changed = tx.execute(
                "UPDATE runs SET status = ?3, ended_at = ?2 WHERE id = ?1 AND status = ?4",
                params![run.id, now, RunStatus::Failed, RunStatus::Running],
            )?;
            if changed > 0 {
                insert_line(&tx, run.id, &now, "", &text, Some(&LogEntry::Line))?;
            }
            tx.commit()
        })?;
        // As stored now (another reader may have marked it first).
        let row = self
            .select_runs("WHERE id = ?1", run.id)?
            .into_iter()
            .next();
        Ok(row.map_or(run, |(r, _, _)| r))
    }

    pub fn add_line(&self, run: i64, stage: &str, text: &str) -> Result<()> {
        self.add_entry(run, stage, text, LogEntry::Line)
    }

    /// Append a line that records `entry` (a stage's start or end, or a plain line).
    pub fn add_entry(&self, run: i64, stage: &str, text: &str, entry: LogEntry) -> Result<()> {
        self.with(|c| insert_line(c, run, &now_rfc3339(), stage, text, Some(&entry)))
    }

    /// Log lines of a run after `after` (a seq), in order.
    pub fn log(&self, run: i64, after: i64) -> Result<Vec<LogLine>> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT seq, at, stage, text, event FROM log_lines WHERE run = ?1 AND seq > ?2 ORDER BY seq")?;
            let rows = stmt.query_map(params![run, after], |row| {
                let (stage, text): (String, String) = (row.get(2)?, row.get(3)?);
                let event: Option<String> = row.get(4)?;
                // Stored by this code: JSON of a LogEntry; older lines: their text.
                let event = Some(
                    event
                        .and_then(|e| serde_json::from_str(&e).ok())
                        .unwrap_or_else(|| legacy_entry(&stage, &text)),
                );
                Ok(LogLine { seq: row.get(0)?, at: row.get(1)?, stage, text, event })
            })?;
            rows.collect()
        })
    }

    pub fn image_for_input(&self, digest: &str) -> Result<Option<String>> {
        self.with(|c| {
            c.query_row(
                "SELECT image_id FROM images WHERE input_digest = ?1",
                [digest],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// Forget a built image (pruned from the engine): a later build with the same
    /// inputs builds it again.
    pub fn forget_image(&self, image_id: &str) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM images WHERE image_id = ?1", [image_id])
                .map(|_| ())
        })
    }

    /// Remove a release's record (its runs stay in the history).
    pub fn delete_release(&self, id: &str) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM releases WHERE id = ?1", [id])
                .map(|_| ())
        })
    }

    /// The names of every environment with a record.
    pub fn environment_names(&self) -> Result<Vec<String>> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT name FROM environments ORDER BY name")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect()
        })
    }

    pub fn record_image(&self, digest: &str, image_id: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO images (input_digest, image_id, created_at) VALUES (?1, ?2, ?3)",
                params![digest, image_id, now_rfc3339()],
            )
            .map(|_| ())
        })
    }
}

/// Where an environment stands: its release, the one before, and what was last applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvironmentRecord {
    pub name: String,
    pub release: Option<String>,
    pub existing_release: Option<String>,
    pub updated_at: String,
    /// The environment's definition (from system.yml) last applied, for `apply`'s diff.
    /// No agent spec is kept: specs hold decrypted configuration, and agents say what
    /// they run.
    pub applied: Option<serde_json::Value>,
}

impl Store {
    /// An environment's record. A damaged one (its stored JSON unreadable) is an
    /// error naming it: reading it as empty would turn a switch-back into removing
    /// the group.
    pub fn environment(&self, name: &str) -> Result<Option<EnvironmentRecord>> {
        type Raw = (
            String,
            Option<String>,
            Option<String>,
            String,
            Option<String>,
        );
        let raw: Option<Raw> = self.with(|c| {
            c.query_row(
                "SELECT name, release, existing_release, updated_at, applied FROM environments WHERE name = ?1",
                [name],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)),
            )
            .optional()
        })?;
        let Some((name, release, existing_release, updated_at, applied)) = raw else {
            return Ok(None);
        };
        let applied = match applied {
            Some(a) => Some(serde_json::from_str(&a).map_err(|e| Error::Failed {
                stage: "store".to_string(),
                message: format!("the record of environment `{name}` is damaged (applied: {e})"),
                help: Some(
                    "run `stretch status ENV` to see what its hosts run, then deploy a release to rewrite the record".to_string(),
                ),
            })?),
            None => None,
        };
        Ok(Some(EnvironmentRecord {
            name,
            release,
            existing_release,
            updated_at,
            applied,
        }))
    }

    pub fn set_environment(&self, e: &EnvironmentRecord) -> Result<()> {
        let applied = e.applied.as_ref().map(|a| a.to_string());
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO environments (name, release, existing_release, updated_at, applied, specs)
                 VALUES (?1, ?2, ?3, ?4, ?5, NULL)",
                params![e.name, e.release, e.existing_release, now_rfc3339(), applied],
            )
            .map(|_| ())
        })
    }
}

/// Writes every event of a run's log into the store.
pub struct RunSink {
    pub store: Store,
    pub run: i64,
}

impl Sink for RunSink {
    fn event(&self, event: &Event) {
        // A log line that cannot be stored must not fail the pipeline.
        let _ = match event {
            Event::StageStarted { stage } => self.store.add_entry(
                self.run,
                stage,
                &format!("==> {stage}"),
                LogEntry::StageStarted,
            ),
            Event::StageFinished { stage, elapsed, ok } => self.store.add_entry(
                self.run,
                stage,
                &format!(
                    "<== {stage} {} in {:.2}s",
                    if *ok { "done" } else { "failed" },
                    elapsed.as_secs_f64()
                ),
                LogEntry::StageFinished {
                    ok: *ok,
                    elapsed_ms: elapsed.as_millis() as u64,
                },
            ),
            Event::Line { stage, text } => self.store.add_line(self.run, stage, text),
            // Progress is for whoever watches; the log keeps the lines.
            Event::RunStarted { .. } | Event::Progress(_) | Event::Host(_) | Event::Batch(_) => {
                Ok(())
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_events_are_stored_as_data_and_old_lines_still_read() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(&t.path().join("db")).unwrap();
        let run = s.start_run(RunKind::Build, None, None, None).unwrap();
        let sink = RunSink {
            store: s.clone(),
            run,
        };
        sink.event(&Event::StageStarted {
            stage: "pull".into(),
        });
        sink.event(&Event::Line {
            stage: "pull".into(),
            text: "<== pull done in 9.99s".into(), // looks like an end, is a line
        });
        sink.event(&Event::StageFinished {
            stage: "pull".into(),
            elapsed: std::time::Duration::from_millis(1234),
            ok: false,
        });
        // A line written before events were stored.
        s.with(|c| {
            c.execute(
                "INSERT INTO log_lines (run, seq, at, stage, text) VALUES (?1, 99, 't', 'push', '<== push done in 0.50s')",
                [run],
            )
        })
        .unwrap();
        let entries: Vec<LogEntry> = s.log(run, 0).unwrap().iter().map(LogLine::entry).collect();
        assert_eq!(
            entries,
            [
                LogEntry::StageStarted,
                LogEntry::Line,
                LogEntry::StageFinished {
                    ok: false,
                    elapsed_ms: 1234
                },
                LogEntry::StageFinished {
                    ok: true,
                    elapsed_ms: 500
                },
            ]
        );
        let lines = s.log(run, 0).unwrap();
        assert_eq!(lines[2].text, "<== pull failed in 1.23s");
        let json = serde_json::to_value(&lines[2]).unwrap();
        assert_eq!(
            json["event"],
            serde_json::json!({"type": "stage_finished", "ok": false, "elapsed_ms": 1234})
        );
        assert_eq!(legacy_entry("push", "<== pull done in 1s"), LogEntry::Line);
        assert_eq!(legacy_entry("push", "==> push"), LogEntry::StageStarted);
    }

    #[test]
    fn a_damaged_environment_record_fails_loudly() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(&t.path().join("db")).unwrap();
        s.set_environment(&EnvironmentRecord {
            name: "prod".into(),
            release: Some("r".into()),
            existing_release: None,
            updated_at: String::new(),
            applied: Some(serde_json::json!({"hosts": {}})),
        })
        .unwrap();
        let back = s.environment("prod").unwrap().unwrap();
        assert_eq!(back.applied, Some(serde_json::json!({"hosts": {}})));
        s.with(|c| c.execute("UPDATE environments SET applied = '{\"hosts\": '", []))
            .unwrap();
        let err = s.environment("prod").unwrap_err().to_string();
        assert!(
            err.contains("environment `prod`") && err.contains("damaged"),
            "{err}"
        );
        assert!(s.environment("other").unwrap().is_none());
    }

    #[test]
    fn a_run_whose_process_is_gone_is_marked_failed() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(&t.path().join("db")).unwrap();
        let ours = s.start_run(RunKind::Build, None, None, None).unwrap();
        let dead = s
            .start_run(RunKind::Deploy, Some("prod"), None, None)
            .unwrap();
        let elsewhere = s
            .start_run(RunKind::Deploy, Some("prod"), None, None)
            .unwrap();
        // A child that has exited and been reaped: its pid is free.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        s.with(|c| {
            c.execute(
                "UPDATE runs SET pid = ?2 WHERE id = ?1",
                params![dead, gone],
            )?;
            c.execute(
                "UPDATE runs SET pid = ?2, origin = 'another-boot' WHERE id = ?1",
                params![elsewhere, gone],
            )
        })
        .unwrap();
        let status = |id| s.run(id).unwrap().unwrap().status;
        assert_eq!(status(ours), RunStatus::Running, "our own process is alive");
        assert_eq!(status(dead), RunStatus::Failed);
        assert_eq!(
            status(elsewhere),
            RunStatus::Running,
            "not judged from another place"
        );
        let log = s.log(dead, 0).unwrap();
        assert!(log[0].text.starts_with("abandoned:"), "{log:?}");
        // Marked once: the line is not added again.
        assert_eq!(status(dead), RunStatus::Failed);
        assert_eq!(s.log(dead, 0).unwrap().len(), 1);
    }

    /// A build creating the store while `history` opens it (the file exists, empty):
    /// both switch it to WAL at once, which SQLite may refuse at once with "locked".
    #[test]
    fn concurrent_first_opens_all_succeed() {
        for _ in 0..40 {
            let t = tempfile::tempdir().unwrap();
            let path = t.path().join("db");
            let barrier = std::sync::Barrier::new(4);
            std::thread::scope(|scope| {
                let opens: Vec<_> = (0..4)
                    .map(|i| {
                        let (path, barrier) = (&path, &barrier);
                        scope.spawn(move || {
                            barrier.wait();
                            let s = Store::open(path)?;
                            if i % 2 == 0 {
                                s.start_run(RunKind::Build, None, None, None)?;
                            }
                            s.runs(None).map(|_| ())
                        })
                    })
                    .collect();
                for open in opens {
                    let r = open.join().unwrap();
                    assert!(r.is_ok(), "{r:?}");
                }
            });
        }
    }

    #[test]
    fn releases_and_runs() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(&t.path().join("db")).unwrap();
        let r = ReleaseRecord {
            id: "abcdef0123".into(),
            name: "brave-otter".into(),
            created_at: now_rfc3339(),
            sources: vec![Pulled {
                name: "app".into(),
                commit: Some("c0ffee".into()),
            }],
            images: vec![Image {
                name: "local/shop/web:abcdef0123".into(),
                digest: Some("sha256:0123".into()),
            }],
            archive_hash: "h".into(),
        };
        s.insert_release(&r).unwrap();
        assert_eq!(s.find_release("brave-otter").unwrap(), r);
        assert_eq!(s.find_release("abcdef").unwrap(), r);
        assert!(s.find_release("abcde").is_err());
        assert!(s.name_taken("brave-otter").unwrap());
        let run = s.start_run(RunKind::Build, None, None, None).unwrap();
        s.add_line(run, "pull", "one").unwrap();
        s.add_line(run, "pull", "two").unwrap();
        s.finish_run(run, true).unwrap();
        let lines: Vec<String> = s.log(run, 0).unwrap().into_iter().map(|l| l.text).collect();
        assert_eq!(lines, ["one", "two"]);
        assert_eq!(s.log(run, 1).unwrap().len(), 1);
        assert_eq!(s.runs(None).unwrap()[0].status, RunStatus::Succeeded);
        assert!(s.runs(Some("prod")).unwrap().is_empty());
    }

    /// The names serde writes are the ones stored, and both read back; a stored value
    /// we do not know is an error naming the run, not a default.
    #[test]
    fn kinds_and_statuses_round_trip() {
        for k in RunKind::ALL {
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.as_str()));
            assert_eq!(serde_json::from_str::<RunKind>(&json).unwrap(), k);
            assert_eq!(k.as_str().parse::<RunKind>(), Ok(k));
            assert_eq!(k.to_string(), k.as_str());
        }
        for st in RunStatus::ALL {
            let json = serde_json::to_string(&st).unwrap();
            assert_eq!(json, format!("\"{}\"", st.as_str()));
            assert_eq!(serde_json::from_str::<RunStatus>(&json).unwrap(), st);
            assert_eq!(st.as_str().parse::<RunStatus>(), Ok(st));
        }
        let names: Vec<&str> = RunKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names, ["build", "deploy", "rollback", "config", "restart"]);
        let names: Vec<&str> = RunStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, ["running", "succeeded", "failed"]);
        assert_eq!(format!("{:<8}|", RunKind::Config), "config  |");

        let t = tempfile::tempdir().unwrap();
        let s = Store::open(&t.path().join("db")).unwrap();
        for k in RunKind::ALL {
            let run = s.start_run(k, Some("prod"), None, None).unwrap();
            let text: (String, String) = s
                .with(|c| {
                    c.query_row("SELECT kind, status FROM runs WHERE id = ?1", [run], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                })
                .unwrap();
            assert_eq!(text, (k.as_str().to_string(), "running".to_string()));
            s.finish_run(run, k != RunKind::Config).unwrap();
            let back = s.run(run).unwrap().unwrap();
            assert_eq!(back.kind, k);
            let want = if k == RunKind::Config {
                "failed"
            } else {
                "succeeded"
            };
            assert_eq!(back.status.as_str(), want);
            let json = serde_json::to_value(&back).unwrap();
            assert_eq!(
                (json["kind"].as_str(), json["status"].as_str()),
                (Some(k.as_str()), Some(want))
            );
            assert_eq!(serde_json::from_value::<RunRecord>(json).unwrap(), back);
        }
        // Rows written as text by an older stretch read as before.
        s.with(|c| {
            c.execute(
                "INSERT INTO runs (kind, status, started_at) VALUES ('rollback', 'succeeded', 't')",
                [],
            )
        })
        .unwrap();
        let newest = &s.runs(None).unwrap()[0];
        assert_eq!(
            (newest.kind, newest.status),
            (RunKind::Rollback, RunStatus::Succeeded)
        );
        let odd = s
            .with(|c| {
                c.execute(
                    "INSERT INTO runs (kind, status, started_at) VALUES ('deploy', 'paused', 't')",
                    [],
                )?;
                Ok(c.last_insert_rowid())
            })
            .unwrap();
        let err = s.run(odd).unwrap_err().to_string();
        assert!(
            err.contains(&format!("run {odd}")) && err.contains("unknown status `paused`"),
            "{err}"
        );
        assert!(s.runs(None).is_err());
        s.with(|c| {
            c.execute(
                "UPDATE runs SET status = 'failed', kind = 'party' WHERE id = ?1",
                [odd],
            )
        })
        .unwrap();
        let err = s.run(odd).unwrap_err().to_string();
        assert!(err.contains("unknown kind `party`"), "{err}");
    }
}
