//! The domain: the view table and its templates, event kinds, run ids, logical keys, and the
//! validators that make a bad id, key, pattern or version unrepresentable past the edge. Plain data and pure functions;
//! depends on nothing else in the crate (config, store and serve build on it).

pub mod event_kind;
pub mod headers;
pub mod lookup;
pub mod peer_addr;
pub mod policy;
pub mod prefix;
pub mod run_id;
pub mod template;
pub mod view;
pub mod write_rule;

pub use event_kind::EventKinds;
pub use lookup::{LookupSpec, Lookups};
pub use policy::{Freshness, FrontendAuth, Storability, TtlTier, ViewPolicy};
pub use prefix::AdminPrefix;
pub use run_id::{MAX_INTEGER_ID, RUN_ID_PATTERN, RawRunId, parse_run_id, run_ids_in_untyped_text};
pub use view::{OnInvalid, Resolved, View, ViewDef, ViewSpec, ViewTable};
pub use write_rule::{Invalidates, WriteRule, WriteRuleSpec, WriteRules};

/// The event kinds shipped by default (`events.kinds`), which invalidate a run.
pub const EVENT_KINDS: [&str; 3] = ["training-completed", "training-failed", "model-deleted"];

/// Longest accepted logical key or clear pattern.
pub const MAX_KEY_LEN: usize = 512;

/// `parts` joined, in one allocation of the right size (keys are built on every request;
/// `format!` costs more than the copying).
pub fn concat(parts: &[&str]) -> String {
    let mut out = String::with_capacity(parts.iter().map(|p| p.len()).sum::<usize>() + 12);
    for p in parts {
        out.push_str(p);
    }
    out
}

/// Appends `n` in decimal.
pub fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        out.push(char::from(d));
    }
}

/// Whether `s` is 1-64 ASCII letters and digits: the form of an instance id and of a
/// delivery id, which are written into logs and the audit trail.
pub fn is_short_word(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

/// Whether `id` is a model run id: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn is_run_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    let first_ok = bytes
        .first()
        .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
    let rest_ok = bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    first_ok && rest_ok && bytes.len() <= 128
}

/// Checks a model run id: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn validate_run_id(id: &str) -> Result<(), String> {
    if is_run_id(id) {
        Ok(())
    } else {
        Err(format!(
            "model_run_id {:?} is invalid: use 1-128 characters of A-Z, a-z, 0-9, '_', '.', '-', not starting with '.' or '-'",
            truncate(id, 40)
        ))
    }
}

/// Checks a key version name: `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`.
pub fn validate_version(v: &str) -> Result<(), String> {
    let bytes = v.as_bytes();
    let ok = bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.len() <= 64
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "version {:?} is invalid: use 1-64 characters of A-Z, a-z, 0-9, '_', '.', '-', starting with a letter or digit",
            truncate(v, 40)
        ))
    }
}

/// Checks a logical key named by `/cache/invalidate`: 1-512 characters of
/// `A-Z a-z 0-9 _ . - :`, no glob characters.
pub fn validate_logical_key(key: &str) -> Result<(), String> {
    if !key.is_empty() && key.len() <= MAX_KEY_LEN && key.bytes().all(is_key_byte) {
        Ok(())
    } else {
        Err(format!(
            "key {:?} is invalid: use 1-{MAX_KEY_LEN} characters of A-Z, a-z, 0-9, '_', '.', '-', ':', '%'",
            truncate(key, 40)
        ))
    }
}

/// Checks a tag named by `/cache/invalidate`, as entries carry it: `kind:value`, the kind
/// `[a-z][a-z0-9_-]{0,63}`, the value 1 or more characters of a key (`A-Z a-z 0-9 _ . - : %`),
/// 512 characters at most in all.
pub fn validate_tag(tag: &str) -> Result<(), String> {
    let ok = tag.len() <= MAX_KEY_LEN
        && tag.split_once(':').is_some_and(|(kind, value)| {
            let k = kind.as_bytes();
            !k.is_empty()
                && k.len() <= 64
                && k[0].is_ascii_lowercase()
                && k.iter().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-')
                })
                && !value.is_empty()
                && value.bytes().all(is_key_byte)
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {:?} is invalid: use kind:value, as in run:42 (a kind of a-z, 0-9, '_', '-'; a value of A-Z, a-z, 0-9, '_', '.', '-', ':', '%'; 512 characters at most)",
            truncate(tag, 40)
        ))
    }
}

/// Checks a clear pattern: like a logical key, plus the globs `*` and `?`. Character classes
/// and escapes are refused, so the pattern means the same to Redis and to the memory tier and
/// can never reach outside this service's prefix and version.
pub fn validate_pattern(pattern: &str) -> Result<(), String> {
    let ok = !pattern.is_empty()
        && pattern.len() <= MAX_KEY_LEN
        && pattern
            .bytes()
            .all(|b| is_key_byte(b) || b == b'*' || b == b'?');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "pattern {:?} is invalid: use 1-{MAX_KEY_LEN} characters of A-Z, a-z, 0-9, '_', '.', '-', ':', '%' and the wildcards '*' and '?'",
            truncate(pattern, 40)
        ))
    }
}

/// Key bytes, and `%` (which a key template writes a byte that may not stand in a key as,
/// `%XX`).
fn is_key_byte(b: u8) -> bool {
    template::is_key_byte(b) || b == b'%'
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_follow_the_spec_pattern() {
        for ok in ["42", "run_1", "a.b-c", "_x", &"a".repeat(128)] {
            assert!(validate_run_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "-a",
            ".a",
            "a/b",
            "a b",
            "a*",
            &"a".repeat(129),
            "é",
        ] {
            assert!(validate_run_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns_refuse_classes_and_escapes() {
        assert!(validate_pattern("model:metrics:*").is_ok());
        assert!(validate_pattern("model:?:1").is_ok());
        for bad in ["", "model:[ab]", "a\\*", "a b", "x{y}"] {
            assert!(validate_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn decimals_are_written_exactly() {
        let mut s = String::new();
        for n in [0, 9, 10, 1234567890123, u64::MAX] {
            s.clear();
            push_decimal(&mut s, n);
            assert_eq!(s, n.to_string());
        }
    }
}
