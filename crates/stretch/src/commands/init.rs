//! `stretch init [DIR]`: write the bundled example system (`examples/hello`), ready
//! for `stretch build` and `stretch deploy local` against a local agent.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use stretch_core::home::write_private;
use stretch_core::{Error, Result};

use crate::printer::Printer;

macro_rules! example {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_str!(concat!("../../../../examples/hello/", $path)))),*]
    };
}

const FILES: &[(&str, &str)] = example![
    "system.yml",
    "app/stretch.yml",
    "app/config.yml",
    "app/containers/base/container.yml",
    "app/containers/base/Dockerfile",
    "app/containers/base/.gitignore",
    "app/web/container.yml",
    "app/web/Dockerfile",
    "app/web/app/health.txt",
    "app/web/templates/index.html.jinja",
];

pub fn run(dir: Option<PathBuf>, printer: &Printer) -> Result<()> {
    let dir = dir.unwrap_or_else(|| PathBuf::from("."));
    if dir.join("system.yml").exists() {
        return Err(Error::invalid(format!(
            "`{}` already exists: not overwriting it",
            dir.join("system.yml").display()
        )));
    }
    let io = |p: &Path, e: std::io::Error| {
        Error::invalid(format!("cannot write `{}`: {e}", p.display()))
    };
    for (rel, text) in FILES {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        std::fs::write(&path, text).map_err(|e| io(&path, e))?;
    }
    let token_file = dir.join("local.token");
    write_private(&token_file, stretch_core::token::generate()?.as_bytes())
        .map_err(|e| io(&token_file, e))?;
    // The base image is built from a static busybox: no registry pull is needed.
    let busybox = dir.join("app/containers/base/busybox");
    let have_busybox = std::fs::copy("/bin/busybox", &busybox).is_ok();
    if have_busybox {
        let _ = std::fs::set_permissions(&busybox, std::fs::Permissions::from_mode(0o755));
    }
    let d = dir.display();
    printer.info(format!("wrote an example system to {d}"));
    if !have_busybox {
        printer.info(format!(
            "note: copy a static busybox to {d}/app/containers/base/busybox (Debian: `apt-get install busybox-static`)"
        ));
    }
    printer.info(format!(
        "next:\n  stretch agent --listen 127.0.0.1:7420 --data-dir {d}/.stretch/agent --token-file {d}/local.token &\n  stretch --system {d}/system.yml build\n  stretch --system {d}/system.yml deploy local\n  curl http://127.0.0.1:8080/"
    ));
    Ok(())
}
