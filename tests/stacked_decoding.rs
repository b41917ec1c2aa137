//! The stacked batch decode that Whisper's greedy decoding takes off the CPU
//! (`WhisperModel::greedy_decode_stacked`: one padded prefill, one step for
//! all windows, the live rules on the device) gives each window what the
//! per-row path gives it, checked here on the CPU with real tiny.en (f32
//! decode weights) and real recordings. Windows differ in prompt length
//! (previous text, a forced prefix), budget and audio, so rows are padded,
//! finish at different steps and the stacked state is gathered down.
//! Tolerance: tokens identical; mean log-probability and no-speech
//! probability within 1e-4 (the stacked GEMMs cover more rows, and the
//! device rules sum in f32).

mod common;
use stepaudio_live::model::whisper::decoder::CrossAttention;
use stepaudio_live::model::whisper::decoding::{DecodingOptions, WindowJob};
use stepaudio_live::model::whisper::{DecoderWeights, WhisperModel};
use stepaudio_live::model::LoadedModel;

const FILES: [&str; 5] = [
    "en_ps_cards_001.wav",
    "en_jfk_ask_not.wav",
    "en_mfa_her.wav",
    "en_timit_ldc93s1.wav",
    "en_ps_goforward.wav",
];

fn model() -> std::sync::Arc<WhisperModel> {
    let dir = common::model_dir("tiny.en");
    match LoadedModel::load(
        &dir,
        stepaudio_live::device::DeviceChoice::Cpu,
        None,
        DecoderWeights::F32,
    )
    .expect("tiny.en loads")
    {
        LoadedModel::Whisper(m) => m,
        _ => panic!("tiny.en is a Whisper model"),
    }
}

#[test]
fn stacked_decoding_equals_the_per_row_path() {
    let m = model();
    let crosses: Vec<CrossAttention> = FILES
        .iter()
        .map(|f| {
            let audio = common::read_audio(&common::speech(f));
            let enc = m.encode(&m.mel.whisper(&audio)).unwrap();
            m.cross_attention(&enc).unwrap()
        })
        .collect();
    let (task, _) = common::english_greedy_setup(&m);
    // A previous segment's text (GPT-2 ids of " Hello there, and welcome
    // back.") in front of the task tokens: a longer prompt.
    let previous = [m.tokenizer.sot_prev, 18435, 612, 11, 290, 7062, 736, 13];
    let long: Vec<u32> = previous.iter().chain(&task).copied().collect();
    let forced = [843, 523]; // " And so"
    let jobs: Vec<WindowJob<'_>> = crosses
        .iter()
        .enumerate()
        .map(|(i, cross)| WindowJob {
            cross,
            prompt: if i % 2 == 1 { &long } else { &task },
            sot_index: if i % 2 == 1 { previous.len() } else { 0 },
            forced: if i == 2 { &forced } else { &[] },
            max_new_tokens: [40, 12, 40, 3, 40][i],
        })
        .collect();
    for timestamps in [false, true] {
        let opts = DecodingOptions {
            timestamps,
            ..Default::default()
        };
        let per_row = m.greedy_decode_batch(&jobs, &opts).unwrap();
        let stacked = m.greedy_decode_stacked(&jobs, &opts).unwrap();
        for (i, (a, b)) in per_row.iter().zip(&stacked).enumerate() {
            let what = format!("window {i} ({}), timestamps {timestamps}", FILES[i]);
            assert_eq!(a.tokens, b.tokens, "{what}: tokens");
            assert_eq!(a.finished, b.finished, "{what}: finished");
            assert!(
                (a.avg_logprob - b.avg_logprob).abs() < 1e-4,
                "{what}: mean log-probability {} vs {}",
                a.avg_logprob,
                b.avg_logprob
            );
            assert!(
                (a.no_speech_prob - b.no_speech_prob).abs() < 1e-4,
                "{what}: no-speech probability {} vs {}",
                a.no_speech_prob,
                b.no_speech_prob
            );
        }
        // Something was decoded, and the budgets cut some windows short.
        assert!(per_row.iter().any(|w| w.tokens.len() > 5));
        assert!(!per_row[3].finished && per_row[3].tokens.len() == 3);
    }
}
