//! Batched Step-Audio 2 decoding on the tiny random checkpoint (f32, CPU):
//! several streams' turns run as one batch must give each stream exactly what
//! it gets decoded alone — the same tokens, text and log-probability, and the
//! same KV cache afterwards — while streams leave the batch at different
//! steps, partials roll back and finals commit inside the same batch, and
//! later batches take a different set of streams.
//!
//! The tiny checkpoint's random weights rarely choose `<|EOT|>` (one clip
//! below does), so streams are also given different budgets (through the
//! session API) to make them leave at different steps; the tests assert
//! that this happened.

mod common;
use candle_core::{DType, Tensor};
use common::*;
use std::sync::Arc;
use stepaudio_live::device::DeviceChoice;
use stepaudio_live::frontend::MelExtractor;
use stepaudio_live::model::batch::{decode_batch, decode_one, BatchRequest};
use stepaudio_live::model::recognizer::{Hypothesis, Recognizer, SegmentFeatures};
use stepaudio_live::model::step_audio2::prompt::SystemPrompt;
use stepaudio_live::model::step_audio2::{
    Session, SessionOptions, StepAudio2, TurnLoop, TurnOptions, TurnOutput, TurnRequest,
};
use stepaudio_live::model::{LoadedModel, RecognizerOptions};

/// Relative tolerance between a batched and an unbatched stream (log-prob
/// sums, KV caches): a batch's projections are one `[B, H]` GEMM, whose rows
/// the CPU kernel sums in another order than a single row, so values may
/// differ in their last bits; ids must be identical.
const TOLERANCE: f64 = 1e-5;

/// Clips of different lengths (seconds cut from the start of each file).
const CLIPS: [(&str, f64); 4] = [
    ("en_ps_cards_001.wav", 25.0),
    ("en_jfk_ask_not.wav", 3.0),
    ("zh_aishell1_BAC009S0764W0121.wav", 25.0),
    ("en_timit_ldc93s1.wav", 2.0),
];

fn model() -> LoadedModel {
    LoadedModel::load(
        &fixture("step_audio2/tiny_ckpt"),
        DeviceChoice::Cpu,
        Some(DType::F32),
        Default::default(),
    )
    .unwrap()
}

fn step_audio2(model: &LoadedModel) -> Arc<StepAudio2> {
    match model {
        LoadedModel::StepAudio2(sa) => sa.clone(),
        LoadedModel::Whisper(_) => panic!("the tiny checkpoint is Step-Audio 2"),
    }
}

fn audio(name: &str, seconds: f64) -> Vec<f32> {
    let mut audio = read_audio(&speech(name));
    audio.truncate((seconds * 16000.0) as usize);
    audio
}

/// The live pipeline's features of a clip: its raw frames, then 479 zeros.
fn features(name: &str, seconds: f64) -> SegmentFeatures {
    let mut padded = audio(name, seconds);
    let samples = padded.len();
    padded.resize(samples + 479, 0.0);
    SegmentFeatures {
        n_mels: 128,
        raw_frames: MelExtractor::new(128).raw_frames(&padded),
        samples,
    }
}

/// Adapter rows of a clip (one piece), as a session turn takes them.
fn rows(sa: &StepAudio2, name: &str, seconds: f64) -> Tensor {
    let mel = MelExtractor::new(128).step_audio(&audio(name, seconds));
    sa.model.audio_embeddings(&[&mel]).unwrap().remove(0)
}

fn kv_snapshot(session: &Session) -> Vec<(Vec<f32>, Vec<f32>)> {
    let st = session.state();
    (0..st.num_layers())
        .map(|i| match st.layer(i).unwrap() {
            Some((k, v)) => (to_vec_f32(&k), to_vec_f32(&v)),
            None => (vec![], vec![]),
        })
        .collect()
}

fn assert_same_hypothesis(what: &str, batched: &Hypothesis, alone: &Hypothesis) {
    assert_eq!(batched.tokens, alone.tokens, "{what}: tokens");
    assert_eq!(batched.text, alone.text, "{what}: text");
    let rel = (batched.avg_logprob - alone.avg_logprob).abs() / alone.avg_logprob.abs().max(1e-12);
    assert!(
        rel <= 1e-4,
        "{what}: avg_logprob {} vs {} alone",
        batched.avg_logprob,
        alone.avg_logprob
    );
}

/// A batched turn against the same turn decoded alone: every field that does
/// not measure time, the log-probability sum exactly.
fn assert_same_turn(what: &str, batched: &TurnOutput, alone: &TurnOutput) {
    assert_eq!(batched.generated, alone.generated, "{what}: generated ids");
    assert_eq!(batched.text_tokens, alone.text_tokens, "{what}: text ids");
    assert_eq!(batched.finished, alone.finished, "{what}: finished");
    assert_eq!(batched.scored, alone.scored, "{what}: scored");
    assert_eq!(batched.decode_steps, alone.decode_steps, "{what}: steps");
    assert_eq!(batched.prompt_tokens, alone.prompt_tokens, "{what}: prompt");
    assert_eq!(batched.restarted, alone.restarted, "{what}: restarted");
    let rel = (batched.sum_logprob - alone.sum_logprob).abs() / alone.sum_logprob.abs().max(1e-12);
    eprintln!("{what}: sum_logprob rel diff {rel:.2e}");
    assert!(
        rel <= TOLERANCE,
        "{what}: sum of log-probabilities {} vs {} alone",
        batched.sum_logprob,
        alone.sum_logprob
    );
}

fn assert_same_session(what: &str, batched: &Session, alone: &Session) {
    assert_eq!(
        batched.committed_len(),
        alone.committed_len(),
        "{what}: committed"
    );
    assert_eq!(
        batched.state().len(),
        alone.state().len(),
        "{what}: cache length"
    );
    assert_eq!(batched.restarts(), alone.restarts(), "{what}: restarts");
    let mut worst = 0f64;
    for (l, ((kb, vb), (ka, va))) in kv_snapshot(batched)
        .iter()
        .zip(&kv_snapshot(alone))
        .enumerate()
    {
        for (b, a) in [(kb, ka), (vb, va)] {
            let rel = rel_l2(b, a);
            worst = worst.max(rel);
            assert!(
                rel <= TOLERANCE,
                "{what}: layer {l} K/V rel error {rel:.2e}"
            );
        }
    }
    eprintln!("{what}: KV cache rel diff {worst:.2e}");
}

