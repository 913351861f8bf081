//! `simulations run FILE`: runs a scenario, prints its Markdown summary and
//! writes CSV, Markdown and PNG files.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use simulations::runner::run_scenario;
use simulations::scenario::{Policy, Scenario};

#[derive(Parser)]
#[command(about = "Flow-level simulator of the cpushare swarm and market")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a scenario file (simulations/scenarios/*.toml).
    Run {
        file: PathBuf,
        /// Where the CSV, Markdown and PNG files go (default target/sim/NAME).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override the scenario's seller count.
        #[arg(long)]
        sellers: Option<usize>,
        /// Override the scenario's policies (comma-separated: shipped,
        /// rarest-first, random, naive).
        #[arg(long, value_delimiter = ',')]
        policies: Option<Vec<String>>,
        /// Override the chunk size in KiB (0: the shipped chunker's 16..256 KiB).
        #[arg(long)]
        chunk_kib: Option<u32>,
        /// Stop each run after this many wall-clock seconds and report how far
        /// it got.
        #[arg(long)]
        max_wall_s: Option<f64>,
        /// Sellers' schedulers see whole chunks only, not a reply's bytes
        /// arriving (the node before `Leecher::on_bytes`).
        #[arg(long)]
        no_progress_reports: bool,
        /// Sellers queue every request they can serve (no Busy answers: the
        /// node before issue 16's admission).
        #[arg(long)]
        no_admission: bool,
        /// No progress bars.
        #[arg(long)]
        quiet: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            file,
            out,
            sellers,
            policies,
            chunk_kib,
            max_wall_s,
            no_progress_reports,
            no_admission,
            quiet,
        } => {
            let mut sc = match Scenario::load(&file) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if let Some(n) = sellers {
                sc.sellers = n;
            }
            if max_wall_s.is_some() {
                sc.max_wall_s = max_wall_s;
            }
            if no_progress_reports {
                sc.progress_reports = false;
            }
            if no_admission {
                sc.admission = false;
            }
            if let Some(k) = chunk_kib {
                sc.image.chunk_kib = (k > 0).then_some(k);
            }
            if let Some(ps) = policies {
                let mut chosen = Vec::new();
                for p in ps {
                    match Policy::ALL.into_iter().find(|x| x.name() == p) {
                        Some(x) => chosen.push(x),
                        None => {
                            eprintln!("error: unknown policy {p:?} (shipped, rarest-first, random, naive)");
                            return ExitCode::FAILURE;
                        }
                    }
                }
                sc.policies = chosen;
            }
            let out = out.unwrap_or_else(|| PathBuf::from("target/sim").join(&sc.name));
            let show = !quiet && std::io::stderr().is_terminal();
            match run_scenario(&sc, &out, show) {
                Ok(o) => {
                    println!("{}", o.markdown);
                    for f in o.files {
                        println!("wrote {}", f.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
