//! Step-Audio 2 on the tiny random checkpoint against the PyTorch reference
//! (`scripts/reference/step_audio2_ref.py`, fixtures in
//! `tests/fixtures/step_audio2/`), f32 on the CPU: every tensor within a
//! relative error ‖a − b‖/‖b‖ ≤ 1e-4, identical greedy tokens. Also the
//! streaming session (persistent cache, rollback, budget restart) and the
//! loader's errors. Run with `--nocapture` to see the measured errors.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use stepaudio_live::frontend::{LogMel, MelExtractor};
use stepaudio_live::model::recognizer::{FrontendSpec, SegmentFeatures};
use stepaudio_live::model::step_audio2::load::load_step_audio2;
use stepaudio_live::model::step_audio2::prompt::{SystemPrompt, ASR_PROMPT_EN, ASR_PROMPT_ZH};
use stepaudio_live::model::step_audio2::{
    load_step_audio2_recognizer, SessionOptions, StepAudio2, TurnOptions,
};
use stepaudio_live::model::ModelError;

const TOLERANCE: f64 = 1e-4;

fn ckpt() -> PathBuf {
    fixture("step_audio2/tiny_ckpt")
}

fn load() -> StepAudio2 {
    load_step_audio2(&ckpt(), &Device::Cpu, DType::F32).unwrap()
}

/// Relative error of `ours` against `reference` (same element count and,
/// squeezing leading 1s, the same shape); asserts the tolerance and prints it.
fn check(what: &str, ours: &Tensor, reference: &Tensor) -> f64 {
    let squeeze = |d: &[usize]| -> Vec<usize> {
        let first = d.iter().position(|&x| x != 1).unwrap_or(d.len());
        d[first..].to_vec()
    };
    assert_eq!(
        squeeze(ours.dims()),
        squeeze(reference.dims()),
        "{what}: shape differs"
    );
    let rel = rel_l2(&to_vec_f32(ours), &to_vec_f32(reference));
    eprintln!("{what}: rel error {rel:.3e}");
    assert!(
        rel <= TOLERANCE,
        "{what}: relative error {rel:.3e} > {TOLERANCE:e}"
    );
    rel
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

fn usizes(t: &Tensor) -> Vec<usize> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as usize)
        .collect()
}

fn mask(t: &Tensor) -> Vec<bool> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap()
        .into_iter()
        .map(|v| v != 0)
        .collect()
}

fn record(max_new_tokens: usize) -> TurnOptions {
    TurnOptions {
        record_logits: true,
        ..TurnOptions::new(max_new_tokens)
    }
}

fn session_opts(prompt: SystemPrompt, max_new_tokens: usize) -> SessionOptions {
    SessionOptions {
        system_prompt: prompt,
        max_new_tokens,
        ..Default::default()
    }
}

/// The live pipeline's features of a whole clip: raw frames of the audio
/// followed by 479 zeros.
fn live_features(audio: &[f32]) -> SegmentFeatures {
    let mut padded = audio.to_vec();
    padded.resize(audio.len() + 479, 0.0);
    SegmentFeatures {
        n_mels: 128,
        raw_frames: MelExtractor::new(128).raw_frames(&padded),
        samples: audio.len(),
    }
}

/// Mel of a single-clip fixture from its stored audio, checked against both
/// the WAV file and the reference mel.
fn clip_mel(fx: &HashMap<String, Tensor>, clip: &str, tag: &str) -> LogMel {
    let audio = to_vec_f32(&fx["audio"]);
    let wav = read_audio(&speech(clip));
    assert_eq!(wav, audio, "{clip}: WAV differs from the fixture's audio");
    let mel = MelExtractor::new(128).step_audio(&audio);
    let ours = Tensor::from_slice(&mel.data, (mel.n_mels, mel.n_frames), &Device::Cpu).unwrap();
    check(&format!("{tag} mel"), &ours, &fx["mel"]);
    mel
}

