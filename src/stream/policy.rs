//! Which part of an open segment's hypothesis may be committed before the
//! segment ends: the longest prefix on which the last two hypotheses agree
//! (local agreement), cut back to a word boundary, so a word still being
//! spoken is never committed. Committed tokens are forced as the start of
//! every later hypothesis of the segment, so committed text never changes.

#[derive(Debug, Default, Clone)]
pub struct StablePrefix {
    committed: Vec<u32>,
    previous: Option<Vec<u32>>,
}

impl StablePrefix {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn committed(&self) -> &[u32] {
        &self.committed
    }

    /// Takes the newest hypothesis (which starts with the committed tokens)
    /// and returns how many tokens became committed.
    pub fn update(&mut self, hypothesis: &[u32], starts_word: impl Fn(u32) -> bool) -> usize {
        debug_assert!(hypothesis.starts_with(&self.committed));
        let before = self.committed.len();
        if let Some(prev) = &self.previous {
            let agree = prev
                .iter()
                .zip(hypothesis)
                .take_while(|(a, b)| a == b)
                .count();
            // Commit only whole words: the agreed run must be followed, in both
            // hypotheses, by a token that starts a new word.
            let mut end = agree;
            while end > before {
                let next_new_word = |h: &[u32]| h.get(end).is_some_and(|&t| starts_word(t));
                if next_new_word(prev) && next_new_word(hypothesis) {
                    break;
                }
                end -= 1;
            }
            // Hold back the last agreed word: two hypotheses half a second
            // apart often agree on a wrong last word that more audio would
            // fix, and committed words are forced into every later decode.
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
        self.previous = Some(hypothesis.to_vec());
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
    fn commits_the_agreed_prefix_up_to_a_word_boundary_but_the_last_word() {
        let mut p = StablePrefix::new();
        assert_eq!(
            p.update(&[100, 1, 101, 102], word),
            0,
            "one hypothesis is not agreement"
        );
        // Agree on the words [100, 1] [101]; the last agreed word is held back.
        assert_eq!(p.update(&[100, 1, 101, 103, 2], word), 2);
        assert_eq!(p.committed(), &[100, 1]);
        // Agreement up to [.., 103, 2] but 2 then 4 continue a word: back off
        // to before 103, then hold back 101.
        assert_eq!(p.update(&[100, 1, 101, 103, 2, 4], word), 0);
        // The previous hypothesis ended inside that word: still nothing new.
        assert_eq!(p.update(&[100, 1, 101, 103, 2, 4, 105], word), 0);
        // Agreed through [103, 2, 4]: 101 is committed, [103, 2, 4] held back.
        assert_eq!(p.update(&[100, 1, 101, 103, 2, 4, 105, 106], word), 1);
        assert_eq!(p.committed(), &[100, 1, 101]);
    }

    #[test]
    fn never_commits_the_last_token_of_a_hypothesis() {
        let mut p = StablePrefix::new();
        p.update(&[100, 101, 102], word);
        // Identical hypotheses: the final word may still grow, so it stays
        // open, and the word before it is held back.
        assert_eq!(p.update(&[100, 101, 102], word), 1);
        assert_eq!(p.committed(), &[100]);
    }
}
