//! Picking the best backend this host can run a guest with, and saying why.

use crate::backend::{Backend, BackendKind, GuestSpec};
use crate::error::{Error, Result};

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

/// The backends this crate has, most preferred first.
pub fn default_backends() -> Vec<Box<dyn Backend>> {
    Vec::new()
}

/// Picks the best backend for `spec` on this host.
pub fn auto(spec: &GuestSpec) -> Result<Choice> {
    choose(spec, default_backends())
}
