//! The `outboard` command: boots the microVM a JSON config describes and
//! exits when the guest shuts down.
//!
//! Exit status: the guest's own status when it powers off through the
//! debug-exit port, 0 when it resets (its way of shutting down), 1 when the
//! guest or the VMM fails (triple fault, KVM error), 2 for a bad config.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use outboard::config::VmConfig;
use outboard::host::{self, KvmKind};
use outboard::legacy::StopReason;
use outboard::vm::Vm;

/// Outboard: a small KVM VMM whose devices run in their own processes.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The VM config (JSON); see the README for the format.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Receive the guest instead of booting it: a live migration on
    /// `tcp:HOST:PORT` or `unix:PATH`, or a snapshot from `file:PATH`.
    #[arg(long, value_name = "ADDRESS")]
    incoming: Option<String>,
}

fn main() -> ExitCode {
    outboard::logger::init();
    let cli = Cli::parse();
    let config = match VmConfig::from_file(&cli.config) {
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
    let reason = Vm::new(&config).and_then(|mut vm| {
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
