//! Damaged and hostile GGUF files must produce errors, never panics, aborts
//! or huge allocations. Cases follow llama.cpp's tests/test-gguf.cpp.

mod common;
use common::*;
use ruvllm::gguf::parse;

/// Builds GGUF images field by field.
#[derive(Default, Clone)]
struct Writer(Vec<u8>);

impl Writer {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
        let mut w = Writer(b"GGUF".to_vec());
        w.u32(version).u64(n_tensors).u64(n_kv);
        w
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn kv_u32(&mut self, k: &str, v: u32) -> &mut Self {
        self.str(k).u32(4).u32(v)
    }
    /// A tensor info: name, dims, type id, offset.
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    /// Pads to 32 bytes and appends `n` bytes of tensor data.
    fn data(&mut self, n: usize) -> &mut Self {
        while !self.0.len().is_multiple_of(32) {
            self.0.push(0);
        }
        self.0.extend(std::iter::repeat_n(0u8, n));
        self
    }
    fn bytes(&self) -> Vec<u8> {
        self.0.clone()
    }
}

fn expect_err(bytes: &[u8], needle: &str) {
    match parse(bytes) {
        Ok(_) => panic!("accepted a bad file (expected an error mentioning '{needle}')"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(needle),
                "error '{msg}' does not mention '{needle}'"
            );
        }
    }
}

fn one_tensor(dims: &[u64], ty: u32, offset: u64, data: usize) -> Vec<u8> {
    let mut w = Writer::header(3, 1, 0);
    w.tensor("t", dims, ty, offset).data(data);
    w.bytes()
}

#[test]
fn a_valid_minimal_file_parses() {
    let (v, md, tensors) = parse(&one_tensor(&[32, 2], 0, 0, 256)).unwrap();
    assert_eq!(v, 3);
    assert!(md.is_empty());
    assert_eq!(tensors[0].dims, vec![32, 2]);
}

#[test]
fn bad_magic_and_versions() {
    let mut b = one_tensor(&[32], 0, 0, 128);
    b[0] = b'X';
    expect_err(&b, "magic");
    for v in [0u32, 1, 4, u32::MAX] {
        let mut w = Writer::header(v, 0, 0);
        w.data(0);
        expect_err(&w.bytes(), "version");
    }
}

#[test]
fn absurd_counts() {
    expect_err(&Writer::header(3, u64::MAX, 0).bytes(), "tensor count");
    expect_err(&Writer::header(3, 0, u64::MAX).bytes(), "metadata count");
    expect_err(&Writer::header(3, 1 << 40, 1 << 40).bytes(), "count");
}

#[test]
fn hostile_metadata() {
    // String length beyond the file.
    let mut w = Writer::header(3, 0, 1);
    w.u64(u64::MAX).data(64);
    expect_err(&w.bytes(), "exceeds");
    // Unknown value type.
    let mut w = Writer::header(3, 0, 1);
    w.str("k").u32(99).u32(0);
    expect_err(&w.bytes(), "unknown value type");
    // Array with an absurd length, and with an unknown element type.
    let mut w = Writer::header(3, 0, 1);
    w.str("k").u32(9).u32(4).u64(u64::MAX / 2);
    expect_err(&w.bytes(), "array length");
    let mut w = Writer::header(3, 0, 1);
    w.str("k").u32(9).u32(77).u64(1);
    expect_err(&w.bytes(), "element type");
    // Arrays nested past any sensible depth.
    let mut w = Writer::header(3, 0, 1);
    w.str("k");
    w.u32(9);
    for _ in 0..64 {
        w.u32(9).u64(1);
    }
    expect_err(&w.bytes(), "nested");
    // A bool that is neither 0 nor 1.
    let mut w = Writer::header(3, 0, 1);
    w.str("k").u32(7);
    w.0.push(2);
    expect_err(&w.bytes(), "bool");
    // Duplicate keys.
    let mut w = Writer::header(3, 0, 2);
    w.kv_u32("a", 1).kv_u32("a", 2);
    expect_err(&w.bytes(), "duplicate metadata key");
    // Alignment that is not a power of two.
    let mut w = Writer::header(3, 0, 1);
    w.kv_u32("general.alignment", 3);
    expect_err(&w.bytes(), "alignment");
}

#[test]
fn hostile_tensor_infos() {
    expect_err(&one_tensor(&[], 0, 0, 128), "dimensions");
    expect_err(&one_tensor(&[1, 1, 1, 1, 1], 0, 0, 128), "dimensions");
    expect_err(&one_tensor(&[32, 0], 0, 0, 128), "dimension 1 is 0");
    expect_err(&one_tensor(&[u64::MAX, 2], 0, 0, 128), "dimension 0");
    expect_err(
        &one_tensor(&[1 << 30, 1 << 30, 1 << 30], 0, 0, 128),
        "too many elements",
    );
    expect_err(&one_tensor(&[32], 123, 0, 128), "unsupported type");
    expect_err(&one_tensor(&[33], 8, 0, 128), "block size");
    expect_err(&one_tensor(&[32], 0, 7, 256), "not aligned");
    expect_err(&one_tensor(&[32], 0, 1 << 20, 128), "beyond the end");
    expect_err(&one_tensor(&[32], 0, u64::MAX - 31, 128), "offset");
    expect_err(&one_tensor(&[64], 0, 0, 128), "beyond the end");

    let mut w = Writer::header(3, 2, 0);
    w.tensor("a", &[32], 0, 0)
        .tensor("b", &[32], 0, 64)
        .data(256);
    expect_err(&w.bytes(), "overlap");
    let mut w = Writer::header(3, 2, 0);
    w.tensor("a", &[32], 0, 0)
        .tensor("a", &[32], 0, 128)
        .data(256);
    expect_err(&w.bytes(), "duplicate tensor name");
}

