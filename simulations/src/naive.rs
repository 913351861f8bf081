//! The naive baseline: no swarm, the buyer uploads the whole image to every
//! seller at once (like N `curl`s from an HTTP server), sharing its uplink
//! max-min fairly over the same flow model.

use indicatif::ProgressBar;

use crate::flow::FlowNet;
use crate::queue::EventQueue;
use crate::scenario::Policy;
use crate::swarm::RunResult;
use crate::topology::World;
use crate::wire_size;

/// Runs the naive distribution of the whole image.
pub fn run(w: &World, bar: Option<&ProgressBar>) -> RunResult {
    let mut net = FlowNet::new(w.up.clone(), w.down.clone());
    let mut q: EventQueue<(u32, u32)> = EventQueue::default();
    let mut out = Vec::new();
    let mut owner = Vec::new();
    for i in 1..=w.n as u32 {
        let f = net.start(0, i, w.total, 0, &mut out);
        if owner.len() <= f as usize {
            owner.resize(f as usize + 1, 0);
        }
        owner[f as usize] = i;
    }
    for r in out.drain(..) {
        if let Some(t) = r.finish_us {
            q.push(t, (r.flow, r.version));
        }
    }
    let mut finish = vec![None; w.n];
    let mut events = 0u64;
    let mut now = 0;
    let mut done = 0usize;
    while let Some((t, (f, v))) = q.pop() {
        events += 1;
        if !net.is_live(f) || net.version(f) != v {
            continue;
        }
        now = t;
        net.stop(f, t, &mut out);
        let i = owner[f as usize];
        // the last byte still has to cross
        finish[i as usize - 1] = Some((t + w.lat(0, i)) as f64 / 1e6);
        done += 1;
        if let Some(b) = bar {
            if done.is_multiple_of(256) {
                b.set_position(done as u64);
            }
        }
        for r in out.drain(..) {
            if let Some(t) = r.finish_us {
                q.push(t, (r.flow, r.version));
            }
        }
    }
    let payload = w.total * w.n as u64;
    RunResult {
        policy: Policy::Naive,
        n: w.n,
        finish_s: finish,
        profile: w.profile[1..].to_vec(),
        bound_s: w.bound(),
        nominal_bound_s: w.nominal_bound(),
        needed_bytes: w.total,
        image_bytes: w.total,
        buyer_payload: payload,
        payload_bytes: payload,
        duplicate_bytes: 0,
        control_bytes: w.n as u64 * wire_size::HEADER * 2,
        events,
        sim_end_s: now as f64 / 1e6,
        gone: 0,
        starving_notes: 0,
        buyer_extra: payload - w.total,
        cancels: 0,
        disconnects: 0,
        polls: 0,
        busy: 0,
    }
}
