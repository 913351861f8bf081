//! One lease on the seller, as processes and devices: fetch the image through the
//! swarm, materialise it (unlinked temp files), make the lease's network namespace
//! and guest tap, join the buyer's overlay, start the guest with the best backend,
//! stream its console, and take it all down again. The lease's state machine
//! (`market::SellerLease`) decides *when*; this does it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use market::{GuestPhase, Lease, LeaseId};
use overlay::io as oio;
use overlay::MacAddr;
use tokio::sync::mpsc;
use tracing::{info, warn};
use vm::qemu::{AccelPolicy, QemuConfig};
use vm::{DiskSpec, GuestSpec, NetSpec, Tap};

use crate::control::{Progress, Reply};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::overlay_leases::LeaseRecord;
use crate::overlay_service::OverlayHandle;
use crate::p2p::P2pHandle;

/// How long a guest asked to stop may take before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Console bytes sent in one message at most.
const CONSOLE_CHUNK: usize = 8 * 1024;

/// What a running lease reports to the seller service.
#[derive(Debug)]
pub enum RunEvent {
    Phase(LeaseId, GuestPhase),
    Started(LeaseId),
    Console(LeaseId, u64, Vec<u8>),
    /// The guest is gone (exited, stopped, or never started: `failed` says why).
    Finished {
        lease: LeaseId,
        failed: Option<String>,
    },
}

/// The seller service's hold on a running lease.
pub struct RunHandle {
    stop: Arc<AtomicBool>,
}

impl RunHandle {
    /// Ask the guest to stop; the run reports `Finished` once it is down.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What a lease run needs from the daemon.
#[derive(Clone)]
pub struct RunCtx {
    pub node: Arc<Node>,
    pub p2p: Arc<P2pHandle>,
    pub overlay: OverlayHandle,
    pub accel: AccelPolicy,
}

/// Short names for the lease's namespace and tap (interface names are at most 15 bytes).
pub fn lease_names(id: &LeaseId) -> (String, String) {
    let h = &id.to_string()[..8];
    (format!("csl-{h}"), format!("cst{h}"))
}

pub fn spawn(
    ctx: RunCtx,
    lease: Lease,
    buyer_udp: SocketAddr,
    events: mpsc::UnboundedSender<RunEvent>,
) -> RunHandle {
    let stop = Arc::new(AtomicBool::new(false));
    let handle = RunHandle { stop: stop.clone() };
    let id = lease.terms.id;
    let span = tracing::info_span!("lease", lease = %id, buyer = %lease.terms.buyer, image = %hex::encode(&lease.terms.image[..8]));
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let failed = match run(ctx, lease, buyer_udp, events.clone(), stop).await {
                Ok(()) => None,
                Err(e) => {
                    warn!(error = %e, "lease run failed");
                    Some(e.to_string())
                }
            };
            let _ = events.send(RunEvent::Finished { lease: id, failed });
        },
        span,
    ));
    handle
}

async fn run(
    ctx: RunCtx,
    lease: Lease,
    buyer_udp: SocketAddr,
    events: mpsc::UnboundedSender<RunEvent>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let t = &lease.terms;
    let id = t.id;
    let image = chunks::ImageId(t.image);

    // 1. The image, through the swarm; progress goes to the buyer.
    let (ptx, mut prx) = mpsc::unbounded_channel();
    let fwd = {
        let events = events.clone();
        tokio::spawn(async move {
            let mut last = std::time::Instant::now() - Duration::from_secs(2);
            while let Some(r) = prx.recv().await {
                if let Reply::Progress(p) = r {
                    if last.elapsed() >= Duration::from_millis(500) || p.done == p.total {
                        last = std::time::Instant::now();
                        let _ = events.send(RunEvent::Phase(
                            id,
                            GuestPhase::Fetching {
                                done: p.done,
                                total: p.total,
                            },
                        ));
                    }
                }
            }
        })
    };
    // the buyer's grant lets us fetch its private image (and share it with the
    // other sellers it granted)
    if let Some(g) = &t.grant {
        ctx.p2p.add_grant(g.clone());
    }
    ctx.p2p.fetch(image, Progress::to_channel(ptx)).await?;
    fwd.abort();
    if stop.load(Ordering::SeqCst) {
        return Ok(());
    }
    let _ = events.send(RunEvent::Phase(id, GuestPhase::Booting));

    // 2. Files, namespace, tap, overlay port, guest: blocking work off the runtime.
    let ev = events.clone();
    let lease2 = lease.clone();
    tokio::task::spawn_blocking(move || boot_and_wait(ctx, lease2, buyer_udp, ev, stop))
        .await
        .map_err(|e| Error::Market(format!("lease task: {e}")))?
}