/// (1) Four streams of different lengths through the public batch API:
/// partials, finals, then partials and finals mixed. Each result equals the stream decoded alone, and
/// the committed context too — a later unbatched partial on each batched
/// stream equals the same partial on the stream that did everything alone.
#[test]
fn a_batch_of_four_equals_each_stream_alone() {
    let model = model();
    let opts = RecognizerOptions::default();
    let new = || -> Vec<Box<dyn Recognizer>> {
        (0..CLIPS.len())
            .map(|_| model.recognizer(&opts).unwrap())
            .collect()
    };
    let (mut batched, mut alone) = (new(), new());
    let feats: Vec<SegmentFeatures> = CLIPS.iter().map(|&(n, s)| features(n, s)).collect();
    let next: Vec<SegmentFeatures> = CLIPS
        .iter()
        .rev()
        .map(|&(n, s)| features(n, s.min(4.0)))
        .collect();
    let prefixes: [&[u32]; 4] = [&[], &[210, 87], &[], &[16]];

    // Partials, finals, then a mix of both.
    for commits in [[false; 4], [true; 4], [true, false, false, true]] {
        let mut requests: Vec<BatchRequest<'_>> = batched
            .iter_mut()
            .zip(&feats)
            .zip(prefixes)
            .zip(commits)
            .map(|(((r, f), prefix), commit)| BatchRequest {
                recognizer: r.as_mut(),
                features: f,
                prefix,
                commit,
                partial: false,
            })
            .collect();
        let t = std::time::Instant::now();
        let results = decode_batch(&mut requests);
        let batch_time = t.elapsed();
        drop(requests);
        let t = std::time::Instant::now();
        for (i, (r, result)) in alone.iter_mut().zip(results).enumerate() {
            let mut one = BatchRequest {
                recognizer: r.as_mut(),
                features: &feats[i],
                prefix: prefixes[i],
                commit: commits[i],
                partial: false,
            };
            let reference = decode_one(&mut one).unwrap();
            let what = format!("stream {i} (commit {})", commits[i]);
            assert_same_hypothesis(&what, &result.unwrap(), &reference);
            assert!(
                reference.tokens.len() > prefixes[i].len(),
                "{what}: decoded nothing"
            );
        }
        eprintln!(
            "commits {commits:?}: batch of 4 {batch_time:?}, the same 4 one by one {:?}",
            t.elapsed()
        );
    }
    // The committed contexts match: the next segment decodes alike.
    for (i, ((b, a), f)) in batched.iter_mut().zip(&mut alone).zip(&next).enumerate() {
        let hb = b.decode(f, &[]).unwrap();
        let ha = a.decode(f, &[]).unwrap();
        assert_same_hypothesis(&format!("stream {i}, the turn after the final"), &hb, &ha);
    }
}

/// One session-API batch: runs `turns` (session index, clip, prefix, commit,
/// budget) batched on `batched` and one by one on `alone`, and checks every
/// turn's output and every touched session against its unbatched twin.
#[allow(clippy::type_complexity)]
fn batch_against_alone(
    sa: &StepAudio2,
    batched: &mut [Session],
    alone: &mut [Session],
    turns: &[(usize, &Tensor, &[u32], bool, usize)],
) -> Vec<TurnOutput> {
    let opts: Vec<TurnOptions> = turns.iter().map(|t| TurnOptions::new(t.4)).collect();
    let audio: Vec<[Tensor; 1]> = turns.iter().map(|t| [t.1.clone()]).collect();
    let mut requests: Vec<TurnRequest<'_>> = Vec::new();
    // Sessions in the order the turns name them (each at most once).
    let mut slots: Vec<Option<&mut Session>> = batched.iter_mut().map(Some).collect();
    for (k, t) in turns.iter().enumerate() {
        requests.push(TurnRequest {
            session: slots[t.0].take().expect("one turn per session"),
            audio: &audio[k],
            prefix: t.2,
            commit: t.3,
            opts: &opts[k],
        });
    }
    let outs: Vec<TurnOutput> = Session::run_turns(sa, &mut requests)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    drop(requests);
    for (k, (t, out)) in turns.iter().zip(&outs).enumerate() {
        let s = &mut alone[t.0];
        let reference = if t.3 {
            s.decode_final(sa, &audio[k], t.2, &opts[k])
        } else {
            s.decode_partial(sa, &audio[k], t.2, &opts[k])
        }
        .unwrap();
        let what = format!("session {} (commit {}, budget {})", t.0, t.3, t.4);
        assert_same_turn(&what, out, &reference);
        assert_same_session(&what, &batched[t.0], &alone[t.0]);
        if !t.3 {
            assert_eq!(
                batched[t.0].state().len(),
                batched[t.0].committed_len(),
                "{what}: a partial leaves only the committed context"
            );
        }
    }
    outs
}

fn sessions(sa: &StepAudio2, opts: &[SessionOptions]) -> Vec<Session> {
    opts.iter()
        .map(|o| sa.session(o.clone()).unwrap())
        .collect()
}

