//! `expertmesh`: the ExpertMesh command-line interface.

mod bench;
mod certs;
mod cli;
mod control;
mod placement;
mod remote;
mod up;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // reqwest is built without a TLS provider of its own; ring is the one
    // tonic uses too. Failing means one is installed already.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
