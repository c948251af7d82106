//! The audit trail: one `audit` log line per admin action or applied event, and the last few
//! kept in memory so that the operator page can show them without a log collector.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use serde::Serialize;
use utoipa::ToSchema;

/// One admin action or event, as the audit line records it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AuditRecord {
    /// When, in Unix milliseconds.
    pub at_ms: u64,
    /// Who: the admin token's id (`token:` and 8 hex digits, never the token), `signature`
    /// for a signed event, or `stream` for an event read from the event stream.
    pub who: String,
    /// The client address (`-` when unknown), or the entry id of an event read from the
    /// stream.
    pub addr: String,
    /// What: `clear`, `invalidate`, `warm`, `version`, `peer-invalidation`, or an event kind.
    pub action: String,
    /// On what: a pattern, a run id, a list of keys, a version.
    pub target: String,
    /// Entries the action dropped or filled.
    pub entries: u64,
}

/// The audit trail of one instance: log lines, and the last `capacity` admin actions and the
/// last `capacity` events in memory. Two rings, so that a training sweep's burst of events
/// (up to `server.event_rate_per_sec`) does not push the admin actions out.
#[derive(Debug)]
pub struct AuditTrail {
    admin: Mutex<VecDeque<AuditRecord>>,
    events: Mutex<VecDeque<AuditRecord>>,
    capacity: usize,
}

fn is_event(action: &str) -> bool {
    crate::domain::EVENT_KINDS.contains(&action)
}

impl AuditTrail {
    /// A trail that keeps the last `capacity` records (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            admin: Mutex::new(VecDeque::with_capacity(capacity)),
            events: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
        }
    }

    /// Writes one audit line (target `audit`) and keeps the record. Admin actions are rare
    /// (rate-limited), so the lock is never contended on a request path that matters.
    pub fn record(&self, who: &str, addr: &str, action: &str, target: &str, entries: u64) {
        tracing::info!(target: "audit", who, addr, action, target, entries, "admin action");
        let record = AuditRecord {
            at_ms: crate::domain::policy::now_ms(),
            who: who.to_owned(),
            addr: addr.to_owned(),
            action: action.to_owned(),
            target: truncate(target, 200),
            entries,
        };
        let ring = if is_event(action) {
            &self.events
        } else {
            &self.admin
        };
        let mut recent = ring.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() == self.capacity {
            recent.pop_front();
        }
        recent.push_back(record);
    }

    /// The kept records, admin actions and events together, newest first.
    pub fn recent(&self) -> Vec<AuditRecord> {
        let mut all: Vec<AuditRecord> = [&self.admin, &self.events]
            .iter()
            .flat_map(|ring| {
                let ring = ring.lock().unwrap_or_else(PoisonError::into_inner);
                ring.iter().cloned().collect::<Vec<_>>()
            })
            .collect();
        // Stable: records of one millisecond keep the order they were made in.
        all.reverse();
        all.sort_by_key(|r| std::cmp::Reverse(r.at_ms));
        all
    }
}

/// At most `max` bytes of `s`, cut at a character boundary, with `…` when cut: a `keys`
/// invalidation may name a thousand keys, and the page needs only the start.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_records_newest_first() {
        let trail = AuditTrail::new(3);
        for i in 0..5 {
            trail.record(
                "token:abcd1234",
                "127.0.0.1:1",
                "invalidate",
                &i.to_string(),
                i,
            );
        }
        let recent = trail.recent();
        let targets: Vec<_> = recent.iter().map(|r| r.target.as_str()).collect();
        assert_eq!(targets, ["4", "3", "2"]);
        assert_eq!(recent[0].entries, 4);
    }

    #[test]
    fn a_burst_of_events_does_not_push_out_the_admin_actions() {
        let trail = AuditTrail::new(2);
        trail.record("token:abcd1234", "-", "clear", "model:*", 3);
        for i in 0..10 {
            trail.record("signature", "-", "training-completed", &i.to_string(), 1);
        }
        let actions: Vec<_> = trail.recent().iter().map(|r| r.action.clone()).collect();
        assert_eq!(actions.len(), 3);
        assert!(actions.contains(&"clear".to_owned()), "{actions:?}");
    }

    #[test]
    fn long_targets_are_cut_at_a_character_boundary() {
        let long = "é".repeat(300);
        let cut = truncate(&long, 201);
        assert!(cut.ends_with('…'));
        assert_eq!(cut.len(), 200 + '…'.len_utf8());
        assert_eq!(truncate("short", 200), "short");
    }
}
