//! Flow-level network: every node has an uplink and a downlink of fixed capacity;
//! concurrent transfers share them max-min fairly. When a flow starts or ends,
//! only the flows that share a link with it are re-filled (progressive filling
//! against what the other flows leave on their far links), so an event costs the
//! size of its neighbourhood, not of the network.

/// Index of a flow in the network's slab.
pub type FlowId = u32;

/// Bytes per second below which a rate counts as zero (avoids endless splitting).
const EPS: f64 = 1e-9;
/// Far links re-filled after an event (the second ring of the neighbourhood).
const MAX_FAR_LINKS: usize = 16;

#[derive(Clone, Debug)]
struct Flow {
    src: u32,
    dst: u32,
    /// Bytes still to move as of `last_us`.
    left: f64,
    /// Bytes per second.
    rate: f64,
    last_us: u64,
    /// Bumped on every rate change: completion events carry it and stale ones
    /// are ignored.
    version: u32,
    live: bool,
}

/// A flow whose rate changed: when it will finish at the new rate (None: stalled
/// at rate zero until a neighbour changes).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reschedule {
    pub flow: FlowId,
    pub version: u32,
    pub finish_us: Option<u64>,
}

/// Link identity inside one re-fill: (node, is_uplink).
type LinkKey = (u32, bool);

/// The network.
#[derive(Debug, Default)]
pub struct FlowNet {
    up_cap: Vec<f64>,
    down_cap: Vec<f64>,
    up_flows: Vec<Vec<FlowId>>,
    down_flows: Vec<Vec<FlowId>>,
    flows: Vec<Flow>,
    free: Vec<FlowId>,
    /// Scratch for one fill: flows in the set and each link's index, stamped
    /// with `epoch` so nothing needs clearing.
    epoch: u32,
    mark: Vec<u32>,
    up_slot: Vec<(u32, u32)>,
    down_slot: Vec<(u32, u32)>,
}

impl FlowNet {
    /// A network of nodes with these up- and downlink capacities (bytes/s;
    /// `f64::INFINITY` for an unconstrained side).
    pub fn new(up: Vec<f64>, down: Vec<f64>) -> Self {
        assert_eq!(
            up.len(),
            down.len(),
            "one up and one down capacity per node"
        );
        let n = up.len();
        FlowNet {
            up_cap: up,
            down_cap: down,
            up_flows: vec![Vec::new(); n],
            down_flows: vec![Vec::new(); n],
            flows: Vec::new(),
            free: Vec::new(),
            epoch: 0,
            mark: Vec::new(),
            up_slot: vec![(0, 0); n],
            down_slot: vec![(0, 0); n],
        }
    }

    /// Flows currently on the network.
    pub fn live_flows(&self) -> usize {
        self.flows.len() - self.free.len()
    }

    /// Current rate of `f` (bytes/s).
    pub fn rate(&self, f: FlowId) -> f64 {
        self.flows[f as usize].rate
    }

    /// Current version of `f` (see [`Reschedule`]).
    pub fn version(&self, f: FlowId) -> u32 {
        self.flows[f as usize].version
    }

    /// Whether `f` is still on the network.
    pub fn is_live(&self, f: FlowId) -> bool {
        self.flows.get(f as usize).is_some_and(|x| x.live)
    }

    /// Endpoints of `f`.
    pub fn ends(&self, f: FlowId) -> (u32, u32) {
        let x = &self.flows[f as usize];
        (x.src, x.dst)
    }

    /// Flows leaving `node`'s uplink and entering its downlink.
    pub fn flows_of(&self, node: u32) -> (&[FlowId], &[FlowId]) {
        (
            &self.up_flows[node as usize],
            &self.down_flows[node as usize],
        )
    }

