//! Runs everything a scenario asks for and writes the outputs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use chunks::swarm::Bitfield;
use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Result, SimError};
use crate::plot::{self, Series};
use crate::report::{self, Cost};
use crate::rng::{shuffle, SplitMix64};
use crate::scenario::{Policy, Scenario};
use crate::stats::{sorted_finish, summarize};
use crate::swarm::{self, RunOpts, RunResult};
use crate::topology::World;

/// Above this many sellers the naive baseline is skipped: its result is N F / u_s
/// and its every flow end re-rates all N flows.
const NAIVE_MAX_N: usize = 20_000;

/// Runs one policy on `w`.
pub fn run_policy(
    w: &World,
    policy: Policy,
    opts: &RunOpts,
    bar: Option<&ProgressBar>,
) -> RunResult {
    match policy {
        Policy::Naive => crate::naive::run(w, bar),
        _ => swarm::run(w, policy, opts, bar),
    }
}

fn bar(show: bool, n: usize, label: &str) -> Option<ProgressBar> {
    if !show {
        return None;
    }
    let b = ProgressBar::new(n as u64);
    b.set_style(
        ProgressStyle::with_template(
            "{prefix:>28} [{elapsed_precise}] {bar:40} {pos}/{len} sellers done {msg}",
        )
        .expect("static template"),
    );
    b.set_prefix(label.to_owned());
    Some(b)
}

fn timed(w: &World, policy: Policy, opts: &RunOpts, show: bool, label: &str) -> (RunResult, Cost) {
    let b = bar(show, w.n, &format!("{label} {}", policy.name()));
    let t0 = Instant::now();
    let r = run_policy(w, policy, opts, b.as_ref());
    let cost = Cost {
        wall_s: t0.elapsed().as_secs_f64(),
        peak_rss_mib: report::peak_rss_mib(),
    };
    if let Some(b) = b {
        b.finish_with_message(format!("{:.1} s wall", cost.wall_s));
    }
    (r, cost)
}

/// Chunks left unchanged by an update of `fraction` of them (seeded).
pub fn unchanged(nch: u32, fraction: f64, seed: u64) -> Bitfield {
    let mut idx: Vec<u32> = (0..nch).collect();
    shuffle(&mut SplitMix64::new(seed ^ 0x0bd8), &mut idx);
    let k = (fraction * nch as f64).round() as usize;
    let mut b = Bitfield::full(nch);
    for &i in idx.iter().take(k) {
        b.clear(i);
    }
    b
}

/// What a scenario run produced.
pub struct Outcome {
    pub markdown: String,
    pub files: Vec<PathBuf>,
}

