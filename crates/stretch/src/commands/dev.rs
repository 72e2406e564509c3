//! `stretch dev ENV`: the edit loop. Watches the `path:` sources and the system file,
//! waits for the files to stay quiet, then runs one *cycle* in this process: build and
//! deploy the new release to ENV, or `apply` when only system.yml's environments
//! changed. A failed cycle prints its error and waits for the next change; the release
//! ENV runs keeps serving (a failed deploy switches nothing, see `deploy`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use serde::Serialize;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;

use stretch_core::build::{self, BuildOptions};
use stretch_core::deploy::apply::{ApplyOutcome, ApplyRequest};
use stretch_core::deploy::{self, DeployRequest, Kind};
use stretch_core::error::ErrorBody;
use stretch_core::home::Home;
use stretch_core::log::Log;
use stretch_core::outcome::{Built, Deployed, Release};
use stretch_core::store::Store;
use stretch_core::system::{SourceKind, System};
use stretch_core::{Error, Result};

use crate::cli::DevArgs;
use crate::printer::Printer;
use crate::render::{self, Human, Line, Lines};
use crate::settings::Settings;

/// A burst of changes is never held back longer than this, even if files keep changing.
const MAX_DEBOUNCE: Duration = Duration::from_secs(1);
/// Changed paths named in a cycle's human line.
const SHOWN_PATHS: usize = 3;
/// Changed paths listed in a cycle's JSON object.
const LISTED_PATHS: usize = 100;

/// What a cycle did, the one outcome `dev` prints per cycle (`--json`: one object a
/// line on stdout).
#[derive(Debug, Serialize)]
pub struct Cycle {
    pub cycle: u64,
    /// The changed files (relative to the system file's folder), at most 100; empty
    /// for the first cycle.
    pub changed: Vec<String>,
    /// How many files changed in all.
    pub changed_count: usize,
    /// `deploy`, `apply`, or `none` (nothing to do).
    pub action: Action,
    pub built: Option<Built>,
    pub deployed: Option<Deployed>,
    pub applied: Option<ApplyOutcome>,
    /// What ENV runs after the cycle (as this home knows).
    pub running: Option<String>,
    pub ok: bool,
    pub error: Option<ErrorBody>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Deploy,
    Apply,
    None,
}

impl Human for Cycle {
    fn human(&self, l: &mut Lines) {
        let running = self
            .deployed
            .as_ref()
            .map(|d| {
                format!(
                    "release {} {}",
                    d.release.name.as_deref().unwrap_or(""),
                    d.release.id
                )
            })
            .or_else(|| self.running.as_ref().map(|r| format!("release {r}")));
        let text = if self.ok {
            let what = match self.action {
                Action::Deploy => "deployed",
                Action::Apply => "applied",
                Action::None => "nothing to deploy",
            };
            format!(
                "dev: cycle {} done in {:.2} s: {what} ({})",
                self.cycle,
                self.seconds,
                running.as_deref().unwrap_or("no release")
            )
        } else {
            format!(
                "dev: cycle {} failed after {:.2} s{}; waiting for the next change",
                self.cycle,
                self.seconds,
                running
                    .map(|r| format!("; {r} keeps serving"))
                    .unwrap_or_default()
            )
        };
        l.0.push(Line::Out(text));
    }
}

