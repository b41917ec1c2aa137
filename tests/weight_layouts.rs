//! The other weight layouts a user may bring, built here from the real tiny.en
//! weights so the same network can be compared across them:
//! - Hugging Face `transformers` naming in safetensors (one file, and sharded
//!   with `model.safetensors.index.json`), q/k/v stored separately;
//! - CTranslate2 `model.bin` with float32 and with int8 (+ per-row scale)
//!   variables, written by a small writer of the documented binary format.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use std::collections::HashMap;
use std::path::Path;
use stepaudio_live::model::ct2::Ct2Model;
use stepaudio_live::model::whisper::decoding::DecodingOptions;
use stepaudio_live::model::whisper::load::load_whisper;
use stepaudio_live::model::whisper::WhisperModel;

fn jfk_tokens(model: &WhisperModel) -> (Tensor, Vec<u32>) {
    let fx = load_fixture("whisper_tiny_en/encoder.safetensors");
    let mel = stepaudio_live::frontend::LogMel {
        n_mels: 80,
        n_frames: 3000,
        data: to_vec_f32(&fx["mel"]),
    };
    let encoded = model.encode(&mel).unwrap();
    let cross = model.cross_attention(&encoded).unwrap();
    let prompt = model.task_tokens(None, Default::default(), false).unwrap();
    let opts = DecodingOptions {
        timestamps: false,
        ..Default::default()
    };
    let out = model.greedy_decode(&cross, &prompt, 0, &opts).unwrap();
    (encoded, out.tokens)
}

fn reference_tokens() -> Vec<u32> {
    let fx = load_fixture("whisper_tiny_en/decoder.safetensors");
    fx["greedy_tokens"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect()
}

fn copy_tokenizer(from: &Path, to: &Path) {
    std::fs::copy(from.join("tokenizer.json"), to.join("tokenizer.json")).unwrap();
}

/// tiny.en's CT2 variables under transformers' names.
fn hf_tensors(ct2: &Ct2Model) -> HashMap<String, Tensor> {
    let t = |n: &str| ct2.tensor(n, DType::F32, &Device::Cpu).unwrap();
    let d = 384;
    let mut out = HashMap::new();
    let mut put = |k: String, v: Tensor| {
        out.insert(k, v);
    };
    put(
        "model.encoder.conv1.weight".into(),
        t("encoder/conv1/weight"),
    );
    put("model.encoder.conv1.bias".into(), t("encoder/conv1/bias"));
    put(
        "model.encoder.conv2.weight".into(),
        t("encoder/conv2/weight"),
    );
    put("model.encoder.conv2.bias".into(), t("encoder/conv2/bias"));
    put(
        "model.encoder.embed_positions.weight".into(),
        t("encoder/position_encodings/encodings"),
    );
    put(
        "model.encoder.layer_norm.weight".into(),
        t("encoder/layer_norm/gamma"),
    );
    put(
        "model.encoder.layer_norm.bias".into(),
        t("encoder/layer_norm/beta"),
    );
    put(
        "model.decoder.embed_tokens.weight".into(),
        t("decoder/embeddings/weight"),
    );
    put(
        "model.decoder.embed_positions.weight".into(),
        t("decoder/position_encodings/encodings"),
    );
    put(
        "model.decoder.layer_norm.weight".into(),
        t("decoder/layer_norm/gamma"),
    );
    put(
        "model.decoder.layer_norm.bias".into(),
        t("decoder/layer_norm/beta"),
    );
    let split = |w: Tensor, parts: &[&str]| -> Vec<(String, Tensor)> {
        parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (
                    p.to_string(),
                    w.narrow(0, i * d, d).unwrap().contiguous().unwrap(),
                )
            })
            .collect()
    };
    for side in ["encoder", "decoder"] {
        for i in 0..4 {
            let c = format!("{side}/layer_{i}");
            let h = format!("model.{side}.layers.{i}");
            let qkv_w = split(
                t(&format!("{c}/self_attention/linear_0/weight")),
                &["q", "k", "v"],
            );
            let qkv_b = split(
                t(&format!("{c}/self_attention/linear_0/bias")),
                &["q", "k", "v"],
            );
            for ((p, w), (_, b)) in qkv_w.into_iter().zip(qkv_b) {
                put(format!("{h}.self_attn.{p}_proj.weight"), w);
                if p != "k" {
                    put(format!("{h}.self_attn.{p}_proj.bias"), b);
                }
            }
            put(
                format!("{h}.self_attn.out_proj.weight"),
                t(&format!("{c}/self_attention/linear_1/weight")),
            );
            put(
                format!("{h}.self_attn.out_proj.bias"),
                t(&format!("{c}/self_attention/linear_1/bias")),
            );
            put(
                format!("{h}.self_attn_layer_norm.weight"),
                t(&format!("{c}/self_attention/layer_norm/gamma")),
            );
            put(
                format!("{h}.self_attn_layer_norm.bias"),
                t(&format!("{c}/self_attention/layer_norm/beta")),
            );
            put(
                format!("{h}.fc1.weight"),
                t(&format!("{c}/ffn/linear_0/weight")),
            );
            put(
                format!("{h}.fc1.bias"),
                t(&format!("{c}/ffn/linear_0/bias")),
            );
            put(
                format!("{h}.fc2.weight"),
                t(&format!("{c}/ffn/linear_1/weight")),
            );
            put(
                format!("{h}.fc2.bias"),
                t(&format!("{c}/ffn/linear_1/bias")),
            );
            put(
                format!("{h}.final_layer_norm.weight"),
                t(&format!("{c}/ffn/layer_norm/gamma")),
            );
            put(
                format!("{h}.final_layer_norm.bias"),
                t(&format!("{c}/ffn/layer_norm/beta")),
            );
            if side == "decoder" {
                put(
                    format!("{h}.encoder_attn.q_proj.weight"),
                    t(&format!("{c}/attention/linear_0/weight")),
                );
                put(
                    format!("{h}.encoder_attn.q_proj.bias"),
                    t(&format!("{c}/attention/linear_0/bias")),
                );
                let kv_w = split(t(&format!("{c}/attention/linear_1/weight")), &["k", "v"]);
                let kv_b = split(t(&format!("{c}/attention/linear_1/bias")), &["k", "v"]);
                for ((p, w), (_, b)) in kv_w.into_iter().zip(kv_b) {
                    put(format!("{h}.encoder_attn.{p}_proj.weight"), w);
                    if p != "k" {
                        put(format!("{h}.encoder_attn.{p}_proj.bias"), b);
                    }
                }
                put(
                    format!("{h}.encoder_attn.out_proj.weight"),
                    t(&format!("{c}/attention/linear_2/weight")),
                );
                put(
                    format!("{h}.encoder_attn.out_proj.bias"),
                    t(&format!("{c}/attention/linear_2/bias")),
                );
                put(
                    format!("{h}.encoder_attn_layer_norm.weight"),
                    t(&format!("{c}/attention/layer_norm/gamma")),
                );
                put(
                    format!("{h}.encoder_attn_layer_norm.bias"),
                    t(&format!("{c}/attention/layer_norm/beta")),
                );
            }
        }
    }
    out
}

