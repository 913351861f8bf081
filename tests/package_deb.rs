//! The seller's home-daemon package (issue 13): `cargo deb` builds it, `dpkg -i`
//! installs it and creates the `cpushare` user, `systemd-analyze verify` accepts the
//! unit, and the daemon started exactly as the unit's ExecStart would run it (its
//! User=, Group=, AmbientCapabilities=, CapabilityBoundingSet= and NoNewPrivileges=,
//! applied with `setpriv`, after its root ExecStartPre) fetches a buyer's image and
//! runs a jailed guest from it. Then `dpkg --purge` takes the package away again.
//!
//! The unit's sandboxing directives (ProtectSystem=, PrivateTmp=, ...) need systemd
//! as PID 1 to apply, which a CI container lacks: `systemd-analyze verify` checks
//! them, the run here checks the user and capabilities.
//!
//! Needs root and the cargo-deb tool (`cargo install cargo-deb`; .ci/run installs
//! it). Names carry the prefix `cpk`.

#[path = "common/vmguest.rs"]
mod vmguest;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use cpushare_tests::netns::{veth, Netns};
use cpushare_tests::node::{cli, NodeProc};
use cpushare_tests::{node_bin, require_root, wait_until};

const UNIT: &str = "/usr/lib/systemd/system/cpushare-node.service";
/// Numbers of the capabilities systemd and setpriv name (linux/capability.h).
const CAP_BITS: &[(&str, u8)] = &[
    ("CAP_CHOWN", 0),
    ("CAP_DAC_OVERRIDE", 1),
    ("CAP_FOWNER", 3),
    ("CAP_KILL", 5),
    ("CAP_SETGID", 6),
    ("CAP_SETUID", 7),
    ("CAP_SETPCAP", 8),
    ("CAP_NET_ADMIN", 12),
    ("CAP_NET_RAW", 13),
    ("CAP_SYS_CHROOT", 18),
    ("CAP_SYS_PTRACE", 19),
    ("CAP_SYS_ADMIN", 21),
    ("CAP_MKNOD", 27),
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// Runs `cmd`; Err carries its stderr.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `cargo deb` runs here; under CI its absence fails the test.
fn have_cargo_deb(cargo: &str) -> bool {
    let ok = Command::new(cargo)
        .args(["deb", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "cargo-deb is missing and CI is set: `cargo install cargo-deb` (.ci/run does)"
        );
        eprintln!("skipping: cargo-deb is not installed (`cargo install cargo-deb`)");
    }
    ok
}

/// `cargo deb` from the binary the tests run (no rebuild); returns the .deb.
fn build_deb(cargo: &str, out: &Path) -> Result<PathBuf> {
    let bin = node_bin();
    let profile = bin.parent().context("binary dir")?;
    let target = profile.parent().context("target dir")?;
    // cargo-deb maps the assets' target/release/ onto this profile's directory.
    let name = profile.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let profile_arg = if name == "debug" { "dev" } else { name };
    run(Command::new(cargo)
        .current_dir(repo_root())
        .env("CARGO_TARGET_DIR", target)
        .args([
            "deb",
            "-p",
            "node",
            "--no-build",
            "--profile",
            profile_arg,
            "--output",
        ])
        .arg(out))?;
    std::fs::read_dir(out)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("cargo deb wrote no .deb")
}

/// The values of `key=` lines in the unit's text (a key may repeat).
fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    let prefix = format!("{key}=");
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .collect()
}

fn unit_value<'a>(unit: &'a str, key: &str) -> Result<&'a str> {
    match unit_values(unit, key).as_slice() {
        [one] => Ok(one),
        v => bail!("{key}= appears {} times in the unit", v.len()),
    }
}

/// What the unit gives the daemon, as setpriv arguments.
struct ServiceCreds {
    user: String,
    group: String,
    caps: Vec<String>,
    no_new_privs: bool,
    exec_start: Vec<String>,
    exec_start_pre: Vec<String>,
}

