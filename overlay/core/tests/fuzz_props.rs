//! The fuzz harnesses of `overlay_core::fuzzing`, run as property tests so CI exercises
//! them on stable Rust (cargo-fuzz needs nightly). Sized to take roughly 10-20 s in
//! total on CI's 2 cores; `PROPTEST_CASES=N` changes the number of cases per target.

use proptest::prelude::*;

fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(cases(5000))]

    #[test]
    fn decrypt_never_accepts_what_was_not_sent(input in proptest::collection::vec(any::<u8>(), 0..1600)) {
        overlay_core::fuzzing::decrypt_case(&input);
    }

    #[test]
    fn decrypt_mutations_of_real_messages(mode in 1u8..4, mask in proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..64)) {
        let mut input = vec![mode];
        input.extend(mask);
        overlay_core::fuzzing::decrypt_case(&input);
    }
}

proptest! {
    #![proptest_config(cases(1_000_000))]

    #[test]
    fn filter_accepts_only_what_the_lease_allows(input in proptest::collection::vec(any::<u8>(), 0..200)) {
        overlay_core::fuzzing::filter_case(&input);
    }
}
