//! `stretch releases`, `stretch history` and `stretch logs`: reading the release store.

use std::time::Duration;

use stretch_core::store::RunStatus;
use stretch_core::{Error, Result};

use stretch_core::outcome::Release;

use crate::printer::Printer;
use crate::render;
use crate::settings::Settings;

pub fn releases(settings: &Settings, printer: &Printer) -> Result<()> {
    let list: Vec<Release> = match super::open_store_if_any(settings)? {
        Some(store) => stretch_core::outcome::releases(&store)?,
        None => Vec::new(),
    };
    render::show(printer, &list);
    Ok(())
}

/// `releases --remote`: the registry's releases, marked with what this home knows
/// environments run.
pub async fn remote_releases(settings: &Settings, printer: &Printer) -> Result<()> {
    let system = super::load_system(settings)?;
    let store = super::open_store_if_any(settings)?;
    let list = stretch_core::outcome::remote_releases(&system, store.as_ref()).await?;
    render::show(printer, &list);
    Ok(())
}

pub async fn prune(
    keep: usize,
    dry_run: bool,
    settings: &Settings,
    printer: &Printer,
) -> Result<()> {
    let system = super::load_system(settings)?;
    let (home, store) = super::open_home(settings)?;
    let log = stretch_core::log::Log::new(vec![printer.progress()]);
    let req = stretch_core::prune::PruneRequest { keep, dry_run };
    let pruned = stretch_core::prune::prune(&system, &home, &store, &req, &log).await?;
    render::show(printer, &pruned);
    Ok(())
}

pub fn history(environment: Option<&str>, settings: &Settings, printer: &Printer) -> Result<()> {
    let runs = match super::open_store_if_any(settings)? {
        Some(store) => store.runs(environment)?,
        None => Vec::new(),
    };
    render::show(printer, &runs);
    Ok(())
}

pub async fn logs(id: i64, follow: bool, settings: &Settings, printer: &Printer) -> Result<()> {
    let store = super::open_store_if_any(settings)?.ok_or_else(|| Error::unknown_run(id))?;
    if store.run(id)?.is_none() {
        return Err(Error::unknown_run(id));
    }
    let mut after = 0;
    loop {
        let lines = store.log(id, after)?;
        for l in &lines {
            render::log_line(printer, l);
            after = l.seq;
        }
        let running = store
            .run(id)?
            .is_some_and(|r| r.status == RunStatus::Running);
        if !follow || (!running && lines.is_empty()) {
            return Ok(());
        }
        if lines.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