impl ServiceCreds {
    fn of_unit(unit: &str) -> Result<ServiceCreds> {
        let words = |k: &str| -> Result<Vec<String>> {
            Ok(unit_value(unit, k)?
                .split_whitespace()
                .map(str::to_string)
                .collect())
        };
        let caps = words("AmbientCapabilities")?;
        let mut bounding = words("CapabilityBoundingSet")?;
        let mut sorted = caps.clone();
        sorted.sort();
        bounding.sort();
        ensure!(
            sorted == bounding,
            "ambient {sorted:?} != bounding {bounding:?}"
        );
        // ExecStartPre=+CMD: `+` runs it with full privileges (as root).
        let pre = words("ExecStartPre")?;
        let pre: Vec<String> = pre
            .iter()
            .enumerate()
            .map(|(i, w)| {
                if i == 0 {
                    w.trim_start_matches('+').to_string()
                } else {
                    w.clone()
                }
            })
            .collect();
        Ok(ServiceCreds {
            user: unit_value(unit, "User")?.to_string(),
            group: unit_value(unit, "Group")?.to_string(),
            caps,
            no_new_privs: unit_value(unit, "NoNewPrivileges")? == "yes",
            exec_start: words("ExecStart")?,
            exec_start_pre: pre,
        })
    }

    /// The capability mask the daemon must end up with (effective = bounding).
    fn mask(&self) -> Result<u64> {
        self.caps.iter().try_fold(0u64, |m, c| {
            let bit = CAP_BITS
                .iter()
                .find(|(n, _)| n == c)
                .with_context(|| format!("{c}: add its number to CAP_BITS"))?
                .1;
            Ok(m | 1 << bit)
        })
    }

    /// `setpriv` arguments that give a process what systemd gives the service.
    fn setpriv(&self) -> Vec<String> {
        let list: Vec<String> = self
            .caps
            .iter()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect();
        let list = list.join(",");
        let mut v: Vec<String> = [
            "setpriv",
            "--reuid",
            &self.user,
            "--regid",
            &self.group,
            // As User= does: the user's supplementary groups (e.g. kvm) from /etc/group.
            "--init-groups",
            "--inh-caps",
            &list,
            "--ambient-caps",
            &list,
            "--bounding-set",
            &format!("-all,{list}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.no_new_privs {
            v.push("--no-new-privs".into());
        }
        v.push("--".into());
        v
    }
}

fn status_field(pid: u32, key: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
}

/// /dev/net/tun as Debian's udev makes it (mode 0666: any user may open it, the
/// kernel checks CAP_NET_ADMIN for what matters); restored on drop.
struct TunMode(Option<u32>);

impl TunMode {
    fn udev_default() -> Result<TunMode> {
        let p = Path::new("/dev/net/tun");
        let mode = std::fs::metadata(p)?.permissions().mode() & 0o7777;
        if mode & 0o006 == 0o006 {
            return Ok(TunMode(None));
        }
        eprintln!("/dev/net/tun has mode {mode:04o} here; giving it udev's 0666 for the test");
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o666))?;
        Ok(TunMode(Some(mode)))
    }
}

impl Drop for TunMode {
    fn drop(&mut self) {
        if let Some(m) = self.0 {
            let _ = std::fs::set_permissions("/dev/net/tun", std::fs::Permissions::from_mode(m));
        }
    }
}

/// Tests here change host-wide things (the package, /dev/net/tun): one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `dpkg --purge` on drop, so a failed run leaves no package behind.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", "cpushare-node"])
            .stdout(Stdio::null())
            .status();
    }
}