/// Mel, encoder, adapter, prompt ids, prefill logits (from scratch), and each
/// decode step's logits and greedy token through a streaming session.
fn single_clip(file: &str, clip: &str, prompt: SystemPrompt) {
    let sa = load();
    let fx = load_fixture(&format!("step_audio2/{file}"));
    let tag = file.trim_end_matches(".safetensors");
    let mel = clip_mel(&fx, clip, tag);

    let enc = sa.model.encode(&[&mel]).unwrap();
    assert_eq!(
        enc.key_valid[0],
        mask(&fx["encoder_key_valid"]),
        "{tag}: key mask"
    );
    assert_eq!(enc.valid_len, usizes(&fx["encoder_valid_len"]), "{tag}: E");
    check(
        &format!("{tag} encoder_out (all P rows)"),
        &enc.out,
        &fx["encoder_out"],
    );
    let (kept, all) = sa.model.adapter.kept_rows(&enc).unwrap();
    check(
        &format!("{tag} adapter_out_all"),
        &all,
        &fx["adapter_out_all"],
    );
    check(
        &format!("{tag} adapter_out (kept)"),
        &kept[0],
        &fx["adapter_out"],
    );

    let n = kept[0].dim(0).unwrap();
    let p = sa.tokenizer.asr_prompt(prompt.text(), &[n]).unwrap();
    assert_eq!(p.ids, ids(&fx["prompt_ids"]), "{tag}: prompt ids");
    assert_eq!(
        p.patch_positions(),
        usizes(&fx["audio_patch_positions"]),
        "{tag}: patches"
    );

    // Prefill from scratch over the whole prompt.
    let llm = &sa.model.llm;
    let mut state = llm.new_state(128);
    let embeds = sa
        .model
        .embed_prompt(&p, &kept)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let prefill = llm
        .logits_last(&llm.forward(&embeds, &mut state).unwrap())
        .unwrap();
    check(
        &format!("{tag} prefill logits"),
        &prefill,
        &fx["prefill_logits"],
    );

    // The same prompt as a session: system prompt cached, then the turn.
    let expected = ids(&fx["greedy_tokens"]);
    let mut session = sa.session(session_opts(prompt, 12)).unwrap();
    let out = session
        .decode_partial(&sa, &kept, &[], &record(expected.len()))
        .unwrap();
    assert_eq!(out.generated, expected, "{tag}: greedy tokens");
    assert_eq!(out.step_logits.len(), expected.len());
    let reference = &fx["step_logits"];
    let mut worst: f64 = 0.0;
    for (s, ours) in out.step_logits.iter().enumerate() {
        let rel = check(
            &format!("{tag} step {s} logits"),
            ours,
            &reference.get(s).unwrap(),
        );
        worst = worst.max(rel);
    }
    eprintln!("{tag}: worst step logits rel error {worst:.3e}");
    assert_eq!(
        out.text_tokens,
        ids(&fx["text_tokens"]),
        "{tag}: text tokens"
    );
    assert!(!out.finished, "{tag}: the reference has no EOT in 12 steps");
}

#[test]
fn english_clip_matches_reference() {
    single_clip(
        "en_ps_cards_001.safetensors",
        "en_ps_cards_001.wav",
        SystemPrompt::English,
    );
}

#[test]
fn chinese_clip_matches_reference() {
    single_clip(
        "zh_aishell1_BAC009S0764W0121.safetensors",
        "zh_aishell1_BAC009S0764W0121.wav",
        SystemPrompt::Chinese,
    );
}

/// Kept adapter rows of a single-clip fixture (mel → encoder → adapter).
fn clip_rows(sa: &StepAudio2, file: &str) -> Tensor {
    let fx = load_fixture(&format!("step_audio2/{file}"));
    let mel = MelExtractor::new(128).step_audio(&to_vec_f32(&fx["audio"]));
    sa.model.audio_embeddings(&[&mel]).unwrap().remove(0)
}

