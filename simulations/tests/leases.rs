//! The lease scenario drives market::Fleet and market::SellerLease over a churning
//! population: replacements happen and billing stays consistent.

use std::path::PathBuf;

use simulations::leases::simulate;
use simulations::scenario::Scenario;

#[test]
fn leases_survive_churn_with_consistent_billing() {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios/leases-small.toml");
    let sc = Scenario::load(&p).expect("loads");
    let ls = sc.leases.clone().expect("lease section");
    let r = simulate(&sc, &ls, None);
    assert!(r.departures > 0, "no churn happened: {r:?}");
    assert!(!r.replacement_s.is_empty(), "no guest was replaced: {r:?}");
    // a silent seller is noticed after silence_ms (30 s) and replaced after a boot
    assert!(r.replacement_s.iter().all(|&s| s > 0.0));
    assert_eq!(r.ledger_mismatches, 0, "{r:?}");
    assert_eq!(r.overbilled, 0, "{r:?}");
    assert!(r.buyer_billed > 0);
    assert!(r.guest_minutes_run > 0.5 * r.guest_minutes_wanted, "{r:?}");
    assert!(r.guest_minutes_run <= r.guest_minutes_wanted + 1e-9);
    // same seed, same run
    assert_eq!(simulate(&sc, &ls, None), r);
}
