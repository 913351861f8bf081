//! The long-running daemon: identity, chunk store, services, control socket.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Instant;

use sd_notify::NotifyState;
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, info_span, warn, Instrument};

use crate::config::Settings;
use crate::control::{self, Router};
use crate::domain::Role;
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::image_service;
use crate::node::Node;

pub fn run(settings: Settings, role: Role) -> Result<()> {
    // Before any thread exists (see `join_host_mounts`). Not under systemd
    // (INVOCATION_ID is set for every unit it starts): the unit's sandboxing gives
    // the service its own mount namespace on purpose, and its VMMs, our children,
    // see the lease namespaces bound there.
    if role == Role::Seller && std::env::var_os("INVOCATION_ID").is_none() {
        crate::overlay_leases::join_host_mounts();
    }
    // Also while single-threaded: what we exec gets none of our capabilities.
    let cleared = crate::privileges::keep_from_children()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))?;
    if cleared > 0 {
        info!(
            capabilities = cleared,
            "ambient capabilities cleared: programs this daemon runs do not inherit them"
        );
    }
    rt.block_on(run_async(settings, role))
}

/// Tells systemd (Type=notify) what we are doing; a no-op outside systemd (no
/// NOTIFY_SOCKET). A failed send is logged, never fatal.
fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "telling systemd our state failed");
    }
}

fn status(line: &str) {
    notify(&[NotifyState::Status(line)]);
}

async fn run_async(mut settings: Settings, role: Role) -> Result<()> {
    if role == Role::Seller {
        // Before anything is created: a capability or device the lease path needs
        // is named now, in one line, not at the first lease.
        status("checking capabilities and devices");
        if crate::privileges::check_seller(settings.seller.accel.as_deref())? {
            // No /dev/kvm, said in one line above: the market sells TCG guests
            // without probing KVM (and warning) again.
            settings.seller.accel = Some("tcg".into());
        }
    }
    let dir = &settings.data_dir;
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating data dir {}", dir.display()), e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("chmod 700 {}", dir.display()), e))?;

    // Claim the control socket first: a second daemon on this data dir stops here,
    // before it touches the store.
    let socket = settings.control_socket();
    let listener = control::bind(&socket, dir)?;

    // Holding the socket, we are the only daemon on this data dir: remove lease
    // namespaces a killed predecessor left behind.
    status("removing what an earlier run left");
    crate::overlay_leases::sweep(dir);
    // ... and guests' VMMs, cgroups and temp files; then set up the guest jail.
    crate::cleanup::at_start(&settings, role == Role::Seller);

    status("opening the identity and chunk store");
    let identity = Identity::load_or_create(&settings.identity_file())?;
    let peer_id = identity.peer_id();
    // Printed on stdout so scripts and tests can read it.
    println!("peer id: {peer_id}");
    let span = info_span!("node", peer = %peer_id, role = role.as_str());

    let store = chunks::ChunkStore::open(settings.store_dir(), settings.store_cap_mib << 20)?;
    let node = Arc::new(Node {
        settings: settings.clone(),
        role,
        identity,
        store: Arc::new(store),
    });

    let mut router = Router::default();
    let started = Instant::now();
    {
        let node = node.clone();
        router.status_section("node", move || {
            json!({
                "peer_id": node.identity.peer_id().to_string(),
                "public_key": node.identity.public_hex(),
                "role": node.role.as_str(),
                "data_dir": node.settings.data_dir.display().to_string(),
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_s": started.elapsed().as_secs(),
            })
        });
    }
    status("starting the network and market services");
    image_service::register(&mut router, node.clone());
    let overlay = crate::overlay_service::register(&mut router, node.clone());
    let p2p = crate::p2p::start(node.clone(), &mut router)?;
    let market = crate::market::start(node.clone(), &mut router, p2p, overlay)?;

    // Before the control socket answers: a client that saw us ready may stop us at
    // once, and a SIGTERM before these exist would kill us without a shutdown.
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::io("signal handler", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::io("signal handler", e))?;
    let router = Arc::new(router);
    let server = tokio::spawn(control::serve(listener, router.clone()).instrument(span.clone()));
    info!(parent: &span, control = %socket.display(), "daemon ready");
    let serving = format!("serving as {} (peer {peer_id})", role.as_str());
    notify(&[NotifyState::Ready, NotifyState::Status(&serving)]);

    // WatchdogSec: ping at half the period from this loop, and only while the control
    // server runs, so a wedged runtime or a dead server gets us restarted.
    let watchdog = sd_notify::watchdog_enabled();
    let mut tick =
        tokio::time::interval(watchdog.map_or(std::time::Duration::from_secs(3600), |d| d / 2));
    loop {
        tokio::select! {
            _ = term.recv() => { info!(parent: &span, "SIGTERM: shutting down"); break }
            _ = int.recv() => { info!(parent: &span, "SIGINT: shutting down"); break }
            _ = tick.tick() => {
                if watchdog.is_some() && !server.is_finished() {
                    notify(&[NotifyState::Watchdog]);
                }
            }
        }
    }
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: ending guests and telling their buyers"),
    ]);
    server.abort();
    // A seller ends its leases first: guests stopped, buyers told, billing closed.
    market.run(std::time::Duration::from_secs(15)).await;
    // Guests' sessions end with the process: take their lease namespaces along.
    crate::overlay_leases::sweep(dir);
    let _ = std::fs::remove_file(&socket);
    status("stopping: flushing the chunk store");
    node.store.flush()?;
    Ok(())
}
