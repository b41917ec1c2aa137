//! The stream engine with the real tiny.en: several streams decoded
//! together (batched) get exactly the finals each gets alone, and a stream
//! opened past the engine's capacity is refused.
//!
//! Partials are switched off here (a huge partial interval): which partials
//! run depends on timing (stale ones are dropped), and they set the forced
//! prefix of later decodes; without them every decode of a segment sees the
//! same context, so finals must be identical however the engine batches.

mod common;
use std::sync::Arc;
use std::time::{Duration, Instant};
use stepaudio_live::model::RecognizerOptions;
use stepaudio_live::stream::engine::{
    self, EngineConfig, EngineHandle, EngineMsg, OpenError, StreamCounters, StreamEvent,
    StreamModel,
};
use stepaudio_live::stream::events::Event;
use stepaudio_live::stream::tracker::{StreamTracker, TrackerConfig, TrackerOutput, UpdateKind};

/// Opens stream `id`; its events arrive on the returned channel.
fn open(
    engine: &EngineHandle,
    id: u64,
    options: &RecognizerOptions,
) -> (
    Result<stepaudio_live::stream::engine::StreamInfo, OpenError>,
    crossbeam_channel::Receiver<StreamEvent>,
) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let sent = engine.send(EngineMsg::Open {
        id,
        model: StreamModel::Options(options.clone()),
        events: Box::new(move |ev| {
            let _ = tx.send(ev);
        }),
        counters: Arc::new(StreamCounters::default()),
    });
    assert!(sent, "the engine is running");
    match rx.recv_timeout(Duration::from_secs(60)).unwrap() {
        StreamEvent::Opened(r) => (r, rx),
        other => panic!("expected Opened, got {other:?}"),
    }
}

/// Feeds `audio` through a tracker into stream `id` as fast as it goes and
/// closes the stream; returns the final texts in segment order.
fn stream_finals(
    engine: &EngineHandle,
    id: u64,
    audio: &[f32],
    options: &RecognizerOptions,
) -> Vec<String> {
    stream_paced(engine, id, audio, options, 3_600_000, Duration::ZERO).0
}

/// Feeds `audio` (100 ms chunks, sleeping `pause` after each, the updates
/// sent as they come) through a tracker asking for a partial every
/// `partial_ms`, into stream `id`, and closes it; returns the final texts in
/// segment order and how many partials arrived.
fn stream_paced(
    engine: &EngineHandle,
    id: u64,
    audio: &[f32],
    options: &RecognizerOptions,
    partial_ms: u32,
    pause: Duration,
) -> (Vec<String>, usize) {
    let (info, events) = open(engine, id, options);
    let info = info.expect("opened");
    let config = TrackerConfig {
        partial_interval_ms: partial_ms,
        ..TrackerConfig::default()
    };
    let mut tracker = StreamTracker::new(&config, info.frontend, info.max_segment_seconds).unwrap();
    let mut outputs = Vec::new();
    let send = |outputs: &mut Vec<TrackerOutput>| {
        for o in outputs.drain(..) {
            match o {
                // Unpaced, a pause decode races the final behind it: taken
                // first, its result is committed as the final (for Step-Audio 2
                // its text ids alone, not the turn the model generated), else
                // it is dropped as stale. Finals must not depend on timing.
                TrackerOutput::Update(update)
                    if pause.is_zero() && update.kind == UpdateKind::Pause => {}
                TrackerOutput::Update(update) => {
                    engine.send(EngineMsg::Update { id, update });
                }
                TrackerOutput::Resume { segment } => {
                    engine.send(EngineMsg::Resume { id, segment });
                }
                TrackerOutput::Event(_) => {}
            }
        }
    };
    for chunk in audio.chunks(1600) {
        tracker.push(chunk, Instant::now(), &mut outputs);
        if !pause.is_zero() {
            send(&mut outputs);
            std::thread::sleep(pause);
        }
    }
    tracker.finish(&mut outputs);
    send(&mut outputs);
    engine.send(EngineMsg::Close { id });
    let (mut finals, mut partials) = (Vec::new(), 0);
    loop {
        match events.recv_timeout(Duration::from_secs(300)).unwrap() {
            StreamEvent::Event(Event::Final {
                segment,
                text,
                reason,
                ..
            }) => {
                assert_ne!(reason, "error");
                assert_eq!(segment as usize, finals.len(), "finals in order");
                finals.push(text);
            }
            StreamEvent::Event(Event::Partial { .. }) => partials += 1,
            StreamEvent::Closed(failure) => {
                assert!(failure.is_none(), "{failure:?}");
                return (finals, partials);
            }
            _ => {}
        }
    }
}

