//! `stretch deploy`, `stretch rollback` and `stretch status`.

use stretch_core::Result;
use stretch_core::deploy::apply::{ActionKind, ApplyRequest, ChangeOp};
use stretch_core::deploy::{self, DeployRequest, Kind};
use stretch_core::log::Log;

use crate::cli::DeployArgs;
use crate::printer::Printer;
use crate::settings::Settings;

pub async fn deploy(
    args: DeployArgs,
    kind: Kind,
    settings: &Settings,
    printer: &Printer,
) -> Result<()> {
    let system = super::load_system(settings)?;
    let (home, store) = super::open_home(settings)?;
    let req = DeployRequest {
        environment: args.environment,
        release: args.release,
        kind,
        wait: args.wait,
    };
    let log = Log::new(vec![printer.progress()]);
    let outcome = deploy::deploy(&system, &home, &store, &req, &log).await?;
    let r = &outcome.release;
    if printer.json {
        printer.json(&serde_json::json!({
            "run": outcome.run,
            "kind": kind.as_str(),
            "environment": req.environment,
            "release": {"id": r.id, "name": r.name},
            "existing_release": outcome.existing.as_ref().map(|x| serde_json::json!({"id": x.id, "name": x.name})),
        }));
    } else {
        printer.out(format!(
            "{} {} ({}) is live on `{}`",
            if kind == Kind::Rollback {
                "rolled back:"
            } else {
                "deployed:"
            },
            r.name,
            r.id,
            req.environment
        ));
    }
    Ok(())
}

pub async fn apply(
    env: &str,
    dry_run: bool,
    wait: bool,
    settings: &Settings,
    printer: &Printer,
) -> Result<()> {
    let system = super::load_system(settings)?;
    let (home, store) = super::open_home(settings)?;
    let req = ApplyRequest {
        environment: env.to_string(),
        dry_run,
        wait,
    };
    // The plan is printed before anything changes; progress follows.
    let log = Log::new(vec![printer.progress()]);
    let outcome = deploy::apply::apply(&system, &home, &store, &req, &log).await?;
    if printer.json {
        printer.json(&outcome);
        return Ok(());
    }
    let plan = &outcome.plan;
    if let Some(release) = &plan.release {
        printer.out(format!("environment `{env}` runs release {release}"));
    }
    if plan.changes.is_empty() && plan.release.is_some() {
        printer.out("no changes in its definition");
    }
    for c in &plan.changes {
        let show =
            |v: &Option<serde_json::Value>| v.as_ref().map(|v| v.to_string()).unwrap_or_default();
        match c.op {
            ChangeOp::Added => printer.out(format!("  + {}: {}", c.path, show(&c.new))),
            ChangeOp::Removed => printer.out(format!("  - {}: {}", c.path, show(&c.old))),
            ChangeOp::Changed => printer.out(format!(
                "  ~ {}: {} -> {}",
                c.path,
                show(&c.old),
                show(&c.new)
            )),
        }
    }
    if !plan.actions.is_empty() {
        printer.out("actions:");
    }
    for a in &plan.actions {
        let (sign, what) = match a.kind {
            ActionKind::Start => ("+", "start (pull the running release's image)".to_string()),
            ActionKind::Stop => ("-", "stop".to_string()),
            ActionKind::Reload => (
                "~",
                format!(
                    "reload configuration {} -> {}",
                    a.from_config.as_deref().unwrap_or("-"),
                    a.to_config.as_deref().unwrap_or("-")
                ),
            ),
            ActionKind::Replace => ("~", "replace instances (same image)".to_string()),
        };
        printer.out(format!("  {sign} {:<20} {what}", a.target));
    }
    if let Some(note) = &outcome.note {
        printer.info(note);
    } else if outcome.applied {
        printer.out(format!(
            "applied: `{env}` converged ({} action(s))",
            plan.actions.len()
        ));
    }
    Ok(())
}

pub async fn status(env_name: &str, settings: &Settings, printer: &Printer) -> Result<()> {
    let system = super::load_system(settings)?;
    let store = super::open_store_if_any(settings)?;
    let home = stretch_core::home::Home::open(&settings.home)?;
    let log = Log::new(vec![printer.progress()]);
    let status =
        stretch_core::status::environment(&system, &home, store.as_ref(), env_name, true, &log)
            .await?;
    if printer.json {
        printer.json(&status);
    } else {
        printer.out(status.to_string().trim_end());
    }
    Ok(())
}
