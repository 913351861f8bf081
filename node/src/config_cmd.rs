//! `cpushare-node config [--json]`: the configuration in effect, every key with its
//! value: the built-in defaults, then the config file, then command-line flags.
//!
//! The defaults come from the documented config file the package installs
//! (packaging/config.toml, compiled in), where every key is listed as `#key = value`.
//! Tests check that file against node/src/config.rs (the keys it accepts) and against
//! the values the code falls back to, so the file and the code cannot drift apart.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use toml::{Table, Value};

use crate::cli::{GlobalArgs, LogFormat};
use crate::config::Settings;
use crate::error::{Error, Result};

/// The documented config file, as installed at /etc/cpushare/config.toml.
pub const DOCUMENTED: &str = include_str!("../../packaging/config.toml");

/// The documented file, read as data.
#[derive(Debug)]
pub struct Documented {
    /// Every key, commented or not, with its documented value.
    pub table: Table,
    /// Dotted keys whose value is only an example ("unset by default").
    pub unset: BTreeSet<String>,
    /// Dotted keys the file really sets (uncommented lines, e.g. the package's role).
    pub set: BTreeSet<String>,
}

fn dotted(section: &str, key: &str) -> String {
    if section.is_empty() {
        key.to_string()
    } else {
        format!("{section}.{key}")
    }
}

/// Reads `text` in the documented format: `#key = value` lines are defaults,
/// `# ...` lines are prose, uncommented lines are settings.
pub fn parse_documented(text: &str) -> std::result::Result<Documented, String> {
    let mut body = String::new();
    let mut section = String::new();
    let mut unset = BTreeSet::new();
    let mut set = BTreeSet::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(h) = t.strip_prefix('[') {
            section = h.trim_end_matches(']').trim().to_string();
            body.push_str(t);
            body.push('\n');
            continue;
        }
        let (kv, commented) = match t.strip_prefix('#') {
            Some(r) if r.starts_with(|c: char| c.is_ascii_lowercase()) => (r, true),
            Some(_) => continue,
            None if t.is_empty() => continue,
            None => (t, false),
        };
        let key = kv
            .split_once('=')
            .map(|(k, _)| k.trim())
            .ok_or_else(|| format!("not a key line: {line:?}"))?;
        let name = dotted(&section, key);
        if !commented {
            set.insert(name);
        } else if kv.contains("unset by default") {
            unset.insert(name);
        }
        body.push_str(kv);
        body.push('\n');
    }
    let table = toml::from_str(&body).map_err(|e| e.message().to_string())?;
    Ok(Documented { table, unset, set })
}

impl Documented {
    /// The built-in defaults: every key but the examples and the package's settings.
    pub fn defaults(&self) -> Table {
        let mut t = self.table.clone();
        for name in self.unset.iter().chain(&self.set) {
            match name.split_once('.') {
                Some((sec, key)) => {
                    if let Some(Value::Table(sub)) = t.get_mut(sec) {
                        sub.remove(key);
                    }
                }
                None => {
                    t.remove(name);
                }
            }
        }
        t
    }
}

/// The compiled-in documented file (a build that fails to read it is a bug the
/// tests catch).
pub fn documented() -> Result<Documented> {
    parse_documented(DOCUMENTED).map_err(|reason| Error::Config {
        path: PathBuf::from("packaging/config.toml (built in)"),
        reason,
    })
}

/// `src` over `dst`, table by table.
fn merge(dst: &mut Table, src: Table) {
    for (k, v) in src {
        match (dst.get_mut(&k), v) {
            (Some(Value::Table(d)), Value::Table(s)) => merge(d, s),
            (_, v) => {
                dst.insert(k, v);
            }
        }
    }
}

