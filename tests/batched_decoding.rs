//! Whisper streams decoded as one batch give each stream exactly what it
//! gets decoded alone (real tiny.en, int8 decode weights, real recordings).
//!
//! Each stream follows a script of decodes — partials (with and without a
//! forced prefix, rolled back afterwards) and finals (committed, so later
//! segments are conditioned on them and carry their audio) — and the
//! batched run groups the streams' steps differently from round to round:
//! streams join late, leave early, and a round holds more streams than one
//! int8 row group (8). Tolerance: none; tokens, text and mean
//! log-probability must be identical, since every row of a batch step
//! takes the same kernels as a lone step.

mod common;
use stepaudio_live::model::batch::{after_finals, decode_batch, decode_one, BatchRequest};
use stepaudio_live::model::recognizer::{Hypothesis, Recognizer, SegmentFeatures};
use stepaudio_live::model::RecognizerOptions;

const FILES: [&str; 12] = [
    "en_ps_cards_001.wav",
    "en_ps_cards_002.wav",
    "en_ps_cards_003.wav",
    "en_ps_cards_004.wav",
    "en_ps_cards_005.wav",
    "en_jfk_ask_not.wav",
    "en_mfa_words.wav",
    "en_mfa_her.wav",
    "en_ps_goforward.wav",
    "en_timit_ldc93s1.wav",
    "en_mfa_thoughts.wav",
    "en_librispeech_61-70968-0000.wav",
];

fn recognizer() -> Box<dyn Recognizer> {
    common::tiny_en()
        .recognizer(&RecognizerOptions::default())
        .unwrap()
}

/// One decode of a stream's script.
struct Step {
    features: SegmentFeatures,
    prefix: Vec<u32>,
    commit: bool,
}

/// Stream `i`: a partial of the first 60 % of recording a (then, for odd
/// streams, one with a forced prefix), a's final, a partial of recording
/// b, b's final: the second segment is decoded after the first's carried
/// audio and committed text.
fn script(i: usize, rec: &dyn Recognizer, prefix_of: &dyn Fn(usize) -> Vec<u32>) -> Vec<Step> {
    let a = common::read_audio(&common::speech(FILES[i % FILES.len()]));
    let b = common::read_audio(&common::speech(FILES[(i + 5) % FILES.len()]));
    let step = |audio: &[f32], prefix: Vec<u32>, commit| Step {
        features: common::live_features(rec, audio),
        prefix,
        commit,
    };
    let mut steps = vec![step(&a[..a.len() * 6 / 10], Vec::new(), false)];
    if i % 2 == 1 {
        steps.push(step(&a[..a.len() * 8 / 10], prefix_of(i), false));
    }
    steps.push(step(&a, Vec::new(), true));
    steps.push(step(&b[..b.len() / 2], Vec::new(), false));
    steps.push(step(&b, Vec::new(), true));
    steps
}

/// The script decoded alone; after a final the recogniser prepares for the
/// next segment on its own (`after_final`: Whisper encodes the carried audio).
fn alone(steps: &[Step]) -> Vec<Hypothesis> {
    let mut rec = recognizer();
    steps
        .iter()
        .map(|s| {
            let h = decode_one(&mut BatchRequest {
                recognizer: rec.as_mut(),
                features: &s.features,
                prefix: &s.prefix,
                commit: s.commit,
                partial: false,
            })
            .unwrap();
            if s.commit {
                rec.after_final().unwrap();
            }
            h
        })
        .collect()
}

