//! Decryption and handshake processing (`handle_udp`) on arbitrary and mutated datagrams.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    overlay_core::fuzzing::decrypt_case(data);
});