fn kv_snapshot(session: &stepaudio_live::model::step_audio2::Session) -> Vec<(Vec<f32>, Vec<f32>)> {
    let st = session.state();
    (0..st.num_layers())
        .map(|i| {
            let (k, v) = st.layer(i).unwrap().unwrap();
            (to_vec_f32(&k), to_vec_f32(&v))
        })
        .collect()
}

#[test]
fn second_turn_on_the_persisted_cache_matches_from_scratch() {
    let sa = load();
    let fx = load_fixture("step_audio2/two_turns.safetensors");
    let rows1 = clip_rows(&sa, "en_ps_cards_001.safetensors");
    let rows2 = clip_rows(&sa, "zh_aishell1_BAC009S0764W0121.safetensors");
    let bounds = usizes(&fx["segment_bounds"]);

    let mut session = sa.session(session_opts(SystemPrompt::English, 12)).unwrap();
    assert_eq!(session.committed_len(), bounds[0]);
    let t1 = session
        .decode_final(&sa, std::slice::from_ref(&rows1), &[], &record(12))
        .unwrap();
    assert_eq!(t1.generated, ids(&fx["turn1_greedy_tokens"]));
    assert_eq!(t1.generated, ids(&fx["turn1_assistant_ids"]));
    check(
        "two_turns turn-1 prefill (cached system prompt)",
        &t1.step_logits[0],
        &fx["turn1_prefill_logits"],
    );
    assert_eq!(
        session.committed_len(),
        bounds[2],
        "turn 1 committed: answer + EOT"
    );

    let t2 = session
        .decode_final(&sa, std::slice::from_ref(&rows2), &[], &record(12))
        .unwrap();
    assert_eq!(
        t2.generated,
        ids(&fx["turn2_greedy_tokens"]),
        "turn 2 greedy tokens"
    );
    assert_eq!(t2.text_tokens, ids(&fx["turn2_text_tokens"]));
    check(
        "two_turns turn2_prefill_logits (cached)",
        &t2.step_logits[0],
        &fx["turn2_prefill_logits"],
    );
    let reference = &fx["turn2_step_logits"];
    for (s, ours) in t2.step_logits.iter().enumerate() {
        check(
            &format!("two_turns turn-2 step {s} logits (cached)"),
            ours,
            &reference.get(s).unwrap(),
        );
    }

    // The whole context from scratch, built from the same pieces.
    let tok = &sa.tokenizer;
    let mut full = stepaudio_live::model::step_audio2::prompt::PromptIds {
        ids: tok.system_turn(ASR_PROMPT_EN).unwrap(),
        patch_runs: vec![],
    };
    full.extend(&tok.human_audio_turn(&[rows1.dim(0).unwrap()]));
    full.ids.extend(&t1.generated);
    full.ids.push(tok.eot);
    full.extend(&tok.human_audio_turn(&[rows2.dim(0).unwrap()]));
    assert_eq!(full.ids, ids(&fx["full_ids"]), "full context ids");
    let mut positions = usizes(&fx["turn1_patch_positions"]);
    positions.extend(usizes(&fx["turn2_patch_positions"]));
    assert_eq!(full.patch_positions(), positions);
    let llm = &sa.model.llm;
    let mut state = llm.new_state(128);
    let embeds = sa.model.embed_prompt(&full, &[rows1, rows2]).unwrap();
    let scratch = llm
        .logits_last(
            &llm.forward(&embeds.unsqueeze(0).unwrap(), &mut state)
                .unwrap(),
        )
        .unwrap();
    check(
        "two_turns from-scratch prefill vs reference",
        &scratch,
        &fx["turn2_prefill_logits"],
    );
    check(
        "two_turns cached vs from-scratch (Rust)",
        &t2.step_logits[0],
        &scratch,
    );
}

