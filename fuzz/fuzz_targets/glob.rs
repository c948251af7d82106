//! Clear patterns: `validate_pattern` accepts only key characters plus `*` and `?`, the
//! physical glob stays under `{prefix}:{version}:`, and `wildmatch` (the memory tier's
//! matcher) agrees with a reference `*`/`?` matcher (the subset Redis `SCAN MATCH` shares).
//!
//! Input: the first line is the pattern, the other lines are logical keys.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runcache::cache::{Keyspace, MAX_KEY_LEN, validate_pattern};
use wildmatch::WildMatch;

/// Reference glob: `*` is any run of characters, `?` exactly one, everything else literal.
fn reference(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = text.chars().collect();
    let (mut pi, mut si) = (0, 0);
    // Position of the last `*` and the text position it currently stands for.
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            star = Some((sp, ss + 1));
            pi = sp + 1;
            si = ss + 1;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':' | b'*' | b'?')
}

fuzz_target!(|data: &[u8]| {
    let input = String::from_utf8_lossy(data);
    let mut lines = input.split('\n');
    let pattern = lines.next().unwrap_or_default();
    let keys: Vec<&str> = lines.take(8).collect();

    let valid = validate_pattern(pattern).is_ok();
    let by_hand =
        !pattern.is_empty() && pattern.len() <= MAX_KEY_LEN && pattern.bytes().all(allowed);
    assert_eq!(valid, by_hand, "validate_pattern({pattern:?})");
    if !valid {
        return;
    }
    for c in pattern.chars() {
        assert!(
            c.is_ascii() && !c.is_whitespace() && !matches!(c, '[' | ']' | '\\'),
            "accepted {c:?} in {pattern:?}"
        );
    }

    let ks = Keyspace::new("p");
    let physical = ks.entry_pattern("v1", pattern);
    assert!(physical.starts_with("p:v1:"), "{physical:?}");
    let glob = WildMatch::new(&physical);
    let logical_glob = WildMatch::new(pattern);

    // A key the pattern must match: `*` stands for the first key (or nothing), `?` for 'x'.
    let filler = keys.first().copied().unwrap_or_default();
    let instance: String = pattern
        .chars()
        .map(|c| match c {
            '*' => filler.to_owned(),
            '?' => "x".to_owned(),
            c => c.to_string(),
        })
        .collect();
    assert!(
        glob.matches(&ks.entry("v1", &instance)),
        "{physical:?} does not match its own instance {instance:?}"
    );

    for key in keys.iter().copied().chain([instance.as_str()]) {
        let candidates = [
            ks.entry("v1", key),
            ks.entry("v2", key),
            ks.run_tag("v1", key),
            ks.fetch_lock("v1", key),
            ks.version_key(),
            format!("q:v1:{key}"),
            key.to_owned(),
        ];
        for candidate in &candidates {
            let got = glob.matches(candidate);
            assert_eq!(
                got,
                reference(&physical, candidate),
                "wildmatch and the reference disagree on {physical:?} vs {candidate:?}"
            );
            if got {
                assert!(
                    candidate.starts_with("p:v1:"),
                    "{physical:?} escaped the entry keyspace: matched {candidate:?}"
                );
            }
        }
        // Matching the physical glob against physical keys means the same as matching the
        // logical pattern against logical keys.
        assert_eq!(
            glob.matches(&ks.entry("v1", key)),
            logical_glob.matches(key),
            "{pattern:?} vs {key:?}"
        );
    }
});
