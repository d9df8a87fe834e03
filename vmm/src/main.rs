//! The `outboard` command: boots the microVM a JSON config describes and
//! exits when the guest shuts down.
//!
//! Exit status: the guest's own status when it powers off through the
//! debug-exit port, 0 when it resets (its way of shutting down), 1 when the
//! guest or the VMM fails (triple fault, KVM error), 2 for a bad config.
//!
//! `outboard api --socket PATH <command>` is the control API's client: it
//! prints the answer as JSON and exits 0, or prints
//! `outboard: api: <status> <message>` and exits 1.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use outboard::api::{self, client::ApiArgs};

use outboard::config::VmConfig;
use outboard::host::{self, KvmKind};
use outboard::legacy::StopReason;
use outboard::vm::{ApiControl, Vm};

/// Outboard: a small KVM VMM whose devices run in their own processes.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    /// The VM config (JSON); see the README for the format.
    #[arg(long, value_name = "FILE", required = true)]
    config: Option<PathBuf>,
    /// Serve the control API (HTTP/1.1 and JSON, vmm/api/openapi.yaml) on
    /// this unix socket.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Receive the guest instead of booting it: a live migration on
    /// `tcp:HOST:PORT` or `unix:PATH`, or a snapshot from `file:PATH`.
    #[arg(long, value_name = "ADDRESS")]
    incoming: Option<String>,
    #[command(subcommand)]
    action: Option<Action>,
}

#[derive(Subcommand, Debug)]
enum Action {
    /// Send one request to a running VMM's control API.
    Api(ApiArgs),
}

fn api_client(args: &ApiArgs) -> ExitCode {
    match api::client::run(args) {
        Ok(out) => {
            if !out.is_empty() {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outboard: api: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    outboard::logger::init();
    let cli = Cli::parse();
    if let Some(Action::Api(args)) = &cli.action {
        return api_client(args);
    }
    let Some(config_path) = cli.config.as_deref() else {
        eprintln!("outboard: --config FILE is required");
        return ExitCode::from(2);
    };
    let config = match VmConfig::from_file(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outboard: {e}");
            return ExitCode::from(2);
        }
    };
    if host::kvm_kind() == KvmKind::Pvm {
        eprintln!("outboard: note: {}", host::PVM_NOTICE);
    }
    let incoming = match cli
        .incoming
        .as_deref()
        .map(str::parse::<outboard_migration::Address>)
    {
        None => None,
        Some(Ok(a)) => Some(a),
        Some(Err(e)) => {
            eprintln!("outboard: --incoming: {e}");
            return ExitCode::from(2);
        }
    };
    let api_socket = cli.api_socket.clone();
    let reason = Vm::new(&config).and_then(|mut vm| {
        // The control API, served for as long as the VM runs.
        let _api = match &api_socket {
            None => None,
            Some(path) => {
                let control = ApiControl::new(vm.handle(), &config);
                Some(api::serve(path, Arc::new(control)).map_err(|e| {
                    outboard::vm::VmError::Host {
                        what: "cannot start the control API",
                        source: std::io::Error::other(e.message),
                    }
                })?)
            }
        };
        if let Some(address) = &incoming {
            vm.incoming(address)?;
        }
        vm.run()
    });
    match reason {
        Ok(StopReason::PowerOff(0)) | Ok(StopReason::Reset) => ExitCode::SUCCESS,
        Ok(StopReason::MigratedAway) => {
            eprintln!("outboard: the guest runs on the destination now");
            ExitCode::SUCCESS
        }
        Ok(StopReason::PowerOff(status)) => {
            eprintln!("outboard: guest powered off with status {status}");
            ExitCode::from(status)
        }
        Ok(StopReason::Signal(sig)) => {
            eprintln!("outboard: stopped by signal {sig}");
            ExitCode::from(128u8.saturating_add(sig as u8))
        }
        Ok(StopReason::Failure(msg)) => {
            eprintln!("outboard: guest stopped: {msg}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("outboard: {e}");
            if e.is_config_error() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