/// The configuration in effect for `settings`, read from `config` (the file it was
/// resolved from, if any).
pub fn effective(config: Option<&Path>, s: &Settings) -> Result<Table> {
    let mut t = documented()?.defaults();
    if let Some(p) = config {
        let bad = |reason: String| Error::Config {
            path: p.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(p).map_err(|e| bad(e.to_string()))?;
        let raw: Table = toml::from_str(&text).map_err(|e| bad(e.message().to_string()))?;
        merge(&mut t, raw);
    }
    // What Settings resolved (flags included) wins for the keys it resolves.
    if let Some(r) = s.role {
        t.insert("role".into(), r.as_str().into());
    }
    t.insert("data_dir".into(), s.data_dir.display().to_string().into());
    t.insert("listen".into(), s.listen.clone().into());
    t.insert(
        "bootstrap".into(),
        Value::Array(s.bootstrap.iter().cloned().map(Value::from).collect()),
    );
    t.insert("mdns".into(), if s.mdns { "on" } else { "off" }.into());
    let fmt = match s.log_format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    t.insert("log_format".into(), fmt.into());
    t.insert("store_cap_mib".into(), mib(s.store_cap_mib));
    // A default that follows another key.
    if let Some(Value::Table(seller)) = t.get_mut("seller") {
        let disk = s.seller.disk_cap_mib.unwrap_or(s.store_cap_mib / 2);
        seller.insert("disk_cap_mib".into(), mib(disk));
    }
    Ok(t)
}

fn mib(v: u64) -> Value {
    Value::Integer(i64::try_from(v).unwrap_or(i64::MAX))
}

/// The JSON form lists unset keys too, as null.
fn to_json(t: &Table, unset: &BTreeSet<String>) -> serde_json::Value {
    let mut v = serde_json::to_value(t).unwrap_or_default();
    for name in unset {
        let (sec, key) = name.split_once('.').unwrap_or(("", name));
        let obj = if sec.is_empty() {
            v.as_object_mut()
        } else {
            v.get_mut(sec).and_then(|s| s.as_object_mut())
        };
        if let Some(o) = obj {
            o.entry(key.to_string()).or_insert(serde_json::Value::Null);
        }
    }
    v
}

pub fn run(global: &GlobalArgs, settings: &Settings, json: bool) -> Result<ExitCode> {
    let t = effective(global.config.as_deref(), settings)?;
    if json {
        let unset = documented()?.unset;
        let v = to_json(&t, &unset);
        let text = serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string());
        print(&format!("{text}\n"))?;
    } else {
        let text = toml::to_string(&t).map_err(|e| Error::Config {
            path: global.config.clone().unwrap_or_default(),
            reason: format!("printing the effective configuration: {e}"),
        })?;
        print(&text)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes to stdout; a reader that went away (`config | head`) is not an error.
fn print(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::io("writing the configuration to stdout", e))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::DaemonArgs;
    use crate::config::{FileConfig, OverlayConfig, SellerTable, DEFAULT_STORE_CAP_MIB};

    /// Dotted names of every key in `t` (tables are walked, not listed).
    fn keys_of(t: &Table) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (k, v) in t {
            match v {
                Value::Table(sub) => out.extend(sub.keys().map(|s| dotted(k, s))),
                _ => {
                    out.insert(k.clone());
                }
            }
        }
        out
    }

    /// The keys `FileConfig` accepts, read from serde's "unknown field" message,
    /// which lists them: the real set, whatever config.rs declares today.
    fn accepted(prefix: &str) -> BTreeSet<String> {
        let probe = if prefix.is_empty() {
            "cpushare_no_such_key = 1\n".to_string()
        } else {
            format!("[{prefix}]\ncpushare_no_such_key = 1\n")
        };
        let err = toml::from_str::<FileConfig>(&probe)
            .expect_err("an unknown key is refused")
            .message()
            .to_string();
        let list = err
            .split_once("expected")
            .unwrap_or_else(|| panic!("serde's message changed: {err}"))
            .1;
        list.split('`')
            .skip(1)
            .step_by(2)
            .map(|k| dotted(prefix, k))
            .collect()
    }

    fn all_accepted(doc: &Documented) -> BTreeSet<String> {
        let top = accepted("");
        let mut out = BTreeSet::new();
        for k in &top {
            if matches!(doc.table.get(k), Some(Value::Table(_))) {
                out.extend(accepted(k));
            } else {
                out.insert(k.clone());
            }
        }
        out
    }

    #[test]
    fn documented_file_lists_exactly_the_keys_config_rs_accepts() {
        let doc = documented().unwrap();
        let have = keys_of(&doc.table);
        let want = all_accepted(&doc);
        let missing: Vec<_> = want.difference(&have).collect();
        let stale: Vec<_> = have.difference(&want).collect();
        assert!(
            missing.is_empty() && stale.is_empty(),
            "packaging/config.toml is out of step with node/src/config.rs: add {missing:?} \
             (as `#key = default` under its table), remove {stale:?}"
        );
        // And the file as a whole is a valid config (every key uncommented).
        let text = toml::to_string(&doc.table).unwrap();
        toml::from_str::<FileConfig>(&text).unwrap();
    }

    /// For each field of config.rs whose doc comment says "(default X)", the
    /// documented file gives X.
    #[test]
    fn documented_defaults_match_config_rs_doc_comments() {
        let src = include_str!("config.rs");
        let doc = documented().unwrap();
        let mut section = String::new();
        let mut pending: Option<String> = None;
        let mut checked = 0;
        for line in src.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("pub struct ") {
                section = match rest.split_whitespace().next().unwrap_or("") {
                    "SellerTable" => "seller",
                    "BuyerTable" => "buyer",
                    "OverlayConfig" => "overlay",
                    "FileConfig" => "",
                    _ => "-",
                }
                .to_string();
            } else if let Some(c) = line.strip_prefix("///") {
                if let Some((_, d)) = c.split_once("(default ") {
                    let v = d.split([')', ':', ',']).next().unwrap_or("").trim();
                    pending = Some(v.trim_matches('"').to_string());
                }
            } else if let Some(field) = line.strip_prefix("pub ") {
                if let (Some(want), false) = (pending.take(), section == "-") {
                    let key = field.split(':').next().unwrap().trim();
                    if want.parse::<f64>().is_err() {
                        continue; // prose such as "half the store cap": checked below
                    }
                    let got = if section.is_empty() {
                        doc.table.get(key)
                    } else {
                        doc.table.get(&section).and_then(|s| s.get(key))
                    };
                    let got = match got {
                        Some(Value::String(s)) => s.clone(),
                        Some(v) => v.to_string(),
                        None => panic!("{section}.{key} is not in packaging/config.toml"),
                    };
                    assert_eq!(got, want, "{section}.{key}: config.rs says default {want}");
                    checked += 1;
                }
            } else if !line.starts_with("#[") {
                pending = None;
            }
        }
        assert!(checked >= 5, "only {checked} documented defaults checked");
    }

    /// The documented defaults are what the code falls back to.
    #[test]
    fn documented_defaults_match_what_the_code_resolves() {
        let d = documented().unwrap().defaults();
        let s = Settings::resolve(
            &GlobalArgs {
                data_dir: Some("/x".into()),
                ..Default::default()
            },
            &DaemonArgs::default(),
        )
        .unwrap();
        let e = effective(None, &s).unwrap();
        for k in ["listen", "bootstrap", "mdns", "log_format", "store_cap_mib"] {
            assert_eq!(d.get(k), e.get(k), "{k}");
        }
        let o = OverlayConfig::default();
        let a = o.admit(None, None, None, None);
        let t = o.attach(None, None, None, None);
        let ov = |k: &str| d["overlay"][k].clone();
        assert_eq!(ov("listen").as_str().unwrap(), a.listen.to_string());
        assert_eq!(ov("tap").as_str().unwrap(), a.tap);
        assert_eq!(ov("host_ip").as_str().unwrap(), a.host_ip.to_string());
        assert_eq!(ov("buyer_ip").as_str().unwrap(), t.buyer_ip.to_string());
        assert_eq!(
            ov("busy_poll_us").as_integer().unwrap() as u64,
            a.busy_poll_us
        );
        let sv = crate::market::seller::SellerSettings::resolve(
            &SellerTable::default(),
            DEFAULT_STORE_CAP_MIB,
        )
        .unwrap();
        let sl = |k: &str| d["seller"][k].clone();
        assert_eq!(
            sl("max_guests").as_integer().unwrap() as u32,
            sv.policy.max_guests
        );
        assert_eq!(sl("vcpus").as_integer().unwrap() as u32, sv.vcpus);
        assert_eq!(sl("memory_mib").as_integer().unwrap() as u64, sv.memory_mib);
        assert_eq!(
            sl("disk_cap_mib").as_integer().unwrap() as u64,
            sv.policy.disk_cap_mib
        );
        assert_eq!(
            market::parse_price(sl("price_per_min").as_str().unwrap()).unwrap(),
            sv.price_per_min
        );
        assert_eq!(
            sl("accel")
                .as_str()
                .unwrap()
                .parse::<vm::qemu::AccelPolicy>()
                .unwrap(),
            sv.accel
        );
        // The jail's: on, the uid range, no CPU cap (100 %).
        let js = crate::cleanup::jail_settings(&s)
            .unwrap()
            .expect("jail on by default");
        assert_eq!(sl("jail").as_str(), Some("on"));
        assert_eq!(
            sl("jail_uid_base").as_integer().unwrap() as u32,
            js.uid_base
        );
        assert_eq!(
            sl("jail_uid_count").as_integer().unwrap() as u32,
            js.uid_count
        );
        assert_eq!(
            sl("max_cpu_percent").as_integer().unwrap() as u32,
            js.max_cpu_percent.unwrap_or(100)
        );
        for k in ["disk_mbps", "disk_iops"] {
            assert!(d["seller"].get(k).is_none(), "{k} has no default");
        }
        // Defaults without a value in the code are not in the defaults table.
        assert!(d["seller"].get("hours").is_none());
        assert!(e["seller"].get("hours").is_none());
    }

    #[test]
    fn file_and_flags_override_defaults_and_output_reparses() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            "store_cap_mib = 1000\n[seller]\nvcpus = 3\nhours = \"18-8\"\n[buyer]\ngrace_s = 9\n",
        )
        .unwrap();
        let global = GlobalArgs {
            config: Some(cfg.clone()),
            data_dir: Some(dir.path().into()),
            log_format: Some(LogFormat::Json),
        };
        let s = Settings::resolve(
            &global,
            &DaemonArgs {
                listen: Some("/ip4/127.0.0.1/tcp/9".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let t = effective(Some(&cfg), &s).unwrap();
        assert_eq!(t["seller"]["vcpus"].as_integer(), Some(3));
        assert_eq!(t["seller"]["max_guests"].as_integer(), Some(2));
        assert_eq!(t["seller"]["hours"].as_str(), Some("18-8"));
        assert_eq!(t["seller"]["disk_cap_mib"].as_integer(), Some(500));
        assert_eq!(t["buyer"]["grace_s"].as_integer(), Some(9));
        assert_eq!(t["buyer"]["silence_s"].as_integer(), Some(30));
        assert_eq!(t["listen"].as_str(), Some("/ip4/127.0.0.1/tcp/9"));
        assert_eq!(t["log_format"].as_str(), Some("json"));
        // The printed TOML is itself a valid config file.
        let text = toml::to_string(&t).unwrap();
        toml::from_str::<FileConfig>(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        // JSON names the unset keys as null.
        let j = to_json(&t, &documented().unwrap().unset);
        assert!(j["buyer"]["trusted"].is_null());
        assert_eq!(j["seller"]["hours"], "18-8");
    }

    #[test]
    fn parse_documented_tells_defaults_examples_and_settings_apart() {
        let d = parse_documented(
            "# prose\nrole = \"seller\"\n#listen = \"x\"\n[seller]\n#hours = \"1-2\"  # example; unset by default\n#vcpus = 1\n",
        )
        .unwrap();
        assert_eq!(d.set, BTreeSet::from(["role".to_string()]));
        assert_eq!(d.unset, BTreeSet::from(["seller.hours".to_string()]));
        let def = d.defaults();
        assert_eq!(
            keys_of(&def),
            BTreeSet::from(["listen".into(), "seller.vcpus".into()])
        );
    }
}