/// (2) Streams leave the batch at different steps (budgets 3, 200, 512 and
/// one `<|EOT|>`) while the others go on, and a later batch takes a different set of
/// streams (one new, one left out), one of which restarts its context after
/// its final.
#[test]
fn streams_leave_the_batch_and_later_batches_take_others() {
    let model = model();
    let sa = step_audio2(&model);
    let clips: Vec<Tensor> = CLIPS.iter().map(|&(n, s)| rows(&sa, n, s)).collect();
    let english = SessionOptions {
        system_prompt: SystemPrompt::English,
        ..Default::default()
    };
    // Session 3 restarts once its committed context passes 300 tokens.
    let small = SessionOptions {
        max_context: 300,
        ..Default::default()
    };
    let opts = [
        SessionOptions::default(),
        english.clone(),
        SessionOptions::default(),
        small,
        english,
    ];
    let (mut batched, mut alone) = (sessions(&sa, &opts), sessions(&sa, &opts));

    // Session 1 (English prompt) on this clip stops at <|EOT|> after 348
    // steps; the others stop at their budgets.
    let eot_clip = rows(&sa, "en_mfa_her.wav", 25.0);
    let turns: Vec<(usize, &Tensor, &[u32], bool, usize)> = vec![
        (0, &clips[0], &[], true, 3),
        (1, &eot_clip, &[], true, 512),
        (2, &clips[2], &[], true, 200),
        (3, &clips[3], &[], true, 512),
    ];
    let outs = batch_against_alone(&sa, &mut batched, &mut alone, &turns);
    let steps: Vec<usize> = outs.iter().map(|o| o.decode_steps).collect();
    let finished: Vec<bool> = outs.iter().map(|o| o.finished).collect();
    eprintln!("first batch: steps {steps:?}, finished {finished:?}");
    // All four stepped together, then left one by one while the rest went on:
    // at the budget (0, 2, 3) or at <|EOT|> (1).
    assert!(
        outs.iter().all(|o| o.peak_batch == 4),
        "all four in one batch"
    );
    assert_eq!(steps, [2, 348, 199, 511]);
    assert_eq!(finished, [false, true, false, false]);
    assert!(outs[3].restarted, "session 3 passed its max_context");
    assert_eq!(batched[3].committed_len(), batched[3].system_len());

    // A different set: session 4 joins, session 0 sits out, 3 commits 25 s
    // again (its context passes 300 and restarts).
    let turns: Vec<(usize, &Tensor, &[u32], bool, usize)> = vec![
        (4, &clips[1], &[], true, 60),
        (1, &clips[3], &[16, 429], true, 10),
        (3, &clips[0], &[], true, 300),
        (2, &clips[2], &[], false, 25),
    ];
    let restarts_before = batched[3].restarts();
    let outs = batch_against_alone(&sa, &mut batched, &mut alone, &turns);
    assert!(outs.iter().all(|o| o.peak_batch == 4));
    assert!(outs[2].restarted && batched[3].restarts() > restarts_before);
    assert_eq!(batched[3].committed_len(), batched[3].system_len());
    // Session 0 was not in it: still equal to its twin.
    assert_same_session("session 0, left out", &batched[0], &alone[0]);

    // A third batch of two, then a batch of one.
    let turns: Vec<(usize, &Tensor, &[u32], bool, usize)> =
        vec![(0, &clips[1], &[], true, 20), (3, &clips[0], &[], false, 7)];
    let outs = batch_against_alone(&sa, &mut batched, &mut alone, &turns);
    assert!(outs.iter().all(|o| o.peak_batch == 2));
    let turns: Vec<(usize, &Tensor, &[u32], bool, usize)> = vec![(2, &clips[3], &[], true, 9)];
    batch_against_alone(&sa, &mut batched, &mut alone, &turns);
}

/// (3) Partials and finals in one batch: the partials roll back to their
/// committed context (bit-identical to before), the finals commit exactly
/// what they commit alone, and a budget of 0 or 1 (no decode step) works in
/// a batch too.
#[test]
fn partials_roll_back_and_finals_commit_inside_one_batch() {
    let model = model();
    let sa = step_audio2(&model);
    let clips: Vec<Tensor> = CLIPS.iter().map(|&(n, s)| rows(&sa, n, s)).collect();
    let opts = vec![SessionOptions::default(); 5];
    let (mut batched, mut alone) = (sessions(&sa, &opts), sessions(&sa, &opts));
    // Give every stream a committed turn first (batched, checked too).
    let turns: Vec<(usize, &Tensor, &[u32], bool, usize)> = (0..5)
        .map(|i| (i, &clips[i % 4], &[][..], true, 8 + i))
        .collect();
    batch_against_alone(&sa, &mut batched, &mut alone, &turns);
    let before: Vec<_> = batched.iter().map(kv_snapshot).collect();
    let committed: Vec<usize> = batched.iter().map(Session::committed_len).collect();

    let turns: Vec<(usize, &Tensor, &[u32], bool, usize)> = vec![
        (0, &clips[1], &[], false, 50),
        (1, &clips[2], &[210, 87], true, 12),
        (2, &clips[3], &[], false, 5),
        (3, &clips[0], &[], true, 0),
        (4, &clips[2], &[16], false, 1),
    ];
    let outs = batch_against_alone(&sa, &mut batched, &mut alone, &turns);
    assert_eq!(outs[0].peak_batch, 3, "partial 0 stepped with the others");
    assert_eq!(outs[3].decode_steps, 0);
    for &i in &[0, 2, 4] {
        assert!(
            kv_snapshot(&batched[i]) == before[i],
            "session {i}: a partial changed the committed cache"
        );
    }
    for &i in &[1, 3] {
        assert!(batched[i].committed_len() > committed[i]);
        assert_ne!(
            kv_snapshot(&batched[i]),
            before[i],
            "session {i}: nothing committed"
        );
    }
}

/// ‖a − b‖∞ / ‖b‖∞ of two tensors (f32).
fn rel_max(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    (diff / scale) as f64
}

