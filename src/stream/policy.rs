//! Which part of an open segment's hypothesis may be committed before the
//! segment ends: the longest prefix on which the last [`AGREEMENT`]
//! hypotheses agree (local agreement), cut back to a word boundary, so a
//! word still being spoken is never committed, and less its last word.
//! Committed tokens are forced as the start of every later hypothesis of the
//! segment, so committed text never changes.

use std::collections::VecDeque;

/// Hypotheses that must agree before their common prefix is committed.
/// Two, half a second apart, committed wrong words that more audio would
/// have fixed (and forcing them derails the rest of the segment); three
/// did better once partials became cheap enough to come every 0.5 s.
pub(crate) const AGREEMENT: usize = 3;

#[derive(Debug, Default, Clone)]
pub(crate) struct StablePrefix {
    committed: Vec<u32>,
    /// The most recent hypotheses, at most `AGREEMENT - 1`.
    previous: VecDeque<Vec<u32>>,
}

impl StablePrefix {
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn committed(&self) -> &[u32] {
        &self.committed
    }

    /// `update_if` with `may_commit` (the tests' shorthand).
    #[cfg(test)]
    pub(crate) fn update(
        &mut self,
        hypothesis: &[u32],
        starts_word: impl Fn(u32) -> bool,
    ) -> usize {
        self.update_if(hypothesis, starts_word, true)
    }

    /// Takes the newest hypothesis (which starts with the committed tokens)
    /// and returns how many tokens became committed; with `may_commit`
    /// false the hypothesis only joins the ones later hypotheses must agree
    /// with.
    pub(crate) fn update_if(
        &mut self,
        hypothesis: &[u32],
        starts_word: impl Fn(u32) -> bool,
        may_commit: bool,
    ) -> usize {
        debug_assert!(hypothesis.starts_with(&self.committed));
        let before = self.committed.len();
        if may_commit && self.previous.len() + 1 >= AGREEMENT {
            let agree = self
                .previous
                .iter()
                .map(|prev| {
                    prev.iter()
                        .zip(hypothesis)
                        .take_while(|(a, b)| a == b)
                        .count()
                })
                .min()
                .unwrap_or(hypothesis.len());
            // Commit only whole words: the agreed run must be followed, in every
            // hypothesis, by a token that starts a new word.
            let mut end = agree;
            while end > before {
                let next_new_word = |h: &[u32]| h.get(end).is_some_and(|&t| starts_word(t));
                if next_new_word(hypothesis) && self.previous.iter().all(|p| next_new_word(p)) {
                    break;
                }
                end -= 1;
            }
            // Hold back the last agreed word: hypotheses half a second apart
            // often agree on a wrong last word that more audio would fix, and
            // committed words are forced into every later decode.
            if end > before {
                end = (before + 1..end)
                    .rev()
                    .find(|&i| starts_word(hypothesis[i]))
                    .unwrap_or(before);
            }
            if end > before {
                self.committed.extend_from_slice(&hypothesis[before..end]);
            }
        }
        self.previous.push_back(hypothesis.to_vec());
        while self.previous.len() >= AGREEMENT {
            self.previous.pop_front();
        }
        self.committed.len() - before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Tokens >= 100 start a word; below 100 continue one.
    fn word(t: u32) -> bool {
        t >= 100
    }

    #[test]
    fn commits_the_prefix_three_hypotheses_agree_on_up_to_a_word_boundary_but_the_last_word() {
        assert_eq!(AGREEMENT, 3, "the sequence below is written for three");
        let mut p = StablePrefix::new();
        assert_eq!(p.update(&[100, 1, 101, 102], word), 0, "one hypothesis");
        assert_eq!(
            p.update(&[100, 1, 101, 103, 2], word),
            0,
            "two are not enough"
        );
        // All three agree on the words [100, 1] [101]; the last is held back.
        assert_eq!(p.update(&[100, 1, 101, 103, 2, 4], word), 2);
        assert_eq!(p.committed(), &[100, 1]);
        // Agreement up to [.., 103, 2] but 4 continues a word: back off to
        // before 103, then hold back 101.
        assert_eq!(p.update(&[100, 1, 101, 103, 2, 4, 105], word), 0);
        // The oldest of the three ended inside [103, 2, 4]: nothing new.
        assert_eq!(p.update(&[100, 1, 101, 103, 2, 4, 105, 106], word), 0);
        // All three contain [103, 2, 4] 105: 101 is committed, [103, 2, 4] held back.
        assert_eq!(p.update(&[100, 1, 101, 103, 2, 4, 105, 106, 107], word), 1);
        assert_eq!(p.committed(), &[100, 1, 101]);
    }

    #[test]
    fn never_commits_the_last_token_of_a_hypothesis() {
        let mut p = StablePrefix::new();
        p.update(&[100, 101, 102], word);
        p.update(&[100, 101, 102], word);
        // Identical hypotheses: the final word may still grow, so it stays
        // open, and the word before it is held back.
        assert_eq!(p.update(&[100, 101, 102], word), 1);
        assert_eq!(p.committed(), &[100]);
    }

    #[test]
    fn hypotheses_that_may_not_commit_still_count_for_agreement() {
        let mut p = StablePrefix::new();
        assert_eq!(p.update_if(&[100, 101, 102], word, false), 0);
        assert_eq!(p.update_if(&[100, 101, 102], word, false), 0);
        assert_eq!(p.update_if(&[100, 101, 102], word, false), 0);
        assert!(p.committed().is_empty());
        // The two before it agree with this one: [100] is committed at once.
        assert_eq!(p.update_if(&[100, 101, 102], word, true), 1);
    }

    #[test]
    fn a_disagreeing_hypothesis_in_the_window_blocks_commitment() {
        let mut p = StablePrefix::new();
        p.update(&[100, 101, 102, 103], word);
        p.update(&[104, 101, 102, 103], word);
        assert_eq!(p.update(&[100, 101, 102, 103], word), 0);
        assert!(p.committed().is_empty());
    }
}
