//! `stretch releases`, `stretch history` and `stretch logs`: reading the release store.

use std::time::Duration;

use stretch_core::store::RunStatus;
use stretch_core::{Error, Result};

use crate::printer::Printer;
use crate::settings::Settings;

pub fn releases(settings: &Settings, printer: &Printer) -> Result<()> {
    let releases = match super::open_store_if_any(settings)? {
        Some(store) => store.releases()?,
        None => Vec::new(),
    };
    if printer.json {
        let list: Vec<_> = releases
            .iter()
            .map(|r| serde_json::json!({"id": r.id, "name": r.name, "created_at": r.created_at, "sources": r.sources, "images": r.images}))
            .collect();
        printer.json(&list);
        return Ok(());
    }
    if releases.is_empty() {
        printer.info("no releases yet: run `stretch build`");
    }
    for r in &releases {
        printer.out(format!("{}  {:<24} {}", r.id, r.name, r.created_at));
    }
    Ok(())
}

pub fn history(environment: Option<&str>, settings: &Settings, printer: &Printer) -> Result<()> {
    let runs = match super::open_store_if_any(settings)? {
        Some(store) => store.runs(environment)?,
        None => Vec::new(),
    };
    if printer.json {
        printer.json(&runs);
        return Ok(());
    }
    if runs.is_empty() {
        printer.info("no builds or deploys yet");
    }
    let dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    for r in &runs {
        printer.out(format!(
            "{:>4}  {:<8} {:<12} {:<20} {:<20} {:<9} {}  {}",
            r.id,
            r.kind,
            dash(&r.environment),
            dash(&r.release),
            dash(&r.existing_release),
            r.status,
            r.started_at,
            dash(&r.ended_at)
        ));
    }
    Ok(())
}

pub async fn logs(id: i64, follow: bool, settings: &Settings, printer: &Printer) -> Result<()> {
    let store = super::open_store_if_any(settings)?.ok_or_else(|| Error::NotFound {
        message: format!("unknown run `{id}`: no history yet"),
        help: None,
    })?;
    if store.run(id)?.is_none() {
        return Err(Error::not_found(
            format!("unknown run `{id}`"),
            "`stretch history` lists the runs",
        ));
    }
    let mut after = 0;
    loop {
        let lines = store.log(id, after)?;
        for l in &lines {
            if printer.json {
                printer.out(serde_json::to_string(l).unwrap_or_default());
            } else {
                printer.out(format!("{} [{}] {}", l.at, l.stage, l.text));
            }
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