#[test]
fn deb_installs_and_its_unit_runs_a_guest_as_the_cpushare_user() -> Result<()> {
    if !require_root("dpkg -i, network namespaces, taps, qemu, cgroups") {
        return Ok(());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    if !have_cargo_deb(&cargo) {
        return Ok(());
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir()?;

    // 1. The .deb builds and holds the binary, unit, helper and config file.
    let deb = build_deb(&cargo, tmp.path())?;
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb))?;
    for f in [
        "./usr/bin/cpushare-node",
        "./usr/lib/systemd/system/cpushare-node.service",
        "./usr/lib/cpushare/prepare-host",
        "./etc/cpushare/config.toml",
    ] {
        ensure!(listing.contains(f), "{f} is not in the package:\n{listing}");
    }

    // 2. dpkg -i installs it and creates the user.
    let _ = Command::new("dpkg")
        .args(["--purge", "cpushare-node"])
        .stdout(Stdio::null())
        .status();
    // A user left by an earlier install (purge keeps it) would hide whether this
    // one creates it.
    if Command::new("getent")
        .args(["passwd", "cpushare"])
        .output()?
        .status
        .success()
    {
        run(Command::new("userdel").arg("cpushare"))?;
    }
    let _ = Command::new("groupdel")
        .arg("cpushare")
        .stderr(Stdio::null())
        .status();
    run(Command::new("dpkg").arg("-i").arg(&deb))?;
    let _installed = Installed;
    let pw = run(Command::new("getent").args(["passwd", "cpushare"]))?;
    let f: Vec<&str> = pw.trim().split(':').collect();
    ensure!(f.len() == 7, "getent passwd: {pw}");
    let uid: u32 = f[2].parse()?;
    ensure!(
        uid != 0 && uid < 1000,
        "cpushare is not a system user: {pw}"
    );
    ensure!(f[5] == "/var/lib/cpushare", "home: {pw}");
    ensure!(
        f[6].ends_with("nologin") || f[6].ends_with("false"),
        "shell: {pw}"
    );
    run(Command::new("getent").args(["group", "cpushare"]))?;
    let home = std::fs::metadata("/var/lib/cpushare")?;
    {
        use std::os::unix::fs::MetadataExt;
        ensure!(home.uid() == uid, "/var/lib/cpushare is not the user's");
        ensure!(
            home.mode() & 0o077 == 0,
            "/var/lib/cpushare mode {:o}",
            home.mode()
        );
    }
    let conf = std::fs::read_to_string("/etc/cpushare/config.toml")?;
    ensure!(
        conf == include_str!("../packaging/config.toml"),
        "installed config differs"
    );
    // The installed binary reads the installed config.
    let eff = run(Command::new("/usr/bin/cpushare-node").args([
        "--config",
        "/etc/cpushare/config.toml",
        "config",
    ]))?;
    ensure!(eff.contains("role = \"seller\""), "{eff}");
    ensure!(eff.contains("data_dir = \"/var/lib/cpushare\""), "{eff}");

    // 3. systemd-analyze verify accepts the installed unit, with nothing to say.
    let unit = std::fs::read_to_string(UNIT)?;
    ensure!(unit == include_str!("../packaging/cpushare-node.service"));
    let v = Command::new("systemd-analyze")
        .args(["verify", UNIT])
        .output()?;
    let said = String::from_utf8_lossy(&v.stderr).into_owned();
    ensure!(
        v.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    // ... and it does have something to say about a broken copy (the check can fail).
    let bad = tmp.path().join("cpushare-node.service");
    std::fs::write(
        &bad,
        unit.replace("ProtectSystem=strict", "ProtectSystem=strickt"),
    )?;
    let v = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&bad)
        .output()?;
    ensure!(
        !String::from_utf8_lossy(&v.stderr).trim().is_empty(),
        "systemd-analyze verify accepted a bad ProtectSystem="
    );

    // 4. The daemon as the unit runs it passes a fetch-and-run test.
    let creds = ServiceCreds::of_unit(&unit)?;
    ensure!(creds.user == "cpushare" && creds.group == "cpushare");
    let _tun = TunMode::udev_default()?;
    fetch_and_run(&creds, uid)?;

    // 5. Purge removes the data dir; the user stays (Debian's way with system users).
    drop(_installed);
    ensure!(
        !Path::new("/usr/bin/cpushare-node").exists(),
        "binary left after purge"
    );
    ensure!(
        !Path::new("/var/lib/cpushare").exists(),
        "data dir left after purge"
    );
    ensure!(
        !Path::new("/etc/cpushare/config.toml").exists(),
        "config left after purge"
    );
    Ok(())
}

