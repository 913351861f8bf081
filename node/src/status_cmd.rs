//! `cpushare-node status`: ask the daemon and print its state.

use std::process::ExitCode;

use serde_json::Value;

use crate::config::Settings;
use crate::control::Client;
use crate::error::Result;

pub fn run(settings: &Settings, json: bool) -> Result<ExitCode> {
    let mut client = Client::connect(&settings.control_socket(), &settings.data_dir)?;
    let status = client.call("status", Value::Null, |_| {})?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).expect("json serialises")
        );
    } else {
        print_human(&status, 0);
    }
    Ok(ExitCode::SUCCESS)
}

/// Indented `key: value` lines, one per leaf; arrays of scalars on one line.
fn print_human(v: &Value, indent: usize) {
    let pad = "  ".repeat(indent);
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match v {
                    Value::Object(m) if !m.is_empty() => {
                        println!("{pad}{k}:");
                        print_human(v, indent + 1);
                    }
                    Value::Array(a) if a.iter().any(|x| x.is_object()) => {
                        println!("{pad}{k}:");
                        for item in a {
                            println!("{pad}  -");
                            print_human(item, indent + 2);
                        }
                    }
                    _ => println!("{pad}{k}: {}", scalar(v)),
                }
            }
        }
        other => println!("{pad}{}", scalar(other)),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "(none)".into(),
        Value::Array(a) => a.iter().map(scalar).collect::<Vec<_>>().join(", "),
        Value::Object(m) if m.is_empty() => "(none)".into(),
        other => other.to_string(),
    }
}