    /// Starts a transfer of `bytes` from `src` to `dst` at `now_us`; returns every
    /// flow whose rate changed, the new one included.
    pub fn start(
        &mut self,
        src: u32,
        dst: u32,
        bytes: u64,
        now_us: u64,
        out: &mut Vec<Reschedule>,
    ) -> FlowId {
        let flow = Flow {
            src,
            dst,
            left: bytes as f64,
            rate: 0.0,
            last_us: now_us,
            version: 0,
            live: true,
        };
        let id = match self.free.pop() {
            Some(id) => {
                let v = self.flows[id as usize].version.wrapping_add(1);
                self.flows[id as usize] = Flow { version: v, ..flow };
                id
            }
            None => {
                self.flows.push(flow);
                (self.flows.len() - 1) as FlowId
            }
        };
        self.up_flows[src as usize].push(id);
        self.down_flows[dst as usize].push(id);
        self.refill(src, dst, now_us, Some(id), out);
        id
    }

    /// Removes `f` (finished or aborted) at `now_us`; its neighbours are re-filled.
    /// Returns the bytes it had left.
    pub fn stop(&mut self, f: FlowId, now_us: u64, out: &mut Vec<Reschedule>) -> f64 {
        let x = &mut self.flows[f as usize];
        assert!(x.live, "flow {f} stopped twice");
        advance(x, now_us);
        x.live = false;
        x.rate = 0.0;
        x.version = x.version.wrapping_add(1);
        let (src, dst, left) = (x.src, x.dst, x.left);
        remove(&mut self.up_flows[src as usize], f);
        remove(&mut self.down_flows[dst as usize], f);
        self.free.push(f);
        self.refill(src, dst, now_us, None, out);
        left.max(0.0)
    }

    /// Re-fills the flows on `src`'s uplink and `dst`'s downlink; `new` is always
    /// reported (its first schedule). Flows that lost rate free capacity on their
    /// far links: those links are re-filled once more (depth two, bounded).
    fn refill(
        &mut self,
        src: u32,
        dst: u32,
        now_us: u64,
        new: Option<FlowId>,
        out: &mut Vec<Reschedule>,
    ) {
        let mut slower = Vec::new();
        self.refill_links(&[(src, true), (dst, false)], now_us, new, out, &mut slower);
        if slower.is_empty() {
            return;
        }
        let mut far: Vec<LinkKey> = Vec::new();
        for f in slower {
            let x = &self.flows[f as usize];
            for key in [(x.src, true), (x.dst, false)] {
                if key != (src, true) && key != (dst, false) && !far.contains(&key) {
                    far.push(key);
                }
            }
        }
        far.truncate(MAX_FAR_LINKS);
        let mut ignored = Vec::new();
        for key in far {
            self.refill_links(&[key], now_us, None, out, &mut ignored);
        }
    }

    fn refill_links(
        &mut self,
        keys: &[LinkKey],
        now_us: u64,
        new: Option<FlowId>,
        out: &mut Vec<Reschedule>,
        slower: &mut Vec<FlowId>,
    ) {
        let mut set: Vec<FlowId> = Vec::new();
        for (k, &(node, is_up)) in keys.iter().enumerate() {
            let on = if is_up {
                &self.up_flows[node as usize]
            } else {
                &self.down_flows[node as usize]
            };
            for &f in on {
                // a flow on an earlier key's link is already in
                let x = &self.flows[f as usize];
                let dup = keys[..k]
                    .iter()
                    .any(|&(n2, up2)| if up2 { x.src == n2 } else { x.dst == n2 });
                if !dup {
                    set.push(f);
                }
            }
        }
        if set.is_empty() {
            return;
        }
        for &f in &set {
            advance(&mut self.flows[f as usize], now_us);
        }
        let rates = self.fill(&set);
        for (&f, &r) in set.iter().zip(&rates) {
            let x = &mut self.flows[f as usize];
            if x.rate == r && Some(f) != new {
                continue;
            }
            if r < x.rate * 0.99 {
                slower.push(f);
            }
            x.rate = r;
            x.version = x.version.wrapping_add(1);
            out.push(Reschedule {
                flow: f,
                version: x.version,
                finish_us: finish(x, now_us),
            });
        }
    }