/// Runs `sc` and writes its files under `out`.
pub fn run_scenario(sc: &Scenario, out: &Path, show: bool) -> Result<Outcome> {
    std::fs::create_dir_all(out).map_err(|source| SimError::Write {
        path: out.to_owned(),
        source,
    })?;
    let mut files = Vec::new();
    let mut md = format!("## {}\n\n", sc.name);
    let base = RunOpts {
        seed: sc.seed,
        churn: None,
        preloaded: None,
        max_time_s: sc.max_time_s,
        max_wall_s: sc.max_wall_s,
        progress_reports: sc.progress_reports,
        no_admission: !sc.admission,
    };
    // main runs, with churn if any
    let t_build = Instant::now();
    let w = World::build(sc, sc.sellers);
    let build_s = t_build.elapsed().as_secs_f64();
    let opts = RunOpts {
        churn: sc.churn.clone(),
        ..base.clone()
    };
    let mut main: Vec<(String, RunResult, Cost)> = Vec::new();
    for &p in &sc.policies {
        if p == Policy::Naive && (w.n > NAIVE_MAX_N || sc.churn.is_some()) {
            continue;
        }
        let (r, c) = timed(&w, p, &opts, show, "main");
        main.push(("main".into(), r, c));
    }
    let _ = std::fmt::Write::write_fmt(
        &mut md,
        format_args!(
            "{} sellers, image {:.1} MB in {} chunks, bound {:.1} s on the simulated links ({:.1} s on nominal rates), degree {}, seed {}; population built in {:.1} s.\n\n",
            w.n,
            w.total as f64 / 1e6,
            w.sizes.len(),
            w.bound(),
            w.nominal_bound(),
            sc.degree.min(w.n.saturating_sub(1)),
            sc.seed,
            build_s
        ),
    );
    let rows = report::rows(&main);
    md.push_str(&report::markdown_table(&rows));
    md.push('\n');
    files.push(report::write(
        &out.join(format!("{}-completions.csv", sc.name)),
        &report::completions_csv(
            &main.iter().map(|x| x.1.clone()).collect::<Vec<_>>(),
            &w.profiles,
        ),
    )?);
    let cdf: Vec<Series> = main
        .iter()
        .map(|(_, r, _)| Series {
            name: r.policy.name().into(),
            points: plot::cdf(&sorted_finish(r), r.bound_s),
        })
        .collect();
    if let Some(p) = plot::lines(
        &out.join(format!("{}-cdf.png", sc.name)),
        &format!("{}: completion time CDF", sc.name),
        "completion time / Kumar-Ross bound",
        "fraction of sellers done",
        &cdf,
        true,
        false,
    )? {
        files.push(p);
    }
    let mut all = main;
    // sweep over N
    if let Some(sw) = &sc.sweep {
        let mut sweep = Vec::new();
        for &n in &sw.sellers {
            let wn = World::build(sc, n);
            for &p in &sc.policies {
                if p == Policy::Naive && n > NAIVE_MAX_N {
                    continue;
                }
                let (r, c) = timed(&wn, p, &base, show, &format!("N={n}"));
                sweep.push((format!("sweep N={n}"), r, c));
            }
        }
        md.push_str("\nSweep over N (no churn):\n\n");
        md.push_str(&report::markdown_table(&report::rows(&sweep)));
        let by = |f: &dyn Fn(&RunResult) -> f64| -> Vec<Series> {
            sc.policies
                .iter()
                .map(|&p| Series {
                    name: p.name().into(),
                    points: sweep
                        .iter()
                        .filter(|x| x.1.policy == p)
                        .map(|x| (x.1.n as f64, f(&x.1)))
                        .collect(),
                })
                .filter(|s| !s.points.is_empty())
                .collect()
        };
        let buyer = by(&|r| summarize(r).buyer_x);
        if let Some(p) = plot::lines(
            &out.join(format!("{}-buyer-vs-n.png", sc.name)),
            &format!("{}: buyer upload vs N", sc.name),
            "sellers N",
            "buyer bytes / image",
            &buyer,
            true,
            true,
        )? {
            files.push(p);
        }
        let time = by(&|r| summarize(r).median_s);
        if let Some(p) = plot::lines(
            &out.join(format!("{}-time-vs-n.png", sc.name)),
            &format!("{}: median completion vs N", sc.name),
            "sellers N",
            "median completion (s)",
            &time,
            true,
            true,
        )? {
            files.push(p);
        }
        let ratio = by(&|r| summarize(r).p95_x());
        if let Some(p) = plot::lines(
            &out.join(format!("{}-p95-vs-n.png", sc.name)),
            &format!("{}: p95 completion / bound vs N", sc.name),
            "sellers N",
            "p95 completion / Kumar-Ross bound",
            &ratio,
            true,
            true,
        )? {
            files.push(p);
        }
        all.extend(sweep);
    }
    // image update
    if let Some(up) = &sc.update {
        let mut upd = Vec::new();
        for &f in &up.changed {
            let pre = unchanged(w.sizes.len() as u32, f, sc.seed);
            let o = RunOpts {
                preloaded: Some(pre),
                ..base.clone()
            };
            for &p in &sc.policies {
                if p == Policy::Naive {
                    continue;
                }
                let (r, c) = timed(&w, p, &o, show, &format!("update {:.0}%", f * 100.0));
                upd.push((format!("update {:.0}%", f * 100.0), r, c));
            }
        }
        md.push_str(
            "\nImage update (sellers hold version 1; figures against the changed bytes):\n\n",
        );
        md.push_str(&report::markdown_table(&report::rows(&upd)));
        let mut t = String::from(
            "\n| changed | policy | changed bytes (MB) | bytes moved (MB) | moved / image | buyer bytes / changed |\n|---:|---|---:|---:|---:|---:|\n",
        );
        for (l, r, _) in &upd {
            let m = summarize(r);
            let _ = std::fmt::Write::write_fmt(
                &mut t,
                format_args!(
                    "| {} | {} | {:.1} | {:.1} | {:.3} | {:.3} |\n",
                    l.trim_start_matches("update "),
                    r.policy.name(),
                    r.needed_bytes as f64 / 1e6,
                    m.moved_bytes as f64 / 1e6,
                    m.moved_bytes as f64 / r.image_bytes as f64 / w.n as f64,
                    m.buyer_x
                ),
            );
        }
        md.push_str(&t);
        let series: Vec<Series> = sc
            .policies
            .iter()
            .filter(|&&p| p != Policy::Naive)
            .map(|&p| Series {
                name: p.name().into(),
                points: upd
                    .iter()
                    .filter(|x| x.1.policy == p)
                    .map(|x| {
                        let m = summarize(&x.1);
                        (
                            x.1.needed_bytes as f64 / x.1.image_bytes as f64,
                            m.moved_bytes as f64 / 1e9,
                        )
                    })
                    .collect(),
            })
            .collect();
        if let Some(p) = plot::lines(
            &out.join(format!("{}-update.png", sc.name)),
            &format!("{}: bytes moved vs changed fraction", sc.name),
            "changed fraction of the image",
            "bytes moved, all sellers (GB)",
            &series,
            false,
            false,
        )? {
            files.push(p);
        }
        all.extend(upd);
    }
    if let Some(ls) = &sc.leases {
        let (text, lf) = crate::leases::run(sc, ls, out, show)?;
        md.push_str(&text);
        files.extend(lf);
    }
    let rows = report::rows(&all);
    files.push(report::write(
        &out.join(format!("{}-summary.csv", sc.name)),
        &report::summary_csv(&rows),
    )?);
    files.push(report::write(&out.join(format!("{}.md", sc.name)), &md)?);
    Ok(Outcome {
        markdown: md,
        files,
    })
}
