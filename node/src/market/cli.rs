//! Client side of `cpushare-node run`, `leases`, `stop` and `audit`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::{json, Value};

use crate::cli::run_args::RunArgs;
use crate::config::Settings;
use crate::control::Client;
use crate::error::{Error, Result};

/// What a slot's plain-text progress line must show at once when it changes: state,
/// phase (without its byte counts), seller, address, replacements. Byte counts and cost
/// change every update and are printed at most every `PLAIN_EVERY`.
fn milestone(s: &Value) -> String {
    let phase = match &s["phase"] {
        Value::Object(o) if o.contains_key("Fetching") => "fetching".to_string(),
        p => p.to_string(),
    };
    format!(
        "{} {} {} {} {}",
        s["state"], phase, s["seller"], s["ip"], s["replacements"]
    )
}

/// How often a plain (non-TTY) progress line may repeat a slot whose milestone did
/// not change: logs get a heartbeat, not a line per update.
const PLAIN_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

fn line(s: &Value) -> String {
    let phase = match &s["phase"] {
        Value::Null => String::new(),
        Value::Object(o) if o.contains_key("Fetching") => {
            let f = &o["Fetching"];
            format!(
                " fetching {}/{} MiB",
                f["done"].as_u64().unwrap_or(0) >> 20,
                f["total"].as_u64().unwrap_or(0) >> 20
            )
        }
        p => format!(
            " {}",
            p.as_str()
                .map(str::to_lowercase)
                .unwrap_or_else(|| p.to_string())
        ),
    };
    let seller = s["seller"]
        .as_str()
        .map(|p| format!(" on {}…", &p[p.len().saturating_sub(8)..]))
        .unwrap_or_default();
    format!(
        "guest {} {:<12} {}{}{}  cost {}{}",
        s["slot"],
        s["ip"].as_str().unwrap_or("?"),
        s["state"].as_str().unwrap_or("?"),
        phase,
        seller,
        s["cost"].as_str().unwrap_or("0"),
        match s["replacements"].as_u64() {
            Some(n) if n > 0 => format!("  (replaced {n}x)"),
            _ => String::new(),
        }
    )
}

