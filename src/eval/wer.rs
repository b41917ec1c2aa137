//! Word (and character) error rate: a text normaliser and a Levenshtein
//! alignment that counts substitutions, deletions and insertions.
//!
//! The normaliser is deliberately small so that any system's output can be
//! scored the same way: lowercase; apostrophes, quotes and other punctuation
//! removed; dashes turned into spaces; whitespace collapsed. Nothing
//! language-specific beyond choosing characters instead of words as the unit
//! for languages written without spaces between words.

use unicode_categories::UnicodeCategories;

/// What one edit-distance token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// Whitespace-separated words (word error rate).
    Word,
    /// Characters, whitespace ignored (character error rate).
    Char,
}

impl Unit {
    /// Characters for languages whose script does not separate words with
    /// spaces (Chinese, Japanese, Cantonese, Thai, Lao, Burmese, Khmer,
    /// Tibetan); words otherwise. `lang` is an ISO 639-1/3 code as in the
    /// manifest's language column.
    pub(crate) fn for_language(lang: &str) -> Unit {
        let primary = lang.split(['-', '_']).next().unwrap_or(lang);
        match primary.to_ascii_lowercase().as_str() {
            "zh" | "ja" | "yue" | "th" | "lo" | "my" | "km" | "bo" | "cmn" | "wuu" => Unit::Char,
            _ => Unit::Word,
        }
    }

    /// The usual name of the rate in this unit.
    pub(crate) fn rate_name(self) -> &'static str {
        match self {
            Unit::Word => "WER",
            Unit::Char => "CER",
        }
    }
}

/// Apostrophes that are not Unicode punctuation (modifier letters and
/// symbols used as apostrophes), so the category test would keep them.
fn is_apostrophe_like(c: char) -> bool {
    matches!(c, '`' | '´' | 'ʼ' | 'ʻ' | 'ʹ' | '′' | '″')
}

/// Lowercases, removes punctuation and quotes, turns dashes into spaces and
/// collapses whitespace.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.chars().flat_map(char::to_lowercase) {
        if c.is_whitespace() || c.is_punctuation_dash() {
            pending_space = true;
        } else if c.is_punctuation() || is_apostrophe_like(c) {
            // Removed without a space: "don't" → "dont", "U.S." → "us".
        } else {
            if pending_space && !out.is_empty() {
                out.push(' ');
            }
            pending_space = false;
            out.push(c);
        }
    }
    out
}

/// Splits normalised text into scoring tokens.
pub(crate) fn tokens(normalized: &str, unit: Unit) -> Vec<String> {
    match unit {
        Unit::Word => normalized.split_whitespace().map(str::to_string).collect(),
        Unit::Char => normalized
            .chars()
            .filter(|c| !c.is_whitespace())
            .map(String::from)
            .collect(),
    }
}

/// Edit operations of a minimum-cost alignment of hypothesis to reference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ErrorCounts {
    pub substitutions: usize,
    pub deletions: usize,
    pub insertions: usize,
    /// Tokens in the reference (hits + substitutions + deletions).
    pub reference_len: usize,
}

impl ErrorCounts {
    pub(crate) fn errors(&self) -> usize {
        self.substitutions + self.deletions + self.insertions
    }

    pub fn hits(&self) -> usize {
        self.reference_len - self.substitutions - self.deletions
    }

    /// Errors per reference token. With an empty reference every inserted
    /// token counts as one whole error (the rate is not defined there).
    pub fn rate(&self) -> f64 {
        self.errors() as f64 / self.reference_len.max(1) as f64
    }

    pub fn add(&mut self, other: &ErrorCounts) {
        self.substitutions += other.substitutions;
        self.deletions += other.deletions;
        self.insertions += other.insertions;
        self.reference_len += other.reference_len;
    }
}

/// Levenshtein alignment with unit costs; among equal-cost alignments the
/// backtrace prefers matches/substitutions, then deletions, then insertions.
pub(crate) fn align<T: PartialEq>(reference: &[T], hypothesis: &[T]) -> ErrorCounts {
    let (n, m) = (reference.len(), hypothesis.len());
    let width = m + 1;
    // cost[i * width + j]: distance between reference[..i] and hypothesis[..j].
    let mut cost = vec![0u32; (n + 1) * width];
    for (j, c) in cost[..width].iter_mut().enumerate() {
        *c = j as u32;
    }
    for i in 1..=n {
        cost[i * width] = i as u32;
        for j in 1..=m {
            let diagonal =
                cost[(i - 1) * width + j - 1] + u32::from(reference[i - 1] != hypothesis[j - 1]);
            let deletion = cost[(i - 1) * width + j] + 1;
            let insertion = cost[i * width + j - 1] + 1;
            cost[i * width + j] = diagonal.min(deletion).min(insertion);
        }
    }
    let mut counts = ErrorCounts {
        reference_len: n,
        ..Default::default()
    };
    let (mut i, mut j) = (n, m);
    while i > 0 || j > 0 {
        let here = cost[i * width + j];
        if i > 0 && j > 0 {
            let differs = reference[i - 1] != hypothesis[j - 1];
            if cost[(i - 1) * width + j - 1] + u32::from(differs) == here {
                counts.substitutions += usize::from(differs);
                i -= 1;
                j -= 1;
                continue;
            }
        }
        if i > 0 && cost[(i - 1) * width + j] + 1 == here {
            counts.deletions += 1;
            i -= 1;
        } else {
            counts.insertions += 1;
            j -= 1;
        }
    }
    counts
}