#[test]
fn truncation_anywhere_is_an_error() {
    let file = std::fs::read(fixtures().join("llama/model-q8_0.gguf")).unwrap();
    parse(&file).expect("the intact file parses");
    let (_, _, tensors) = parse(&file).unwrap();
    let data_start = tensors.iter().map(|t| t.offset).min().unwrap();
    // Every cut inside the header and metadata, and a spread through the data.
    let cuts = (0..data_start).chain((data_start..file.len()).step_by(997));
    for cut in cuts {
        assert!(
            parse(&file[..cut]).is_err(),
            "a file cut at {cut} of {} parsed",
            file.len()
        );
    }
}

#[test]
fn corrupt_bytes_never_panic() {
    // Flip bytes across the header; any outcome but a panic is acceptable.
    let file = std::fs::read(fixtures().join("qwen2/model-f32.gguf")).unwrap();
    let (_, _, tensors) = parse(&file).unwrap();
    let header = tensors.iter().map(|t| t.offset).min().unwrap();
    let mut rng = ruvllm::sampling::Rng::new(7);
    for _ in 0..3000 {
        let mut b = file[..header + 64].to_vec();
        for _ in 0..1 + rng.next_u64() % 4 {
            let i = (rng.next_u64() % header as u64) as usize;
            b[i] = rng.next_u64() as u8;
        }
        let _ = parse(&b);
    }
}

