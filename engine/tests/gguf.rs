//! GGUF reading: files written here with known contents, malformed files, and the real default
//! model (installed by `scripts/fetch-model.sh`).

// Helpers outside `#[test]` functions panic on purpose when something is wrong.
#![allow(clippy::unwrap_used)]

mod common;

use hotprefix_engine::gguf::{GgmlType, GgufError, GgufFile, Value};

use common::GgufWriter as Writer;

fn f16(v: f32) -> [u8; 2] {
    // Exact for the small values used here.
    let bits = v.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    if v == 0.0 {
        return sign.to_le_bytes();
    }
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    let man = ((bits >> 13) & 0x3ff) as u16;
    (sign | ((exp as u16) << 10) | man).to_le_bytes()
}

#[test]
fn metadata_and_every_supported_tensor_type_round_trip() {
    let mut w = Writer::default();
    let mut arr = Vec::new();
    arr.extend(8u32.to_le_bytes());
    arr.extend(2u64.to_le_bytes());
    Writer::string(&mut arr, "<s>");
    Writer::string(&mut arr, "hello");
    let mut name = Vec::new();
    Writer::string(&mut name, "llama");
    w.kv("general.architecture", 8, &name)
        .kv("llama.block_count", 4, &30u32.to_le_bytes())
        .kv("llama.rope.freq_base", 6, &10000f32.to_le_bytes())
        .kv("tokenizer.ggml.tokens", 9, &arr)
        .kv("flag", 7, &[1])
        .kv("big", 10, &7u64.to_le_bytes());
    let f32s: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
    let f32_bytes: Vec<u8> = f32s.iter().flat_map(|v| v.to_le_bytes()).collect();
    w.tensor("f32", &[4, 2], 0, &f32_bytes);
    let f16_bytes: Vec<u8> = [1.0f32, -2.0, 0.5, 0.0]
        .iter()
        .flat_map(|&v| f16(v))
        .collect();
    w.tensor("f16", &[4], 1, &f16_bytes);
    let bf16_bytes: Vec<u8> = [1.5f32, -0.25]
        .iter()
        .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
        .collect();
    w.tensor("bf16", &[2], 30, &bf16_bytes);
    let mut q8 = f16(0.5).to_vec();
    q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
    w.tensor("q8_0", &[32], 8, &q8);
    let mut q4 = f16(2.0).to_vec();
    q4.extend((0..16u8).map(|j| j | (j << 4)));
    w.tensor("q4_0", &[32], 2, &q4);
    let mut q41 = f16(0.5).to_vec();
    q41.extend(f16(1.0));
    q41.extend((0..16u8).map(|j| (15 - j) | (j << 4)));
    w.tensor("q4_1", &[32], 3, &q41);
    w.tensor("q5_k", &[256], 13, &[]);

    let g = GgufFile::parse(w.bytes()).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.meta_str("general.architecture"), Some("llama"));
    assert_eq!(g.meta_u64("llama.block_count"), Some(30));
    assert_eq!(g.meta_f64("llama.rope.freq_base"), Some(10000.0));
    assert_eq!(g.metadata["flag"], Value::Bool(true));
    assert_eq!(g.meta_u64("big"), Some(7));
    assert_eq!(
        g.metadata["tokenizer.ggml.tokens"],
        Value::Array(vec![
            Value::String("<s>".into()),
            Value::String("hello".into())
        ])
    );
    assert_eq!(g.tensor("f32").unwrap().dims, vec![4, 2]);
    assert_eq!(g.dequantize("f32").unwrap(), f32s);
    assert_eq!(g.dequantize("f16").unwrap(), vec![1.0, -2.0, 0.5, 0.0]);
    assert_eq!(g.dequantize("bf16").unwrap(), vec![1.5, -0.25]);
    let q8v = g.dequantize("q8_0").unwrap();
    assert_eq!(q8v[0], -8.0);
    assert_eq!(q8v[31], 7.5);
    let q4v = g.dequantize("q4_0").unwrap();
    assert_eq!(
        (q4v[0], q4v[15], q4v[16], q4v[31]),
        (-16.0, 14.0, -16.0, 14.0)
    );
    let q41v = g.dequantize("q4_1").unwrap();
    assert_eq!(
        (q41v[0], q41v[15], q41v[16], q41v[31]),
        (8.5, 1.0, 1.0, 8.5)
    );
    assert_eq!(g.tensor("q5_k").unwrap().dtype, GgmlType::Other(13));
    assert!(matches!(
        g.dequantize("q5_k"),
        Err(GgufError::UnsupportedType { .. })
    ));
    assert!(matches!(g.dequantize("nope"), Err(GgufError::NoTensor(_))));
}