pub async fn run(args: DevArgs, settings: &Settings, printer: &Printer) -> Result<()> {
    let mut system = super::load_system(settings)?;
    deploy::environment(&system, &args.environment)?;
    let (home, store) = super::open_home(settings)?;
    let mut signals = Signals::new()?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watch = Watch::new(&system, &home, tx.clone())?;
    printer.info(format!(
        "dev: watching {}; deploying to `{}` (Ctrl-C stops)",
        watch.describe(&system),
        args.environment
    ));
    let debounce = Duration::from_millis(args.debounce_ms.max(10));
    let mut loop_ = DevLoop {
        env: args.environment.clone(),
        build_opts: BuildOptions {
            identity: args.identity.clone(),
        },
        release_identity: settings.release_identity.clone(),
        printer,
        home: &home,
        store: &store,
        last_built: None,
        build_failed: false,
        cycles: 0,
    };

    // The first cycle: bring ENV to what the sources are now.
    let mut changes = Changes {
        sources: true,
        ..Changes::default()
    };
    loop {
        let mut next = Changes::default();
        let (stop, sources_moved) = {
            let cycle = loop_.cycle(&mut system, &settings.system_file, &changes);
            tokio::pin!(cycle);
            let mut stopping = false;
            loop {
                tokio::select! {
                    moved = &mut cycle => break (stopping, moved),
                    Some(event) = rx.recv() => {
                        next.add(&watch, event);
                    }
                    _ = signals.recv() => {
                        if stopping {
                            // A second Ctrl-C: stop now. Locks are the kernel's to free,
                            // the run is recorded as abandoned, and a host mid-switch
                            // keeps serving (old or new instances): the next deploy
                            // converges it.
                            printer.info("dev: stopped in the middle of a cycle");
                            std::process::exit(130);
                        }
                        stopping = true;
                        printer.info("dev: stopping after this cycle (Ctrl-C again to stop now)");
                    }
                }
            }
        };
        if stop {
            break;
        }
        if sources_moved {
            // A source that cannot be watched (yet) is said; the others stay watched.
            match Watch::new(&system, &home, tx.clone()) {
                Ok(w) => {
                    watch = w;
                    printer.info(format!("dev: now watching {}", watch.describe(&system)));
                }
                Err(e) => printer.error(e),
            }
        }
        // Wait for a change, then for the files to stay quiet.
        if next.is_empty() {
            printer.info("dev: waiting for changes");
        }
        let stopped = loop {
            let mut quiet_since = Instant::now();
            let mut first: Option<Instant> = (!next.is_empty()).then(Instant::now);
            let stopped = loop {
                let wait = first.map_or(Duration::ZERO, |f| {
                    debounce
                        .saturating_sub(quiet_since.elapsed())
                        .min(MAX_DEBOUNCE.saturating_sub(f.elapsed()))
                });
                tokio::select! {
                    event = rx.recv() => {
                        let Some(event) = event else { break true };
                        if next.add(&watch, event) {
                            quiet_since = Instant::now();
                            first.get_or_insert_with(Instant::now);
                        }
                    }
                    _ = tokio::time::sleep(wait), if first.is_some() => break false,
                    _ = signals.recv() => break true,
                }
            };
            if stopped {
                break true;
            }
            next.settle();
            // Only temp files that came and went: nothing to build.
            if next.paths.is_empty() && !next.rescan {
                next = Changes::default();
                continue;
            }
            break false;
        };
        if stopped {
            break;
        }
        changes = next;
    }
    printer.info(format!(
        "dev: stopped after {} cycle(s); `{}` keeps running what it runs",
        loop_.cycles, args.environment
    ));
    Ok(())
}

