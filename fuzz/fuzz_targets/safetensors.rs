#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mood_fuzz::safetensors(data));
