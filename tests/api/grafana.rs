//! The Grafana dashboard (`deploy/grafana/runcache.json`) against a running runcache: every
//! metric name its queries use is one that `/metrics` exports, so the board cannot silently rot
//! when a metric is renamed or removed.

use std::collections::{BTreeMap, BTreeSet};

use runcache::metrics::names;
use serde_json::{Value, json};

use crate::helpers::{TestRedis, header, spawn_app};

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/runcache.json");

/// Identifiers that are never metric names: PromQL's aggregation operators and keywords (a
/// function is recognised by the `(` after it instead, so no list of functions is needed).
const KEYWORDS: [&str; 24] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
];

/// Keywords that may be followed by a parenthesised list of label names.
const LABEL_LISTS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Index just past the string literal that opens at `i` (`"…"`, `'…'` or `` `…` ``).
fn skip_string(chars: &[char], i: usize) -> usize {
    let quote = chars[i];
    let mut j = i + 1;
    while j < chars.len() {
        match chars[j] {
            '\\' if quote != '`' => j += 2,
            c if c == quote => return j + 1,
            _ => j += 1,
        }
    }
    j
}

/// Index just past the `close` that ends the group opening at `i`, skipping string literals
/// (a regex matcher may hold a `}` or `)`).
fn skip_group(chars: &[char], i: usize, close: char) -> usize {
    let mut j = i + 1;
    while j < chars.len() {
        match chars[j] {
            '"' | '\'' | '`' => j = skip_string(chars, j),
            c if c == close => return j + 1,
            _ => j += 1,
        }
    }
    j
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The metric names in a PromQL expression (with Grafana's `$variables`): every identifier
/// that is not a function or aggregation (followed by `(`), a keyword, a label name (inside
/// `{…}` or a `by (…)`-style list), a duration (inside `[…]` or after `offset`), a number or a
/// variable.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut found = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = skip_string(&chars, i);
        } else if c == '{' {
            i = skip_group(&chars, i, '}');
        } else if c == '[' {
            i = skip_group(&chars, i, ']');
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '$' {
            i += 1;
            if chars.get(i) == Some(&'{') {
                i = skip_group(&chars, i, '}');
            } else {
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || c == '.' {
            // Numbers (0.95, 1e3, 0x1f) and durations (offset 5m).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let lower = word.to_ascii_lowercase();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let call = chars.get(next) == Some(&'(');
            if call && LABEL_LISTS.contains(&lower.as_str()) {
                i = skip_group(&chars, next, ')');
            } else if !call
                && !KEYWORDS.contains(&lower.as_str())
                && !matches!(lower.as_str(), "offset" | "atan2" | "inf" | "nan")
            {
                found.insert(word);
            }
        } else {
            i += 1;
        }
    }
    found
}

/// The label matchers of every selector written `metric{…}`: `(metric, label, op, value)`.
fn matchers(expr: &str) -> Vec<(String, String, String, String)> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = skip_string(&chars, i);
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            if chars.get(i) != Some(&'{') {
                continue;
            }
            let metric: String = chars[start..i].iter().collect();
            let end = skip_group(&chars, i, '}');
            let body: String = chars[i + 1..end.saturating_sub(1)].iter().collect();
            for part in body.split(',') {
                let part = part.trim();
                let Some(at) = part.find(['=', '!']) else {
                    continue;
                };
                let label = part[..at].trim().to_owned();
                let rest = &part[at..];
                let op_len =
                    if rest.starts_with("=~") || rest.starts_with("!~") || rest.starts_with("!=") {
                        2
                    } else {
                        1
                    };
                let value = rest[op_len..].trim().trim_matches('"').to_owned();
                out.push((metric.clone(), label, rest[..op_len].to_owned(), value));
            }
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// `(metric, label, value)` of every exported sample.
fn exported_labels(text: &str) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((metric, rest)) = line.split_once('{') else {
            continue;
        };
        let Some((labels, _)) = rest.split_once('}') else {
            continue;
        };
        for pair in labels.split("\",") {
            if let Some((k, v)) = pair.split_once("=\"") {
                out.insert((
                    metric.to_owned(),
                    k.trim_start_matches(',').to_owned(),
                    v.trim_end_matches('"').to_owned(),
                ));
            }
        }
    }
    out
}

/// The metric names of a templating query: Grafana's `label_values(expr, label)` and
/// `query_result(expr)` name metrics in `expr` only; `label_names()` and `metrics(re)` none.
fn variable_query_names(query: &str) -> BTreeSet<String> {
    let q = query.trim();
    let inner = |prefix: &str| {
        q.strip_prefix(prefix)
            .and_then(|rest| rest.trim_start().strip_prefix('('))
            .and_then(|rest| rest.strip_suffix(')'))
    };
    if let Some(args) = inner("label_values") {
        // The label is the last argument; a lone argument is a label, not a metric.
        return match args.rfind(',') {
            Some(comma) => metric_names(&args[..comma]),
            None => BTreeSet::new(),
        };
    }
    if let Some(expr) = inner("query_result") {
        return metric_names(expr);
    }
    if inner("label_names").is_some() || inner("metrics").is_some() {
        return BTreeSet::new();
    }
    metric_names(q)
}

