//! Warming: filling the cache for named runs (at start, through `/cache/warm`) and for the
//! origin's most recent runs, with bounded concurrency and anonymous requests.

use futures_util::StreamExt;
use http::{HeaderMap, Method};
use serde_json::Value;

use super::{CacheOutcome, ReadThrough, ViewRequest};
use crate::domain::{RawRunId, parse_run_id};
use crate::origin::{OriginError, OriginRequest};

/// What a warm-up did.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct WarmReport {
    /// Entries fetched from the origin and stored.
    pub warmed: u64,
    /// Entries already cached, left alone.
    pub skipped: u64,
    /// Entries that could not be fetched or stored.
    pub failed: Vec<WarmFailure>,
}

/// One entry a warm-up could not fill.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct WarmFailure {
    /// The run.
    pub model_run_id: String,
    /// The view (`metrics` or `feature_importance`).
    pub view: String,
    /// Why.
    pub error: String,
}

impl ReadThrough {
    /// The views a run is warmed in: every `GET` view of one run (its one path parameter
    /// the run, tagged `run:{…}` by it, no query it requires): the metrics and feature
    /// importance of the shipped table.
    fn run_views(&self) -> Vec<&crate::domain::ViewDef> {
        self.table
            .views()
            .iter()
            .filter(|d| {
                d.method == Method::GET
                    && d.params.len() == 1
                    && d.query.iter().all(|q| !q.required || q.default.is_some())
                    && d.keyed_by_tag().is_some_and(|(_, kind, _)| kind == "run")
            })
            .collect()
    }

    /// Fetches and stores, for each of `run_ids`, every view of one run (`Self::run_views`)
    /// not cached yet, at most `concurrency` origin requests at a time. Anonymous: no client
    /// header is forwarded, so warming never leaks the admin token to the origin.
    pub async fn warm(&self, run_ids: &[String], concurrency: usize) -> WarmReport {
        let views = self.run_views();
        let mut requests = Vec::with_capacity(run_ids.len() * views.len());
        for id in run_ids {
            for def in &views {
                let path = def.path_with(&[id.as_str()]);
                if let Ok(resolved) = def.resolve(&path, None, None) {
                    requests.push((
                        id.clone(),
                        ViewRequest::resolved(def, resolved, HeaderMap::new()),
                    ));
                }
            }
        }
        let results: Vec<(String, ViewRequest, Result<bool, String>)> =
            futures_util::stream::iter(requests)
                .map(|(id, req)| async move {
                    let result = match self.serve_inner(req.clone()).await {
                        Ok(r) => match r.outcome {
                            CacheOutcome::Miss { stored: true, .. } => Ok(true),
                            CacheOutcome::Hit { .. } | CacheOutcome::Stale { .. } => Ok(false),
                            _ => Err(format!(
                                "not stored (origin answered {})",
                                r.status.as_u16()
                            )),
                        },
                        // Not the raw error: it can name internal hosts.
                        Err(OriginError::Unreachable(_)) => Err("origin unreachable".to_owned()),
                        Err(e) => Err(e.to_string()),
                    };
                    (id, req, result)
                })
                .buffer_unordered(concurrency.max(1))
                .collect()
                .await;
        let mut report = WarmReport::default();
        for (id, req, result) in results {
            match result {
                Ok(true) => report.warmed += 1,
                Ok(false) => report.skipped += 1,
                Err(error) => report.failed.push(WarmFailure {
                    model_run_id: id,
                    view: req.view.name().to_owned(),
                    error,
                }),
            }
        }
        self.stats
            .record_warm(report.warmed, report.failed.len() as u64);
        report
    }

    /// The ids of the origin's `limit` most recent runs, from `GET {path}?limit={limit}`.
    /// `None` (after one log line) when the origin has no such route or answers badly.
    pub async fn recent_runs(&self, path: &str, limit: usize) -> Option<Vec<String>> {
        let req = OriginRequest {
            method: Method::GET,
            path_and_query: format!("{path}?limit={limit}"),
            body: None,
            headers: HeaderMap::new(),
        };
        let resp = match self.origin.send(req).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(path, error = %e, "cannot list recent runs for warming; carrying on");
                return None;
            }
        };
        if !resp.status.is_success() {
            tracing::warn!(
                path,
                status = resp.status.as_u16(),
                "the origin has no usable recent-runs route; warming only warm.model_run_ids"
            );
            return None;
        }
        match parse_run_list(&resp.body) {
            Ok(mut ids) => {
                ids.truncate(limit);
                Some(ids)
            }
            Err(e) => {
                tracing::warn!(path, error = %e, "cannot read the recent-runs list; carrying on");
                None
            }
        }
    }
}

/// Run ids from a list of runs: a JSON array of ids (strings or non-negative integers) or of
/// objects carrying `model_run_id`, `run_id` or `id`, possibly under `runs`, `model_runs`,
/// `items` or `data`. Invalid ids are skipped.
fn parse_run_list(body: &[u8]) -> Result<Vec<String>, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let list = match &value {
        Value::Array(items) => items,
        Value::Object(map) => ["runs", "model_runs", "items", "data"]
            .iter()
            .find_map(|k| map.get(*k).and_then(Value::as_array))
            .ok_or("no runs, model_runs, items or data array")?,
        _ => return Err("expected an array or an object".into()),
    };
    let id_of = |v: &Value| -> Option<String> {
        let raw = match v {
            Value::Object(o) => ["model_run_id", "run_id", "id"]
                .iter()
                .find_map(|k| o.get(*k))?,
            other => other,
        };
        parse_run_id(RawRunId::Json(raw)).ok()
    };
    Ok(list.iter().filter_map(id_of).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_lists_in_common_shapes_are_read() {
        let shapes: [&[u8]; 4] = [
            br#"["1", 2, "three"]"#,
            br#"{"runs": [{"model_run_id": "1"}, {"model_run_id": 2}, {"id": "three"}]}"#,
            br#"{"items": [{"run_id": "1"}, {"run_id": "2"}, {"run_id": "three"}]}"#,
            br#"{"data": ["1", 2.0, "three", "..", -4, 1.5, null]}"#,
        ];
        for body in shapes {
            assert_eq!(parse_run_list(body).expect("parses"), ["1", "2", "three"]);
        }
        assert!(parse_run_list(b"{}").is_err());
        assert!(parse_run_list(b"nope").is_err());
    }
}