#[test]
fn partial_rollback_leaves_the_cache_bit_identical() {
    let sa = load();
    let rows1 = clip_rows(&sa, "en_ps_cards_001.safetensors");
    let rows2 = clip_rows(&sa, "zh_aishell1_BAC009S0764W0121.safetensors");
    let mut session = sa.session(session_opts(SystemPrompt::English, 12)).unwrap();
    session
        .decode_final(&sa, std::slice::from_ref(&rows1), &[], &record(12))
        .unwrap();
    let committed = session.committed_len();
    let before = kv_snapshot(&session);

    // Partials with and without a forced prefix, then check the cache.
    session
        .decode_partial(&sa, std::slice::from_ref(&rows2), &[], &record(12))
        .unwrap();
    session
        .decode_partial(&sa, std::slice::from_ref(&rows2), &[210, 87], &record(5))
        .unwrap();
    assert_eq!(session.committed_len(), committed);
    assert_eq!(session.state().len(), committed);
    let after = kv_snapshot(&session);
    assert!(
        before == after,
        "K/V of the committed prefix changed after a rollback"
    );
    eprintln!(
        "rollback: {} layers × K/V of {committed} positions bit-identical",
        before.len()
    );

    // And the final after partials equals a final without them, bit for bit.
    let with = session
        .decode_final(&sa, std::slice::from_ref(&rows2), &[], &record(12))
        .unwrap();
    let mut fresh = sa.session(session_opts(SystemPrompt::English, 12)).unwrap();
    fresh.decode_final(&sa, &[rows1], &[], &record(12)).unwrap();
    let without = fresh.decode_final(&sa, &[rows2], &[], &record(12)).unwrap();
    assert_eq!(with.generated, without.generated);
    for (a, b) in with.step_logits.iter().zip(&without.step_logits) {
        assert_eq!(to_vec_f32(a), to_vec_f32(b));
    }
    assert!(kv_snapshot(&session) == kv_snapshot(&fresh));
}

#[test]
fn forced_prefix_continues_the_greedy_transcript() {
    let sa = load();
    let fx = load_fixture("step_audio2/two_turns.safetensors");
    let rows1 = clip_rows(&sa, "en_ps_cards_001.safetensors");
    let rows2 = clip_rows(&sa, "zh_aishell1_BAC009S0764W0121.safetensors");
    let greedy = ids(&fx["turn2_greedy_tokens"]);
    let mut session = sa.session(session_opts(SystemPrompt::English, 12)).unwrap();
    session
        .decode_final(&sa, &[rows1], &[], &record(12))
        .unwrap();
    // Forcing the first 3 greedy ids must give the remaining 9 and their logits.
    let out = session
        .decode_partial(&sa, &[rows2], &greedy[..3], &record(9))
        .unwrap();
    assert_eq!(out.generated, greedy[3..].to_vec());
    let reference = &fx["turn2_step_logits"];
    for (s, ours) in out.step_logits.iter().enumerate() {
        check(
            &format!("prefix step {} logits", s + 3),
            ours,
            &reference.get(s + 3).unwrap(),
        );
    }
    assert_eq!(&out.text_tokens[..3], &greedy[..3]);
}

/// Collects what a tracing subscriber writes.
#[derive(Clone, Default)]
struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[test]
fn max_context_restarts_from_the_system_prompt() {
    let sa = load();
    let rows1 = clip_rows(&sa, "en_ps_cards_001.safetensors");
    let rows2 = clip_rows(&sa, "zh_aishell1_BAC009S0764W0121.safetensors");
    let opts = SessionOptions {
        system_prompt: SystemPrompt::English,
        max_context: 60,
        max_new_tokens: 12,
    };
    let mut session = sa.session(opts).unwrap();
    let system = session.system_len();
    // Turn 1 commits 21 + 31 + 13 = 65 > 60 tokens: the stream restarts,
    // and says so in a trace event.
    let log = LogBuffer::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(log.clone())
        .with_ansi(false)
        .finish();
    let t1 = tracing::subscriber::with_default(subscriber, || {
        session
            .decode_final(&sa, &[rows1], &[], &record(12))
            .unwrap()
    });
    assert!(t1.restarted);
    let logged = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    eprintln!("trace: {}", logged.trim());
    assert!(
        logged.contains("restarting from the system prompt"),
        "{logged}"
    );
    assert!(logged.contains("committed=65"), "{logged}");
    assert_eq!(session.restarts(), 1);
    assert_eq!(session.committed_len(), system);
    assert_eq!(session.state().len(), system);
    let t2 = session
        .decode_final(&sa, std::slice::from_ref(&rows2), &[], &record(12))
        .unwrap();

    // Turn 2 then sees exactly what a fresh stream sees.
    let mut fresh = sa.session(session_opts(SystemPrompt::English, 12)).unwrap();
    let alone = fresh.decode_final(&sa, &[rows2], &[], &record(12)).unwrap();
    assert_eq!(t2.generated, alone.generated);
    for (a, b) in t2.step_logits.iter().zip(&alone.step_logits) {
        assert_eq!(to_vec_f32(a), to_vec_f32(b));
    }
    // 21 + 70 (53 audio patches) + the answer > 60: restarted again after turn 2.
    assert_eq!(session.restarts(), 2);
}

