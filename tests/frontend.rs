//! Log-mel frontend against the numpy/librosa reference in
//! `scripts/reference/make_frontend_fixtures.py` (max abs error ≤ 1e-4), and
//! the streaming API against the one-shot computation (bit-identical).

mod common;
use common::*;
use std::sync::Arc;
use stepaudio_live::frontend::{
    mel_filterbank, LogMel, MelExtractor, MelStream, STEP_AUDIO_TAIL_PADDING,
};

const TOLERANCE: f32 = 1e-4;

#[test]
fn filterbanks_match_librosa() {
    for (file, key, n) in [
        ("frontend/whisper80.safetensors", "filters80", 80),
        ("frontend/stepaudio128.safetensors", "filters128", 128),
    ] {
        let fx = load_fixture(file);
        let reference = to_vec_f32(&fx[key]);
        let ours = mel_filterbank(n);
        let err = max_abs_diff(&ours, &reference);
        assert!(
            err < 1e-6,
            "{n}-bin filterbank differs from librosa by {err}"
        );
    }
}

#[test]
fn whisper_log_mel_matches_reference() {
    let fx = load_fixture("frontend/whisper80.safetensors");
    let audio = to_vec_f32(&fx["audio"]);
    let mel = MelExtractor::new(80).whisper(&audio);
    assert_eq!((mel.n_mels, mel.n_frames), (80, 3000));
    let err = max_abs_diff(&mel.data, &to_vec_f32(&fx["log_mel"]));
    assert!(err <= TOLERANCE, "max abs error {err}");
}

#[test]
fn step_audio_log_mel_matches_reference() {
    for file in [
        "frontend/stepaudio128.safetensors",
        "frontend/stepaudio128_jfk.safetensors",
    ] {
        let fx = load_fixture(file);
        let audio = to_vec_f32(&fx["audio"]);
        let reference = &fx["log_mel"];
        let mel = MelExtractor::new(128).step_audio(&audio);
        assert_eq!(
            vec![mel.n_mels, mel.n_frames],
            reference.dims().to_vec(),
            "{file}"
        );
        let err = max_abs_diff(&mel.data, &to_vec_f32(reference));
        assert!(err <= TOLERANCE, "{file}: max abs error {err}");
    }
}

/// Deterministic chunk sizes from a tiny LCG (no test-time randomness).
fn chunk_sizes(seed: u64, total: usize) -> Vec<usize> {
    let mut state = seed;
    let mut sizes = Vec::new();
    let mut left = total;
    while left > 0 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let n = ((state >> 33) as usize % 1700 + 1).min(left);
        sizes.push(n);
        left -= n;
    }
    sizes
}

#[test]
fn streaming_frames_equal_one_shot_bit_for_bit() {
    let fx = load_fixture("frontend/stepaudio128_jfk.safetensors");
    let audio = to_vec_f32(&fx["audio"]);
    let extractor = Arc::new(MelExtractor::new(128));
    let one_shot = extractor.step_audio(&audio);
    for seed in 0..5u64 {
        let mut stream = MelStream::new(extractor.clone());
        let mut raw = Vec::new();
        let mut pos = 0;
        for n in chunk_sizes(seed, audio.len()) {
            raw.extend(stream.push(&audio[pos..pos + n]));
            pos += n;
            // Frames already emitted never exceed what the one-shot has.
            assert!(stream.frames_emitted() <= one_shot.n_frames);
        }
        raw.extend(stream.push(&vec![0.0; STEP_AUDIO_TAIL_PADDING]));
        raw.extend(stream.finish());
        let streamed = LogMel::from_raw_frames(128, raw);
        assert_eq!(
            streamed, one_shot,
            "seed {seed}: streamed mel differs from one-shot"
        );
    }
}

#[test]
fn streaming_handles_tiny_pushes_and_short_signals() {
    let extractor = Arc::new(MelExtractor::new(80));
    let signal: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.05).sin() * 0.3).collect();
    let mut stream = MelStream::new(extractor.clone());
    let mut raw = Vec::new();
    for s in &signal {
        raw.extend(stream.push(std::slice::from_ref(s)));
    }
    raw.extend(stream.finish());
    let one_shot = LogMel::from_raw_frames(80, extractor.raw_frames(&signal));
    assert_eq!(LogMel::from_raw_frames(80, raw), one_shot);
    // Shorter than the reflect padding: still frames, no panic.
    let short = extractor.raw_frames(&signal[..170]);
    assert_eq!(short.len(), 80);
    assert!(short.iter().all(|v| v.is_finite()));
}

#[test]
fn snapshot_equals_one_shot_of_the_prefix_with_zero_tail() {
    let fx = load_fixture("frontend/stepaudio128_jfk.safetensors");
    let audio = to_vec_f32(&fx["audio"]);
    let extractor = Arc::new(MelExtractor::new(128));
    let mut stream = MelStream::new(extractor.clone());
    let mut pos = 0;
    for (i, n) in chunk_sizes(7, audio.len()).into_iter().enumerate() {
        stream.push(&audio[pos..pos + n]);
        pos += n;
        // Snapshot at the current end and somewhat before it, with both tails.
        for len in [pos, pos.saturating_sub(i * 37 % 900)] {
            for tail in [STEP_AUDIO_TAIL_PADDING, 400] {
                let mut signal = audio[..len].to_vec();
                signal.resize(len + tail, 0.0);
                let expected = extractor.raw_frames(&signal);
                let got = stream.snapshot(len, tail);
                assert_eq!(got, expected, "len {len} tail {tail}");
            }
        }
    }
}
