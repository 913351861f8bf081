//! The clock side of a fetch, sans-IO like [`Leecher`](super::Leecher): how long a
//! fetch waits for a manifest and when a redirected one goes back to the
//! super-seed ([`ManifestWait`]); how often providers are looked up, backing off;
//! when a starving note may go out; when progress is reported; when a fetch has
//! stalled ([`FetchTimers`]). The driver passes `now` in, sleeps until
//! `next_deadline()` and carries the actions out, so tests and the simulator run
//! them on a simulated clock.

use std::collections::VecDeque;

use super::Micros;

const MS: Micros = 1_000;
const SEC: Micros = 1_000_000;

/// The waits of a fetch (defaults: the node's values).
#[derive(Clone, Debug)]
pub struct TimerConfig {
    /// How long a fetch waits for any peer to hand over a valid manifest.
    pub manifest_wait_us: Micros,
    /// A fetch sent elsewhere for the manifest asks the super-seed again after this.
    pub redirect_wait_us: Micros,
    /// How often a manifest fetch asks around again; the first step of the
    /// provider-lookup backoff.
    pub discovery_every_us: Micros,
    /// Longest wait between two provider lookups of an image being fetched.
    pub lookup_max_wait_us: Micros,
    /// A fetch with no chunk arriving for this long has stalled.
    pub stall_us: Micros,
    /// Least time between two "starving" notes to the super-seeds.
    pub starving_every_us: Micros,
    /// Least time between two progress reports to the waiters.
    pub report_every_us: Micros,
}

impl Default for TimerConfig {
    fn default() -> Self {
        TimerConfig {
            manifest_wait_us: 15 * SEC,
            redirect_wait_us: 1_500 * MS,
            discovery_every_us: 2 * SEC,
            lookup_max_wait_us: 30 * SEC,
            stall_us: 120 * SEC,
            starving_every_us: 200 * MS,
            report_every_us: 250 * MS,
        }
    }
}

/// What a manifest fetch's clock asks the driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestAction<P> {
    /// Ask every connected peer not asked yet, and look the image's providers up.
    AskAround,
    /// The peer a super-seed pointed us at gave nothing in time: ask `seed` itself.
    AskSeed { seed: P },
    /// No valid manifest within `manifest_wait_us`: fail the fetch (once; nothing follows).
    GiveUp,
}

/// The clock of one image's manifest fetch, from its start until a valid
/// manifest arrives (then the driver drops it) or it gives up.
#[derive(Clone, Debug)]
pub struct ManifestWait<P> {
    cfg: TimerConfig,
    started: Micros,
    next_ask: Micros,
    /// After a redirect: when to go back to the super-seed, and who it is.
    fallback: Option<(Micros, P)>,
    gave_up: bool,
    out: VecDeque<ManifestAction<P>>,
}

impl<P: Clone> ManifestWait<P> {
    /// A fetch that starts at `now` (the driver asks around at once itself).
    pub fn new(now: Micros, cfg: TimerConfig) -> Self {
        ManifestWait {
            next_ask: now + cfg.discovery_every_us,
            started: now,
            fallback: None,
            gave_up: false,
            out: VecDeque::new(),
            cfg,
        }
    }

    /// A super-seed `seed` pointed us at other peers: unless the manifest comes
    /// within `redirect_wait_us`, ask `seed` again. A later redirect replaces this one.
    pub fn on_redirect(&mut self, seed: P, now: Micros) {
        self.fallback = Some((now + self.cfg.redirect_wait_us, seed));
    }

    /// Whether a redirect's fallback is pending.
    pub fn fallback_pending(&self) -> bool {
        self.fallback.is_some()
    }

    /// How long the fetch has waited.
    pub fn elapsed(&self, now: Micros) -> Micros {
        now.saturating_sub(self.started)
    }

    /// Queues what is due at `now`.
    pub fn poll(&mut self, now: Micros) {
        if self.gave_up {
            return;
        }
        if self.elapsed(now) >= self.cfg.manifest_wait_us {
            self.gave_up = true;
            self.fallback = None;
            self.out.push_back(ManifestAction::GiveUp);
            return;
        }
        if let Some((at, seed)) = self.fallback.take() {
            if now >= at {
                self.out.push_back(ManifestAction::AskSeed { seed });
            } else {
                self.fallback = Some((at, seed));
            }
        }
        if now >= self.next_ask {
            self.next_ask = now + self.cfg.discovery_every_us;
            self.out.push_back(ManifestAction::AskAround);
        }
    }

