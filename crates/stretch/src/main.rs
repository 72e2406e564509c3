//! The `stretch` binary: parse arguments, run one command, map errors to exit codes.

mod cli;
mod commands;
mod printer;
mod progress;
mod remote;
mod render;
mod serve;
mod settings;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let settings = settings::Settings::from_args(&args);
    let printer = printer::Printer::new(&settings);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::run(args.command, &settings, &printer)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = e.exit_code();
            printer.error(e);
            ExitCode::from(code)
        }
    }
}