#[test]
fn long_audio_is_encoded_as_a_batch_of_25s_pieces() {
    let sa = load();
    let fx = load_fixture("step_audio2/long_27s.safetensors");
    let wav = read_audio(&speech("en_mfa_acoustic_corpus.wav"));
    assert_eq!(wav.len(), 427572);
    let extractor = MelExtractor::new(128);
    let mel_t =
        |m: &LogMel| Tensor::from_slice(&m.data, (m.n_mels, m.n_frames), &Device::Cpu).unwrap();

    for (prefix, padded) in [("", true), ("unpadded_", false)] {
        let mut audio = wav.clone();
        if padded {
            audio.resize(432000, 0.0);
        }
        let mels = extractor.step_audio_pieces(&audio);
        assert_eq!(mels.len(), 2);
        check(
            &format!("long_27s {prefix}mel piece 0"),
            &mel_t(&mels[0]),
            &fx["mel_piece0"],
        );
        check(
            &format!("long_27s {prefix}mel piece 1"),
            &mel_t(&mels[1]),
            &fx[&format!("{prefix}mel_piece1")],
        );
        // Batched path (the one the model takes).
        let enc = sa.model.encode(&[&mels[0], &mels[1]]).unwrap();
        assert_eq!(enc.padded_len, 2502);
        assert_eq!(
            enc.valid_len,
            usizes(&fx[&format!("{prefix}encoder_valid_len")])
        );
        let (kept, _) = sa.model.adapter.kept_rows(&enc).unwrap();
        let rows = sa.model.audio_embeddings(&[&mels[0], &mels[1]]).unwrap();
        assert_eq!(to_vec_f32(&rows[1]), to_vec_f32(&kept[1]));
        if padded {
            let key_valid = mask(&fx["encoder_key_valid"]);
            assert_eq!(enc.key_valid.concat(), key_valid);
            check(
                "long_27s batched encoder_out [2, P, D]",
                &enc.out,
                &fx["encoder_out"],
            );
            check(
                "long_27s adapter piece 0",
                &kept[0],
                &fx["adapter_out_piece0"],
            );
            check(
                "long_27s adapter piece 1 (batched)",
                &kept[1],
                &fx["adapter_out_piece1"],
            );
        } else {
            assert_eq!(
                enc.key_valid[1],
                mask(&fx["unpadded_encoder_key_valid_piece1"])
            );
            check(
                "long_27s unpadded piece 0 encoder",
                &enc.out.get(0).unwrap(),
                &fx["encoder_out"].get(0).unwrap(),
            );
            check(
                "long_27s unpadded piece 1 encoder (batched)",
                &enc.out.get(1).unwrap(),
                &fx["unpadded_encoder_out_piece1"],
            );
            check(
                "long_27s unpadded adapter piece 1 (batched)",
                &kept[1],
                &fx["unpadded_adapter_out_piece1"],
            );
        }
        // Piece 1 alone (batch of one), which is what a live segment does.
        let alone = sa.model.encode(&[&mels[1]]).unwrap();
        assert_eq!(
            alone.key_valid[0],
            mask(&fx[&format!("{prefix}encoder_key_valid_piece1_alone")])
        );
        check(
            &format!("long_27s {prefix}piece 1 alone encoder"),
            &alone.out,
            &fx[&format!("{prefix}encoder_out_piece1_alone")],
        );
        let (kept_alone, _) = sa.model.adapter.kept_rows(&alone).unwrap();
        check(
            &format!("long_27s {prefix}piece 1 alone adapter"),
            &kept_alone[0],
            &fx[&format!("{prefix}adapter_out_piece1_alone")],
        );
        if padded {
            // One human turn with two audio groups, Chinese prompt.
            let counts: Vec<usize> = kept.iter().map(|k| k.dim(0).unwrap()).collect();
            let p = sa.tokenizer.asr_prompt(ASR_PROMPT_ZH, &counts).unwrap();
            assert_eq!(p.ids, ids(&fx["prompt_ids"]));
            assert_eq!(
                p.patch_runs[0].0,
                usizes(&fx["audio_patch_positions_piece0"])[0]
            );
            assert_eq!(
                p.patch_runs[1].0,
                usizes(&fx["audio_patch_positions_piece1"])[0]
            );
            let llm = &sa.model.llm;
            let mut state = llm.new_state(512);
            let embeds = sa
                .model
                .embed_prompt(&p, &kept)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = llm
                .logits_last(&llm.forward(&embeds, &mut state).unwrap())
                .unwrap();
            check("long_27s prefill logits", &logits, &fx["prefill_logits"]);
        }
    }
}