    /// The next queued action.
    pub fn next_action(&mut self) -> Option<ManifestAction<P>> {
        self.out.pop_front()
    }

    /// When `poll` next has something to do (`None` once it gave up).
    pub fn next_deadline(&self) -> Option<Micros> {
        if self.gave_up {
            return None;
        }
        let give_up = self.started + self.cfg.manifest_wait_us;
        let mut d = give_up.min(self.next_ask);
        if let Some((at, _)) = &self.fallback {
            d = d.min(*at);
        }
        Some(d)
    }
}

/// What a fetch's clock asks the driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchAction {
    /// Look the image's providers up again (new sellers may have started).
    LookupProviders,
    /// No chunk arrived for `stall_us`: end the fetch with an error (once).
    Stalled,
}

/// The clock of one image being fetched (beside its [`Leecher`](super::Leecher)).
#[derive(Clone, Debug)]
pub struct FetchTimers {
    cfg: TimerConfig,
    started: Micros,
    last_progress: Micros,
    last_report: Micros,
    last_starving: Option<Micros>,
    lookups: u32,
    next_lookup: Micros,
    stalled: bool,
    out: VecDeque<FetchAction>,
}

impl FetchTimers {
    /// A fetch that starts at `now` (the driver looks providers up at once itself).
    pub fn new(now: Micros, cfg: TimerConfig) -> Self {
        FetchTimers {
            started: now,
            last_progress: now,
            last_report: now,
            last_starving: None,
            lookups: 0,
            next_lookup: now + cfg.discovery_every_us,
            stalled: false,
            out: VecDeque::new(),
            cfg,
        }
    }

    /// A chunk arrived: the stall clock starts over. Returns whether a progress
    /// report is due (at most one per `report_every_us`).
    pub fn on_progress(&mut self, now: Micros) -> bool {
        self.last_progress = now;
        if now.saturating_sub(self.last_report) > self.cfg.report_every_us {
            self.last_report = now;
            return true;
        }
        false
    }

    /// The leecher is starving: returns whether a note to the super-seeds may go
    /// out now (at most one per `starving_every_us`), counting it as sent if so.
    pub fn starving_note(&mut self, now: Micros) -> bool {
        let due = self
            .last_starving
            .is_none_or(|t| now.saturating_sub(t) > self.cfg.starving_every_us);
        if due {
            self.last_starving = Some(now);
        }
        due
    }

    /// How long the fetch has run.
    pub fn elapsed(&self, now: Micros) -> Micros {
        now.saturating_sub(self.started)
    }

    /// Provider lookups made by `poll` so far (the driver's first one not counted).
    pub fn lookups(&self) -> u32 {
        self.lookups
    }

    /// The configuration (for messages that name a wait).
    pub fn config(&self) -> &TimerConfig {
        &self.cfg
    }

    /// Queues what is due at `now`. Lookups come often at first, then back off
    /// (each costs every peer asked a reply): waits of 2, 4, 8, 16 times
    /// `discovery_every_us`, capped at `lookup_max_wait_us`.
    pub fn poll(&mut self, now: Micros) {
        if self.stalled {
            return;
        }
        if now.saturating_sub(self.last_progress) >= self.cfg.stall_us {
            self.stalled = true;
            self.out.push_back(FetchAction::Stalled);
            return;
        }
        if now >= self.next_lookup {
            self.lookups += 1;
            let wait = self.cfg.discovery_every_us << self.lookups.min(4);
            self.next_lookup = now + wait.min(self.cfg.lookup_max_wait_us);
            self.out.push_back(FetchAction::LookupProviders);
        }
    }

    /// The next queued action.
    pub fn next_action(&mut self) -> Option<FetchAction> {
        self.out.pop_front()
    }