    /// Max-min rates for `set` given that every other flow keeps its rate.
    fn fill(&mut self, set: &[FlowId]) -> Vec<f64> {
        self.epoch = self.epoch.wrapping_add(1);
        let ep = self.epoch;
        if self.mark.len() < self.flows.len() {
            self.mark.resize(self.flows.len(), 0);
        }
        for &f in set {
            self.mark[f as usize] = ep;
        }
        // the links the set touches, with what the flows outside it leave free
        let mut links: Vec<(LinkKey, f64, usize)> = Vec::new();
        let mut ends: Vec<(usize, usize)> = Vec::with_capacity(set.len());
        for &f in set {
            let (src, dst) = {
                let x = &self.flows[f as usize];
                (x.src, x.dst)
            };
            let u = self.link_slot(&mut links, src, true, ep);
            let d = self.link_slot(&mut links, dst, false, ep);
            ends.push((u, d));
        }
        for l in links.iter_mut() {
            let (node, is_up) = l.0;
            let (cap, on) = if is_up {
                (self.up_cap[node as usize], &self.up_flows[node as usize])
            } else {
                (
                    self.down_cap[node as usize],
                    &self.down_flows[node as usize],
                )
            };
            let others: f64 = on
                .iter()
                .filter(|&&f| self.mark[f as usize] != ep)
                .map(|&f| self.flows[f as usize].rate)
                .sum();
            l.1 = (cap - others).max(0.0);
        }
        progressive_fill(&mut links, &ends)
    }

    /// Index of `node`'s link in `links` for this fill (stamped with `ep`).
    fn link_slot(
        &mut self,
        links: &mut Vec<(LinkKey, f64, usize)>,
        node: u32,
        is_up: bool,
        ep: u32,
    ) -> usize {
        let slot = if is_up {
            &mut self.up_slot
        } else {
            &mut self.down_slot
        };
        let (e, i) = slot[node as usize];
        if e == ep {
            links[i as usize].2 += 1;
            return i as usize;
        }
        links.push(((node, is_up), f64::NAN, 1));
        slot[node as usize] = (ep, (links.len() - 1) as u32);
        links.len() - 1
    }

    /// Rates every flow would get from a from-scratch max-min computation over
    /// the whole network (tests compare the incremental rates against it).
    pub fn global_max_min(&self) -> Vec<(FlowId, f64)> {
        let set: Vec<FlowId> = (0..self.flows.len() as FlowId)
            .filter(|&f| self.flows[f as usize].live)
            .collect();
        let mut links: Vec<(LinkKey, f64, usize)> = Vec::new();
        let mut ends = Vec::new();
        for &f in &set {
            let x = &self.flows[f as usize];
            let mut idx = [0usize; 2];
            for (k, key) in [(x.src, true), (x.dst, false)].into_iter().enumerate() {
                idx[k] = match links.iter().position(|l| l.0 == key) {
                    Some(i) => {
                        links[i].2 += 1;
                        i
                    }
                    None => {
                        let cap = if key.1 {
                            self.up_cap[key.0 as usize]
                        } else {
                            self.down_cap[key.0 as usize]
                        };
                        links.push((key, cap, 1));
                        links.len() - 1
                    }
                };
            }
            ends.push((idx[0], idx[1]));
        }
        let rates = progressive_fill(&mut links, &ends);
        set.into_iter().zip(rates).collect()
    }

    /// Sum of the rates on `node`'s uplink and downlink.
    pub fn load(&self, node: u32) -> (f64, f64) {
        let sum = |v: &Vec<FlowId>| v.iter().map(|&f| self.flows[f as usize].rate).sum();
        (
            sum(&self.up_flows[node as usize]),
            sum(&self.down_flows[node as usize]),
        )
    }

    /// Capacities of `node` (up, down).
    pub fn capacity(&self, node: u32) -> (f64, f64) {
        (self.up_cap[node as usize], self.down_cap[node as usize])
    }
}