#[test]
fn recognizer_trait_partial_and_final() {
    let fx = load_fixture("step_audio2/en_ps_cards_001.safetensors");
    let mut rec = load_step_audio2_recognizer(
        &ckpt(),
        &Device::Cpu,
        DType::F32,
        session_opts(SystemPrompt::English, 12),
    )
    .unwrap();
    assert_eq!(
        rec.frontend(),
        FrontendSpec {
            n_mels: 128,
            tail_zeros: 479
        }
    );
    assert_eq!(rec.max_segment_seconds(), 25.0);
    let audio = to_vec_f32(&fx["audio"]);
    let features = live_features(&audio);
    let expected = ids(&fx["text_tokens"]);
    let partial = rec.decode(&features, &[]).unwrap();
    assert_eq!(partial.tokens, expected);
    assert_eq!(partial.text, rec.detokenize(&expected));
    assert!(partial.avg_logprob < 0.0);
    let with_prefix = rec.decode(&features, &expected[..4]).unwrap();
    assert_eq!(&with_prefix.tokens[..4], &expected[..4]);
    let fin = rec.decode_final(&features, &[]).unwrap();
    assert_eq!(fin.tokens, expected);
    rec.reset_context();
    assert_eq!(rec.decode_final(&features, &[]).unwrap().tokens, expected);
    // Committing a partial's hypothesis leaves the same context as decode_final.
    rec.reset_context();
    let h = rec.decode(&features, &[]).unwrap();
    rec.commit(&features, &h).unwrap();
    let second_a = rec.decode(&features, &[]).unwrap();
    rec.reset_context();
    rec.decode_final(&features, &[]).unwrap();
    let second_b = rec.decode(&features, &[]).unwrap();
    assert_eq!(second_a.tokens, second_b.tokens);
    // A segment longer than 25 s is refused.
    let long = SegmentFeatures {
        n_mels: 128,
        raw_frames: vec![-10.0; 128 * 2600],
        samples: 2600 * 160,
    };
    assert!(rec.decode(&long, &[]).is_err());
}

// ----------------------------------------------------------------- loading