fn boot_and_wait(
    ctx: RunCtx,
    lease: Lease,
    buyer_udp: SocketAddr,
    events: mpsc::UnboundedSender<RunEvent>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let t = &lease.terms;
    let id = t.id;
    let node = &ctx.node;
    let tmp = crate::guest_files::tmp_dir(&node.settings.data_dir)?;
    let cap = t.disk_mib << 20;
    let prepared = crate::guest_files::from_store(
        &node.store,
        chunks::ImageId(t.image),
        &tmp,
        Some(cap),
        None,
    )?;
    let (ns_name, tap_name) = lease_names(&id);
    let ns = oio::create_lease_netns(&ns_name)?;
    let tap = oio::create_guest_tap(&ns, &tap_name, false)?;
    let record = LeaseRecord::create(&node.settings.data_dir, &ns, &tap_name)?;
    let mac = MacAddr(t.guest_mac);
    ctx.overlay.attach_iface(
        &ns_name,
        &tap_name,
        buyer_udp,
        &hex::encode(t.buyer.0),
        mac,
        t.guest_ip,
        t.buyer_host_ip,
    )?;
    let result = run_guest(&ctx, &lease, &ns_name, prepared, tap, &events, &stop);
    if let Err(e) = ctx.overlay.detach(mac) {
        warn!(error = %e, "overlay detach");
    }
    drop(ns);
    drop(record);
    result
}

/// Which VMM a jailed lease runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JailedVmm {
    /// Our microvm, as a jailed process of its own (`vm::microvm::jailed`).
    Microvm,
    Qemu,
}

/// The jailed lease's VMM: `vm::auto`'s choice among `candidates`, exactly as for an
/// unjailed guest (the microvm where KVM runs Linux and the image boots directly),
/// with the one-line explanation of the pick.
fn jailed_vmm(
    spec: &GuestSpec,
    candidates: Vec<Box<dyn vm::Backend>>,
) -> Result<(JailedVmm, String)> {
    let choice = vm::auto::choose(spec, candidates)?;
    let vmm = match choice.backend.kind() {
        vm::BackendKind::Microvm => JailedVmm::Microvm,
        vm::BackendKind::Qemu => JailedVmm::Qemu,
    };
    Ok((vmm, choice.explain()))
}

/// Starts the guest jailed ([`vm::jail`]): our microvm or qemu, whichever `vm::auto`
/// picks; unless the seller turned the jail off, then the best backend unjailed.
fn start_guest(
    ctx: &RunCtx,
    lease: &Lease,
    ns_name: &str,
    spec: GuestSpec,
) -> Result<(Box<dyn vm::Guest>, Option<crate::cleanup::JailRecord>)> {
    let t = &lease.terms;
    let node = &ctx.node;
    let qemu = QemuConfig {
        accel: ctx.accel,
        ..QemuConfig::default()
    };
    let Some(jailer) = crate::cleanup::jailer(&node.settings)? else {
        let choice = vm::auto::choose(&spec, vm::auto::backends_with(qemu))?;
        info!(backend = %choice.explain(), "starting the guest (not jailed)");
        return Ok((choice.backend.start(spec)?, None));
    };
    let (vmm, why) = jailed_vmm(&spec, vm::auto::backends_with(qemu.clone()))?;
    let mut limits = vm::jail::GuestLimits::for_guest(t.vcpus, t.memory_mib);
    limits.disk_bps = node.settings.seller.disk_mbps.map(|m| m << 20);
    limits.disk_iops = node.settings.seller.disk_iops;
    let name = format!("lease-{}", &t.id.to_string()[..8]);
    let netns = std::path::Path::new("/run/netns").join(ns_name);
    let jail = jailer.jail(&name, limits, Some(&netns))?;
    let record = crate::cleanup::JailRecord::create(
        &node.settings.data_dir,
        &name,
        jail.uid(),
        jail.group(),
    )?;
    info!(uid = jail.uid(), cgroup = ?jail.group().dirs, backend = %why, "starting the guest, jailed");
    let guest: Box<dyn vm::Guest> = match vmm {
        JailedVmm::Microvm => {
            // The VMM is this binary's hidden subcommand.
            let exe = std::env::current_exe()
                .map_err(|e| Error::Market(format!("finding the node binary for the VMM: {e}")))?;
            Box::new(vm::microvm::Microvm::new().start_jailed(spec, jail, &exe)?)
        }
        JailedVmm::Qemu => Box::new(vm::qemu::Qemu::new(qemu).start_jailed(spec, jail)?),
    };
    Ok((guest, Some(record)))
}

