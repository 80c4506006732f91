#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sluice_broker::fuzzing::wal_scan(data);
});
