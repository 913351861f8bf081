//! The seller's egress filter / ingress check and the DHCP parser on arbitrary frames.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    overlay_core::fuzzing::filter_case(data);
});
