//! `cpushare-node`: the one binary every buyer and seller runs.

mod cleanup;
mod cli;
mod config;
mod config_cmd;
mod control;
mod daemon;
mod domain;
mod error;
mod guest_files;
mod identity;
mod image_cmd;
mod image_service;
mod logging;
mod market;
mod node;
mod overlay_leases;
mod overlay_service;
mod p2p;
mod privileges;
mod progress;
mod status_cmd;
mod vm_cmd;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::config::Settings;
use crate::error::{Error, Result};

fn main() -> ExitCode {
    // Hidden subcommand: the jailed microvm's VMM process (vm::microvm::jailed). It
    // runs before anything else (no logging, no runtime): its seccomp filter must be
    // installed while it has a single thread.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args
        .first()
        .is_some_and(|a| a == vm::microvm::jailed::SUBCOMMAND)
    {
        let code = vm::microvm::jailed::vmm_main(&args[1..]);
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let settings = Settings::resolve(&cli.global, &cli.daemon)?;
    logging::init(settings.log_format);
    match cli.command {
        None => {
            let Some(role) = settings.role else {
                return Err(Error::BadArg {
                    what: "--role",
                    reason: "give --role buyer or --role seller to run the daemon, or a subcommand (see --help)".into(),
                });
            };
            daemon::run(settings, role)?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Image(cmd)) => image_cmd::run(&settings, cmd),
        Some(Command::Overlay(cmd)) => overlay_service::run_cli(&settings, cmd),
        Some(Command::Config { json }) => config_cmd::run(&cli.global, &settings, json),
        Some(Command::Status { json }) => status_cmd::run(&settings, json),
        Some(Command::Vm(cmd)) => vm_cmd::run(&settings, cmd),
        Some(Command::Run(args)) => market::cli::run(&settings, args),
        Some(Command::Leases { json }) => market::cli::leases(&settings, json),
        Some(Command::Stop { lease, all }) => market::cli::stop(&settings, lease, all),
        Some(Command::Audit { json }) => market::cli::audit(&settings, json),
        Some(Command::Id) => {
            let id = identity::Identity::load_or_create(&settings.identity_file())?;
            println!("peer id: {}", id.peer_id());
            println!("public key: {}", id.public_hex());
            Ok(ExitCode::SUCCESS)
        }
    }
}