/// Water-filling: repeatedly find the link with the smallest fair share among
/// its unfrozen flows and freeze them at that share. `links` holds
/// (key, free capacity, unfrozen flow count); `ends[i]` the two links of flow i.
fn progressive_fill(links: &mut [(LinkKey, f64, usize)], ends: &[(usize, usize)]) -> Vec<f64> {
    let mut rate = vec![0.0; ends.len()];
    let mut frozen = vec![false; ends.len()];
    let mut left = ends.len();
    while left > 0 {
        let mut best: Option<(usize, f64)> = None;
        for (i, l) in links.iter().enumerate() {
            if l.2 == 0 {
                continue;
            }
            let share = l.1 / l.2 as f64;
            if best.is_none_or(|(_, s)| share < s) {
                best = Some((i, share));
            }
        }
        let Some((bi, share)) = best else { break };
        // an unconstrained pair of links (both infinite) would give infinity
        let share = if share.is_finite() { share } else { 0.0 };
        for (k, &(u, d)) in ends.iter().enumerate() {
            if frozen[k] || (u != bi && d != bi) {
                continue;
            }
            frozen[k] = true;
            left -= 1;
            let r = if share < EPS { 0.0 } else { share };
            rate[k] = r;
            for li in [u, d] {
                links[li].1 = (links[li].1 - r).max(0.0);
                links[li].2 -= 1;
            }
        }
    }
    rate
}

fn advance(x: &mut Flow, now_us: u64) {
    if now_us > x.last_us {
        x.left -= x.rate * (now_us - x.last_us) as f64 / 1e6;
        if x.left < 0.0 {
            x.left = 0.0;
        }
        x.last_us = now_us;
    }
}

fn finish(x: &Flow, now_us: u64) -> Option<u64> {
    if x.left <= 0.0 {
        return Some(now_us);
    }
    (x.rate > EPS).then(|| now_us + (x.left / x.rate * 1e6).ceil() as u64)
}

