//! `stretch keys generate`: a new age identity, in `age-keygen`'s format.
//! `stretch keys token`: a fresh token for agents and servers.

use std::path::Path;

use stretch_core::{Result, secrets};

use crate::cli::KeysCommand;
use crate::printer::Printer;

pub fn run(command: KeysCommand, printer: &Printer) -> Result<()> {
    match command {
        KeysCommand::Generate { output: Some(path) } => generate_to(&path, printer),
        KeysCommand::Generate { output: None } => {
            let (file, recipient) = secrets::generate();
            print!("{file}");
            print_recipient(&recipient, printer);
            Ok(())
        }
        KeysCommand::Token => {
            let token = stretch_core::token::generate()?;
            if printer.json {
                printer.json(&serde_json::json!({ "token": token }));
            } else {
                println!("{token}");
            }
            Ok(())
        }
    }
}

fn generate_to(path: &Path, printer: &Printer) -> Result<()> {
    let recipient = secrets::write_new_identity(path)?;
    print_recipient(&recipient, printer);
    Ok(())
}

/// Like `age-keygen`: the recipient goes to stderr as `Public key: …`, or to stdout
/// with `--json`.
fn print_recipient(recipient: &str, printer: &Printer) {
    if printer.json {
        printer.json(&serde_json::json!({ "recipient": recipient }));
    } else {
        eprintln!("Public key: {recipient}");
    }
}