#[test]
fn malformed_files_are_errors_not_panics() {
    assert!(matches!(
        GgufFile::parse(b"GGML\x03\0\0\0".to_vec()),
        Err(GgufError::BadMagic(_))
    ));
    let mut v = b"GGUF".to_vec();
    v.extend(9u32.to_le_bytes());
    assert!(matches!(
        GgufFile::parse(v),
        Err(GgufError::UnsupportedVersion(9))
    ));
    let mut w = Writer::default();
    w.tensor("t", &[64], 0, &[0u8; 256]);
    let good = w.bytes();
    // Every truncation of a valid file is an error.
    for cut in [3, 8, 20, 30, good.len() - 1] {
        let err = GgufFile::parse(good[..cut].to_vec()).unwrap_err();
        assert!(
            matches!(err, GgufError::Truncated { .. } | GgufError::Malformed(_)),
            "{err}"
        );
    }
    // A tensor pointing past the end.
    let mut w = Writer::default();
    w.tensor("t", &[1 << 40], 0, &[]);
    let err = GgufFile::parse(w.bytes()).unwrap_err().to_string();
    assert!(err.contains("beyond the end of the file"), "{err}");
    // A string length larger than the file.
    let mut w = Writer::default();
    w.kv("k", 8, &u64::MAX.to_le_bytes());
    assert!(GgufFile::parse(w.bytes()).is_err());
    // An array claiming more elements than bytes left.
    let mut arr = 4u32.to_le_bytes().to_vec();
    arr.extend((1u64 << 20).to_le_bytes());
    let mut w = Writer::default();
    w.kv("a", 9, &arr);
    assert!(GgufFile::parse(w.bytes()).is_err());
    // Every single-byte corruption of a small valid file parses or fails, never panics.
    let mut w = Writer::default();
    let mut name = Vec::new();
    Writer::string(&mut name, "llama");
    w.kv("general.architecture", 8, &name)
        .tensor("t", &[32], 8, &[0u8; 34]);
    let good = w.bytes();
    for i in 0..good.len() {
        for b in [0x00, 0xff, 0x7f] {
            let mut bad = good.clone();
            bad[i] = b;
            let _ = GgufFile::parse(bad);
        }
    }
}

/// Writes `bytes` to a fresh file in the temp folder.
fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("hotprefix-{}-{name}.gguf", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn a_file_opened_from_disk_reads_its_header_in_growing_prefixes_and_tensors_on_demand() {
    // A header of about 3 MiB (a long string array, like a tokenizer's vocabulary) is larger
    // than the first read, so opening needs several prefixes.
    let mut arr = Vec::new();
    arr.extend(8u32.to_le_bytes());
    arr.extend(200_000u64.to_le_bytes());
    for i in 0..200_000 {
        Writer::string(&mut arr, &format!("token-{i:08}"));
    }
    let mut w = Writer::default();
    w.kv("tokenizer.ggml.tokens", 9, &arr);
    let f32s: Vec<f32> = (0..64).map(|i| i as f32 * 0.25).collect();
    let f32_bytes: Vec<u8> = f32s.iter().flat_map(|v| v.to_le_bytes()).collect();
    w.tensor("w", &[8, 8], 0, &f32_bytes);
    let bytes = w.bytes();
    assert!(bytes.len() > 2 << 20);
    let path = temp_file("big-header", &bytes);
    let g = GgufFile::open(&path).unwrap();
    let Some(Value::Array(tokens)) = g.metadata.get("tokenizer.ggml.tokens") else {
        panic!("no token array");
    };
    assert_eq!(tokens.len(), 200_000);
    assert_eq!(g.dequantize("w").unwrap(), f32s);
    // The same file parsed from memory reads the same.
    assert_eq!(
        GgufFile::parse(bytes.clone())
            .unwrap()
            .dequantize("w")
            .unwrap(),
        f32s
    );
    std::fs::remove_file(&path).unwrap();
    // Truncated on disk: inside the header, and inside the tensor data.
    for cut in [1 << 20, bytes.len() - 4] {
        let path = temp_file("truncated", &bytes[..cut]);
        let err = GgufFile::open(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(
            matches!(err, GgufError::Truncated { .. } | GgufError::Malformed(_)),
            "{err}"
        );
    }
    // A missing file names its path.
    let err = GgufFile::open(std::path::Path::new("/nonexistent/model.gguf")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/model.gguf"), "{err}");
}

#[test]
fn the_default_model_reads_with_its_documented_shape() {
    let g = GgufFile::open(&common::model_path()).unwrap();
    assert_eq!(g.meta_str("general.architecture"), Some("llama"));
    assert_eq!(g.meta_u64("llama.block_count"), Some(30));
    assert_eq!(g.meta_u64("llama.embedding_length"), Some(576));
    assert_eq!(g.meta_u64("llama.attention.head_count"), Some(9));
    assert_eq!(g.meta_u64("llama.attention.head_count_kv"), Some(3));
    assert_eq!(g.meta_f64("llama.rope.freq_base"), Some(100_000.0));
    match &g.metadata["tokenizer.ggml.tokens"] {
        Value::Array(tokens) => assert_eq!(tokens.len(), 49152),
        other => panic!("tokens are {other:?}"),
    }
    let emb = g.tensor("token_embd.weight").unwrap();
    assert_eq!(emb.dims, vec![576, 49152]);
    // 30 layers x 9 tensors + embeddings + final norm (the output head is tied).
    assert_eq!(g.tensors.len(), 30 * 9 + 2);
    for t in &g.tensors {
        let v = g.dequantize(&t.name).unwrap();
        assert_eq!(v.len() as u64, t.elements(), "{}", t.name);
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{} has non-finite values",
            t.name
        );
    }
    let norm = g.dequantize("output_norm.weight").unwrap();
    let mean = norm.iter().sum::<f32>() / norm.len() as f32;
    assert!(
        mean > 0.1 && mean < 10.0,
        "final RMSNorm weights average {mean}"
    );
}