fn remove(v: &mut Vec<FlowId>, f: FlowId) {
    if let Some(p) = v.iter().position(|&x| x == f) {
        v.swap_remove(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(net: &FlowNet, fs: &[FlowId]) -> Vec<f64> {
        fs.iter().map(|&f| net.rate(f)).collect()
    }

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn one_flow_gets_the_narrower_end() {
        let mut net = FlowNet::new(vec![100.0, 1000.0], vec![1000.0, 40.0]);
        let mut out = Vec::new();
        let f = net.start(0, 1, 1000, 0, &mut out);
        close(&rates(&net, &[f]), &[40.0]);
        // 1000 bytes at 40 B/s: 25 s
        assert_eq!(out.last().unwrap().finish_us, Some(25_000_000));
    }

    #[test]
    fn uplink_shared_equally_then_freed() {
        // seed 0 (up 90) to three peers with ample downlinks: 30 each
        let mut net = FlowNet::new(vec![90.0, 0.0, 0.0, 0.0], vec![1e9; 4]);
        let mut out = Vec::new();
        let f: Vec<FlowId> = (1..4).map(|d| net.start(0, d, 100, 0, &mut out)).collect();
        close(&rates(&net, &f), &[30.0, 30.0, 30.0]);
        net.stop(f[0], 1_000_000, &mut out);
        close(&rates(&net, &f[1..]), &[45.0, 45.0]);
    }

    #[test]
    fn bottlenecked_flow_leaves_its_share_to_others() {
        // Hand-computed: seed up 100 to peers 1 (down 10), 2 and 3 (down 1000).
        // Flow to 1 is held to 10 by its downlink; the other two split 90: 45 each.
        let mut net = FlowNet::new(vec![100.0, 0.0, 0.0, 0.0], vec![1e9, 10.0, 1000.0, 1000.0]);
        let mut out = Vec::new();
        let f: Vec<FlowId> = (1..4).map(|d| net.start(0, d, 100, 0, &mut out)).collect();
        close(&rates(&net, &f), &[10.0, 45.0, 45.0]);
    }

    #[test]
    fn downlink_shared_by_two_senders() {
        // Hand-computed: senders 0 (up 30) and 1 (up 100) into 2 (down 80):
        // fair share 40 each, but 0 can only give 30, so 1 gets 50.
        let mut net = FlowNet::new(vec![30.0, 100.0, 0.0], vec![1e9, 1e9, 80.0]);
        let mut out = Vec::new();
        let a = net.start(0, 2, 100, 0, &mut out);
        let b = net.start(1, 2, 100, 0, &mut out);
        close(&rates(&net, &[a, b]), &[30.0, 50.0]);
    }

    #[test]
    fn chain_matches_global_computation() {
        // Hand-computed classic: A up 10 -> X, A -> Y; B up 100 -> Y; Y down 20.
        // Global max-min: A's two flows 5 each; B->Y gets 15 (Y's 20 minus 5).
        let (a, b, x, y) = (0, 1, 2, 3);
        let mut net = FlowNet::new(vec![10.0, 100.0, 0.0, 0.0], vec![1e9, 1e9, 1e9, 20.0]);
        let mut out = Vec::new();
        let f1 = net.start(a, x, 100, 0, &mut out);
        let f2 = net.start(a, y, 100, 0, &mut out);
        let f3 = net.start(b, y, 100, 0, &mut out);
        close(&rates(&net, &[f1, f2, f3]), &[5.0, 5.0, 15.0]);
        let g: Vec<f64> = net.global_max_min().into_iter().map(|x| x.1).collect();
        close(&g, &[5.0, 5.0, 15.0]);
    }

    #[test]
    fn left_bytes_follow_rate_changes() {
        let mut net = FlowNet::new(vec![100.0, 0.0, 0.0], vec![1e9; 3]);
        let mut out = Vec::new();
        let a = net.start(0, 1, 300, 0, &mut out); // 100 B/s
        out.clear();
        let b = net.start(0, 2, 300, 1_000_000, &mut out); // a has 200 left, both 50
        let fa = out.iter().find(|r| r.flow == a).unwrap();
        assert_eq!(fa.finish_us, Some(5_000_000));
        let left = net.stop(b, 2_000_000, &mut out);
        assert!((left - 250.0).abs() < 1e-9);
    }

    use proptest::prelude::*;

    proptest! {
        /// Whatever the order of starts and stops, no link carries more than its
        /// capacity and every flow on a saturated-free pair of links moves.
        #[test]
        fn incremental_rates_are_feasible(
            caps in proptest::collection::vec((1.0f64..100.0, 1.0f64..100.0), 2..8),
            ops in proptest::collection::vec((0usize..8, 0usize..8, any::<bool>()), 1..60),
        ) {
            let n = caps.len();
            let mut net = FlowNet::new(caps.iter().map(|c| c.0).collect(), caps.iter().map(|c| c.1).collect());
            let mut live: Vec<FlowId> = Vec::new();
            let mut out = Vec::new();
            for (t, (s, d, stop)) in ops.into_iter().enumerate() {
                let now = t as u64 * 1000;
                if stop && !live.is_empty() {
                    let f = live.remove(s % live.len());
                    net.stop(f, now, &mut out);
                } else if s % n != d % n {
                    live.push(net.start((s % n) as u32, (d % n) as u32, 1000, now, &mut out));
                }
                for i in 0..n as u32 {
                    let (u, dn) = net.load(i);
                    let (cu, cd) = net.capacity(i);
                    prop_assert!(u <= cu * (1.0 + 1e-9) + 1e-9, "uplink {i} over: {u} > {cu}");
                    prop_assert!(dn <= cd * (1.0 + 1e-9) + 1e-9, "downlink {i} over: {dn} > {cd}");
                }
            }
        }
    }
}
