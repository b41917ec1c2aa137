//! Whisper partials with bounded encoder work (the default; `--full-partials`
//! turns it off): a partial of a growing segment reuses the encoder states
//! of the segment's last partial for all of its audio but the last second.
//! Checked with the real tiny.en weights on a real 11 s recording fed as one
//! growing segment, a partial every 0.5 s (the live default), alone and
//! after a committed segment (which is then carried in front of it):
//! - the bounded partials agree with the full ones: at least 60 % identical
//!   token for token and at most 5 % word errors against them (measured 76 %
//!   and 1.9 % alone; `examples/bounded_partials.rs` measures all
//!   recordings);
//! - the reuse takes place: some partial's log-probability differs from the
//!   full one's (identical states would give identical numbers);
//! - a pause decode (which may become the final) and the final itself are
//!   exactly what a recogniser without bounded partials gives.

mod common;
use stepaudio_live::model::recognizer::Recognizer;
use stepaudio_live::model::RecognizerOptions;

fn recognizer(full_partials: bool) -> Box<dyn Recognizer> {
    let opts = RecognizerOptions {
        full_partials,
        ..Default::default()
    };
    common::tiny_en().recognizer(&opts).unwrap()
}

/// Feeds `audio` to both recognisers as one growing segment and checks the
/// properties above.
fn compare(full: &mut dyn Recognizer, bounded: &mut dyn Recognizer, audio: &[f32]) {
    let (mut n, mut identical, mut logprob_differs) = (0, 0, false);
    let mut errors = stepaudio_live::eval::wer::ErrorCounts::default();
    for end in (1..).map(|k| k * 8_000).take_while(|&e| e < audio.len()) {
        let f = common::live_features(full, &audio[..end]);
        let a = full.decode_partial(&f, &[]).unwrap();
        let b = bounded.decode_partial(&f, &[]).unwrap();
        n += 1;
        identical += usize::from(a.tokens == b.tokens);
        logprob_differs |= a.avg_logprob != b.avg_logprob;
        errors.add(&stepaudio_live::eval::wer::score(
            &a.text,
            &b.text,
            stepaudio_live::eval::wer::Unit::Word,
        ));
    }
    assert!(n >= 20, "{n} partials");
    assert!(
        identical * 100 >= 60 * n,
        "only {identical} of {n} bounded partials equal the full ones"
    );
    assert!(
        errors.rate() <= 0.05,
        "bounded partials: {:.1} % word errors against the full ones",
        100.0 * errors.rate()
    );
    assert!(
        logprob_differs,
        "the last partial's states were never reused"
    );

    // A pause decode and the final are encoded whole, whatever came before.
    let f = common::live_features(full, audio);
    let (a, b) = (
        full.decode(&f, &[]).unwrap(),
        bounded.decode(&f, &[]).unwrap(),
    );
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(
        a.avg_logprob, b.avg_logprob,
        "a pause decode used partial states"
    );
    let (a, b) = (
        full.decode_final(&f, &[]).unwrap(),
        bounded.decode_final(&f, &[]).unwrap(),
    );
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(
        a.avg_logprob, b.avg_logprob,
        "the final used partial states"
    );
}

#[test]
fn bounded_partials_agree_with_full_ones_and_leave_finals_exact() {
    let speech = common::read_audio(&common::speech("en_jfk_ask_not.wav"));
    let (mut full, mut bounded) = (recognizer(true), recognizer(false));
    compare(&mut *full, &mut *bounded, &speech);

    // After a committed segment (carried in front of the next one), on both.
    let cards = common::read_audio(&common::speech("en_ps_cards_001.wav"));
    for rec in [&mut full, &mut bounded] {
        rec.reset_context();
        let f = common::live_features(&**rec, &cards);
        rec.decode_final(&f, &[]).unwrap();
    }
    compare(&mut *full, &mut *bounded, &speech);
}
