//! Output files: per-seller CSV, summary CSV, a Markdown table.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{Result, SimError};
use crate::stats::{summarize, Summary};
use crate::swarm::RunResult;

/// Wall-clock and memory cost of a run (not part of the deterministic output).
#[derive(Clone, Debug, Default)]
pub struct Cost {
    pub wall_s: f64,
    pub peak_rss_mib: f64,
}

pub fn write(path: &Path, text: &str) -> Result<PathBuf> {
    std::fs::write(path, text).map_err(|source| SimError::Write {
        path: path.to_owned(),
        source,
    })?;
    Ok(path.to_owned())
}

/// One line per seller: policy, seller, link profile, completion (s), / bound.
pub fn completions_csv(runs: &[RunResult], profiles: &[String]) -> String {
    let mut s = String::from("policy,n,seller,profile,finish_s,finish_over_bound\n");
    for r in runs {
        for (i, f) in r.finish_s.iter().enumerate() {
            let prof = profiles
                .get(r.profile[i] as usize)
                .map(String::as_str)
                .unwrap_or("?");
            match f {
                Some(t) => {
                    let _ = writeln!(
                        s,
                        "{},{},{},{},{:.6},{:.6}",
                        r.policy.name(),
                        r.n,
                        i + 1,
                        prof,
                        t,
                        t / r.bound_s
                    );
                }
                None => {
                    let _ = writeln!(s, "{},{},{},{},,", r.policy.name(), r.n, i + 1, prof);
                }
            }
        }
    }
    s
}

/// One line per run.
pub fn summary_csv(rows: &[(String, &RunResult, Summary, Cost)]) -> String {
    let mut s = String::from(
        "label,policy,n,bound_s,nominal_bound_s,median_s,p95_s,max_s,median_x,p95_x,max_x,buyer_x,moved_x,moved_bytes,needed_bytes,finished,unfinished,gone,events,starving_notes,cancels,disconnects,polls,buyer_extra_bytes,sim_end_s,wall_s,peak_rss_mib,busy\n",
    );
    for (label, r, m, c) in rows {
        let _ = writeln!(
            s,
            "{},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.4},{:.4},{:.4},{:.4},{:.4},{},{},{},{},{},{},{},{},{},{},{},{:.3},{:.1},{:.0},{}",
            label,
            r.policy.name(),
            r.n,
            m.bound_s,
            r.nominal_bound_s,
            m.median_s,
            m.p95_s,
            m.max_s,
            m.median_x(),
            m.p95_x(),
            m.max_x(),
            m.buyer_x,
            m.moved_x,
            m.moved_bytes,
            r.needed_bytes,
            m.finished,
            m.unfinished,
            r.gone,
            r.events,
            r.starving_notes,
            r.cancels,
            r.disconnects,
            r.polls,
            r.buyer_extra,
            r.sim_end_s,
            c.wall_s,
            c.peak_rss_mib,
            r.busy
        );
    }
    s
}

/// Markdown table of runs.
pub fn markdown_table(rows: &[(String, &RunResult, Summary, Cost)]) -> String {
    let mut s = String::from(
        "| run | policy | N | K-R bound (s) | median / bound | p95 / bound | max / bound | buyer bytes / F | bytes moved / F | unfinished | wall (s) | peak RSS (MiB) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (label, r, m, c) in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {} | {:.1} | {:.0} |",
            label,
            r.policy.name(),
            r.n,
            m.bound_s,
            m.median_x(),
            m.p95_x(),
            m.max_x(),
            m.buyer_x,
            m.moved_x,
            m.unfinished,
            c.wall_s,
            c.peak_rss_mib
        );
    }
    s
}

/// Summaries for a set of runs with their labels and costs.
pub fn rows(runs: &[(String, RunResult, Cost)]) -> Vec<(String, &RunResult, Summary, Cost)> {
    runs.iter()
        .map(|(l, r, c)| (l.clone(), r, summarize(r), c.clone()))
        .collect()
}

/// Peak resident memory of this process so far (MiB), from /proc/self/status.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