/// SIGINT and SIGTERM, as one stream.
struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    fn new() -> Result<Signals> {
        let make = |kind| {
            signal(kind).map_err(|e| Error::failed("dev", format!("cannot handle signals: {e}")))
        };
        Ok(Signals {
            int: make(SignalKind::interrupt())?,
            term: make(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// The watcher over the sources and the system file, and what its events mean.
struct Watch {
    _watcher: RecommendedWatcher,
    /// The `path:` sources' folders (canonical).
    roots: Vec<PathBuf>,
    /// The system file (canonical folder + name: editors replace it by renaming).
    system_file: PathBuf,
    /// The home folder: the build writes there.
    home: PathBuf,
    /// Changed paths are shown relative to this (the system file's folder).
    base: PathBuf,
}

type Events = mpsc::UnboundedSender<notify::Result<notify::Event>>;

impl Watch {
    fn new(system: &System, home: &Home, tx: Events) -> Result<Watch> {
        let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        let roots: Vec<PathBuf> = system
            .sources
            .iter()
            .filter_map(|s| match &s.kind {
                SourceKind::Path { path } => Some(canon(path)),
                SourceKind::Git { .. } => None,
            })
            .collect();
        let base = canon(&system.dir);
        let name = system
            .file
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_default();
        let system_file = base.join(name);
        let mut watcher = notify::recommended_watcher(move |event| {
            // The receiver is gone only when `dev` is ending.
            let _ = tx.send(event);
        })
        .map_err(|e| Error::failed("dev", format!("cannot watch files: {e}")))?;
        let cannot = |p: &Path, e: notify::Error| {
            Error::invalid(format!("cannot watch `{}`: {e}", p.display()))
        };
        for root in &roots {
            watcher
                .watch(root, RecursiveMode::Recursive)
                .map_err(|e| cannot(root, e))?;
        }
        // The system file's folder, not the file: an editor's rename would end a
        // watch on the file itself. Not when a source already covers it.
        if !roots.iter().any(|r| base.starts_with(r)) {
            watcher
                .watch(&base, RecursiveMode::NonRecursive)
                .map_err(|e| cannot(&base, e))?;
        }
        Ok(Watch {
            _watcher: watcher,
            roots,
            system_file,
            home: canon(&home.root),
            base,
        })
    }

    fn describe(&self, system: &System) -> String {
        let mut what: Vec<String> = self
            .roots
            .iter()
            .map(|r| format!("`{}`", self.show(r)))
            .collect();
        what.push(format!("`{}`", self.show(&self.system_file)));
        let git = system
            .sources
            .iter()
            .filter(|s| matches!(s.kind, SourceKind::Git { .. }))
            .count();
        let mut text = what.join(", ");
        if git > 0 {
            text.push_str(&format!(
                " ({git} git source(s) not watched: built at their ref)"
            ));
        }
        text
    }

    /// `path` relative to the system file's folder, when it is inside it.
    fn show(&self, path: &Path) -> String {
        match path.strip_prefix(&self.base) {
            Ok(rel) if rel.as_os_str().is_empty() => ".".into(),
            Ok(rel) => rel.display().to_string(),
            Err(_) => path.display().to_string(),
        }
    }

    /// What a changed path is to us.
    fn classify(&self, path: &Path) -> Option<What> {
        if path == self.system_file {
            return Some(What::System);
        }
        if path.starts_with(&self.home) || ignored(path) {
            return None;
        }
        self.roots
            .iter()
            .any(|r| path.starts_with(r))
            .then_some(What::Source)
    }
}

enum What {
    System,
    Source,
}

/// Files no build should wait for: version control, editor swap and backup files.
fn ignored(path: &Path) -> bool {
    if path.components().any(|c| c.as_os_str() == ".git") {
        return true;
    }
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    name.ends_with('~')
        || name == "4913" // vim's probe for a writable folder
        || name.starts_with(".#") // emacs locks
        || (name.starts_with('.') && (name.ends_with(".swp") || name.ends_with(".swx")))
}

/// Events that change a file's content, name or presence. Not reads (the build opens
/// every file) nor attribute changes (hard links made by the build change the link
/// count).
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) | EventKind::Any => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Other => false,
    }
}

/// The changes gathered while waiting (or during a cycle, for the next one).
#[derive(Debug, Default)]
struct Changes {
    /// A source file changed (or the first cycle).
    sources: bool,
    /// The system file changed.
    system: bool,
    /// Events were lost: treat everything as changed.
    rescan: bool,
    paths: BTreeSet<String>,
    /// Paths created in this burst, with their full path: those gone again (an
    /// editor's or `sed -i`'s temp file) are not worth naming.
    created: Vec<(String, PathBuf)>,
}

impl Changes {
    fn is_empty(&self) -> bool {
        !self.sources && !self.system && !self.rescan
    }

    /// Take in one event; true when it is a change of ours.
    fn add(&mut self, watch: &Watch, event: notify::Result<notify::Event>) -> bool {
        let event = match event {
            Ok(e) => e,
            Err(_) => {
                // An error of the watcher (e.g. its queue overflowed): look at everything.
                self.rescan = true;
                return true;
            }
        };
        if event.need_rescan() {
            self.rescan = true;
            return true;
        }
        if !is_change(&event.kind) {
            return false;
        }
        let mut ours = false;
        for path in &event.paths {
            match watch.classify(path) {
                Some(What::System) => self.system = true,
                Some(What::Source) => self.sources = true,
                None => continue,
            }
            ours = true;
            let shown = watch.show(path);
            if matches!(event.kind, EventKind::Create(_)) && !self.paths.contains(&shown) {
                self.created.push((shown.clone(), path.clone()));
            }
            self.paths.insert(shown);
        }
        ours
    }

    /// Forget the paths created and removed again within the burst.
    fn settle(&mut self) {
        for (shown, path) in std::mem::take(&mut self.created) {
            if std::fs::symlink_metadata(&path).is_err() {
                self.paths.remove(&shown);
            }
        }
    }
}

/// The loop's state between cycles.
struct DevLoop<'a> {
    env: String,
    build_opts: BuildOptions,
    release_identity: Option<PathBuf>,
    printer: &'a Printer,
    home: &'a Home,
    store: &'a Store,
    /// The release the last successful build gave.
    last_built: Option<String>,
    /// The last build failed: the next cycle builds whatever changed.
    build_failed: bool,
    cycles: u64,
}

