#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sluice_client::fuzzing::record_decoder(data);
});
