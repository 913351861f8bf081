//! What `status` shows of the networking task (a snapshot it publishes now and
//! then, so the control socket never waits on the swarm), and a fetch's report.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::image::ImageSwarm;
use super::Net;
use crate::control::Router;

/// Counters shown by `status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub(super) struct ImageStats {
    pub uploaded_bytes: u64,
    pub downloaded_bytes: u64,
    pub chunks_downloaded: u64,
    pub duplicate_chunks: u64,
    pub bad_chunks: u64,
    pub resumed_bytes: u64,
    pub banned: BTreeSet<String>,
    pub complete: bool,
}

/// Inputs refused, by kind.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub(super) struct Rejects {
    pub bad_manifests: u64,
    pub bad_chunks: u64,
    pub bad_messages: u64,
    /// Manifest, hello and chunk requests for a private image from a peer with
    /// no valid grant for it.
    pub refused_no_grant: u64,
}

#[derive(Default)]
pub(super) struct Snapshot {
    listen: Vec<String>,
    connected: BTreeSet<String>,
    images: BTreeMap<String, ImageStats>,
    rejects: Rejects,
    /// Chunk bytes sent and not yet acknowledged, and the limit on them.
    upload_in_flight: u64,
    upload_budget: u64,
    uplink: super::link::UplinkView,
    queued_by_message: BTreeMap<&'static str, u64>,
}

/// Registers the `p2p` status section, read from `snapshot`. `test_fault` is the
/// fault a test build injects, if any.
pub(super) fn register(
    router: &mut Router,
    snapshot: Arc<Mutex<Snapshot>>,
    peer_id: String,
    test_fault: Option<&'static str>,
) {
    router.status_section("p2p", move || {
        let s = snapshot.lock().expect("snapshot lock");
        let banned: Vec<Value> = s
            .images
            .iter()
            .flat_map(|(img, st)| {
                st.banned
                    .iter()
                    .map(move |p| json!({"peer": p, "image": img}))
            })
            .collect();
        let mut v = json!({
            "peer_id": peer_id,
            "listen_addrs": s.listen,
            "connected_peers": s.connected,
            "images": s.images,
            "banned_peers": banned,
            "rejected": s.rejects,
            "upload_in_flight_bytes": s.upload_in_flight,
            "upload_budget_bytes": s.upload_budget,
            "uplink": s.uplink,
            "sent_bytes_by_message": s.queued_by_message,
        });
        if let Some(f) = test_fault {
            v["test_fault"] = json!(f);
        }
        v
    });
}

impl Net {
    /// Copies the counters into the snapshot `status` reads.
    pub(super) fn publish_snapshot(&self) {
        let mut s = self.snapshot.lock().expect("snapshot lock");
        s.listen = self.listen.iter().map(|a| a.to_string()).collect();
        s.connected = self.connected.iter().map(|p| p.to_string()).collect();
        for (id, img) in &self.images {
            s.images.insert(id.to_hex(), img.stats.clone());
        }
        s.rejects = self.rejects.clone();
        (s.upload_in_flight, s.upload_budget) = self.links.budget();
        s.uplink = self.links.uplink();
        s.queued_by_message = self.links.queued_by_message().clone();
        s.rejects.bad_messages += self.link_rejects.load(std::sync::atomic::Ordering::Relaxed);
    }
}

/// The report a fetch's waiters get.
pub(super) fn fetch_report(img: &ImageSwarm, secs: f64) -> Value {
    json!({
        "image": img.id.to_hex(),
        "total_bytes": img.total,
        "downloaded_bytes": img.stats.downloaded_bytes,
        "chunks_downloaded": img.stats.chunks_downloaded,
        "duplicate_chunks": img.stats.duplicate_chunks,
        "resumed_bytes": img.stats.resumed_bytes,
        "bad_chunks": img.stats.bad_chunks,
        "banned": img.stats.banned,
        "seconds": secs,
    })
}