#[test]
fn label_matchers_are_read_from_selectors() {
    let m = matchers(
        "sum(rate(a_total{instance=~\"$instance\", result=\"hit\"}[5m])) / b{x=~\"p|q\",y!=\"z\"}",
    );
    let m: Vec<_> = m
        .iter()
        .map(|(a, b, c, d)| format!("{a} {b}{c}{d}"))
        .collect();
    assert_eq!(
        m,
        [
            "a_total instance=~$instance",
            "a_total result=hit",
            "b x=~p|q",
            "b y!=z"
        ]
    );
    let labels = exported_labels("a_total{view=\"m\",result=\"hit\"} 1\n# HELP x\nb 2\n");
    assert!(labels.contains(&("a_total".into(), "result".into(), "hit".into())));
    assert!(labels.contains(&("a_total".into(), "view".into(), "m".into())));
}

#[test]
fn the_extractor_keeps_metric_names_and_nothing_else() {
    let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        metric_names(
            "histogram_quantile(0.95, sum by (le) (rate(\
             runcache_view_request_duration_seconds_bucket{instance=~\"$instance\", view=\"metrics\"}\
             [$__rate_interval])))"
        ),
        set(&["runcache_view_request_duration_seconds_bucket"])
    );
    assert_eq!(
        metric_names(
            "100 * sum(increase(a_total{result=\"hit\", x=~\"a|b}\"}[$__range]))\n  \
             / (sum without (view) (rate(a_total[5m] offset 1h)) > bool 0) + sum(b) by (x)"
        ),
        set(&["a_total", "b"])
    );
    assert_eq!(
        metric_names(
            "x and on (instance) group_left (view) y unless ignoring(le) z or w * 1e-9 + Inf \
             # a comment naming not_a_metric\n - max_over_time(ns:rule[1h:5m] @ end()) \
             / topk(3, ${var}) - count_values(\"v\", v)"
        ),
        set(&["ns:rule", "v", "w", "x", "y", "z"])
    );
    assert_eq!(
        variable_query_names("label_values(runcache_view_requests_total{job=\"a\"}, instance)"),
        set(&["runcache_view_requests_total"])
    );
    assert_eq!(variable_query_names("label_values(instance)"), set(&[]));
    assert_eq!(
        variable_query_names("query_result(topk(1, up))"),
        set(&["up"])
    );
}