/// The batched prefill: streams with different cached pasts (none, short,
/// longer) and different numbers of new positions (several, one, many) in
/// one `forward_batch` give each stream the hidden states and KV cache of
/// its own `forward` (the rows' GEMM sums in another order: TOLERANCE).
#[test]
fn a_batched_forward_of_different_lengths_equals_each_stream_alone() {
    let model = model();
    let sa = step_audio2(&model);
    let llm = &sa.model.llm;
    let ids = |seed: u32, n: usize| -> Vec<u32> {
        (0..n as u32)
            .map(|i| (seed * 7919 + i * 104_729) % 700)
            .collect()
    };
    let pasts = [0usize, 5, 40];
    let news = [7usize, 1, 23];
    let fresh = || {
        pasts
            .iter()
            .enumerate()
            .map(|(s, &p)| {
                let mut st = llm.new_state(8);
                if p > 0 {
                    let e = llm.embed(&ids(s as u32, p)).unwrap().unsqueeze(0).unwrap();
                    llm.forward(&e, &mut st).unwrap();
                }
                st
            })
            .collect::<Vec<_>>()
    };
    let inputs: Vec<Tensor> = news
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            llm.embed(&ids(100 + s as u32, n))
                .unwrap()
                .unsqueeze(0)
                .unwrap()
        })
        .collect();
    let mut batched = fresh();
    let hidden = {
        let mut refs: Vec<_> = batched.iter_mut().collect();
        llm.forward_batch(&inputs, &mut refs).unwrap()
    };
    let mut alone = fresh();
    for s in 0..pasts.len() {
        let h = llm.forward(&inputs[s], &mut alone[s]).unwrap();
        assert_eq!(hidden[s].dims(), h.dims(), "stream {s}: hidden shape");
        let e = rel_max(&hidden[s], &h);
        assert!(e <= TOLERANCE, "stream {s}: hidden states differ by {e:e}");
        assert_eq!(
            batched[s].len(),
            pasts[s] + news[s],
            "stream {s}: cache length"
        );
        assert_eq!(batched[s].len(), alone[s].len());
        for l in 0..batched[s].num_layers() {
            let (bk, bv) = batched[s].layer(l).unwrap().unwrap();
            let (ak, av) = alone[s].layer(l).unwrap().unwrap();
            for (x, y, what) in [(&bk, &ak, "keys"), (&bv, &av, "values")] {
                let e = rel_max(x, y);
                assert!(
                    e <= TOLERANCE,
                    "stream {s}, layer {l}: {what} differ by {e:e}"
                );
            }
        }
    }
}

/// (5) Continuous batching: turns join a running loop between its steps and
/// leave it while the others go on — two start together, two more join after
/// 5 steps (a final and a partial), and the first stream's next segment joins
/// right after its turn is taken back. Every turn equals the same turn
/// decoded alone, and so does every session afterwards.
#[test]
fn turns_joining_a_running_loop_equal_each_stream_alone() {
    let model = model();
    let sa = step_audio2(&model);
    let clips: Vec<Tensor> = CLIPS.iter().map(|&(n, s)| rows(&sa, n, s)).collect();
    let opts = vec![SessionOptions::default(); 4];
    let (mut looped, mut alone) = (sessions(&sa, &opts), sessions(&sa, &opts));
    // (session, clip, prefix, commit, budget, the step it joins at)
    type Joining<'a> = (usize, usize, &'a [u32], bool, usize, usize);
    let prefix: &[u32] = &[210, 87];
    let plan: [Joining<'_>; 5] = [
        (0, 0, &[], true, 8, 0),
        (1, 1, prefix, false, 30, 0),
        (2, 2, &[], true, 12, 5),
        (3, 3, &[], false, 20, 5),
        // session 0's next segment, once its first turn is back (step 8)
        (0, 3, &[], true, 10, 8),
    ];
    let turn_opts: Vec<TurnOptions> = plan.iter().map(|p| TurnOptions::new(p.4)).collect();
    let audio: Vec<[Tensor; 1]> = plan.iter().map(|p| [clips[p.1].clone()]).collect();
    let mut outs: Vec<Option<TurnOutput>> = plan.iter().map(|_| None).collect();
    let mut batch = TurnLoop::new(&sa);
    let mut step = 0;
    let mut joined = 0;
    while joined < plan.len() || !batch.is_idle() {
        // Join every turn due by now whose session is free.
        let mut keys = Vec::new();
        let mut slots: Vec<Option<&mut Session>> = looped.iter_mut().map(Some).collect();
        let mut requests = Vec::new();
        while joined < plan.len() && plan[joined].5 <= step {
            let p = plan[joined];
            let Some(session) = slots[p.0].take() else {
                break;
            };
            if outs[..joined]
                .iter()
                .zip(&plan)
                .any(|(o, q)| q.0 == p.0 && o.is_none())
            {
                break; // its earlier turn is still in the loop
            }
            keys.push(joined as u64);
            requests.push(TurnRequest {
                session,
                audio: &audio[joined],
                prefix: p.2,
                commit: p.3,
                opts: &turn_opts[joined],
            });
            joined += 1;
        }
        drop(slots);
        if !requests.is_empty() {
            for r in batch.admit(&sa, &keys, &mut requests) {
                r.unwrap();
            }
        }
        drop(requests);
        if step == 1 {
            // A session whose turn is in the loop cannot start another.
            let mut again = [TurnRequest {
                session: &mut looped[0],
                audio: &audio[0],
                prefix: &[],
                commit: false,
                opts: &turn_opts[0],
            }];
            let refused = batch.admit(&sa, &[99], &mut again);
            assert!(refused[0].is_err(), "a second turn of a busy session");
        }
        for key in batch.step(&sa) {
            let k = key as usize;
            let out = batch.finish(key, &mut looped[plan[k].0]).unwrap().unwrap();
            outs[k] = Some(out);
        }
        step += 1;
        assert!(step < 1000, "the loop never ended");
    }
    for (k, p) in plan.iter().enumerate() {
        let s = &mut alone[p.0];
        let reference = if p.3 {
            s.decode_final(&sa, &audio[k], p.2, &turn_opts[k])
        } else {
            s.decode_partial(&sa, &audio[k], p.2, &turn_opts[k])
        }
        .unwrap();
        let out = outs[k].as_ref().expect("every turn ended");
        let what = format!("turn {k} (session {}, commit {}, budget {})", p.0, p.3, p.4);
        assert_same_turn(&what, out, &reference);
        eprintln!("{what}: peak batch {}", out.peak_batch);
    }
    for i in 0..looped.len() {
        assert_same_session(&format!("session {i}"), &looped[i], &alone[i]);
    }
    // The turns overlapped: 2 and 3 joined while 0 and 1 were stepping, and
    // session 0's second turn joined turns still running.
    let peak: Vec<usize> = outs
        .iter()
        .map(|o| o.as_ref().unwrap().peak_batch)
        .collect();
    assert_eq!(peak[0], 4, "turns 2 and 3 joined turns 0 and 1 mid-way");
    assert!(peak[4] >= 2, "session 0's next turn joined a running loop");
    if stepaudio_live::ops::fast::fast_paths().fold {
        // turns 0 and 1 at the admission of 2 and 3, the rest at turn 4's
        assert_eq!(batch.steps_in_admissions(), 2, "steps inside admissions");
    }
}

