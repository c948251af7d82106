//! The comparison body: `normalise_run_ids` returns a sorted, de-duplicated list of 2..=50
//! valid ids, and the comparison key does not depend on the order of the ids sent.
//!
//! Input: JSON; `model_run_ids` of an object is used when it is an array (a top-level array
//! is used as it is, which helps the fuzzer).
#![no_main]

use libfuzzer_sys::fuzz_target;
use runcache::cache::{comparison_key, validate_run_id};
use runcache::http::views::{normalise_run_ids, run_id_from_json};
use serde_json::Value;

const MAX: usize = 50;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let values = match body {
        Value::Object(mut map) => match map.remove("model_run_ids") {
            Some(Value::Array(values)) => values,
            _ => return,
        },
        Value::Array(values) => values,
        _ => return,
    };

    let result = normalise_run_ids(&values, MAX);
    let mut reversed = values.clone();
    reversed.reverse();
    let mut rotated = values.clone();
    if !rotated.is_empty() {
        rotated.rotate_left(1);
    }
    let mut doubled = values.clone();
    doubled.extend(values.iter().cloned());

    let Ok(ids) = result else {
        assert!(normalise_run_ids(&reversed, MAX).is_err());
        assert!(normalise_run_ids(&rotated, MAX).is_err());
        return;
    };
    assert!((2..=MAX).contains(&ids.len()), "{} ids", ids.len());
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "not sorted and unique: {ids:?}"
    );
    for id in &ids {
        assert!(validate_run_id(id).is_ok(), "invalid id {id:?}");
    }
    // Every id comes from the input, and every input value is one of the ids.
    for v in &values {
        let id = run_id_from_json(v).expect("each value of an accepted list is an id");
        assert!(ids.binary_search(&id).is_ok(), "{id:?} lost");
    }

    let key = comparison_key(&ids);
    let digest = key
        .strip_prefix("model:comparison:")
        .expect("comparison key prefix");
    assert!(
        digest.len() == 64
            && digest
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{key:?}"
    );
    for permuted in [&reversed, &rotated] {
        let again = normalise_run_ids(permuted, MAX).expect("a permutation is accepted too");
        assert_eq!(again, ids);
        assert_eq!(comparison_key(&again), key);
    }
    // Repeating every id changes nothing, as long as the list stays within the size limit.
    if doubled.len() <= MAX * 4 {
        let again = normalise_run_ids(&doubled, MAX).expect("duplicates are accepted");
        assert_eq!(comparison_key(&again), key);
    }
});