/// A copy of the tiny checkpoint with one tensor of shard `shard` removed
/// (`reshape: None`) or given another shape of the same size.
fn doctored_checkpoint(tag: &str, tensor: &str, reshape: Option<Vec<usize>>) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("sa2_ckpt_{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(ckpt()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_owned();
        let bytes = std::fs::read(&path).unwrap();
        let is_shard = path.extension().is_some_and(|e| e == "safetensors");
        let out = if is_shard {
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            let mut kept = Vec::new();
            for (n, view) in st.tensors() {
                if n == tensor {
                    match &reshape {
                        None => continue,
                        Some(shape) => kept.push((
                            n,
                            safetensors::tensor::TensorView::new(
                                view.dtype(),
                                shape.clone(),
                                view.data(),
                            )
                            .unwrap(),
                        )),
                    }
                } else {
                    kept.push((n, view));
                }
            }
            safetensors::serialize(kept, meta.metadata().clone()).unwrap()
        } else {
            bytes
        };
        std::fs::write(dir.join(name), out).unwrap();
    }
    dir
}

#[test]
fn loading_reports_missing_and_misshaped_tensors_by_name() {
    let missing = "model.layers.1.mlp.up_proj.weight";
    let dir = doctored_checkpoint("missing", missing, None);
    let err = load_step_audio2(&dir, &Device::Cpu, DType::F32)
        .err()
        .expect("must fail");
    eprintln!("missing tensor: {err}");
    assert!(
        matches!(&err, ModelError::MissingTensor { name, .. } if name == missing),
        "{err:?}"
    );
    assert!(err.to_string().contains(missing));

    let misshaped = "encoder.blocks.0.attn.key.weight";
    let dir = doctored_checkpoint("misshaped", misshaped, Some(vec![32, 128]));
    let err = load_step_audio2(&dir, &Device::Cpu, DType::F32)
        .err()
        .expect("must fail");
    eprintln!("misshaped tensor: {err}");
    match &err {
        ModelError::Shape {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(name, misshaped);
            assert_eq!(expected, &vec![64, 64]);
            assert_eq!(found, &vec![32, 128]);
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    assert!(err.to_string().contains(misshaped));

    // The adapter width is read off the weight, so a wrong input width of it
    // is the error to report.
    let dir = doctored_checkpoint("adapter", "adapter.linear1.weight", Some(vec![128, 128]));
    let err = load_step_audio2(&dir, &Device::Cpu, DType::F32)
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("adapter.linear1.weight"), "{err}");

    // bf16 has no CPU matmul in candle: refused up front.
    let err = load_step_audio2(&ckpt(), &Device::Cpu, DType::BF16)
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("bf16"), "{err}");
}

#[test]
fn f16_and_random_weights_build() {
    // f16 runs on the CPU (slowly) and stays close to f32 at this size.
    let sa16 = load_step_audio2(&ckpt(), &Device::Cpu, DType::F16).unwrap();
    let fx = load_fixture("step_audio2/en_ps_cards_001.safetensors");
    let mel = MelExtractor::new(128).step_audio(&to_vec_f32(&fx["audio"]));
    let rows = sa16.model.audio_embeddings(&[&mel]).unwrap();
    let rel = rel_l2(&to_vec_f32(&rows[0]), &to_vec_f32(&fx["adapter_out"]));
    eprintln!("f16 adapter_out rel error {rel:.3e}");
    assert!(rel < 2e-2, "f16 adapter rel error {rel}");

    let cfg = sa16.model.config.clone();
    let model =
        stepaudio_live::model::step_audio2::load::random_weights(&cfg, &Device::Cpu, DType::F32, 7)
            .unwrap();
    let again =
        stepaudio_live::model::step_audio2::load::random_weights(&cfg, &Device::Cpu, DType::F32, 7)
            .unwrap();
    assert_eq!(
        to_vec_f32(&model.llm.lm_head.weight),
        to_vec_f32(&again.llm.lm_head.weight)
    );
    let tok = stepaudio_live::model::step_audio2::prompt::StepTokenizer::load(
        &ckpt().join("tokenizer.json"),
    )
    .unwrap();
    let sa = StepAudio2::new(model, tok).unwrap();
    let mut session = sa.session(session_opts(SystemPrompt::Chinese, 4)).unwrap();
    let out = sa
        .transcribe(
            &mut session,
            &to_vec_f32(&fx["audio"]),
            &TurnOptions::new(4),
        )
        .unwrap();
    assert!(out.scored >= 1);
}

