//! `stretch build`: run the build step and print the release.

use stretch_core::build::{self, BuildOptions};
use stretch_core::deploy::{self, AutoDeploy};
use stretch_core::home::Home;
use stretch_core::log::Log;
use stretch_core::store::Store;
use stretch_core::system::System;
use stretch_core::{Error, Result};

use stretch_core::outcome::{Built, Release};

use crate::cli::BuildArgs;
use crate::printer::Printer;
use crate::render;
use crate::settings::Settings;

pub async fn run(args: BuildArgs, settings: &Settings, printer: &Printer) -> Result<()> {
    let mut system = super::load_system(settings)?;
    for s in &args.sources {
        let (name, git_ref) = s
            .split_once('=')
            .filter(|(n, r)| !n.is_empty() && !r.is_empty())
            .ok_or_else(|| Error::invalid(format!("`--source {s}`: expected `NAME=REF`")))?;
        system.override_ref(name, git_ref)?;
    }
    let (home, store) = super::open_home(settings)?;
    let log = Log::new(vec![printer.progress()]);
    let result = build::build(
        &system,
        &home,
        &store,
        &BuildOptions {
            identity: args.identity,
        },
        &log,
    )
    .await;
    let outcome = result?;
    let built = Built {
        release: Release::from(&outcome.release),
        reused: outcome.reused,
    };
    render::show(printer, &built);
    auto_deploy(
        &system,
        &home,
        &store,
        &built.release.id,
        settings.release_identity.as_deref(),
        printer,
    )
    .await
}

/// Deploy a new release to every `auto_deploy` environment not already running it.
async fn auto_deploy(
    system: &System,
    home: &Home,
    store: &Store,
    id: &str,
    release_identity: Option<&std::path::Path>,
    printer: &Printer,
) -> Result<()> {
    let log = Log::new(vec![printer.progress()]);
    deploy::auto_deploy(
        system,
        home,
        store,
        id,
        release_identity,
        &log,
        |step| match step {
            AutoDeploy::Starting { environment } => {
                printer.info(format!("auto_deploy: deploying {id} to `{environment}`"))
            }
            AutoDeploy::Deployed { environment } => {
                if !printer.json {
                    printer.out(format!("deployed: {id} is live on `{environment}`"));
                }
            }
        },
    )
    .await
}
