//! Client side of `cpushare-node image ...`.

use std::path::Path;
use std::process::ExitCode;

use serde_json::{json, Value};

use crate::cli::{ImageCommand, ImageFormatArg};
use crate::config::Settings;
use crate::control::Client;
use crate::error::{Error, Result};
use crate::progress::Display;

pub fn run(settings: &Settings, cmd: ImageCommand) -> Result<ExitCode> {
    // Validate what can be checked here before bothering the daemon.
    let (method, params) = match &cmd {
        ImageCommand::Import {
            file,
            kernel,
            initrd,
            cmdline,
            format,
            name,
            public: _,
        } => {
            let path = file.as_deref().map(absolute_existing_file).transpose()?;
            let kind = format.map(|f| match f {
                ImageFormatArg::Raw => "raw",
                ImageFormatArg::Iso => "iso",
                ImageFormatArg::Qcow2 => "qcow2",
            });
            match kernel {
                Some(k) => (
                    "image.import",
                    json!({
                        "kernel": absolute_existing_file(k)?,
                        "initrd": initrd.as_deref().map(absolute_existing_file).transpose()?,
                        "disk": path,
                        "cmdline": cmdline,
                        "name": name,
                    }),
                ),
                None => (
                    "image.import",
                    json!({ "path": path, "kind": kind, "name": name }),
                ),
            }
        }
        ImageCommand::Ls { .. } => ("image.ls", Value::Null),
        ImageCommand::Fetch { id, grant } => {
            check_id(id)?;
            ("image.fetch", json!({ "id": id, "grant": grant }))
        }
        ImageCommand::Grant {
            id,
            peer,
            public: _,
            until,
        } => {
            check_id(id)?;
            let until_ms = until.as_deref().map(parse_until).transpose()?;
            (
                "image.grant",
                json!({ "id": id, "peer": peer, "until_ms": until_ms }),
            )
        }
        ImageCommand::Export { id, file } => {
            check_id(id)?;
            let path = std::path::absolute(file)
                .map_err(|e| Error::io(format!("{}", file.display()), e))?;
            ("image.export", json!({ "id": id, "path": path }))
        }
        ImageCommand::Verify => ("image.verify", Value::Null),
    };
    let mut client = Client::connect(&settings.control_socket(), &settings.data_dir)?;
    let mut display = Display::new();
    let result = client.call(method, params, |p| display.update(p));
    display.finish();
    let v = result?;
    match cmd {
        ImageCommand::Import { public: true, .. } => {
            // a public grant: any peer may fetch it (images are private by default)
            let id = str_field(&v, "id");
            client.call("image.grant", json!({ "id": id, "peer": null }), |_| {})?;
            println!("{id}")
        }
        ImageCommand::Import { .. } => println!("{}", str_field(&v, "id")),
        ImageCommand::Grant { .. } => println!("{}", str_field(&v, "grant")),
        ImageCommand::Ls { json: true } => {
            println!("{}", serde_json::to_string_pretty(&v).expect("json"))
        }
        ImageCommand::Ls { json: false } => {
            let images = v.as_array().cloned().unwrap_or_default();
            if images.is_empty() {
                println!("no images");
            }
            for i in images {
                println!(
                    "{}  {:>12}  {:>5}/{:<5} chunks  {}{}",
                    str_field(&i, "id"),
                    i["size"],
                    i["present_chunks"],
                    i["chunks"],
                    str_field(&i, "name"),
                    if i["pinned"] == true {
                        "  (pinned)"
                    } else {
                        ""
                    }
                );
            }
        }
        ImageCommand::Fetch { .. } | ImageCommand::Export { .. } | ImageCommand::Verify => {
            println!("{}", serde_json::to_string(&v).expect("json"))
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--until`: a duration from now (`90s`, `30m`, `12h`, `7d`) or Unix seconds;
/// returns Unix ms.
fn parse_until(s: &str) -> Result<u64> {
    let bad = || Error::BadArg {
        what: "--until",
        reason: format!("{s:?}: write a duration (90s, 30m, 12h, 7d) or Unix seconds"),
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let s = s.trim();
    let unit = match s.chars().last() {
        Some('s') => 1,
        Some('m') => 60,
        Some('h') => 3600,
        Some('d') => 86_400,
        _ => {
            let secs: u64 = s.parse().map_err(|_| bad())?;
            return Ok(secs.saturating_mul(1000));
        }
    };
    let n: u64 = s[..s.len() - 1].parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(bad());
    }
    Ok(now_ms.saturating_add(n.saturating_mul(unit).saturating_mul(1000)))
}

fn str_field(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_string()
}

fn check_id(id: &str) -> Result<()> {
    id.parse::<chunks::ImageId>()
        .map(|_| ())
        .map_err(Error::from)
}

fn absolute_existing_file(file: &Path) -> Result<std::path::PathBuf> {
    let meta = std::fs::metadata(file).map_err(|e| Error::BadArg {
        what: "image file",
        reason: format!("{}: {e}", file.display()),
    })?;
    if !meta.is_file() {
        return Err(Error::BadArg {
            what: "image file",
            reason: format!("{} is not a regular file", file.display()),
        });
    }
    std::fs::canonicalize(file).map_err(|e| Error::io(format!("{}", file.display()), e))
}