impl DevLoop<'_> {
    /// One cycle, printed. True when the system file's sources changed: the watch
    /// must follow them.
    async fn cycle(&mut self, system: &mut System, file: &Path, changes: &Changes) -> bool {
        self.cycles += 1;
        let start = Instant::now();
        let n = self.cycles;
        let printer = self.printer;
        if changes.paths.is_empty() && n == 1 {
            printer.info(format!("dev: cycle {n}: building the sources as they are"));
        } else {
            let shown: Vec<&str> = changes
                .paths
                .iter()
                .take(SHOWN_PATHS)
                .map(String::as_str)
                .collect();
            let more = changes.paths.len().saturating_sub(SHOWN_PATHS);
            printer.info(format!(
                "dev: cycle {n}: changed {}{}{}",
                shown.join(", "),
                if more > 0 {
                    format!(" (+{more} more)")
                } else {
                    String::new()
                },
                if changes.rescan {
                    " (events were lost: rebuilding)"
                } else {
                    ""
                }
            ));
        }
        let mut cycle = Cycle {
            cycle: n,
            changed: changes.paths.iter().take(LISTED_PATHS).cloned().collect(),
            changed_count: changes.paths.len(),
            action: Action::None,
            built: None,
            deployed: None,
            applied: None,
            running: None,
            ok: true,
            error: None,
            seconds: 0.0,
        };
        let mut sources_moved = false;
        let result = self
            .stages(system, file, changes, &mut cycle, &mut sources_moved)
            .await;
        cycle.running = self
            .store
            .environment(&self.env)
            .ok()
            .flatten()
            .and_then(|r| r.release)
            .map(|id| match self.store.release_by_id(&id) {
                Ok(Some(r)) => format!("{} {}", r.name, r.id),
                _ => id,
            });
        cycle.seconds = start.elapsed().as_secs_f64();
        if let Err(e) = result {
            cycle.ok = false;
            cycle.error = Some(ErrorBody::from(&e));
            printer.error(e);
        }
        if printer.json {
            printer.out(serde_json::to_string(&cycle).unwrap_or_default());
        } else {
            render::show(printer, &cycle);
        }
        sources_moved
    }

    async fn stages(
        &mut self,
        system: &mut System,
        file: &Path,
        changes: &Changes,
        cycle: &mut Cycle,
        sources_moved: &mut bool,
    ) -> Result<()> {
        let mut build = changes.sources || changes.rescan || self.build_failed;
        if changes.system || changes.rescan {
            let new = System::load(file)?;
            deploy::environment(&new, &self.env)?;
            // Only what the build reads makes a new release; the environments are
            // the config-only path's.
            let build_parts = |s: &System| {
                (
                    s.spec.system.clone(),
                    s.spec.registry.clone(),
                    s.spec.release_recipients.clone(),
                    s.sources.clone(),
                )
            };
            if build_parts(&new) != build_parts(system) {
                build = true;
                *sources_moved = new.sources != system.sources;
            }
            *system = new;
        }
        let log = Log::new(vec![self.printer.progress()]);
        if build {
            self.build_failed = true;
            let outcome =
                build::build(system, self.home, self.store, &self.build_opts, &log).await?;
            self.build_failed = false;
            let built = Built {
                release: Release::from(&outcome.release),
                reused: outcome.reused,
            };
            if !self.printer.json {
                render::show(self.printer, &built);
            }
            self.last_built = Some(built.release.id.clone());
            cycle.built = Some(built);
        }
        let running = self.store.environment(&self.env)?.and_then(|r| r.release);
        match &self.last_built {
            Some(id) if Some(id) != running.as_ref() => {
                cycle.action = Action::Deploy;
                let req = DeployRequest {
                    environment: self.env.clone(),
                    release: Some(id.clone()),
                    kind: Kind::Deploy,
                    wait: false,
                    release_identity: self.release_identity.clone(),
                };
                let outcome = deploy::deploy(system, self.home, self.store, &req, &log).await?;
                let deployed = Deployed::of(&outcome, Kind::Deploy, &self.env);
                if !self.printer.json {
                    render::show(self.printer, &deployed);
                }
                cycle.deployed = Some(deployed);
            }
            _ if changes.system || changes.rescan => {
                cycle.action = Action::Apply;
                let req = ApplyRequest {
                    environment: self.env.clone(),
                    dry_run: false,
                    wait: false,
                    release_identity: self.release_identity.clone(),
                };
                let outcome =
                    deploy::apply::apply(system, self.home, self.store, &req, &log).await?;
                if !self.printer.json {
                    render::show(self.printer, &outcome);
                }
                cycle.applied = Some(outcome);
            }
            Some(id) => {
                self.printer.info(format!(
                    "dev: `{}` already runs {id}: nothing to deploy",
                    self.env
                ));
            }
            None => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn editor_and_vcs_files_are_ignored() {
        for p in [
            "/s/app/.git/index",
            "/s/app/a.txt~",
            "/s/app/4913",
            "/s/app/.a.txt.swp",
            "/s/app/.#a.txt",
        ] {
            assert!(ignored(Path::new(p)), "{p}");
        }
        for p in ["/s/app/a.txt", "/s/app/web/Dockerfile", "/s/app/.env"] {
            assert!(!ignored(Path::new(p)), "{p}");
        }
    }

    #[test]
    fn reads_and_attribute_changes_are_not_changes() {
        use notify::event::{CreateKind, DataChange, MetadataKind};
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!is_change(&EventKind::Modify(ModifyKind::Metadata(
            MetadataKind::Any
        ))));
        assert!(is_change(&EventKind::Modify(ModifyKind::Data(
            DataChange::Any
        ))));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
        assert!(is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
    }
}
