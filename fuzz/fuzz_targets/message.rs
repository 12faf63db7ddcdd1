//! Fuzzes the inbound message parser and recipient resolution; see
//! `checks::message`.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::message(data));
