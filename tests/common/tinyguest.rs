//! Tiny guest programs for the microvm tests, assembled and linked at test time from
//! tests/guests/ (binutils' `as` and `ld`), so no binary guest is committed.

use std::path::{Path, PathBuf};

/// Where the guest sources (lib64.S, link.ld) live.
pub fn guests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("guests")
}

/// Run a build tool, panicking with its stderr when it fails.
pub fn run_tool(prog: &str, args: &[&str]) {
    let out = std::process::Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog} (install binutils): {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Assemble `src` into `dir/<name>.elf`, linked at 1 MiB by tests/guests/link.ld.
/// 64-bit guests get tests/guests/lib64.S (puts, putc, puthex) linked in.
pub fn build_guest(dir: &Path, name: &str, src: &str, with_lib: bool) -> PathBuf {
    let s = dir.join(format!("{name}.S"));
    std::fs::write(&s, src).unwrap();
    let o = dir.join(format!("{name}.o"));
    run_tool(
        "as",
        &["--64", "-o", o.to_str().unwrap(), s.to_str().unwrap()],
    );
    let mut objs = vec![o.to_str().unwrap().to_string()];
    if with_lib {
        let lo = dir.join("lib64.o");
        if !lo.exists() {
            let lib = guests_dir().join("lib64.S");
            run_tool(
                "as",
                &["--64", "-o", lo.to_str().unwrap(), lib.to_str().unwrap()],
            );
        }
        objs.push(lo.to_str().unwrap().to_string());
    }
    let elf = dir.join(format!("{name}.elf"));
    let ld_script = guests_dir().join("link.ld");
    let mut args = vec![
        "-m".to_string(),
        "elf_x86_64".into(),
        "-T".into(),
        ld_script.to_str().unwrap().into(),
        "-o".into(),
        elf.to_str().unwrap().into(),
    ];
    args.extend(objs);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_tool("ld", &args);
    elf
}