/// The tiny random Step-Audio 2 checkpoint (f32, CPU).
fn tiny_step_audio2() -> stepaudio_live::model::LoadedModel {
    stepaudio_live::model::LoadedModel::load(
        &common::fixture("step_audio2/tiny_ckpt"),
        stepaudio_live::device::DeviceChoice::Cpu,
        Some(candle_core::DType::F32),
        Default::default(),
    )
    .unwrap()
}

/// Runs `stream(engine, i, input)` for every input at once, one thread each.
fn together<T: Send>(
    engine: &EngineHandle,
    inputs: &[Vec<f32>],
    stream: impl Fn(&EngineHandle, usize, &[f32]) -> T + Sync,
) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = inputs
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let stream = &stream;
                s.spawn(move || stream(engine, i, a))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn audio_of(ids: &[&str]) -> Vec<f32> {
    let mut audio = Vec::new();
    for id in ids {
        audio.extend(common::read_audio(&common::speech(&format!("{id}.wav"))));
        audio.extend(std::iter::repeat_n(0.0, 16_000));
    }
    audio
}

#[test]
fn streams_decoded_together_get_the_finals_they_get_alone() {
    let inputs = [
        audio_of(&["en_ps_cards_001", "en_jfk_ask_not"]),
        audio_of(&["en_mfa_words", "en_ps_cards_002", "en_mfa_her"]),
        audio_of(&["en_timit_ldc93s1", "en_ps_goforward"]),
        audio_of(&["en_ps_cards_003", "en_mfa_thoughts"]),
    ];
    let config = EngineConfig {
        max_streams: 8,
        ..EngineConfig::default()
    };
    let (engine, thread) = engine::spawn(common::tiny_en(), config.clone()).unwrap();
    let alone: Vec<Vec<String>> = inputs
        .iter()
        .enumerate()
        .map(|(i, a)| stream_finals(&engine, i as u64, a, &Default::default()))
        .collect();
    assert_eq!(engine.stats().largest_batch, 1, "one stream at a time");
    drop(engine);
    thread.join().unwrap();

    let (engine, thread) = engine::spawn(common::tiny_en(), config).unwrap();
    let together = together(&engine, &inputs, |engine, i, a| {
        stream_finals(engine, 10 + i as u64, a, &Default::default())
    });
    let stats = engine.stats();
    drop(engine);
    thread.join().unwrap();
    assert!(
        stats.largest_batch > 1,
        "the streams shared batches: {stats:?}"
    );
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert!(a.iter().any(|f| !f.is_empty()), "stream {i} heard speech");
        assert_eq!(a, t, "stream {i}");
    }
}