fn cfg(path: &Path, text: &str) -> Result<String> {
    std::fs::create_dir_all(path.parent().context("config dir")?)?;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    Ok(path.display().to_string())
}

fn fetch_and_run(creds: &ServiceCreds, uid: u32) -> Result<()> {
    let tag = std::process::id() % 10000;
    let b = Netns::new(&format!("cpk{tag}b"))?;
    let s = Netns::new(&format!("cpk{tag}s"))?;
    veth(&b, "eth0", "10.213.0.1/24", &s, "eth0", "10.213.0.2/24")?;

    // The buyer: the workspace binary, as root, as other tests run it.
    let btmp = tempfile::tempdir_in(vmguest::scratch_dir())?;
    let bdir = btmp.path().join("buyer");
    let bcfg = cfg(
        &bdir.join("node.toml"),
        "[buyer]\nbilling_period_s = 5\ngrace_s = 60\nsilence_s = 60\n",
    )?;
    let buyer = NodeProc::spawn(
        &["ip", "netns", "exec", b.name()],
        &bdir,
        "buyer",
        &["--listen", "/ip4/0.0.0.0/tcp/7450", "--config", &bcfg],
    )?;
    let boot = format!("/ip4/10.213.0.1/tcp/7450/p2p/{}", buyer.peer_id);

    // The seller: the installed binary, its data under the package's state dir.
    let sdir = tempfile::Builder::new()
        .prefix("cpk-test-")
        .tempdir_in("/var/lib/cpushare")?;
    run(Command::new("chown")
        .arg(format!("{}:{}", creds.user, creds.group))
        .arg(sdir.path()))?;
    std::fs::set_permissions(sdir.path(), std::fs::Permissions::from_mode(0o700))?;
    let data = sdir.path().join("data");
    let scfg = cfg(
        &sdir.path().join("config.toml"),
        &format!(
            "role = \"seller\"\ndata_dir = \"{}\"\nlisten = \"/ip4/0.0.0.0/tcp/7450\"\n\
             bootstrap = [\"{boot}\"]\n[seller]\nmax_guests = 1\nvcpus = 1\nmemory_mib = 256\n\
             accel = \"tcg\"\n",
            data.display()
        ),
    )?;
    // The unit's ExecStartPre=+ (as root), then its ExecStart with this config
    // instead of /etc/cpushare/config.toml, under the unit's user and capabilities.
    let (pre, pre_args) = creds.exec_start_pre.split_first().context("ExecStartPre")?;
    run(Command::new(pre).args(pre_args))?;
    let mut exec = creds.exec_start.clone();
    let at = exec
        .iter()
        .position(|a| a == "--config")
        .context("ExecStart --config")?;
    exec[at + 1] = scfg.clone();
    ensure!(exec[0] == "/usr/bin/cpushare-node", "ExecStart: {exec:?}");
    let log_path = sdir.path().join("daemon.log");
    let mut seller = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", s.name()))
        .args(creds.setpriv())
        .args(&exec)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()?;
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let seller_status = || {
        cli(&data, &["status", "--json"])
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
    };
    let result = (|| -> Result<()> {
        let up = wait_until(Duration::from_secs(60), || {
            seller_status().is_some() || seller.try_wait().ok().flatten().is_some()
        });
        ensure!(
            up && seller_status().is_some(),
            "the packaged seller did not come up:\n{}",
            log()
        );

        // It runs as the unit says: user, groups, exactly the unit's capabilities.
        // nsenter and setpriv exec: the child is the daemon itself.
        let pid = seller.id();
        let field = |k: &str| status_field(pid, k).unwrap_or_default();
        let want = format!("{:016x}", creds.mask()?);
        eprintln!(
            "seller pid {pid}: Uid {} CapEff {} CapBnd {} CapAmb {} NoNewPrivs {}",
            field("Uid"),
            field("CapEff"),
            field("CapBnd"),
            field("CapAmb"),
            field("NoNewPrivs")
        );
        ensure!(
            field("Uid")
                .split_whitespace()
                .all(|u| u == uid.to_string()),
            "Uid {}",
            field("Uid")
        );
        ensure!(
            field("CapEff") == want,
            "CapEff {} (want {want})",
            field("CapEff")
        );
        ensure!(
            field("CapBnd") == want,
            "CapBnd {} (want {want})",
            field("CapBnd")
        );
        ensure!(field("NoNewPrivs") == "1");
        // ... and keeps them from the programs it runs.
        ensure!(
            field("CapAmb") == "0000000000000000",
            "CapAmb {}",
            field("CapAmb")
        );

        // Fetch and run: the buyer's image, fetched by the seller, runs as a guest.
        let files = vmguest::test_guest();
        let out = buyer.cli_ok(&[
            "image",
            "import",
            "--kernel",
            &files.vmlinuz.display().to_string(),
            "--initrd",
            &files.initrd.display().to_string(),
            "--cmdline",
            &vmguest::cmdline("echo cs-up", "cs.keep"),
        ])?;
        let image = out
            .split_whitespace()
            .find(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
            .context("image id in import output")?
            .to_string();
        let offered = wait_until(Duration::from_secs(90), || {
            buyer
                .status()
                .ok()
                .and_then(|v| v["market"]["offers"].as_u64())
                .is_some_and(|o| o >= 1)
        });
        ensure!(offered, "no offer from the packaged seller:\n{}", log());
        buyer.cli_ok(&[
            "run", "--image", &image, "--count", "1", "--detach", "--json",
        ])?;
        let mut leases = serde_json::Value::Null;
        let running = wait_until(Duration::from_secs(240), || {
            leases = buyer
                .cli_ok(&["leases", "--json"])
                .ok()
                .and_then(|o| serde_json::from_str(&o).ok())
                .unwrap_or_default();
            leases
                .as_array()
                .or_else(|| leases["leases"].as_array())
                .is_some_and(|v| v.iter().any(|l| l["state"] == "running"))
        });
        ensure!(running, "no lease ran: {leases}\nseller log:\n{}", log());
        // The guest's VMM runs jailed (the seller's jail record names its cgroup),
        // under a uid of its own: not root, not the daemon's.
        let mut vmms = Vec::new();
        for e in std::fs::read_dir(data.join("jails"))?.flatten() {
            let j: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path())?)?;
            for d in j["group"]["dirs"].as_array().into_iter().flatten() {
                let procs =
                    Path::new(d["path"].as_str().unwrap_or("/nonexistent")).join("cgroup.procs");
                for p in std::fs::read_to_string(procs).unwrap_or_default().lines() {
                    let p: u32 = p.trim().parse()?;
                    vmms.push((p, status_field(p, "Uid").unwrap_or_default()));
                }
            }
        }
        vmms.sort();
        vmms.dedup(); // one process, listed in each v1 hierarchy
        eprintln!("guest VMMs (pid, Uid): {vmms:?}");
        ensure!(!vmms.is_empty(), "no jailed VMM found:\n{}", log());
        for (p, u) in &vmms {
            ensure!(
                !u.split_whitespace()
                    .any(|x| x == "0" || x == uid.to_string()),
                "VMM {p} runs as root or as the daemon: Uid {u}"
            );
        }

        // SIGTERM (systemd's stop) ends the guest and the daemon cleanly.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let st = seller.wait()?;
        ensure!(
            st.success(),
            "the seller exited with {st} on SIGTERM:\n{}",
            log()
        );
        Ok(())
    })();
    let _ = seller.kill();
    let _ = seller.wait();
    if result.is_err() {
        eprintln!("seller log:\n{}", log());
    }
    drop(buyer);
    result
}

