//! Lookup tables (SPEC section 9, `[lookups.<name>]`): what a write's tags need but the write
//! does not carry (the experiment of a run that a metric is logged to), learned from the
//! origin's 2xx answers to views and writes that show both, and read in a rule's templates as
//! `lookup.<table>[<field>]`.
//!
//! A table maps an id to something that never changes for it (a run's experiment). A table
//! whose values could change would name the old value's tags after the change, and an
//! invalidation would miss: such a relation is not a lookup's to hold.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::Value;

use super::template::{self, Expr, Inputs, Root};
use super::view::{TableError, View, ViewTable};

/// Default bound of a table's entries.
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;

/// Longest key or value a table holds (in the form a tag writes it).
pub const MAX_PART_LEN: usize = 200;

/// `[lookups.<name>]` as configured.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupSpec {
    /// Most entries held (in Redis and in each instance's memory); past it the table starts
    /// again empty (default 100,000).
    pub max_entries: Option<usize>,
    /// Where it learns from.
    #[serde(default)]
    pub learn: Vec<LearnSpec>,
    /// What it maps.
    pub description: Option<String>,
}

/// One source of a lookup table: a view's or a rule's 2xx answers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnSpec {
    /// A view whose answers it learns from.
    pub view: Option<String>,
    /// Or an `[invalidate.*]` rule whose writes' answers it learns from.
    pub rule: Option<String>,
    /// The objects that hold both (`response.runs[*].info`).
    pub from: Option<String>,
    /// The member of each that is the key (`run_id`).
    pub key: Option<String>,
    /// The member of each that is the value (`experiment_id`).
    pub value: Option<String>,
}

/// Where a learner learns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A view's answers.
    View(View),
    /// A rule's answers.
    Rule(String),
}

#[derive(Debug, Clone)]
struct Learner {
    source: Source,
    from: Expr,
    key: Vec<String>,
    value: Vec<String>,
}

/// A checked table.
#[derive(Debug, Clone)]
pub struct LookupTable {
    /// Its name.
    pub name: String,
    /// Its bound.
    pub max_entries: usize,
    learners: Vec<Learner>,
}

/// What an answer taught a table: its name, a key and a value (the key as [`template::render`]
/// writes it; the value as the JSON it was).
pub type Learned = (String, String, Value);

/// Every lookup table.
#[derive(Debug, Clone, Default)]
pub struct Lookups {
    tables: Vec<LookupTable>,
}

impl Lookups {
    /// Checks `specs` against the views and the names of the enabled rules. The error names
    /// the setting (`lookups.<name>.<field>`).
    pub fn compile(
        specs: &BTreeMap<String, LookupSpec>,
        views: &ViewTable,
        rules: &BTreeSet<String>,
    ) -> Result<Lookups, TableError> {
        let mut tables = Vec::new();
        for (name, spec) in specs {
            let err = |field: &str, reason: String| TableError {
                setting: if field.is_empty() {
                    format!("lookups.{name}")
                } else {
                    format!("lookups.{name}.{field}")
                },
                reason,
            };
            if !template::is_name(name) || name.len() > super::view::MAX_VIEW_NAME {
                return Err(err(
                    "",
                    "a table name is [A-Za-z_][A-Za-z0-9_]{0,39}".into(),
                ));
            }
            let max_entries = spec.max_entries.unwrap_or(DEFAULT_MAX_ENTRIES);
            if !(1..=10_000_000).contains(&max_entries) {
                return Err(err("max_entries", "must be 1 to 10,000,000".into()));
            }
            if spec.learn.is_empty() {
                return Err(err(
                    "learn",
                    "names no source: the table would stay empty".into(),
                ));
            }
            let mut learners = Vec::new();
            for (i, l) in spec.learn.iter().enumerate() {
                let field = format!("learn[{i}]");
                let source = match (&l.view, &l.rule) {
                    (Some(v), None) => Source::View(
                        views
                            .by_name(v)
                            .ok_or_else(|| err(&field, format!("{v:?} is no configured view")))?
                            .view,
                    ),
                    (None, Some(r)) if rules.contains(r) => Source::Rule(r.clone()),
                    (None, Some(r)) => {
                        return Err(err(&field, format!("{r:?} is no enabled invalidate rule")));
                    }
                    _ => return Err(err(&field, "names one view or one rule".into())),
                };
                let from_text = l.from.as_deref().unwrap_or("response");
                let from = template::parse_expr(from_text)
                    .map_err(|e| err(&format!("{field}.from"), e))?;
                // Only what the origin said: a request's body or query is the client's to
                // choose, and a client must not teach a table what a write's tags are.
                if from.root != Root::Response {
                    return Err(err(
                        &format!("{field}.from"),
                        "a lookup learns from the origin's answer (response…)".into(),
                    ));
                }
                let member =
                    |what: &str, text: &Option<String>| -> Result<Vec<String>, TableError> {
                        let text = text
                            .as_deref()
                            .ok_or_else(|| err(&format!("{field}.{what}"), "is missing".into()))?;
                        let parts: Vec<String> = text.split('.').map(str::to_owned).collect();
                        if parts.iter().any(|p| !template::is_name(p)) {
                            return Err(err(
                                &format!("{field}.{what}"),
                                format!("{text:?}: a member path, as run_id or info.run_id"),
                            ));
                        }
                        Ok(parts)
                    };
                learners.push(Learner {
                    source,
                    from,
                    key: member("key", &l.key)?,
                    value: member("value", &l.value)?,
                });
            }
            tables.push(LookupTable {
                name: name.clone(),
                max_entries,
                learners,
            });
        }
        Ok(Lookups { tables })
    }