/// A turn given `draft` against the same turn without (`base`, decoded on a
/// session in the same state): the same ids, text, end and log-probability
/// sum; the agreeing draft ids (its common start with `base`'s ids, of those
/// offered) taken without decode steps.
fn assert_same_but_drafted(what: &str, out: &TurnOutput, base: &TurnOutput, draft: &[u32]) {
    let agree = draft
        .iter()
        .zip(&base.generated)
        .take_while(|(a, b)| a == b)
        .count()
        .min(out.draft_offered);
    assert_eq!(out.generated, base.generated, "{what}: generated ids");
    assert_eq!(out.text_tokens, base.text_tokens, "{what}: text ids");
    assert_eq!(out.finished, base.finished, "{what}: finished");
    assert_eq!(out.scored, base.scored, "{what}: scored");
    assert_eq!(out.draft_taken, agree, "{what}: draft ids taken");
    assert_eq!(
        out.decode_steps + agree,
        base.decode_steps,
        "{what}: steps saved"
    );
    let rel = (out.sum_logprob - base.sum_logprob).abs() / base.sum_logprob.abs().max(1e-12);
    assert!(
        rel <= TOLERANCE,
        "{what}: sum of log-probabilities {} vs {} without a draft",
        out.sum_logprob,
        base.sum_logprob
    );
}

/// (6) Drafts are lossless: a turn given the ids it chooses anyway (the last
/// hypothesis of the same audio), a draft wrong from its fourth id, or one of
/// other ids, gives what it gives without a draft — ids, log-probability sum,
/// and after a final the same committed cache — alone and in a batch; only
/// the agreeing ids skip their decode steps.
#[test]
fn drafts_save_steps_and_change_nothing_else() {
    let model = model();
    let sa = step_audio2(&model);
    let jfk = [rows(&sa, "en_jfk_ask_not.wav", 3.0)];
    let budget = 40;
    let plain = TurnOptions::new(budget);
    let mut reference = sa.session(SessionOptions::default()).unwrap();
    let base = reference.decode_partial(&sa, &jfk, &[], &plain).unwrap();
    assert!(base.decode_steps >= 10, "the turn decodes some steps");
    let own = base.generated.clone();
    let mut wrong = own.clone();
    wrong[3] = if wrong[3] == 7 { 8 } else { 7 };
    let other: Vec<u32> = (100..130).collect();
    let drafted = |draft: &[u32]| TurnOptions {
        draft: draft.to_vec(),
        ..TurnOptions::new(budget)
    };
    // alone, as partials (the cache rolls back to the committed context)
    let mut session = sa.session(SessionOptions::default()).unwrap();
    for (what, draft) in [
        ("own ids", &own),
        ("wrong 4th id", &wrong),
        ("other ids", &other),
    ] {
        let out = session
            .decode_partial(&sa, &jfk, &[], &drafted(draft))
            .unwrap();
        assert_eq!(out.draft_offered, draft.len().min(budget - 1), "{what}");
        assert_same_but_drafted(what, &out, &base, draft);
        assert_same_session(what, &session, &reference);
        if draft == &own {
            assert!(
                out.draft_taken >= 10,
                "{what}: the turn's own ids are taken"
            );
        }
    }
    // alone, as a final: the committed turn's cache equals the one without
    let final_base = reference.decode_final(&sa, &jfk, &[], &plain).unwrap();
    let out = session
        .decode_final(&sa, &jfk, &[], &drafted(&own))
        .unwrap();
    assert_same_but_drafted("final", &out, &final_base, &own);
    assert_same_session("final", &session, &reference);
    // in a batch: two sessions' finals with drafts against each alone without
    let mut batched = sessions(&sa, &[SessionOptions::default(), SessionOptions::default()]);
    let mut alone = sessions(&sa, &[SessionOptions::default(), SessionOptions::default()]);
    let timit = [rows(&sa, "en_timit_ldc93s1.wav", 2.0)];
    let refs: Vec<TurnOutput> = [(&jfk, 0), (&timit, 1)]
        .iter()
        .map(|(a, s)| alone[*s].decode_final(&sa, *a, &[], &plain).unwrap())
        .collect();
    let opts = [drafted(&refs[0].generated), drafted(&wrong)];
    let [first, second] = &mut batched[..] else {
        unreachable!()
    };
    let mut requests = vec![
        TurnRequest {
            session: first,
            audio: &jfk,
            prefix: &[],
            commit: true,
            opts: &opts[0],
        },
        TurnRequest {
            session: second,
            audio: &timit,
            prefix: &[],
            commit: true,
            opts: &opts[1],
        },
    ];
    let outs = Session::run_turns(&sa, &mut requests);
    drop(requests);
    for (k, out) in outs.into_iter().enumerate() {
        let what = format!("batched final {k}");
        assert_same_but_drafted(&what, &out.unwrap(), &refs[k], &opts[k].draft);
        assert_same_session(&what, &batched[k], &alone[k]);
    }
}