/// Every PromQL query in the dashboard, by where it is: the `expr` of every target (rows'
/// nested panels and annotations included) and every templating query.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String, bool)> {
    fn walk(value: &Value, path: &str, out: &mut Vec<(String, String, bool)>) {
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    let here = format!("{path}/{key}");
                    match (key.as_str(), v) {
                        ("expr", Value::String(expr)) => out.push((here, expr.clone(), false)),
                        ("templating", _) => {}
                        _ => walk(v, &here, out),
                    }
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    walk(v, &format!("{path}/{i}"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, "", &mut out);
    let variables = dashboard["templating"]["list"].as_array();
    for (i, var) in variables.into_iter().flatten().enumerate() {
        if var["type"] != "query" {
            continue;
        }
        let path = format!("/templating/list/{i}");
        if let Some(d) = var["definition"].as_str() {
            out.push((format!("{path}/definition"), d.to_owned(), true));
        }
        let query = var["query"].as_str().or(var["query"]["query"].as_str());
        if let Some(q) = query {
            out.push((format!("{path}/query"), q.to_owned(), true));
        }
    }
    out
}

/// The name of every sample on `/metrics`, with the `# TYPE` of its family where one is given
/// (`histogram` families export only `_bucket`, `_sum` and `_count` samples).
fn exported(text: &str) -> (BTreeSet<String>, BTreeMap<String, String>) {
    let mut samples = BTreeSet::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                types.insert(name.to_owned(), kind.to_owned());
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            samples.insert(line[..end].to_owned());
        }
    }
    (samples, types)
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported_by_a_running_runcache() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;

    // A miss, a hit, a bypass, a comparison and a feature importance, then an event that
    // invalidates them: the labelled series the board reads have samples of their own.
    assert_eq!(header(&app.metrics("7").await, "x-cache"), "MISS");
    assert_eq!(header(&app.metrics("7").await, "x-cache"), "HIT");
    let bypass = app
        .get("/api/v1/models/train/7/metrics?use_cache=false")
        .await;
    assert_eq!(header(&bypass, "x-cache"), "BYPASS");
    assert_eq!(app.compare(json!(["7", "8"])).await.status(), 200);
    let importance = app
        .get("/api/v1/models/train/7/feature-importance?top_n=3")
        .await;
    assert_eq!(importance.status(), 200);
    let event = app.event("training-completed", json!("7")).await;
    assert_eq!(event.status(), 200);
    let invalidated: Value = event.json().await.expect("event json");
    assert!(
        invalidated["invalidated"].as_u64() >= Some(1),
        "{invalidated}"
    );

    let resp = app.get("/metrics").await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.expect("metrics text");
    let (samples, types) = exported(&text);
    let hits = format!(
        "{}{{view=\"metrics\",result=\"hit\"}}",
        names::VIEW_REQUESTS_TOTAL
    );
    assert!(text.contains(&hits), "{hits} missing:\n{text}");

    let raw = std::fs::read_to_string(DASHBOARD).expect("deploy/grafana/runcache.json");
    let dashboard: Value = serde_json::from_str(&raw).expect("the dashboard is JSON");
    let queries = dashboard_queries(&dashboard);
    let mut used = BTreeSet::new();
    let mut missing = Vec::new();
    for (place, query, is_variable) in &queries {
        assert!(!query.trim().is_empty(), "{place} is an empty query");
        let found = if *is_variable {
            variable_query_names(query)
        } else {
            metric_names(query)
        };
        assert!(!found.is_empty(), "{place} names no metric: {query}");
        for name in found {
            // A sample of exactly this name: a histogram's family name has none (its samples
            // are `_bucket`, `_sum` and `_count`), and Prometheus stores no series under it.
            if !samples.contains(&name) {
                let why = match types.get(&name).map(String::as_str) {
                    Some("histogram") => {
                        format!("a histogram: query {name}_bucket, _sum or _count")
                    }
                    Some(kind) => format!("a {kind} without samples"),
                    None => "not exported".to_owned(),
                };
                missing.push(format!("{place}: {name} ({why})"));
            }
            used.insert(name);
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics that /metrics does not export:\n{}\n\n{text}",
        missing.join("\n")
    );

    // And every label value they select on: a typo in `result="hit"` or `cause=~"…"` would
    // leave a panel empty as surely as a renamed metric.
    let labels = exported_labels(&text);
    let mut wrong = Vec::new();
    let mut checked = 0;
    for (place, query, _) in &queries {
        for (metric, label, op, value) in matchers(query) {
            // Variables, and labels Prometheus adds at scrape time, are not the exporter's.
            if value.contains('$') || matches!(label.as_str(), "instance" | "job") {
                continue;
            }
            let alternatives: Vec<&str> = match op.as_str() {
                "=" => vec![value.as_str()],
                "=~" if value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_|".contains(c)) =>
                {
                    value.split('|').collect()
                }
                _ => continue,
            };
            for v in alternatives {
                checked += 1;
                if !labels.contains(&(metric.clone(), label.clone(), v.to_owned())) {
                    wrong.push(format!(
                        "{place}: {metric}{{{label}{op}\"{value}\"}}: no series has {label}=\"{v}\""
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "the dashboard selects label values that /metrics never exports:\n{}",
        wrong.join("\n")
    );
    assert!(checked >= 5, "only {checked} label values checked");

    // Not vacuous: the board reads many families, and the panels the issue asks for are there.
    assert!(
        used.len() >= 8,
        "only {} metric names: {used:?}",
        used.len()
    );
    for needed in [
        names::VIEW_REQUESTS_TOTAL.to_owned(),
        format!("{}_bucket", names::VIEW_REQUEST_DURATION),
        format!("{}_bucket", names::ORIGIN_REQUEST_DURATION),
        names::ORIGIN_REQUESTS_TOTAL.to_owned(),
        names::CIRCUIT_OPEN.to_owned(),
        names::REDIS_UP.to_owned(),
        names::MEMORY_BYTES.to_owned(),
        names::NEAR_CACHE_BYTES.to_owned(),
        names::PENDING_INVALIDATIONS.to_owned(),
        names::INVALIDATIONS_TOTAL.to_owned(),
        names::COALESCED_TOTAL.to_owned(),
    ] {
        assert!(used.contains(&needed), "no panel reads {needed}");
    }
    assert!(
        queries
            .iter()
            .any(|(_, q, _)| q.contains("histogram_quantile(0.99")),
        "no p99 from the histograms"
    );

    // Every query goes to the provisioned data source, by uid (no `${DS_…}` import inputs).
    assert!(
        !raw.contains("${DS_"),
        "an import placeholder is left in the dashboard"
    );
    let var = &dashboard["templating"]["list"][0];
    assert_eq!(var["name"], "instance", "{var}");
    assert_eq!(var["datasource"]["uid"], "prometheus", "{var}");
    let mut sources = BTreeSet::new();
    collect_datasources(&dashboard, &mut sources);
    sources.remove("-- Grafana --");
    assert_eq!(sources, BTreeSet::from(["prometheus".to_owned()]));
}

/// Every `datasource.uid` in `value`.
fn collect_datasources(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            if let Some(uid) = map
                .get("datasource")
                .and_then(|d| d.get("uid"))
                .and_then(Value::as_str)
            {
                out.insert(uid.to_owned());
            }
            map.values().for_each(|v| collect_datasources(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_datasources(v, out)),
        _ => {}
    }
}