/// Runs the scripts in rounds: in round r, stream i takes its next step if
/// `takes(r, i)`; every step of a round is one batch, and the streams whose
/// final it was prepare for their next segments together (`after_finals`),
/// as the engine does.
fn batched(
    scripts: &[Vec<Step>],
    takes: impl Fn(usize, usize) -> bool,
) -> (Vec<Vec<Hypothesis>>, usize, usize) {
    let mut recs: Vec<Box<dyn Recognizer>> = scripts.iter().map(|_| recognizer()).collect();
    let mut next = vec![0usize; scripts.len()];
    let mut out: Vec<Vec<Hypothesis>> = scripts.iter().map(|_| Vec::new()).collect();
    let (mut widest, mut widest_after) = (0, 0);
    for round in 0.. {
        if (0..scripts.len()).all(|i| next[i] == scripts[i].len()) {
            break;
        }
        assert!(round < 100, "the schedule never finishes");
        let chosen: Vec<usize> = (0..scripts.len())
            .filter(|&i| next[i] < scripts[i].len() && takes(round, i))
            .collect();
        let mut requests: Vec<BatchRequest<'_>> = Vec::new();
        for (i, rec) in recs.iter_mut().enumerate() {
            if chosen.contains(&i) {
                let s = &scripts[i][next[i]];
                requests.push(BatchRequest {
                    recognizer: rec.as_mut(),
                    features: &s.features,
                    prefix: &s.prefix,
                    commit: s.commit,
                    partial: false,
                });
            }
        }
        widest = widest.max(requests.len());
        for (&i, result) in chosen.iter().zip(decode_batch(&mut requests)) {
            out[i].push(result.unwrap());
            next[i] += 1;
        }
        let finished: Vec<usize> = chosen
            .iter()
            .copied()
            .filter(|&i| scripts[i][next[i] - 1].commit)
            .collect();
        let mut prepared: Vec<&mut dyn Recognizer> = Vec::new();
        for (i, rec) in recs.iter_mut().enumerate() {
            if finished.contains(&i) {
                prepared.push(rec.as_mut());
            }
        }
        widest_after = widest_after.max(prepared.len());
        for result in after_finals(&mut prepared) {
            result.unwrap();
        }
    }
    (out, widest, widest_after)
}

fn assert_same(alone: &[Vec<Hypothesis>], batched: &[Vec<Hypothesis>]) {
    for (i, (a, b)) in alone.iter().zip(batched).enumerate() {
        assert_eq!(a.len(), b.len());
        for (k, (a, b)) in a.iter().zip(b).enumerate() {
            assert_eq!(
                a.tokens, b.tokens,
                "stream {i} step {k}: {:?} vs {:?}",
                a.text, b.text
            );
            assert_eq!(a.text, b.text);
            assert_eq!(a.avg_logprob, b.avg_logprob, "stream {i} step {k}");
            assert_eq!(a.no_speech_prob, b.no_speech_prob, "stream {i} step {k}");
        }
    }
}

#[test]
fn a_batch_gives_every_stream_its_unbatched_tokens() {
    let probe = recognizer();
    // The forced prefix of stream i: the first two tokens of its first partial alone.
    let prefix_of = |i: usize| {
        let a = common::read_audio(&common::speech(FILES[i % FILES.len()]));
        let mut rec = recognizer();
        let f = common::live_features(probe.as_ref(), &a[..a.len() * 6 / 10]);
        let h = rec.decode(&f, &[]).unwrap();
        h.tokens[..2.min(h.tokens.len())].to_vec()
    };
    let n = 10;
    let scripts: Vec<Vec<Step>> = (0..n)
        .map(|i| script(i, probe.as_ref(), &prefix_of))
        .collect();
    let reference: Vec<Vec<Hypothesis>> = scripts.iter().map(|s| alone(s)).collect();
    assert!(
        reference
            .iter()
            .all(|r| r.iter().any(|h| !h.tokens.is_empty())),
        "every stream decodes some speech"
    );

    // Everyone in every round: 10 streams, more than one int8 row group.
    let (all, widest, widest_after) = batched(&scripts, |_, _| true);
    assert_eq!(widest, n);
    // the even streams' first finals share a round (the odd ones take one
    // partial more): prepared together
    assert_eq!(widest_after, n / 2);
    assert_same(&reference, &all);

    // Streams join late and take turns: stream i starts in round i / 3 and
    // then skips every third round, so partials and finals of different
    // segments share batches and streams leave while others go on.
    let (staggered, _, _) = batched(&scripts, |r, i| r >= i / 3 && (r + i) % 3 != 0);
    assert_same(&reference, &staggered);
}
