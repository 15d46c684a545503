//! "Did you mean": the closest known word to a misspelled one.

/// The known word closest to `word` by edit distance, if it is close
/// enough to be a likely typo (at most a third of its letters wrong).
pub fn closest<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    known.iter().map(|k| (distance(word, k), *k)).filter(|(d, _)| *d <= limit).min_by_key(|(d, _)| *d).map(|(_, k)| k)
}

/// Levenshtein distance over chars.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let here = row[j + 1];
            row[j + 1] = (row[j] + 1).min(here + 1).min(prev + usize::from(ca != *cb));
            prev = here;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_only_close_words() {
        let keys = ["interval", "timeout", "rise", "fall"];
        assert_eq!(closest("intervall", &keys), Some("interval"));
        assert_eq!(closest("timout", &keys), Some("timeout"));
        assert_eq!(closest("colour", &keys), None);
        assert_eq!(closest("standby", &["primary", "replica", "any"]), None);
        assert_eq!(distance("kitten", "sitting"), 3);
    }
}