#[test]
fn a_stream_past_capacity_is_refused_until_one_closes() {
    let config = EngineConfig {
        max_streams: 2,
        ..EngineConfig::default()
    };
    let (engine, thread) = engine::spawn(common::tiny_en(), config).unwrap();
    let (a, a_events) = open(&engine, 1, &Default::default());
    let (b, _b_events) = open(&engine, 2, &Default::default());
    assert!(a.is_ok() && b.is_ok());
    let (c, _) = open(&engine, 3, &Default::default());
    match c {
        Err(e @ OpenError::AtCapacity { capacity: 2 }) => {
            assert!(e.to_string().contains("capacity (2 streams)"), "{e}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    engine.send(EngineMsg::Close { id: 1 });
    assert!(matches!(
        a_events.recv_timeout(Duration::from_secs(60)).unwrap(),
        StreamEvent::Closed(None)
    ));
    let (d, _) = open(&engine, 4, &Default::default());
    assert!(d.is_ok(), "a place was freed: {d:?}");
    let stats = engine.stats();
    assert_eq!((stats.streams, stats.capacity, stats.refused), (2, 2, 1));
    drop(engine);
    // Streams 2 and 4 were never closed: the engine still ends with its last handle.
    thread.join().unwrap();
}

/// Step-Audio 2 (the tiny random checkpoint, CPU): the engine's continuous
/// batch — decodes joining and leaving one running decode loop between its
/// steps — gives every stream the finals it gets from the batch-at-a-time
/// engine with the streams one after another.
#[test]
fn a_continuous_batch_gives_each_stream_its_finals_alone() {
    let inputs = [
        audio_of(&["en_jfk_ask_not", "en_timit_ldc93s1"]),
        audio_of(&["en_mfa_words", "en_ps_cards_002"]),
        audio_of(&["en_timit_ldc93s1", "en_ps_goforward", "en_mfa_her"]),
    ];
    // Turns of 24 tokens, as in the GPU benchmarks: the random weights' logits
    // are nearly flat, and a batch's GEMM sums rows in another order than a
    // single row's, so over hundreds of steps a near-tie may flip.
    let options = RecognizerOptions {
        step_audio_max_new_tokens: 24,
        ..Default::default()
    };
    let options = &options;
    let alone_config = EngineConfig {
        max_streams: 8,
        ..EngineConfig::default()
    };
    let (engine, thread) = engine::spawn(tiny_step_audio2(), alone_config.clone()).unwrap();
    let alone: Vec<Vec<String>> = inputs
        .iter()
        .enumerate()
        .map(|(i, a)| stream_finals(&engine, i as u64, a, options))
        .collect();
    drop(engine);
    thread.join().unwrap();

    let config = EngineConfig {
        continuous: true,
        ..alone_config
    };
    let model = tiny_step_audio2();
    let (engine, thread) = engine::spawn(model.clone(), config).unwrap();
    let together = together(&engine, &inputs, |engine, i, a| {
        stream_finals(engine, 10 + i as u64, a, options)
    });
    let stats = engine.stats();
    drop(engine);
    thread.join().unwrap();
    eprintln!("continuous: {stats:?}");
    // The engine held its streams' KV caches in one pool of max_streams
    // slots, all back once the streams closed.
    let stepaudio_live::model::LoadedModel::StepAudio2(sa) = &model else {
        unreachable!("the tiny checkpoint is Step-Audio 2")
    };
    let pool = sa.kv_pool().expect("the streams' sessions made the pool");
    assert_eq!((pool.slots(), pool.free_slots()), (8, 8));
    assert!(
        stats.largest_batch > 1,
        "decodes of several streams shared steps: {stats:?}"
    );
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert!(a.iter().any(|f| !f.is_empty()), "stream {i} got text");
        assert_eq!(a, t, "stream {i}");
    }
}

/// Step-Audio 2 (tiny random checkpoint, CPU), the continuous batch with
/// partials on and audio arriving as it is spoken (20× real time): partials
/// join and leave the running loop beside other streams' finals, and a final
/// may drop its own stream's partial in flight; every stream still gets one
/// final per segment, in order, none failed — as many as the batch-at-a-time
/// engine gives the same audio, also when every final misses the deadline
/// that partials yield to.
#[test]
fn the_continuous_batch_with_partials_keeps_every_final() {
    let options = &RecognizerOptions {
        step_audio_max_new_tokens: 24,
        ..Default::default()
    };
    let inputs = [
        audio_of(&["en_jfk_ask_not", "en_timit_ldc93s1"]),
        audio_of(&["en_mfa_words", "en_ps_cards_002"]),
        audio_of(&["en_timit_ldc93s1", "en_ps_goforward", "en_mfa_her"]),
    ];
    let mut segments = Vec::new();
    // Batch at a time; continuous; continuous with a deadline every final
    // misses, so partials join only while no final is in the loop.
    let modes = [
        (false, EngineConfig::default().final_deadline),
        (true, EngineConfig::default().final_deadline),
        (true, Some(Duration::ZERO)),
    ];
    for (continuous, final_deadline) in modes {
        let config = EngineConfig {
            max_streams: 8,
            continuous,
            final_deadline,
            ..EngineConfig::default()
        };
        let (engine, thread) = engine::spawn(tiny_step_audio2(), config).unwrap();
        let pause = Duration::from_millis(5);
        let got = together(&engine, &inputs, |engine, i, a| {
            stream_paced(engine, i as u64, a, options, 300, pause)
        });
        let stats = engine.stats();
        drop(engine);
        thread.join().unwrap();
        eprintln!(
            "continuous {continuous}, deadline {final_deadline:?}: {stats:?}, partials {:?}",
            got.iter().map(|g| g.1).collect::<Vec<_>>()
        );
        segments.push(got.iter().map(|g| g.0.len()).collect::<Vec<_>>());
    }
    assert!(segments[0].iter().all(|&n| n >= 2), "segments {segments:?}");
    for mode in [1, 2] {
        assert_eq!(
            segments[mode], segments[0],
            "finals per stream, continuous ({:?}) vs batch at a time",
            modes[mode]
        );
    }
}