// ------------------------------------------------------------ offline driver

/// Offline transcription of a single-utterance file gives the reference's
/// tokens (one 25 s piece, one turn), the same as the live recogniser's
/// final on that audio; the `transcribe` command loads the checkpoint
/// directory through the common loader and prints that text with its span.
#[test]
fn offline_transcribe_equals_the_live_final_and_the_reference() {
    let sa = load();
    let fx = load_fixture("step_audio2/en_ps_cards_001.safetensors");
    let expected = ids(&fx["text_tokens"]);
    let audio = read_audio(&speech("en_ps_cards_001.wav"));
    let offline = stepaudio_live::transcribe::transcribe_step_audio2(
        &sa,
        &audio,
        session_opts(SystemPrompt::English, expected.len()),
    )
    .unwrap();
    assert_eq!(offline.segments.len(), 1);
    let seg = &offline.segments[0];
    assert_eq!(seg.tokens, expected);
    assert_eq!(seg.start, 0.0);
    assert!((seg.end - audio.len() as f64 / 16000.0).abs() < 1e-9);

    let mut rec = load_step_audio2_recognizer(
        &ckpt(),
        &Device::Cpu,
        DType::F32,
        session_opts(SystemPrompt::English, expected.len()),
    )
    .unwrap();
    let features = live_features(&audio);
    let live = rec.decode_final(&features, &[]).unwrap();
    assert_eq!(live.tokens, seg.tokens);
    assert_eq!(live.text.trim(), seg.text);

    // The command, with the default token budget: the text of the library
    // call with the same budget, as one JSON segment spanning the file.
    let full = stepaudio_live::transcribe::transcribe_step_audio2(
        &sa,
        &audio,
        session_opts(
            SystemPrompt::English,
            SessionOptions::default().max_new_tokens,
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stepaudio-live"))
        .args([
            "transcribe",
            "--language",
            "en",
            "--format",
            "jsonl",
            "--model",
        ])
        .arg(ckpt())
        .arg(speech("en_ps_cards_001.wav"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(
        line["text"].as_str().unwrap().trim(),
        full.segments[0].text,
        "{stdout}"
    );
    assert_eq!(line["start"].as_f64(), Some(0.0), "{stdout}");
}

/// A recording longer than 25 s becomes one segment per piece, each with
/// its own span and the text of its own turn.
#[test]
fn offline_transcribe_of_long_audio_has_one_segment_per_25s_piece() {
    let sa = load();
    let audio = read_audio(&speech("en_mfa_acoustic_corpus.wav"));
    let t = stepaudio_live::transcribe::transcribe_step_audio2(
        &sa,
        &audio,
        session_opts(SystemPrompt::English, 6),
    )
    .unwrap();
    assert_eq!(t.segments.len(), 2);
    assert_eq!((t.segments[0].start, t.segments[0].end), (0.0, 25.0));
    assert_eq!(t.segments[1].start, 25.0);
    assert!((t.segments[1].end - audio.len() as f64 / 16000.0).abs() < 1e-9);
    // The second piece's turn is decoded after the first was committed.
    let rows = sa.audio_rows(&audio).unwrap();
    let mut session = sa.session(session_opts(SystemPrompt::English, 6)).unwrap();
    let turn = TurnOptions::new(6);
    let first = session.decode_final(&sa, &rows[..1], &[], &turn).unwrap();
    let second = session.decode_final(&sa, &rows[1..], &[], &turn).unwrap();
    assert_eq!(t.segments[0].tokens, first.text_tokens);
    assert_eq!(t.segments[1].tokens, second.text_tokens);
}