/// (7) Through the recogniser: partials of a growing segment (each the draft
/// of the next decode, the last one of exactly the final's audio) leave the
/// final as it is without them, and the committed context too: the next
/// segment decodes the same.
#[test]
fn partials_before_a_final_leave_it_unchanged() {
    let model = model();
    let opts = RecognizerOptions::default();
    let mut with = model.recognizer(&opts).unwrap();
    let mut without = model.recognizer(&opts).unwrap();
    let full = features("en_jfk_ask_not.wav", 3.0);
    for seconds in [1.5, 2.5] {
        with.decode(&features("en_jfk_ask_not.wav", seconds), &[])
            .unwrap();
    }
    let partial = with.decode(&full, &[]).unwrap();
    assert_same_hypothesis(
        "partial, drafted",
        &with.decode(&full, &[]).unwrap(),
        &partial,
    );
    let a = with.decode_final(&full, &[]).unwrap();
    with.after_final().unwrap();
    let b = without.decode_final(&full, &[]).unwrap();
    assert_same_hypothesis("final after partials", &a, &b);
    let next = features("en_timit_ldc93s1.wav", 2.0);
    assert_same_hypothesis(
        "next segment",
        &with.decode(&next, &[]).unwrap(),
        &without.decode(&next, &[]).unwrap(),
    );
}

/// (8) A final taken from the decode made at a pause (`commit` of that
/// hypothesis, as the live decoder does when the segment then ends with the
/// same audio) leaves the committed context the decoded final leaves: the
/// next segment decodes the same.
#[test]
fn a_final_committed_from_a_pause_decode_equals_the_decoded_final() {
    let model = model();
    let opts = RecognizerOptions::default();
    let mut reused = model.recognizer(&opts).unwrap();
    let mut decoded = model.recognizer(&opts).unwrap();
    let full = features("en_jfk_ask_not.wav", 3.0);
    let at_pause = reused.decode(&full, &[]).unwrap();
    reused.commit(&full, &at_pause).unwrap();
    reused.after_final().unwrap();
    let final_ = decoded.decode_final(&full, &[]).unwrap();
    decoded.after_final().unwrap();
    assert_same_hypothesis("the final", &at_pause, &final_);
    let next = features("en_timit_ldc93s1.wav", 2.0);
    assert_same_hypothesis(
        "next segment",
        &reused.decode(&next, &[]).unwrap(),
        &decoded.decode(&next, &[]).unwrap(),
    );
}

/// (8b) A pause decode is held in the cache ([`TurnOptions::hold`]): alone
/// or in a batch with a final, committing it as it is leaves the session bit
/// for bit as decoding the final does; the next turn drops it instead, and
/// then nothing is left to commit.
#[test]
fn a_held_turn_commits_as_the_decoded_final_or_is_dropped_by_the_next_turn() {
    let model = model();
    let sa = step_audio2(&model);
    let audio = [rows(&sa, "en_jfk_ask_not.wav", 3.0)];
    let other = [rows(&sa, "en_ps_cards_001.wav", 2.0)];
    let opts = SessionOptions::default();
    let plain = TurnOptions::new(12);
    let hold = TurnOptions {
        hold: true,
        ..plain.clone()
    };
    let mut decoded = Session::new(&sa, opts.clone()).unwrap();
    let final_ = decoded.decode_final(&sa, &audio, &[], &plain).unwrap();

    let mut held = Session::new(&sa, opts.clone()).unwrap();
    let at_pause = held.decode_partial(&sa, &audio, &[], &hold).unwrap();
    assert_same_turn("held turn", &at_pause, &final_);
    assert_eq!(
        held.committed_len(),
        held.system_len(),
        "held, not committed"
    );
    assert!(held.commit_held(), "a held turn commits");
    assert!(!held.commit_held(), "only once");
    assert_same_session("held, then committed", &held, &decoded);

    // In a batch beside another stream's final.
    let mut batched = [
        Session::new(&sa, opts.clone()).unwrap(),
        Session::new(&sa, opts.clone()).unwrap(),
    ];
    let mut alone_other = Session::new(&sa, opts.clone()).unwrap();
    let other_final = alone_other.decode_final(&sa, &other, &[], &plain).unwrap();
    let outs: Vec<TurnOutput> = {
        let [a, b] = &mut batched;
        let mut requests = [
            TurnRequest {
                session: a,
                audio: &audio,
                prefix: &[],
                commit: false,
                opts: &hold,
            },
            TurnRequest {
                session: b,
                audio: &other,
                prefix: &[],
                commit: true,
                opts: &plain,
            },
        ];
        Session::run_turns(&sa, &mut requests)
            .into_iter()
            .map(Result::unwrap)
            .collect()
    };
    assert_same_turn("held in a batch", &outs[0], &final_);
    assert_same_turn("final beside it", &outs[1], &other_final);
    assert!(batched[0].commit_held());
    assert_same_session("held in a batch, then committed", &batched[0], &decoded);
    assert_same_session("final beside it", &batched[1], &alone_other);

    // Speech resumed: the next turn of the segment drops the held one.
    let mut dropped = Session::new(&sa, opts.clone()).unwrap();
    dropped.decode_partial(&sa, &other, &[], &hold).unwrap();
    let longer = dropped.decode_final(&sa, &audio, &[], &plain).unwrap();
    assert_same_turn("final after a dropped held turn", &longer, &final_);
    assert!(!dropped.commit_held(), "nothing held after the next turn");
    assert_same_session("final after a dropped held turn", &dropped, &decoded);
}