fn run_guest(
    ctx: &RunCtx,
    lease: &Lease,
    ns_name: &str,
    prepared: crate::guest_files::Prepared,
    tap: oio::Tap,
    events: &mpsc::UnboundedSender<RunEvent>,
    stop: &AtomicBool,
) -> Result<()> {
    let t = &lease.terms;
    let id = t.id;
    let crate::guest_files::Prepared {
        boot,
        disk,
        keep,
        reserved,
    } = prepared;
    let mut spec = GuestSpec::new(format!("lease-{}", &id.to_string()[..8]), boot);
    spec.vcpus = t.vcpus;
    spec.memory_mib = t.memory_mib;
    spec.disk = disk.map(DiskSpec::new);
    spec.disk_cap_bytes = Some(t.disk_mib << 20);
    spec.net = Some(NetSpec {
        tap: Tap::Fd(tap.into_fd()),
        mac: t.guest_mac,
    });
    spec.wall_clock_limit = t.duration_s.map(Duration::from_secs);
    let (mut guest, jail_record) = start_guest(ctx, lease, ns_name, spec)?;
    let _ = events.send(RunEvent::Started(id));
    let _ = events.send(RunEvent::Phase(id, GuestPhase::Running));
    let console = guest.take_console();
    let printer = console.map(|rx| {
        let events = events.clone();
        std::thread::spawn(move || {
            let mut offset = 0u64;
            while let Ok(first) = rx.recv() {
                let mut buf = first;
                while buf.len() < CONSOLE_CHUNK {
                    match rx.try_recv() {
                        Ok(more) => buf.extend_from_slice(&more),
                        Err(_) => break,
                    }
                }
                for part in buf.chunks(CONSOLE_CHUNK) {
                    let _ = events.send(RunEvent::Console(id, offset, part.to_vec()));
                    offset += part.len() as u64;
                }
            }
        })
    });
    let exit = loop {
        if stop.load(Ordering::SeqCst) {
            break guest.stop(STOP_GRACE)?;
        }
        if let Some(exit) = guest.wait_timeout(Duration::from_millis(300))? {
            break exit;
        }
    };
    info!(%exit, "guest ended");
    // The jail goes with the guest handle; its record after it.
    drop(guest);
    drop(jail_record);
    if let Some(p) = printer {
        let _ = p.join();
    }
    drop(keep);
    drop(reserved);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm::{Backend, BackendKind, Boot, Probe};

    /// A backend whose probe answers as told (the real probes depend on this host's
    /// KVM, which cannot run Linux here).
    struct Stub(BackendKind, bool);

    impl Backend for Stub {
        fn kind(&self) -> BackendKind {
            self.0
        }
        fn probe(&self, _spec: &GuestSpec) -> Probe {
            Probe {
                usable: self.1,
                reason: if self.1 {
                    "ok"
                } else {
                    "KVM cannot run Linux here"
                }
                .into(),
            }
        }
        fn start(&self, _spec: GuestSpec) -> vm::Result<Box<dyn vm::Guest>> {
            unreachable!("the choice never starts a guest")
        }
    }

    fn direct_spec() -> GuestSpec {
        GuestSpec::new(
            "t",
            Boot::Direct {
                kernel: "/boot/vmlinuz".into(),
                initrd: None,
                cmdline: String::new(),
            },
        )
    }

    #[test]
    fn jailed_lease_runs_the_microvm_where_it_is_usable_else_qemu() {
        let both = |microvm_ok| -> Vec<Box<dyn Backend>> {
            vec![
                Box::new(Stub(BackendKind::Microvm, microvm_ok)),
                Box::new(Stub(BackendKind::Qemu, true)),
            ]
        };
        let (vmm, why) = jailed_vmm(&direct_spec(), both(true)).unwrap();
        assert_eq!(vmm, JailedVmm::Microvm, "{why}");
        let (vmm, why) = jailed_vmm(&direct_spec(), both(false)).unwrap();
        assert_eq!(vmm, JailedVmm::Qemu);
        assert!(
            why.contains("not microvm: KVM cannot run Linux here"),
            "{why}"
        );
        let none: Vec<Box<dyn Backend>> = vec![
            Box::new(Stub(BackendKind::Microvm, false)),
            Box::new(Stub(BackendKind::Qemu, false)),
        ];
        assert!(jailed_vmm(&direct_spec(), none).is_err());
    }

    #[test]
    fn jailed_lease_candidates_are_vm_autos() {
        // The real candidates: the microvm first (unless TCG is forced), then qemu.
        let kinds = |accel| {
            vm::auto::backends_with(QemuConfig {
                accel,
                ..QemuConfig::default()
            })
            .iter()
            .map(|b| b.kind())
            .collect::<Vec<_>>()
        };
        assert_eq!(
            kinds(AccelPolicy::Auto),
            [BackendKind::Microvm, BackendKind::Qemu]
        );
        assert_eq!(kinds(AccelPolicy::Tcg), [BackendKind::Qemu]);
        // A disk image (firmware boot) never goes to the microvm.
        let disk = tempfile::tempfile().unwrap();
        disk.set_len(1 << 20).unwrap();
        let mut spec = GuestSpec::new("t", Boot::Disk);
        spec.disk = Some(DiskSpec::new(disk));
        match jailed_vmm(&spec, vm::auto::backends_with(QemuConfig::default())) {
            Ok((vmm, why)) => {
                assert_eq!(vmm, JailedVmm::Qemu);
                assert!(why.contains("not microvm"), "{why}");
            }
            Err(e) => assert!(e.to_string().contains("microvm"), "{e}"),
        }
    }
}
