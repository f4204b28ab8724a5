//! Feeds arbitrary bytes to the GGUF reader: it must return Ok or Err,
//! never panic, abort or allocate without bound.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((_, metadata, tensors)) = ruvllm::gguf::parse(data) {
        // Every accepted tensor must lie inside the input.
        for t in &tensors {
            assert!(t.offset + t.size <= data.len());
        }
        let _ = metadata.len();
    }
});