/// (9) A partial that reuses the start of its prompt from the cache, as the
/// partial before it left it ([`TurnOptions::keep`] / [`TurnOptions::reuse`]),
/// equals the same turn prefilled whole (a fresh session, the same audio
/// rows): the cached positions are exactly what a prefill would write.
#[test]
fn a_partial_reusing_the_cached_prompt_start_equals_it_prefilled_whole() {
    let model = model();
    let sa = step_audio2(&model);
    let first = rows(&sa, "en_jfk_ask_not.wav", 2.0);
    let longer = rows(&sa, "en_jfk_ask_not.wav", 3.0);
    let kept = first.dim(0).unwrap() - 12;
    // The second partial's rows: the first one's kept rows, then newer ones.
    let second = Tensor::cat(
        &[
            first.narrow(0, 0, kept).unwrap(),
            longer
                .narrow(0, kept, longer.dim(0).unwrap() - kept)
                .unwrap(),
        ],
        0,
    )
    .unwrap();
    let patch_start = sa.tokenizer.human_audio_turn(&[0]).patch_runs[0].0;
    let opts = SessionOptions::default();
    let mut reusing = Session::new(&sa, opts.clone()).unwrap();
    let mut whole = Session::new(&sa, opts).unwrap();
    let budget = |keep, reuse| TurnOptions {
        keep,
        reuse,
        ..TurnOptions::new(12)
    };
    let out = reusing
        .decode_partial(&sa, &[first], &[], &budget(patch_start + kept, 0))
        .unwrap();
    assert_eq!(out.reused, 0);
    assert_eq!(
        reusing.state().len(),
        reusing.committed_len() + patch_start + kept,
        "the partial leaves its prompt's start cached"
    );
    let a = reusing
        .decode_partial(
            &sa,
            std::slice::from_ref(&second),
            &[],
            &budget(0, patch_start + kept),
        )
        .unwrap();
    let b = whole
        .decode_partial(&sa, &[second], &[], &budget(0, 0))
        .unwrap();
    assert_eq!(a.reused, patch_start + kept);
    assert_eq!(b.reused, 0);
    assert_same_turn("reusing the cached prompt start", &a, &b);
    assert_same_session("after the partials", &reusing, &whole);
    // A final asks for no reuse: whatever a partial left is dropped first.
    let fin = |s: &mut Session| {
        s.decode_partial(
            &sa,
            &[rows(&sa, "en_jfk_ask_not.wav", 2.5)],
            &[],
            &budget(patch_start + 9, 0),
        )
        .unwrap();
        s.decode_final(
            &sa,
            std::slice::from_ref(&longer),
            &[],
            &TurnOptions::new(12),
        )
        .unwrap()
    };
    let (a, b) = (fin(&mut reusing), fin(&mut whole));
    assert_eq!(a.reused, 0);
    assert_same_turn("final", &a, &b);
    assert_same_session("after the finals", &reusing, &whole);
}

/// (10) Through the recogniser and the batch API: partials of growing
/// segments (reusing the last partial's rows and cache, the default) batched
/// equal each stream's alone, and the finals after them equal finals of a
/// recogniser that encodes every partial whole (`full_partials`), as does the
/// next segment: bounding a partial never reaches a final.
#[test]
fn bounded_partials_batch_like_alone_and_leave_finals_as_whole_ones() {
    let model = model();
    let bounded = RecognizerOptions::default();
    let whole = RecognizerOptions {
        full_partials: true,
        ..Default::default()
    };
    let clips = ["en_jfk_ask_not.wav", "en_ps_cards_001.wav"];
    let make = |o: &RecognizerOptions| -> Vec<Box<dyn Recognizer>> {
        clips.iter().map(|_| model.recognizer(o).unwrap()).collect()
    };
    let (mut batched, mut alone, mut full) = (make(&bounded), make(&bounded), make(&whole));
    let mut differs = false;
    for seconds in [1.4, 2.0, 2.6, 3.0] {
        let feats: Vec<SegmentFeatures> = clips.iter().map(|c| features(c, seconds)).collect();
        let outs = decode_all(&mut batched, &feats, false);
        for (k, out) in outs.into_iter().enumerate() {
            let one = alone[k].decode_partial(&feats[k], &[]).unwrap();
            assert_same_hypothesis(&format!("partial {k} at {seconds} s"), &out.unwrap(), &one);
            let w = full[k].decode_partial(&feats[k], &[]).unwrap();
            differs |= w.avg_logprob != one.avg_logprob;
        }
    }
    assert!(differs, "no partial reused anything");
    for (k, clip) in clips.iter().enumerate() {
        let f = features(clip, 3.0);
        // (Equal up to the drafts, taken from different partials.)
        assert_same_hypothesis(
            &format!("final {k}"),
            &batched[k].decode_final(&f, &[]).unwrap(),
            &full[k].decode_final(&f, &[]).unwrap(),
        );
        let next = features("en_timit_ldc93s1.wav", 2.0);
        assert_same_hypothesis(
            &format!("next segment {k}"),
            &batched[k].decode(&next, &[]).unwrap(),
            &full[k].decode(&next, &[]).unwrap(),
        );
    }
}

/// Recogniser `i` decodes `feats[i]` (no prefix) in one `decode_batch`: finals
/// with `commit`, partials without.
fn decode_all(
    recs: &mut [Box<dyn Recognizer>],
    feats: &[SegmentFeatures],
    commit: bool,
) -> Vec<Result<Hypothesis, stepaudio_live::model::ModelError>> {
    let mut requests: Vec<BatchRequest<'_>> = recs
        .iter_mut()
        .zip(feats)
        .map(|(r, f)| BatchRequest {
            recognizer: r.as_mut(),
            features: f,
            prefix: &[],
            commit,
            partial: !commit,
        })
        .collect();
    decode_batch(&mut requests)
}

