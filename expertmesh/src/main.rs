//! `expertmesh`: the ExpertMesh command-line interface.

mod bench;
mod certs;
mod cli;
mod cluster_cmd;
mod eval_cmd;
mod placement_cmd;
mod remote;
mod up;

use clap::Parser;

fn main() -> std::process::ExitCode {
    if let Err(e) = expertmesh_plumbing::process::tune_allocator() {
        eprintln!("error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    // reqwest is built without a TLS provider of its own; ring is the one
    // tonic uses too. An error means one is installed already, which is fine.
    if tokio_rustls::rustls::crypto::ring::default_provider().install_default().is_err() {
        eprintln!("note: a TLS crypto provider was already installed");
    }
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