/// A seller started without the capabilities it needs names them in one line and
/// exits; one without /dev/kvm falls back to TCG (accel auto) or exits (accel kvm).
#[test]
fn seller_without_privileges_says_which_and_exits_or_falls_back() -> Result<()> {
    if !require_root("setpriv to another user") {
        return Ok(());
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let _tun = TunMode::udev_default()?;
    let tmp = tempfile::tempdir()?;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))?;
    // nobody: a user with no capabilities and no groups.
    let nobody = "65534";
    let start = |name: &str, accel: &str, caps: Option<&str>| -> Result<Child> {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir)?;
        run(Command::new("chown")
            .arg(format!("{nobody}:{nobody}"))
            .arg(&dir))?;
        let conf = cfg(
            &tmp.path().join(format!("{name}.toml")),
            &format!(
                "role = \"seller\"\ndata_dir = \"{}\"\nlisten = \"/ip4/127.0.0.1/tcp/0\"\n[seller]\naccel = \"{accel}\"\njail = \"off\"\n",
                dir.join("data").display()
            ),
        )?;
        let mut c = Command::new("setpriv");
        c.args(["--reuid", nobody, "--regid", nobody, "--clear-groups"]);
        if let Some(list) = caps {
            c.args(["--inh-caps", list, "--ambient-caps", list]);
            c.arg("--bounding-set").arg(format!("-all,{list}"));
        }
        c.arg("--")
            .arg(node_bin())
            .args(["--config", &conf])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log"))?);
        Ok(c.spawn()?)
    };
    let log =
        |name: &str| std::fs::read_to_string(tmp.path().join(name).join("log")).unwrap_or_default();

    // No capabilities at all: one line naming each, then exit 1.
    let st = start("nocaps", "tcg", None)?.wait()?;
    let l = log("nocaps");
    eprintln!("without capabilities: {st}: {l}");
    ensure!(!st.success(), "started without capabilities:\n{l}");
    let errs: Vec<&str> = l.lines().filter(|x| x.contains("lacks")).collect();
    ensure!(errs.len() == 1, "not one line: {l}");
    let unit = include_str!("../packaging/cpushare-node.service");
    for c in unit_value(unit, "AmbientCapabilities")?.split_whitespace() {
        ensure!(errs[0].contains(c), "{c} is not named: {}", errs[0]);
    }

    // Every capability but CAP_NET_ADMIN: only that one is named.
    let creds = ServiceCreds::of_unit(unit)?;
    let all: Vec<String> = creds
        .caps
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let but_net: Vec<&str> = all
        .iter()
        .map(String::as_str)
        .filter(|c| *c != "+net_admin")
        .collect();
    let st = start("nonet", "tcg", Some(&but_net.join(",")))?.wait()?;
    let l = log("nonet");
    ensure!(!st.success(), "started without CAP_NET_ADMIN:\n{l}");
    let errs: Vec<&str> = l.lines().filter(|x| x.contains("lacks")).collect();
    ensure!(
        errs.len() == 1 && errs[0].contains("CAP_NET_ADMIN") && !errs[0].contains("CAP_SYS_ADMIN"),
        "{l}"
    );

    // /dev/kvm: only where nobody cannot open it (mode without o+rw).
    let kvm = std::fs::metadata("/dev/kvm").map(|m| m.permissions().mode() & 0o006 == 0o006);
    if kvm.unwrap_or(false) {
        eprintln!("/dev/kvm is open to every user here: the KVM fallback is not exercised");
        return Ok(());
    }
    let all = all.join(",");
    let st = start("kvm", "kvm", Some(&all))?.wait()?;
    let l = log("kvm");
    eprintln!("accel kvm without /dev/kvm: {st}: {l}");
    ensure!(
        !st.success() && l.contains("/dev/kvm") && l.contains("seller.accel"),
        "{l}"
    );

    let mut auto = start("auto", "auto", Some(&all))?;
    let data = tmp.path().join("auto").join("data");
    let up = wait_until(Duration::from_secs(60), || {
        cli(&data, &["status", "--json"]).is_ok_and(|o| o.status.success())
            || auto.try_wait().ok().flatten().is_some()
    });
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(auto.id() as i32, libc::SIGTERM) };
    let st = auto.wait()?;
    let l = log("auto");
    eprintln!("accel auto without /dev/kvm: {st}");
    ensure!(up, "did not come up with accel auto:\n{l}");
    // One warning names /dev/kvm; the market then sells TCG without another.
    let warns: Vec<&str> = l
        .lines()
        .filter(|x| x.contains(" WARN ") || x.contains(" ERROR "))
        .filter(|x| x.to_lowercase().contains("kvm"))
        .collect();
    ensure!(
        warns.len() == 1 && warns[0].contains("falling back to TCG"),
        "not one fallback line:\n{l}"
    );
    Ok(())
}

