#![no_main]
//! See `hsmseal_fuzz::token` (fuzz/src/lib.rs) for the input layout and the
//! properties checked.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hsmseal_fuzz::token(data));
