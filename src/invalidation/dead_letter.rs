//! The event stream's dead-letter stream: where an entry whose invalidation kept failing is
//! set aside, with the error, once it has been delivered `events.max_deliveries` times (one
//! entry that always fails would otherwise be read again for ever). Its key is
//! `<stream>:dead:{<stream>}:<group>` (see [`super::stream::side_key`]): named after the
//! stream, so an ACL that grants the stream grants it, and in the stream's hash slot, so one
//! script acknowledges the entry and copies it.
//!
//! Each dead-letter entry holds `id` (the entry's ID in the stream), `error` (the last
//! failure), `deliveries`, `consumer` (the instance that set it aside), then the entry's own
//! fields (`kind`, `model_run_id`, …; any named like one of those four is left out).

use redis::Value;

/// Acknowledges an entry and, if it was still pending (no other instance set it aside
/// first), appends it to the dead-letter stream. `KEYS`: the stream, the dead-letter stream;
/// `ARGV`: group, entry ID, the dead-letter stream's approximate length bound, then the
/// fields to append. Returns 1 when it was set aside here. A dead-letter key of another type
/// is refused before anything is written.
pub const SET_ASIDE: &str = r#"
local t = redis.call('TYPE', KEYS[2])['ok']
if t ~= 'none' and t ~= 'stream' then
  return redis.error_reply('WRONGTYPE the dead-letter key holds a ' .. t)
end
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
return 1
"#;

/// Entries the dead-letter stream keeps (approximately; the oldest go first).
pub const MAX_LEN: u64 = 10_000;

/// Fields a dead-letter entry adds to the event's own.
const OWN: [&str; 4] = ["id", "error", "deliveries", "consumer"];

/// Longest error message kept, and longest field value.
const MAX_ERROR: usize = 1_000;
/// Most of the event's own fields kept (a script's `unpack` has a bound; an event has a few).
const MAX_FIELDS: usize = 64;

/// One entry set aside.
#[derive(Debug)]
pub struct DeadLetter<'a> {
    /// The entry's ID in the stream.
    pub id: &'a str,
    /// Why its invalidation failed, the last time.
    pub error: &'a str,
    /// Its deliveries, from `XPENDING`.
    pub deliveries: u64,
    /// The consumer that sets it aside.
    pub consumer: &'a str,
    /// The entry's fields.
    pub fields: &'a [(String, String)],
}

impl DeadLetter<'_> {
    /// The dead-letter entry's fields, flat: name, value, name, value, …
    pub fn fields(&self) -> Vec<String> {
        let error: String = self.error.chars().take(MAX_ERROR).collect();
        let mut out = vec![
            "id".to_owned(),
            self.id.to_owned(),
            "error".to_owned(),
            error,
            "deliveries".to_owned(),
            self.deliveries.to_string(),
            "consumer".to_owned(),
            self.consumer.to_owned(),
        ];
        let cut = |s: &str| s.chars().take(MAX_ERROR).collect::<String>();
        for (k, v) in self
            .fields
            .iter()
            .filter(|(k, _)| !OWN.contains(&k.as_str()))
            .take(MAX_FIELDS)
        {
            out.push(cut(k));
            out.push(cut(v));
        }
        out
    }
}

/// The delivery count in a reply of `XPENDING <stream> <group> <id> <id> 1`:
/// `[[id, consumer, idle, deliveries]]`, or 0 when the entry is no longer pending.
pub fn deliveries(reply: &Value) -> u64 {
    let Value::Array(rows) = reply else {
        return 0;
    };
    match rows.first() {
        Some(Value::Array(row)) => match row.get(3) {
            Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
            _ => 0,
        },
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_keeps_the_event_and_says_why() {
        let fields = vec![
            ("kind".to_owned(), "model-deleted".to_owned()),
            ("model_run_id".to_owned(), "7".to_owned()),
            ("error".to_owned(), "the producer's own".to_owned()),
        ];
        let letter = DeadLetter {
            id: "1-0",
            error: "WRONGTYPE",
            deliveries: 5,
            consumer: "http://a",
            fields: &fields,
        };
        assert_eq!(
            letter.fields(),
            [
                "id",
                "1-0",
                "error",
                "WRONGTYPE",
                "deliveries",
                "5",
                "consumer",
                "http://a",
                "kind",
                "model-deleted",
                "model_run_id",
                "7"
            ]
        );
    }

    #[test]
    fn deliveries_are_read_from_xpending() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("1-0"),
            bulk("c"),
            Value::Int(12),
            Value::Int(4),
        ])]);
        assert_eq!(deliveries(&reply), 4);
        assert_eq!(deliveries(&Value::Array(vec![])), 0);
        assert_eq!(deliveries(&Value::Nil), 0);
    }
}