/// Type=notify as systemd sees it: the daemon sends READY=1 once it serves (with a
/// STATUS= line), WATCHDOG=1 while it runs when WATCHDOG_USEC asks for it, and
/// STOPPING=1 on SIGTERM. The test plays systemd's part: it binds the datagram
/// socket that NOTIFY_SOCKET names. A buyer daemon: no privileges needed.
#[test]
fn daemon_tells_systemd_ready_watchdog_and_stopping() -> Result<()> {
    use std::os::unix::net::UnixDatagram;
    let tmp = tempfile::tempdir()?;
    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path)?;
    sock.set_read_timeout(Some(Duration::from_secs(60)))?;
    let data = tmp.path().join("data");
    let mut daemon = Command::new(node_bin())
        .args([
            "--role",
            "buyer",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--data-dir",
        ])
        .arg(&data)
        .env("NOTIFY_SOCKET", &sock_path)
        // Ping every second (half the period); WATCHDOG_PID is left unset.
        .env("WATCHDOG_USEC", "2000000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tmp.path().join("log"))?)
        .spawn()?;
    let log = || std::fs::read_to_string(tmp.path().join("log")).unwrap_or_default();
    let mut seen: Vec<String> = Vec::new();
    let recv_until = |want: &str, seen: &mut Vec<String>| -> Result<()> {
        let mut buf = [0u8; 4096];
        while !seen.iter().any(|m| m.lines().any(|l| l == want)) {
            let n = sock
                .recv(&mut buf)
                .with_context(|| format!("no {want} (got {seen:?}); log:\n{}", log()))?;
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        Ok(())
    };
    let result = (|| -> Result<()> {
        recv_until("READY=1", &mut seen)?;
        // Ready means serving: the control socket answers now.
        let out = cli(&data, &["status", "--json"])?;
        ensure!(
            out.status.success(),
            "READY=1 before the control socket served"
        );
        let ready = seen.iter().find(|m| m.contains("READY=1")).unwrap();
        ensure!(ready.contains("STATUS=serving as buyer"), "{ready:?}");
        recv_until("WATCHDOG=1", &mut seen)?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
        recv_until("STOPPING=1", &mut seen)?;
        let st = daemon.wait()?;
        ensure!(st.success(), "exit on SIGTERM: {st}\n{}", log());
        Ok(())
    })();
    let _ = daemon.kill();
    let _ = daemon.wait();
    eprintln!("notifications: {seen:?}");
    result
}
