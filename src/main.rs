//! The `mews-outbox` binary: parse the command line, load settings, start
//! logging, dispatch. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;
use mews_outbox::cli::{Cli, execute};
use mews_outbox::config::Settings;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let sources = cli.sources();
    let settings = match Settings::load(&sources) {
        Ok(settings) => settings,
        Err(e) => {
            // The chain, as below: a token file's cause is its source.
            eprintln!("mews-outbox: {:#}", anyhow::Error::new(e));
            return ExitCode::from(2);
        }
    };
    mews_outbox::telemetry::init(&settings.log);
    match execute(cli.command, settings, sources).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mews-outbox: {e:#}");
            ExitCode::FAILURE
        }
    }
}