fn write_hf_config(dir: &Path, ct2_dir: &Path) {
    let config = serde_json::json!({
        "model_type": "whisper", "num_mel_bins": 80, "max_source_positions": 1500, "d_model": 384,
        "encoder_layers": 4, "encoder_attention_heads": 6, "decoder_layers": 4, "decoder_attention_heads": 6,
        "max_target_positions": 448, "vocab_size": 51864, "encoder_ffn_dim": 1536, "decoder_ffn_dim": 1536
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let ct2_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ct2_dir.join("config.json")).unwrap())
            .unwrap();
    let generation = serde_json::json!({
        "suppress_tokens": ct2_cfg["suppress_ids"], "begin_suppress_tokens": ct2_cfg["suppress_ids_begin"]
    });
    std::fs::write(dir.join("generation_config.json"), generation.to_string()).unwrap();
    copy_tokenizer(ct2_dir, dir);
}

#[test]
fn hugging_face_layout_single_file_and_sharded_match_the_ct2_model() {
    let ct2_dir = model_dir("tiny.en");
    let reference = load_whisper(&ct2_dir, &Device::Cpu, DType::F32).unwrap();
    let (ref_encoded, ref_tokens) = jfk_tokens(&reference);
    assert_eq!(ref_tokens, reference_tokens());
    let tensors = hf_tensors(&Ct2Model::open(&ct2_dir.join("model.bin")).unwrap());

    let single = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&tensors, single.path().join("model.safetensors")).unwrap();
    write_hf_config(single.path(), &ct2_dir);

    let sharded = tempfile::tempdir().unwrap();
    let (mut a, mut b, mut map) = (HashMap::new(), HashMap::new(), serde_json::Map::new());
    for (name, t) in &tensors {
        let shard = if name.contains("encoder") {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        map.insert(name.clone(), shard.into());
        if name.contains("encoder") {
            a.insert(name.clone(), t.clone())
        } else {
            b.insert(name.clone(), t.clone())
        };
    }
    candle_core::safetensors::save(&a, sharded.path().join("model-00001-of-00002.safetensors"))
        .unwrap();
    candle_core::safetensors::save(&b, sharded.path().join("model-00002-of-00002.safetensors"))
        .unwrap();
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(
        sharded.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    write_hf_config(sharded.path(), &ct2_dir);

    for dir in [single.path(), sharded.path()] {
        let model = load_whisper(dir, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(model.config, reference.config);
        let (encoded, tokens) = jfk_tokens(&model);
        let err = max_abs_diff(&to_vec_f32(&encoded), &to_vec_f32(&ref_encoded));
        assert!(err < 1e-5, "{}: encoder differs by {err}", dir.display());
        assert_eq!(tokens, ref_tokens, "{}", dir.display());
    }

    // A tensor missing from a shard is reported by name.
    std::fs::remove_file(sharded.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_whisper(sharded.path(), &Device::Cpu, DType::F32)
        .err()
        .expect("missing shard must fail")
        .to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

// ------------------------------------------------------------- CTranslate2

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&((s.len() + 1) as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn put_variable(out: &mut Vec<u8>, name: &str, shape: &[usize], dtype_id: u8, bytes: &[u8]) {
    put_string(out, name);
    out.push(shape.len() as u8);
    for &d in shape {
        out.extend_from_slice(&(d as u32).to_le_bytes());
    }
    out.push(dtype_id);
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Rewrites tiny.en's model.bin with float weights as float32 (`int8 = false`)
/// or with every 2-D `.../weight` as int8 and a per-row `weight_scale`
/// (CTranslate2's int8 scheme: q = round(w · scale), scale = 127 / max|w|).
fn rewrite_ct2(src: &Path, dst: &Path, int8: bool) {
    let model = Ct2Model::open(&src.join("model.bin")).unwrap();
    let mut names: Vec<String> = model.names().map(str::to_string).collect();
    names.sort();
    names.retain(|n| n != "decoder/projection/weight"); // an alias, written as one below
    let mut vars = Vec::new();
    let mut count = 0u32;
    for name in &names {
        let v = model.variable(name).unwrap();
        if v.shape.is_empty() {
            // Scalars (head counts, flags) are copied as they are.
            let raw = model.raw_bytes(name).unwrap();
            put_variable(&mut vars, name, &[], model.dtype_id(name).unwrap(), raw);
            count += 1;
            continue;
        }
        let t = model.tensor(name, DType::F32, &Device::Cpu).unwrap();
        let data = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        if int8
            && v.shape.len() == 2
            && name.ends_with("weight")
            && name != "decoder/embeddings/weight"
        {
            let cols = v.shape[1];
            let (mut q, mut scales) = (Vec::new(), Vec::new());
            for row in data.chunks(cols) {
                let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                let scale = if max > 0.0 { 127.0 / max } else { 1.0 };
                scales.push(scale);
                q.extend(
                    row.iter()
                        .map(|x| (x * scale).round().clamp(-127.0, 127.0) as i8 as u8),
                );
            }
            put_variable(&mut vars, name, &v.shape, 1, &q);
            let sb: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
            put_variable(&mut vars, &format!("{name}_scale"), &[scales.len()], 0, &sb);
            count += 2;
        } else {
            let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            put_variable(&mut vars, name, &v.shape, 0, &bytes);
            count += 1;
        }
    }
    let mut out = Vec::new();
    out.extend_from_slice(&6u32.to_le_bytes());
    put_string(&mut out, "WhisperSpec");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&vars);
    out.extend_from_slice(&1u32.to_le_bytes());
    put_string(&mut out, "decoder/projection/weight");
    put_string(&mut out, "decoder/embeddings/weight");
    std::fs::write(dst.join("model.bin"), out).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    copy_tokenizer(src, dst);
}

#[test]
fn ctranslate2_float32_and_int8_variables_load() {
    let ct2_dir = model_dir("tiny.en");
    let reference = load_whisper(&ct2_dir, &Device::Cpu, DType::F32).unwrap();
    let (ref_encoded, ref_tokens) = jfk_tokens(&reference);

    let f32_dir = tempfile::tempdir().unwrap();
    rewrite_ct2(&ct2_dir, f32_dir.path(), false);
    let model = load_whisper(f32_dir.path(), &Device::Cpu, DType::F32).unwrap();
    let (encoded, tokens) = jfk_tokens(&model);
    // float16 → float32 is exact, so the float32 file holds the same numbers.
    assert_eq!(to_vec_f32(&encoded), to_vec_f32(&ref_encoded));
    assert_eq!(tokens, ref_tokens);

    let int8_dir = tempfile::tempdir().unwrap();
    rewrite_ct2(&ct2_dir, int8_dir.path(), true);
    let model = load_whisper(int8_dir.path(), &Device::Cpu, DType::F32).unwrap();
    let (encoded, tokens) = jfk_tokens(&model);
    // Dequantised int8 weights: the encoder output moves by a few hundredths
    // (its values reach ±12) and the transcript stays the same.
    let err = rel_l2(&to_vec_f32(&encoded), &to_vec_f32(&ref_encoded));
    assert!(err < 0.05, "int8 encoder output relative error {err}");
    assert_eq!(tokens, ref_tokens);
}
