//! `stretch secrets encrypt|show`: manage a `secrets.yml`.

use stretch_core::home::write_private;
use stretch_core::secrets::{self, Identities};
use stretch_core::{Error, Result};

use crate::cli::SecretsCommand;
use crate::printer::Printer;

pub fn run(command: SecretsCommand, printer: &Printer) -> Result<()> {
    match command {
        SecretsCommand::Encrypt { file, recipients } => {
            let label = file.display().to_string();
            let text = std::fs::read_to_string(&file)
                .map_err(|e| Error::invalid(format!("cannot read `{label}`: {e}")))?;
            let encrypted = secrets::encrypt_secrets_file(&label, &text, &recipients)?;
            // Keep the file's mode: it now holds only ciphertext, but may be shared.
            let mode = std::fs::metadata(&file).map(|m| m.permissions());
            write_private(&file, encrypted.as_bytes())
                .map_err(|e| Error::invalid(format!("cannot write `{label}`: {e}")))?;
            if let Ok(mode) = mode {
                let _ = std::fs::set_permissions(&file, mode);
            }
            printer.info(format!(
                "encrypted `{label}` for {} recipient(s)",
                recipients.len()
            ));
            Ok(())
        }
        SecretsCommand::Show { file, identity } => {
            let label = file.display().to_string();
            let ids = Identities::from_file(&identity)?;
            let text = std::fs::read_to_string(&file)
                .map_err(|e| Error::invalid(format!("cannot read `{label}`: {e}")))?;
            let tree = secrets::decrypt_secrets_file(&label, &text, &ids)?;
            if printer.json {
                printer.json(&tree.to_json());
            } else {
                print!("{}", tree.to_yaml()?);
            }
            Ok(())
        }
    }
}