    /// When `poll` next has something to do (`None` once stalled).
    pub fn next_deadline(&self) -> Option<Micros> {
        if self.stalled {
            return None;
        }
        Some(self.next_lookup.min(self.last_progress + self.cfg.stall_us))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::swarm::{Action, Bitfield, Leecher, LeecherConfig, PeerKind};

    fn drain_m(w: &mut ManifestWait<u8>) -> Vec<ManifestAction<u8>> {
        std::iter::from_fn(|| w.next_action()).collect()
    }

    fn drain_f(t: &mut FetchTimers) -> Vec<FetchAction> {
        std::iter::from_fn(|| t.next_action()).collect()
    }

    /// Runs `poll` at every deadline up to `until`, as a driver sleeping on
    /// `next_deadline` does; returns each action with its time.
    fn run_fetch(t: &mut FetchTimers, until: Micros) -> Vec<(Micros, FetchAction)> {
        let mut seen = Vec::new();
        while let Some(d) = t.next_deadline().filter(|d| *d <= until) {
            t.poll(d);
            seen.extend(drain_f(t).into_iter().map(|a| (d, a)));
        }
        seen
    }

    #[test]
    fn redirect_falls_back_to_the_seed_after_the_wait_once() {
        let mut w = ManifestWait::new(0, TimerConfig::default());
        w.on_redirect(7u8, 100 * MS);
        assert!(w.fallback_pending());
        assert_eq!(w.next_deadline(), Some(1_600 * MS));
        w.poll(1_600 * MS - 1);
        assert_eq!(drain_m(&mut w), vec![]);
        w.poll(1_600 * MS);
        assert_eq!(drain_m(&mut w), vec![ManifestAction::AskSeed { seed: 7 }]);
        assert!(!w.fallback_pending());
        w.poll(1_700 * MS);
        assert_eq!(drain_m(&mut w), vec![]);
    }

    #[test]
    fn a_second_redirect_restarts_the_fallback_wait() {
        let mut w = ManifestWait::new(0, TimerConfig::default());
        w.on_redirect(1u8, 0);
        w.on_redirect(2u8, 1_000 * MS);
        w.poll(1_500 * MS);
        assert_eq!(drain_m(&mut w), vec![]);
        w.poll(2_500 * MS);
        // the re-ask every 2 s is due too
        assert_eq!(
            drain_m(&mut w),
            vec![
                ManifestAction::AskSeed { seed: 2 },
                ManifestAction::AskAround
            ]
        );
    }

    #[test]
    fn manifest_wait_asks_around_every_two_seconds_then_gives_up_once() {
        let mut w: ManifestWait<u8> = ManifestWait::new(SEC, TimerConfig::default());
        let mut asks = Vec::new();
        let mut gave_up = Vec::new();
        while let Some(d) = w.next_deadline() {
            w.poll(d);
            for a in drain_m(&mut w) {
                match a {
                    ManifestAction::AskAround => asks.push(d / MS),
                    ManifestAction::GiveUp => gave_up.push(d / MS),
                    ManifestAction::AskSeed { .. } => panic!("no redirect was made"),
                }
            }
        }
        assert_eq!(
            asks,
            vec![3_000, 5_000, 7_000, 9_000, 11_000, 13_000, 15_000]
        );
        assert_eq!(gave_up, vec![16_000]);
        w.poll(100 * SEC);
        assert_eq!(drain_m(&mut w), vec![]);
    }

    #[test]
    fn giving_up_drops_a_pending_fallback() {
        let mut w = ManifestWait::new(0, TimerConfig::default());
        w.on_redirect(3u8, 14 * SEC);
        w.poll(16 * SEC);
        assert_eq!(drain_m(&mut w), vec![ManifestAction::GiveUp]);
        assert!(!w.fallback_pending());
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn provider_lookups_back_off_to_the_cap() {
        let mut t = FetchTimers::new(0, TimerConfig::default());
        let mut at = Vec::new();
        // progress keeps coming, so only lookups happen
        let mut now = 0;
        while now < 200 * SEC {
            now += SEC;
            t.on_progress(now);
            t.poll(now);
            at.extend(
                drain_f(&mut t)
                    .into_iter()
                    .inspect(|a| assert_eq!(*a, FetchAction::LookupProviders))
                    .map(|_| now / SEC),
            );
        }
        // waits 4, 8, 16, then 30 (capped) seconds
        assert_eq!(at, vec![2, 6, 14, 30, 60, 90, 120, 150, 180]);
        assert_eq!(t.lookups(), 9);
    }

    #[test]
    fn a_fetch_stalls_exactly_one_stall_wait_after_its_last_chunk() {
        let mut t = FetchTimers::new(0, TimerConfig::default());
        t.on_progress(10 * SEC);
        let seen = run_fetch(&mut t, 1_000 * SEC);
        let stalls: Vec<Micros> = seen
            .iter()
            .filter(|(_, a)| *a == FetchAction::Stalled)
            .map(|(d, _)| *d)
            .collect();
        assert_eq!(stalls, vec![130 * SEC]);
        // nothing after the stall
        assert_eq!(
            seen.last().map(|(_, a)| a.clone()),
            Some(FetchAction::Stalled)
        );
        assert_eq!(t.next_deadline(), None);
        t.poll(2_000 * SEC);
        assert_eq!(drain_f(&mut t), vec![]);
    }

    #[test]
    fn progress_just_before_the_stall_postpones_it() {
        let mut t = FetchTimers::new(0, TimerConfig::default());
        t.poll(120 * SEC - 1);
        assert!(!drain_f(&mut t).contains(&FetchAction::Stalled));
        t.on_progress(120 * SEC - 1);
        t.poll(200 * SEC);
        assert!(!drain_f(&mut t).contains(&FetchAction::Stalled));
        t.poll(240 * SEC - 1);
        assert_eq!(drain_f(&mut t), vec![FetchAction::Stalled]);
    }

    #[test]
    fn polling_at_deadlines_sees_what_polling_every_millisecond_sees() {
        // a driver that sleeps until next_deadline loses nothing against a busy one
        let mut a = FetchTimers::new(0, TimerConfig::default());
        let mut b = FetchTimers::new(0, TimerConfig::default());
        a.on_progress(3 * SEC);
        b.on_progress(3 * SEC);
        let by_deadline = run_fetch(&mut a, 300 * SEC);
        let mut by_ms = Vec::new();
        for now in (0..=300 * SEC).step_by(MS as usize) {
            b.poll(now);
            by_ms.extend(drain_f(&mut b).into_iter().map(|x| (now, x)));
        }
        assert_eq!(by_deadline, by_ms);
    }

    #[test]
    fn starving_notes_and_progress_reports_are_throttled() {
        let mut t = FetchTimers::new(0, TimerConfig::default());
        let notes: Vec<Micros> = (0..=1_000)
            .map(|ms| ms * MS)
            .filter(|&now| t.starving_note(now))
            .collect();
        // more than 200 ms apart: 0, 201, 402, 603, 804 ms
        assert_eq!(notes, vec![0, 201 * MS, 402 * MS, 603 * MS, 804 * MS]);
        let reports: Vec<Micros> = (1..=1_000)
            .map(|ms| ms * MS)
            .filter(|&now| t.on_progress(now))
            .collect();
        assert_eq!(reports, vec![251 * MS, 502 * MS, 753 * MS]);
    }

    /// The timers beside a real [`Leecher`]: its only peer delivers half the
    /// image and then goes silent. The leecher keeps re-requesting (its own
    /// timeouts); the fetch stalls `stall_us` after the last chunk, on the
    /// simulated clock, and has looked providers up meanwhile.
    #[test]
    fn a_leecher_whose_peer_goes_silent_stalls_on_the_simulated_clock() {
        let sizes = vec![64 * 1024; 16];
        let mut l: Leecher<u8> = Leecher::new(
            sizes.clone(),
            Bitfield::new(16),
            1,
            LeecherConfig::default(),
        );
        let mut t = FetchTimers::new(0, TimerConfig::default());
        l.add_peer(1, Bitfield::full(16), PeerKind::Normal, 0);
        let mut now = 0;
        let mut delivered = 0;
        let mut last_chunk = 0;
        let mut stalled_at = None;
        let mut lookups = 0;
        while stalled_at.is_none() && now < 1_000 * SEC {
            now += 50 * MS;
            l.poll(now);
            while let Some(a) = l.next_action() {
                if let Action::Request { peer, chunk } = a {
                    if delivered < 8 {
                        delivered += 1;
                        l.on_chunk(&peer, chunk, true, now);
                        last_chunk = now;
                        t.on_progress(now);
                    }
                }
            }
            t.poll(now);
            while let Some(a) = t.next_action() {
                match a {
                    FetchAction::LookupProviders => lookups += 1,
                    FetchAction::Stalled => stalled_at = Some(now),
                }
            }
        }
        assert_eq!(delivered, 8);
        assert!(!l.is_complete());
        assert_eq!(stalled_at, Some(last_chunk + 120 * SEC));
        assert!(lookups >= 4, "{lookups} lookups");
    }
}
