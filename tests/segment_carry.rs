//! Whisper's live recogniser carrying the previous final segment into the
//! next decode (`--carry-audio`): the previous segment's audio goes first in
//! the window and its final text is forced, so the new segment's first words
//! are heard in context. Checked with the real tiny.en weights on real
//! recordings (two card names read by one speaker):
//! - the carried text never reaches the new segment's hypothesis;
//! - decoding leaves the committed context as it was (same result twice);
//! - a segment longer than the limit, or one that decoded to nothing, is not
//!   carried: results equal a recogniser without carrying, token for token.

mod common;
use stepaudio_live::model::recognizer::Recognizer;
use stepaudio_live::model::{LoadedModel, RecognizerOptions};

fn model() -> LoadedModel {
    common::tiny_en()
}

fn recognizer(carry_seconds: f64) -> Box<dyn Recognizer> {
    let opts = RecognizerOptions {
        whisper_carry_seconds: carry_seconds,
        ..Default::default()
    };
    model().recognizer(&opts).unwrap()
}

fn words(text: &str) -> Vec<String> {
    stepaudio_live::eval::wer::normalize(text)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn carried_segment_conditions_the_next_without_leaking_into_it() {
    let mut rec = recognizer(10.0);
    let first = common::live_features(
        &*rec,
        &common::read_audio(&common::speech("en_ps_cards_001.wav")),
    );
    let second = common::live_features(
        &*rec,
        &common::read_audio(&common::speech("en_ps_cards_003.wav")),
    );
    let h1 = rec.decode_final(&first, &[]).unwrap();
    assert!(
        words(&h1.text).ends_with(&["of".into(), "clubs".into()]),
        "{:?}",
        h1.text
    );

    let h2 = rec.decode(&second, &[]).unwrap();
    let w2 = words(&h2.text);
    // "seven of clubs": once, and nothing of the carried "ten of clubs".
    assert_eq!(w2.len(), 3, "{:?}", h2.text);
    assert!(w2[0] == "seven" || w2[0] == "7", "{:?}", h2.text);
    assert_eq!(&w2[1..], &["of", "clubs"]);
    assert!(!h2.tokens.starts_with(&h1.tokens));
    // decode() does not commit: the same call gives the same tokens.
    assert_eq!(rec.decode(&second, &[]).unwrap().tokens, h2.tokens);
    // A forced prefix of the new segment is kept at its start.
    let forced = rec.decode(&second, &h2.tokens[..1]).unwrap();
    assert_eq!(forced.tokens[0], h2.tokens[0]);
}

#[test]
fn long_or_empty_segments_are_not_carried() {
    let first = common::read_audio(&common::speech("en_ps_cards_001.wav"));
    let second = common::read_audio(&common::speech("en_ps_cards_003.wav"));
    let mut plain = recognizer(0.0);
    let (f1, f2) = (
        common::live_features(&*plain, &first),
        common::live_features(&*plain, &second),
    );
    plain.decode_final(&f1, &[]).unwrap();
    let expected = plain.decode(&f2, &[]).unwrap().tokens;

    // The first segment (1.1 s) is longer than the limit: nothing carried.
    let mut short_limit = recognizer(0.5);
    short_limit.decode_final(&f1, &[]).unwrap();
    assert_eq!(short_limit.decode(&f2, &[]).unwrap().tokens, expected);

    // A segment of silence decodes to nothing and replaces the carried one.
    let mut carrying = recognizer(10.0);
    carrying.decode_final(&f1, &[]).unwrap();
    let silence = common::live_features(&*carrying, &vec![0.0; 16_000]);
    let h = carrying.decode_final(&silence, &[]).unwrap();
    assert!(h.tokens.is_empty(), "silence decoded as {:?}", h.text);
    assert_eq!(carrying.decode(&f2, &[]).unwrap().tokens, expected);

    // reset_context drops the carried segment with the text.
    carrying.decode_final(&f1, &[]).unwrap();
    carrying.reset_context();
    let mut fresh = recognizer(0.0);
    assert_eq!(
        carrying.decode(&f2, &[]).unwrap().tokens,
        fresh.decode(&f2, &[]).unwrap().tokens
    );
}