    /// The tables' names.
    pub fn names(&self) -> Vec<&str> {
        self.tables.iter().map(|t| t.name.as_str()).collect()
    }

    /// Every table.
    pub fn tables(&self) -> &[LookupTable] {
        &self.tables
    }

    /// Whether some table learns from `source`.
    pub fn learns_from(&self, source: &Source) -> bool {
        self.tables
            .iter()
            .any(|t| t.learners.iter().any(|l| &l.source == source))
    }

    /// What a 2xx answer of `source` over `inputs` teaches: one entry per object `from`
    /// names that holds both members, as scalars (a string, a number), of at most
    /// [`MAX_PART_LEN`] bytes once written as a tag does.
    pub fn learned(&self, source: &Source, inputs: &Inputs<'_>) -> Vec<Learned> {
        let mut out = Vec::new();
        for t in &self.tables {
            for l in t.learners.iter().filter(|l| &l.source == source) {
                for obj in l.from.values(inputs) {
                    let (Some(k), Some(v)) = (member(obj, &l.key), member(obj, &l.value)) else {
                        continue;
                    };
                    let key = template::render(k);
                    if usable(k) && usable(v) && key.len() <= MAX_PART_LEN {
                        out.push((t.name.clone(), key, v.clone()));
                    }
                }
            }
        }
        out
    }
}

/// Whether a value may be held: a string or a number, short once written as a tag does.
pub fn usable(v: &Value) -> bool {
    matches!(v, Value::String(_) | Value::Number(_))
        && !v.as_str().is_some_and(str::is_empty)
        && template::render(v).len() <= MAX_PART_LEN
}

fn member<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(obj, |v, m| v.get(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, json};

    fn table() -> ViewTable {
        let specs: BTreeMap<String, super::super::view::ViewSpec> =
            serde_json::from_value(json!({
                "runs_get": {"method": "GET", "path": "/runs/get", "query": {"run_id": {"type": "string", "required": true}},
                             "key": "run:{query.run_id}", "ttl": 60},
                "search": {"method": "POST", "path": "/runs/search", "key": "s:{sha256(body)}", "ttl": 60},
            }))
            .expect("views");
        ViewTable::compile(&specs).expect("table")
    }

    fn lookups(spec: Value) -> Result<Lookups, TableError> {
        let specs: BTreeMap<String, LookupSpec> = serde_json::from_value(spec).expect("spec");
        let rules: BTreeSet<String> = ["create".to_owned()].into();
        Lookups::compile(&specs, &table(), &rules)
    }

    #[test]
    fn answers_teach_pairs_from_one_object_or_many() {
        let l = lookups(json!({"run_exp": {"learn": [
            {"view": "runs_get", "from": "response.run.info", "key": "run_id", "value": "experiment_id"},
            {"view": "search", "from": "response.runs[*].info", "key": "run_id", "value": "experiment_id"},
            {"rule": "create", "from": "response.run.info", "key": "run_id", "value": "experiment_id"},
        ]}}))
        .expect("compiles");
        let view = |n: &str| Source::View(table().by_name(n).expect("view").view);
        let empty = Map::new();
        let answer = json!({"runs": [
            {"info": {"run_id": "a", "experiment_id": "1"}},
            {"info": {"run_id": "b:c", "experiment_id": 2}},
            {"info": {"run_id": "d"}},
            {"info": {"run_id": {"x": 1}, "experiment_id": "3"}},
        ]});
        let inputs = Inputs {
            params: &empty,
            query: &empty,
            body: None,
            response: Some(&answer),
            lookups: None,
        };
        assert_eq!(
            l.learned(&view("search"), &inputs),
            vec![
                ("run_exp".into(), "a".into(), json!("1")),
                ("run_exp".into(), "b%3Ac".into(), json!(2)),
            ]
        );
        // The same answer shape from another source teaches nothing.
        assert!(l.learned(&view("runs_get"), &inputs).is_empty());
        assert!(l.learns_from(&Source::Rule("create".into())));
        assert!(!l.learns_from(&Source::Rule("other".into())));
    }

    #[test]
    fn configuration_errors_name_the_table_and_the_field() {
        for (spec, setting) in [
            (json!({"t": {"learn": []}}), "lookups.t.learn"),
            (
                json!({"t": {"learn": [{"view": "nope", "key": "a", "value": "b"}]}}),
                "lookups.t.learn[0]",
            ),
            (
                json!({"t": {"learn": [{"rule": "nope", "key": "a", "value": "b"}]}}),
                "lookups.t.learn[0]",
            ),
            (
                json!({"t": {"learn": [{"view": "search", "value": "b"}]}}),
                "lookups.t.learn[0].key",
            ),
            (
                json!({"t": {"learn": [{"view": "search", "key": "a b", "value": "b"}]}}),
                "lookups.t.learn[0].key",
            ),
            (
                json!({"t": {"max_entries": 0, "learn": [{"view": "search", "key": "a", "value": "b"}]}}),
                "lookups.t.max_entries",
            ),
            (
                json!({"t": {"learn": [{"view": "search", "from": "body", "key": "a", "value": "b"}]}}),
                "lookups.t.learn[0].from",
            ),
        ] {
            let e = lookups(spec.clone()).expect_err(&spec.to_string());
            assert_eq!(e.setting, setting, "{spec}: {}", e.reason);
        }
    }
}
