#![no_main]
//! See `hsmseal_fuzz::dump` (fuzz/src/lib.rs): the first line holds the
//! column options, the rest is a tsv dump.
use hsmseal::columns::Format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hsmseal_fuzz::dump(Format::Tsv, data));