/// Normalises both texts and aligns them in `unit`s.
pub fn score(reference: &str, hypothesis: &str, unit: Unit) -> ErrorCounts {
    let r = tokens(&normalize(reference), unit);
    let h = tokens(&normalize(hypothesis), unit);
    align(&r, &h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<&str> {
        s.split_whitespace().collect()
    }

    #[test]
    fn normalizer_handles_case_punctuation_quotes_dashes_and_space() {
        assert_eq!(
            normalize("  And so, my fellow Americans:   ask NOT!  "),
            "and so my fellow americans ask not"
        );
        assert_eq!(
            normalize("Beauty’s rose — don't \"quote\" «this»"),
            "beautys rose dont quote this"
        );
        assert_eq!(
            normalize("self-love well‐known x–y"),
            "self love well known x y"
        );
        assert_eq!(normalize("U.S. ʼtis `tick´"), "us tis tick");
        assert_eq!(normalize("甚至 出现，交易。"), "甚至 出现交易");
        assert_eq!(normalize("Ça VA? Übermäßig."), "ça va übermäßig");
        assert_eq!(normalize("...!?"), "");
    }

    #[test]
    fn alignment_counts_by_hand() {
        // cat→bat (S), "on" deleted (D), "today" inserted (I); every other
        // alignment costs more.
        let c = align(
            &words("the cat sat on the mat"),
            &words("the bat sat the mat today"),
        );
        assert_eq!((c.substitutions, c.deletions, c.insertions), (1, 1, 1));
        assert_eq!(c.reference_len, 6);
        assert_eq!(c.hits(), 4);
        assert!((c.rate() - 0.5).abs() < 1e-12);

        // Two alignments cost 3 here (S S S, or S D I); the count is what matters.
        let tie = align(&words("a b c d e"), &words("a x c e f"));
        assert_eq!(tie.errors(), 3);

        let exact = align(&words("the cat sat"), &words("the cat sat"));
        assert_eq!(exact.errors(), 0);

        let all_deleted = align(&words("one two three"), &[]);
        assert_eq!((all_deleted.deletions, all_deleted.errors()), (3, 3));

        let all_inserted = align(&[], &words("uh um"));
        assert_eq!(
            (all_inserted.insertions, all_inserted.reference_len),
            (2, 0)
        );
        assert_eq!(all_inserted.rate(), 2.0);

        // Word error rate can exceed 100 %.
        let worse = align(&words("yes"), &words("no no no"));
        assert_eq!((worse.substitutions, worse.insertions), (1, 2));
        assert!((worse.rate() - 3.0).abs() < 1e-12);
    }

    #[test]
    fn shifted_sequence_is_one_deletion_and_one_insertion() {
        let c = align(&words("a b c d"), &words("b c d e"));
        assert_eq!((c.substitutions, c.deletions, c.insertions), (0, 1, 1));
    }

    #[test]
    fn scoring_units_follow_the_language() {
        assert_eq!(Unit::for_language("zh"), Unit::Char);
        assert_eq!(Unit::for_language("ja"), Unit::Char);
        assert_eq!(Unit::for_language("en"), Unit::Word);
        assert_eq!(Unit::for_language("de"), Unit::Word);
        // 换一首歌 vs 换一首个: one substituted character of four.
        let c = score("换一首歌", "换一首个。", Unit::Char);
        assert_eq!((c.substitutions, c.reference_len), (1, 4));
        // Spaces in a Chinese reference do not count as tokens.
        let spaced = score("甚至 出现 交易", "甚至出现交易", Unit::Char);
        assert_eq!((spaced.errors(), spaced.reference_len), (0, 6));
    }

    #[test]
    fn totals_sum_errors_and_reference_words() {
        let mut total = ErrorCounts::default();
        total.add(&score("ask not what", "ask what", Unit::Word));
        total.add(&score("your country", "your country can", Unit::Word));
        assert_eq!(total.errors(), 2);
        assert_eq!(total.reference_len, 5);
        assert!((total.rate() - 0.4).abs() < 1e-12);
    }
}