#[test]
fn damaged_models_fail_to_load_with_a_message() {
    use ruvllm::engine::{Engine, EngineOptions};
    let dir = std::env::temp_dir().join(format!("ruvllm-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = std::fs::read(fixtures().join("gemma3/model-q8_0.gguf")).unwrap();
    let opts = EngineOptions {
        threads: 1,
        context: Some(64),
        ..Default::default()
    };

    // Truncated in the tensor data.
    let p = dir.join("truncated.gguf");
    std::fs::write(&p, &good[..good.len() - 100]).unwrap();
    let e = Engine::load(&p, &opts)
        .err()
        .expect("truncated file loaded");
    assert!(e.to_string().contains("beyond the end"), "{e}");

    // Structurally valid but without a model in it.
    let p = dir.join("empty.gguf");
    std::fs::write(&p, one_tensor(&[32], 0, 0, 128)).unwrap();
    let e = Engine::load(&p, &opts).err().expect("empty file loaded");
    assert!(e.to_string().contains("general.architecture"), "{e}");

    // Not a GGUF file at all.
    let p = dir.join("text.gguf");
    std::fs::write(&p, b"hello").unwrap();
    assert!(Engine::load(&p, &opts).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

/// A sparse file of `len` bytes starting with `head`: the body costs no disk
/// and reads as zeros.
fn sparse_file(name: &str, head: &[u8], len: u64) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("ruvllm-{name}-{}.gguf", std::process::id()));
    let f = std::fs::File::create(&p).unwrap();
    std::io::Write::write_all(&mut &f, head).unwrap();
    f.set_len(len).unwrap();
    p
}

fn open_err(path: &std::path::Path, needles: &[&str]) {
    let r = ruvllm::gguf::GgufFile::open(path);
    std::fs::remove_file(path).ok();
    let msg = match r {
        Ok(_) => panic!("accepted a hostile file"),
        Err(e) => e.to_string(),
    };
    for n in needles {
        assert!(msg.contains(n), "error '{msg}' does not mention '{n}'");
    }
}

#[test]
fn a_huge_array_claim_with_a_small_body_fails_cleanly() {
    let mut w = Writer::header(3, 0, 1);
    w.str("big").u32(9).u32(0).u64(1 << 30).data(64);
    expect_err(&w.bytes(), "array length");
}

#[test]
fn a_huge_array_that_the_file_does_hold_is_refused_before_allocating() {
    // 2^30 one-byte elements really are in the (sparse) file, so the
    // length check passes; one 32-byte value per element would ask for
    // 32 GiB. Typed storage needs 1 GiB, still over the metadata cap.
    let mut w = Writer::header(3, 0, 1);
    w.str("big").u32(9).u32(0).u64(1 << 30);
    let len = w.0.len() as u64 + (1 << 30);
    let p = sparse_file("huge-array", &w.0, len);
    open_err(&p, &["'big'", "MiB allowed"]);
}

#[test]
fn metadata_memory_is_capped_in_total() {
    // Two arrays of 20M u64, 160 MB each: either fits the cap, both do not.
    let n = 20_000_000u64;
    let mut w = Writer::header(3, 0, 2);
    w.str("first").u32(9).u32(10).u64(n);
    let head = w.0.len() as u64;
    let second_at = head + 8 * n;
    let mut second = Writer::default();
    second.str("second").u32(9).u32(10).u64(n);
    let p = sparse_file(
        "two-arrays",
        &w.0,
        second_at + second.0.len() as u64 + 8 * n,
    );
    {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.seek(std::io::SeekFrom::Start(second_at)).unwrap();
        f.write_all(&second.0).unwrap();
    }
    open_err(&p, &["'second'", "MiB allowed"]);
}

#[test]
fn arrays_are_stored_as_typed_vectors() {
    use ruvllm::gguf::{Array, ValueRef};
    let mut w = Writer::header(3, 0, 4);
    w.str("tokens").u32(9).u32(8).u64(3);
    w.str("a").str("").str("\u{2581}hello");
    w.str("scores").u32(9).u32(6).u64(2);
    w.0.extend_from_slice(&1.5f32.to_le_bytes());
    w.0.extend_from_slice(&(-2.0f32).to_le_bytes());
    w.str("types").u32(9).u32(5).u64(2);
    w.0.extend_from_slice(&1i32.to_le_bytes());
    w.0.extend_from_slice(&(-3i32).to_le_bytes());
    // [[true], []] as arrays of bools.
    w.str("nested").u32(9).u32(9).u64(2);
    w.u32(7).u64(1);
    w.0.push(1);
    w.u32(7).u64(0);
    w.data(0);
    let (_, md, _) = parse(&w.bytes()).unwrap();

    let Some(Array::String(tokens)) = md["tokens"].as_array() else {
        panic!("tokens: {:?}", md["tokens"]);
    };
    assert_eq!(
        tokens.iter().collect::<Vec<_>>(),
        ["a", "", "\u{2581}hello"]
    );
    assert_eq!(tokens.get(3), None);
    assert_eq!(md["scores"].as_array(), Some(&Array::F32(vec![1.5, -2.0])));
    let types = md["types"].as_array().unwrap();
    assert_eq!(types, &Array::I32(vec![1, -3]));
    assert_eq!(types.get(1).and_then(ValueRef::as_i64), Some(-3));
    assert_eq!(types.get(1).and_then(ValueRef::as_u64), None);
    let nested = md["nested"].as_array().unwrap();
    assert_eq!(nested.len(), 2);
    assert_eq!(
        nested.get(0).and_then(ValueRef::as_array),
        Some(&Array::Bool(vec![true]))
    );
    assert!(nested
        .get(1)
        .and_then(ValueRef::as_array)
        .unwrap()
        .is_empty());
}

#[test]
fn keys_and_tensor_names_longer_than_the_spec_allows_are_refused() {
    let long = "k".repeat(65_536);
    let mut w = Writer::header(3, 0, 1);
    w.kv_u32(&long, 1).data(0);
    expect_err(&w.bytes(), "at most 65535");
    let mut w = Writer::header(3, 1, 0);
    w.tensor(&long, &[32], 0, 0).data(128);
    expect_err(&w.bytes(), "at most 65535");
    // The longest allowed key is fine.
    let mut w = Writer::header(3, 0, 1);
    w.kv_u32(&long[1..], 1).data(0);
    parse(&w.bytes()).unwrap();
}

#[test]
fn invalid_utf8_is_charged_at_the_size_it_grows_to() {
    // 100 MiB of 0xFF bytes: 100 MiB in the file, but 300 MiB once each
    // byte becomes U+FFFD, over the 256 MiB cap. A valid string of the same
    // length is within it.
    let n = 100u64 << 20;
    for (byte, ok) in [(0xFFu8, false), (b'a', true)] {
        let mut w = Writer::header(3, 0, 1);
        w.str("text").u32(8).u64(n);
        let head = w.0.len() as u64;
        let p = sparse_file(&format!("utf8-{byte}"), &w.0, head + n + 64);
        {
            use std::io::{Seek, Write};
            let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.seek(std::io::SeekFrom::Start(head)).unwrap();
            f.write_all(&vec![byte; n as usize]).unwrap();
        }
        if ok {
            let r = ruvllm::gguf::GgufFile::open(&p);
            std::fs::remove_file(&p).ok();
            if let Err(e) = r {
                // No tensors is fine here; only the metadata matters.
                assert!(!e.to_string().contains("MiB allowed"), "{e}");
            }
        } else {
            open_err(&p, &["'text'", "MiB allowed"]);
        }
    }
}

#[test]
fn tensor_entries_count_against_the_metadata_cap() {
    // 1.2M tensor infos with 64-byte names: 115 MB in the file, more than
    // the 256 MiB cap once held as entries (each name is kept twice).
    let n = 1_200_000u64;
    let mut w = Writer::header(3, n, 0);
    for i in 0..n {
        w.tensor(&format!("{i:064}"), &[32], 0, 0);
    }
    w.data(64);
    expect_err(&w.bytes(), "MiB allowed");
}
