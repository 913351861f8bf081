//! Picking the best backend this host can run a guest with, and saying why.

use crate::backend::{Backend, BackendKind, Guest, GuestSpec, Probe};
use crate::error::{Error, Result};
use crate::qemu::{AccelPolicy, Qemu, QemuConfig};

/// The backend picked for a guest, with the reasons for the pick and for every backend
/// passed over, in preference order.
pub struct Choice {
    pub backend: Box<dyn Backend>,
    /// Why this backend (its probe's sentence).
    pub reason: String,
    /// Backends tried before it and why each could not run the guest.
    pub rejected: Vec<(BackendKind, String)>,
}

impl std::fmt::Debug for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Choice")
            .field("backend", &self.backend.kind())
            .field("reason", &self.reason)
            .field("rejected", &self.rejected)
            .finish()
    }
}

impl Choice {
    /// One line for logs and the CLI: `qemu: <reason> (microvm: <why not>)`.
    pub fn explain(&self) -> String {
        let mut s = format!("{}: {}", self.backend.kind(), self.reason);
        for (kind, why) in &self.rejected {
            s.push_str(&format!(" (not {kind}: {why})"));
        }
        s
    }
}

/// Picks the first backend in `candidates` (most preferred first) whose probe says it
/// can run `spec`.
pub fn choose(spec: &GuestSpec, candidates: Vec<Box<dyn Backend>>) -> Result<Choice> {
    let mut rejected = Vec::new();
    for backend in candidates {
        let probe = backend.probe(spec);
        tracing::debug!(backend = %backend.kind(), usable = probe.usable, reason = %probe.reason, "backend probe");
        if probe.usable {
            return Ok(Choice {
                backend,
                reason: probe.reason,
                rejected,
            });
        }
        rejected.push((backend.kind(), probe.reason));
    }
    Err(Error::NoBackend {
        reasons: rejected
            .into_iter()
            .map(|(k, r)| format!("{k}: {r}"))
            .collect(),
    })
}

/// The microvm, admitted for a direct (Linux) boot only where KVM also passes the
/// Linux instruction probe ([`crate::kvm_probe`]): a KVM that runs tiny guests but
/// cannot emulate what Linux does would otherwise be picked and fail tens of seconds
/// into the boot.
struct MicrovmForLinux(crate::microvm::Microvm);

impl Backend for MicrovmForLinux {
    fn kind(&self) -> BackendKind {
        self.0.kind()
    }

    fn probe(&self, spec: &GuestSpec) -> Probe {
        let p = self.0.probe(spec);
        if !p.usable {
            return p;
        }
        match crate::kvm_probe::linux_instructions() {
            Ok(()) => p,
            Err(Error::KvmUnusable { reason }) => Probe {
                usable: false,
                reason: format!("KVM cannot run Linux here: {reason}"),
            },
            Err(e) => Probe {
                usable: false,
                reason: e.to_string(),
            },
        }
    }

    fn start(&self, spec: GuestSpec) -> Result<Box<dyn Guest>> {
        self.0.start(spec)
    }
}

/// The backends this crate has, most preferred first: the microvm (KVM, direct boot),
/// then qemu configured by `qemu`.
pub fn backends_with(qemu: QemuConfig) -> Vec<Box<dyn Backend>> {
    let mut v: Vec<Box<dyn Backend>> = Vec::new();
    // TCG forced means "no KVM": the microvm is KVM only.
    if qemu.accel != AccelPolicy::Tcg {
        v.push(Box::new(MicrovmForLinux(crate::microvm::Microvm::new())));
    }
    v.push(Box::new(Qemu::new(qemu)));
    v
}

/// The backends with default settings, most preferred first.
pub fn default_backends() -> Vec<Box<dyn Backend>> {
    backends_with(QemuConfig::default())
}

/// Picks the best backend for `spec` on this host.
pub fn auto(spec: &GuestSpec) -> Result<Choice> {
    choose(spec, default_backends())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Boot;

    #[test]
    fn firmware_boot_never_picks_the_microvm_and_says_why() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        let mut spec = GuestSpec::new("t", Boot::Disk);
        spec.disk = Some(crate::backend::DiskSpec::new(file));
        match auto(&spec) {
            Ok(choice) => {
                assert_eq!(choice.backend.kind(), BackendKind::Qemu);
                assert!(
                    choice.explain().contains("not microvm"),
                    "{}",
                    choice.explain()
                );
            }
            // No qemu on this host: the error names both backends.
            Err(Error::NoBackend { reasons }) => {
                assert_eq!(reasons.len(), 2, "{reasons:?}");
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn forced_tcg_leaves_only_qemu() {
        let v = backends_with(QemuConfig {
            accel: AccelPolicy::Tcg,
            ..QemuConfig::default()
        });
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].kind(), BackendKind::Qemu);
    }
}