pub fn run(settings: &Settings, args: RunArgs) -> Result<ExitCode> {
    let mut client = Client::connect(&settings.control_socket(), &settings.data_dir)?;
    // A file is imported into the buyer's store first.
    let image = if args.image.len() == 64 && args.image.chars().all(|c| c.is_ascii_hexdigit()) {
        args.image.clone()
    } else {
        let path = PathBuf::from(&args.image);
        if !path.is_file() {
            return Err(Error::BadArg {
                what: "--image",
                reason: format!("{} is neither an image id nor a file", args.image),
            });
        }
        let path = path
            .canonicalize()
            .map_err(|e| Error::io(format!("resolving {}", path.display()), e))?;
        let v = client.call(
            "image.import",
            json!({"path": path, "kind": Value::Null, "name": Value::Null}),
            |_| {},
        )?;
        v["id"]
            .as_str()
            .ok_or_else(|| Error::Control("image.import returned no id".into()))?
            .to_string()
    };
    let params = json!({
        "image": image, "count": args.count, "vcpus": args.vcpus,
        "memory_mib": args.memory_mib, "disk_mib": args.disk_mib,
        "max_price": args.max_price, "max_latency_ms": args.max_latency_ms,
        "trusted_only": args.trusted_only, "duration_s": args.duration,
        "detach": args.detach, "offer_wait_s": args.offer_wait_s,
    });
    let tty = std::io::stderr().is_terminal();
    let multi = indicatif::MultiProgress::new();
    let mut bars: Vec<indicatif::ProgressBar> = Vec::new();
    let mut last: Vec<(String, String, Option<std::time::Instant>)> = Vec::new();
    let v = client.call("market.run", params, |p| {
        let Some(d) = &p.detail else { return };
        let slots = d["slots"].as_array().cloned().unwrap_or_default();
        for (i, s) in slots.iter().enumerate() {
            let text = line(s);
            if tty {
                while bars.len() <= i {
                    let b = multi.add(indicatif::ProgressBar::new_spinner());
                    b.enable_steady_tick(std::time::Duration::from_millis(200));
                    bars.push(b);
                }
                bars[i].set_message(text);
            } else {
                while last.len() <= i {
                    last.push((String::new(), String::new(), None));
                }
                let key = milestone(s);
                let (last_key, last_text, at) = &mut last[i];
                let due = at.is_none_or(|t: std::time::Instant| t.elapsed() >= PLAIN_EVERY);
                if *last_key != key || (*last_text != text && due) {
                    eprintln!("{text}");
                    *last_key = key;
                    *last_text = text;
                    *at = Some(std::time::Instant::now());
                }
            }
        }
    })?;
    for b in bars {
        b.finish();
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
    } else {
        for s in v["slots"].as_array().into_iter().flatten() {
            println!("{}  lease {}", line(s), s["lease"].as_str().unwrap_or("-"));
        }
        println!(
            "cost so far {}  consoles in {}/<lease>/console.log",
            v["cost"].as_str().unwrap_or("0"),
            v["leases_dir"].as_str().unwrap_or("?")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn leases(settings: &Settings, json_out: bool) -> Result<ExitCode> {
    let mut client = Client::connect(&settings.control_socket(), &settings.data_dir)?;
    let v = client.call("market.leases", Value::Null, |_| {})?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return Ok(ExitCode::SUCCESS);
    }
    let rows = v.as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        println!("no leases");
    } else {
        println!(
            "{:<34} {:<10} {:<15} {:>7} {:>12}  end",
            "LEASE", "STATE", "IP", "MINUTES", "BILLED"
        );
        for r in rows {
            let s = |k: &str| {
                r[k].as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| "-".into())
            };
            let minutes = r["minutes"]
                .as_u64()
                .or_else(|| r["minutes_acked"].as_u64())
                .unwrap_or(0);
            println!(
                "{:<34} {:<10} {:<15} {:>7} {:>12}  {}",
                s("lease"),
                r["state"].as_str().or(r["phase"].as_str()).unwrap_or("-"),
                r["ip"].as_str().or(r["guest_ip"].as_str()).unwrap_or("-"),
                minutes,
                s("billed"),
                s("end_reason"),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn stop(settings: &Settings, lease: Option<String>, all: bool) -> Result<ExitCode> {
    if lease.is_none() && !all {
        return Err(Error::BadArg {
            what: "stop",
            reason: "give a lease id (see `cpushare-node leases`) or --all".into(),
        });
    }
    let mut client = Client::connect(&settings.control_socket(), &settings.data_dir)?;
    let v = client.call("market.stop", json!({ "lease": lease }), |_| {})?;
    println!("{}", serde_json::to_string(&v).expect("json"));
    Ok(ExitCode::SUCCESS)
}

pub fn audit(settings: &Settings, json_out: bool) -> Result<ExitCode> {
    let mut client = Client::connect(&settings.control_socket(), &settings.data_dir)?;
    let v = client.call("market.audit", Value::Null, |_| {})?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
    } else {
        for e in v.as_array().into_iter().flatten() {
            println!("{}", serde_json::to_string(e).expect("json"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(state: &str, done: u64, cost: &str) -> Value {
        json!({"slot": 0, "ip": "10.77.0.2", "state": state, "seller": "12D3KooWabcdefgh",
               "phase": {"Fetching": {"done": done, "total": 64 << 20}},
               "cost": cost, "replacements": 0})
    }

    #[test]
    fn plain_progress_prints_milestones_at_once_and_counts_as_a_heartbeat() {
        // Bytes and cost move every update: same milestone, a different line.
        let a = slot("starting", 1 << 20, "0");
        let b = slot("starting", 9 << 20, "0.01");
        assert_eq!(milestone(&a), milestone(&b));
        assert_ne!(line(&a), line(&b));
        // A new state or seller is a milestone.
        assert_ne!(milestone(&a), milestone(&slot("running", 1 << 20, "0")));
        let mut moved = a.clone();
        moved["seller"] = json!("12D3KooWzzzzzzzz");
        assert_ne!(milestone(&a), milestone(&moved));
    }
}