/// (11) Streams whose KV caches are slots of one pool (planned for 3 streams)
/// decode exactly as streams with caches of their own: partials, finals and
/// the next segment, batched; bit for bit, since only where the keys and
/// values live differs. A fourth stream finds no free slot and keeps its
/// own cache; the slots come back when the streams close.
#[test]
fn streams_in_kv_pool_slots_decode_as_with_their_own_caches() {
    let (pooled_model, own_model) = (model(), model());
    pooled_model.reserve_streams(3);
    let sa = step_audio2(&pooled_model);
    let opts = RecognizerOptions::default();
    let make = |m: &LoadedModel| -> Vec<Box<dyn Recognizer>> {
        CLIPS.iter().map(|_| m.recognizer(&opts).unwrap()).collect()
    };
    let (mut pooled, mut own) = (make(&pooled_model), make(&own_model));
    let pool = sa.kv_pool().expect("the first session made the pool");
    assert_eq!(
        (pool.slots(), pool.free_slots()),
        (3, 0),
        "3 slots, all taken"
    );
    assert!(step_audio2(&own_model).kv_pool().is_none());
    let feats: Vec<SegmentFeatures> = CLIPS.iter().map(|&(n, s)| features(n, s)).collect();
    let run = |recs: &mut [Box<dyn Recognizer>], commit: bool| -> Vec<Hypothesis> {
        decode_all(recs, &feats, commit)
            .into_iter()
            .map(Result::unwrap)
            .collect()
    };
    for commit in [false, true] {
        for (i, (p, o)) in run(&mut pooled, commit)
            .iter()
            .zip(run(&mut own, commit))
            .enumerate()
        {
            let what = format!("stream {i} (commit {commit})");
            assert_eq!(p.tokens, o.tokens, "{what}: tokens");
            assert_eq!(p.avg_logprob, o.avg_logprob, "{what}: avg_logprob");
        }
    }
    let next = features("en_timit_ldc93s1.wav", 2.0);
    for (i, (p, o)) in pooled.iter_mut().zip(&mut own).enumerate() {
        let (hp, ho) = (p.decode(&next, &[]).unwrap(), o.decode(&next, &[]).unwrap());
        assert_eq!(hp.tokens, ho.tokens, "stream {i}, next segment");
        assert_eq!(hp.avg_logprob, ho.avg_logprob, "stream {i}, next segment");
    }
    drop(pooled);
    assert_eq!(pool.free_slots(), 3, "closed streams give their slots back");
}

/// (12) A session in a pool slot never holds more positions than the slot
/// has: with a short committed context (so finals restart it), turns that
/// fit are exactly those of a session with its own cache, and a turn whose
/// forced prefix would pass the slot restarts the context first instead of
/// failing or cutting the turn's budget.
#[test]
fn a_session_in_a_slot_stays_within_it() {
    let (pooled_model, own_model) = (model(), model());
    pooled_model.reserve_streams(1);
    let (sa, own_sa) = (step_audio2(&pooled_model), step_audio2(&own_model));
    let system = own_sa
        .session(SessionOptions::default())
        .unwrap()
        .system_len();
    let opts = SessionOptions {
        max_context: system + 200,
        max_new_tokens: 24,
        ..Default::default()
    };
    let mut slotted = sa.session(opts.clone()).unwrap();
    let mut own = own_sa.session(opts.clone()).unwrap();
    let positions = slotted.state().fixed_positions().expect("a pool slot");
    assert_eq!(positions, Session::positions_for(&opts, usize::MAX));
    assert!(own.state().fixed_positions().is_none());
    let turn = TurnOptions::new(opts.max_new_tokens);
    for (k, &(name, seconds)) in CLIPS.iter().chain(CLIPS.iter()).enumerate() {
        let (a, b) = (rows(&sa, name, seconds), rows(&own_sa, name, seconds));
        let p = slotted.decode_final(&sa, &[a], &[], &turn).unwrap();
        let o = own.decode_final(&own_sa, &[b], &[], &turn).unwrap();
        assert_eq!(p.generated, o.generated, "final {k}");
        assert_eq!(p.restarted, o.restarted, "final {k}");
        assert!(
            slotted.state().len() <= positions,
            "final {k} past the slot"
        );
    }
    assert!(slotted.restarts() > 0, "the short context restarted");
    assert_eq!(slotted.restarts(), own.restarts());
    // A forced prefix that exactly fits the slot after the system prompt, so
    // after any committed turn it restarts the context first.
    let short = rows(&sa, "en_timit_ldc93s1.wav", 2.0);
    let probe = slotted
        .decode_partial(&sa, std::slice::from_ref(&short), &[], &turn)
        .unwrap();
    let len = positions - (system + probe.prompt_tokens + 1 + opts.max_new_tokens);
    let prefix: Vec<u32> = (0..len as u32).map(|i| 100 + i % 400).collect();
    while slotted.committed_len() == system {
        slotted
            .decode_final(&sa, std::slice::from_ref(&short), &[], &turn)
            .unwrap();
    }
    let out = slotted
        .decode_partial(&sa, &[short], &prefix, &turn)
        .unwrap();
    assert!(
        out.restarted,
        "the turn did not fit after the committed context"
    );
    assert_eq!(out.generated.len(), opts.max_new_tokens, "the whole budget");
    assert_eq!(slotted.committed_len(), system);
    assert!(slotted.state().len() <= positions);
}

/// Opening a session copies the cache of an earlier session's system prompt
/// (the same ids) instead of prefilling it: the same keys and values bit for
/// bit, and the same turn afterwards; a session with another prompt
/// prefills its own.
#[test]
fn sessions_copy_a_cached_system_prompt_bit_for_bit() {
    let model = model();
    let sa = step_audio2(&model);
    let mut prefilled = sa.session(SessionOptions::default()).unwrap();
    assert_eq!(sa.system_prompt_copies(), 0, "the first session prefills");
    let mut copied = sa.session(SessionOptions::default()).unwrap();
    assert_eq!(sa.system_prompt_copies(), 1, "the second session copies");
    let english = SessionOptions {
        system_prompt: SystemPrompt::English,
        ..Default::default()
    };
    let other = sa.session(english).unwrap();
    assert_eq!(sa.system_prompt_copies(), 1, "another prompt is prefilled");
    assert_ne!(other.committed_len(), 0);
    assert_eq!(copied.committed_len(), prefilled.committed_len());
    assert_eq!(copied.state().len(), prefilled.state().len());
    for l in 0..prefilled.state().num_layers() {
        let (pk, pv) = prefilled.state().layer(l).unwrap().unwrap();
        let (ck, cv) = copied.state().layer(l).unwrap().unwrap();
        for (x, y, what) in [(&pk, &ck, "keys"), (&pv, &cv, "values")] {
            let diff = (x - y).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "layer {l}: {what}");
        }
    }
    let audio = [rows(&sa, CLIPS[1].0, CLIPS[1].1)];
    let opts = TurnOptions::new(12);
    let a = prefilled.decode_final(&sa, &audio, &[], &opts).unwrap();
    let b = copied.decode_final(&sa, &audio, &[], &opts).unwrap();
    assert_eq!(a.generated, b.generated);
    assert_eq!(a.sum_logprob, b.sum_logprob);
}
