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
        ImageCommand::Fetch { id } => {
            check_id(id)?;
            ("image.fetch", json!({ "id": id }))
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
        ImageCommand::Import { .. } => println!("{}", str_field(&v, "id")),
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
