//! `stretch deploy`, `stretch rollback` and `stretch status`.

use stretch_core::Result;
use stretch_core::agent::fleet::{Fleet, prefixed};
use stretch_core::deploy::apply::{ActionKind, ApplyRequest};
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
            "added" => printer.out(format!("  + {}: {}", c.path, show(&c.new))),
            "removed" => printer.out(format!("  - {}: {}", c.path, show(&c.old))),
            _ => printer.out(format!(
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
    let env = deploy::environment(&system, env_name)?;
    let token = deploy::agent_token(&system, env_name, env)?;
    let record = super::open_store_if_any(settings)?
        .map(|s| s.environment(env_name))
        .transpose()?
        .flatten();
    let release = record.as_ref().and_then(|r| r.release.clone());
    let home = stretch_core::home::Home::open(&settings.home)?;
    let fleet = Fleet::new(&system, env_name, env, &home, &token)?;
    let log = Log::new(vec![printer.progress()]);
    let mut states: std::collections::BTreeMap<String, _> = fleet
        .states(
            env.hosts
                .iter()
                .map(|(name, h)| (name.as_str(), h.agent.as_str())),
            &log,
        )
        .await
        .into_iter()
        .collect();
    let mut hosts = Vec::new();
    for (host, h) in &env.hosts {
        let Some(state) = states.remove(host) else {
            continue;
        };
        let groups: Vec<serde_json::Value> = env
            .groups
            .iter()
            .filter(|(_, g)| g.hosts.contains(host))
            .map(|(name, g)| {
                let found = state.as_ref().ok().and_then(|s| {
                    s.groups.iter().find(|x| {
                        x.key.system == system.name()
                            && x.key.environment == env_name
                            && &x.key.group == name
                    })
                });
                serde_json::json!({
                    "group": name,
                    "node": g.node,
                    "release": found.and_then(|f| f.release.as_ref().map(|r| r.id.clone())),
                    "config_version": found.and_then(|f| f.config_version.clone()),
                    "instances": found.map(|f| f.instances.len()).unwrap_or(0),
                    "healthy": found.map(|f| f.healthy).unwrap_or(false),
                })
            })
            .collect();
        hosts.push(serde_json::json!({
            "host": host,
            "agent": h.agent,
            "reachable": state.is_ok(),
            "error": state.as_ref().err().map(|e| prefixed(host, e)),
            "groups": groups,
        }));
    }
    if printer.json {
        printer.json(
            &serde_json::json!({"environment": env_name, "release": release, "hosts": hosts}),
        );
        return Ok(());
    }
    printer.out(format!(
        "environment `{env_name}`: release {}",
        release.as_deref().unwrap_or("(never deployed)")
    ));
    for h in &hosts {
        let reach = if h["reachable"] == true {
            "reachable".to_string()
        } else {
            format!("UNREACHABLE ({})", h["error"].as_str().unwrap_or(""))
        };
        printer.out(format!(
            "  host {} ({}): {reach}",
            h["host"].as_str().unwrap_or(""),
            h["agent"].as_str().unwrap_or("")
        ));
        for g in h["groups"].as_array().into_iter().flatten() {
            printer.out(format!(
                "    group {:<12} node {:<10} release {:<22} config {:<14} instances {} {}",
                g["group"].as_str().unwrap_or(""),
                g["node"].as_str().unwrap_or(""),
                g["release"].as_str().unwrap_or("-"),
                g["config_version"].as_str().unwrap_or("-"),
                g["instances"],
                if g["healthy"] == true {
                    "healthy"
                } else {
                    "NOT HEALTHY"
                },
            ));
        }
    }
    Ok(())
}
