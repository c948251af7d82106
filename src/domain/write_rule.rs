//! Write-through invalidation rules (SPEC section 9): `[invalidate.<name>]` names a write (a
//! method and a path template) and the tags it changes, with the templates of the view table
//! over the write's path, query, JSON body and JSON answer, and over lookup tables
//! (`lookup.<table>[<field>]`). When a template names nothing for a write (a field absent, a
//! lookup that learned nothing, an answer that never came), the rule's `otherwise` tags and
//! views are invalidated too: a lookup or a field that is missing never skips an
//! invalidation.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::template::{self, Inputs, Root, Template, Use};
use super::view::{self, Field, FieldSpec, PathSegment, TableError, View, ViewTable};

/// `[invalidate.<name>]` as configured.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteRuleSpec {
    /// `false` turns a shipped rule off.
    pub enabled: Option<bool>,
    /// `POST`, `PUT`, `PATCH` or `DELETE`.
    pub method: Option<String>,
    /// The path template: literal segments, `{name}` parameters, and a last segment `*` that
    /// stands for one or more further segments (an artifact's path).
    pub path: Option<String>,
    /// Validators of path parameters (a parameter without one takes any segment).
    #[serde(default)]
    pub params: BTreeMap<String, FieldSpec>,
    /// Tag templates: what the write changes.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Views every such write drops whole (what it changes but no tag names: the runs of a
    /// deleted experiment).
    #[serde(default)]
    pub views: Vec<String>,
    /// What is invalidated when a template names nothing for a write.
    #[serde(default)]
    pub otherwise: OtherwiseSpec,
    /// Shown in the OpenAPI document.
    pub description: Option<String>,
}

/// `otherwise` of a rule: tags, and views dropped whole.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtherwiseSpec {
    /// Tags (literal: `exp-list:all`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Views whose every entry goes (their namespaces).
    #[serde(default)]
    pub views: Vec<String>,
}

/// One segment of a rule's path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RuleSegment {
    Literal(String),
    Param(String),
    /// `*`, last: one or more further segments.
    Rest,
}

/// A checked rule.
#[derive(Debug, Clone)]
pub struct WriteRule {
    /// Its name (`invalidate.<name>`).
    pub name: String,
    /// The write's method.
    pub method: http::Method,
    /// The path template as configured.
    pub path: String,
    segments: Vec<RuleSegment>,
    /// Validators of path parameters, where configured.
    pub params: Vec<Field>,
    /// The names of the path's parameters, in order.
    pub param_names: Vec<String>,
    /// The tag templates.
    pub tags: Vec<Template>,
    /// Views every such write drops whole.
    pub views: Vec<View>,
    /// Tags invalidated when a template names nothing.
    pub otherwise_tags: Vec<String>,
    /// Views dropped whole when a template names nothing.
    pub otherwise_views: Vec<View>,
    /// Whether a template reads the request body.
    pub reads_body: bool,
    /// Whether a template reads the answer.
    pub reads_response: bool,
    /// The description, for the OpenAPI document.
    pub description: Option<String>,
}

/// What a write invalidates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Invalidates {
    /// The tags, sorted and without repeats.
    pub tags: Vec<String>,
    /// Views dropped whole.
    pub views: Vec<View>,
}

impl WriteRule {
    /// The path parameters of `path` if it is this rule's, checked by their validators
    /// (`Err`: a message for a `400`). `None`: not this rule's path.
    pub fn captures(&self, path: &str) -> Option<Result<Map<String, Value>, String>> {
        let rest = path.strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        let mut raw = Vec::new();
        for (i, segment) in self.segments.iter().enumerate() {
            match segment {
                RuleSegment::Rest => {
                    if parts.len() <= i || parts[i..].iter().any(|p| p.is_empty()) {
                        return None;
                    }
                    return Some(self.checked(raw));
                }
                RuleSegment::Literal(l) if parts.get(i) == Some(&l.as_str()) => {}
                RuleSegment::Literal(_) => return None,
                RuleSegment::Param(name) => match parts.get(i) {
                    Some(p) if !p.is_empty() => raw.push((name.as_str(), *p)),
                    _ => return None,
                },
            }
        }
        (parts.len() == self.segments.len()).then(|| self.checked(raw))
    }

    fn checked(&self, raw: Vec<(&str, &str)>) -> Result<Map<String, Value>, String> {
        let mut out = Map::new();
        for (name, text) in raw {
            let decoded = percent_encoding::percent_decode_str(text)
                .decode_utf8()
                .map_err(|_| format!("{name} is not valid UTF-8"))?;
            if decoded == "." || decoded == ".." {
                return Err(format!("{name} may not be {decoded:?}"));
            }
            let value = match self.params.iter().find(|f| f.name == name) {
                Some(field) => field.check_text(&decoded)?,
                None => Value::String(decoded.into_owned()),
            };
            out.insert(name.to_owned(), value);
        }
        Ok(out)
    }

    /// The lookups its templates make over `inputs`: table and the key looked up (as
    /// [`template::render`] writes it).
    pub fn lookups(&self, inputs: &Inputs<'_>) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for t in &self.tags {
            for (e, _) in t.fields() {
                if let Root::Lookup { table, key } = &e.root {
                    for v in key.values(inputs) {
                        out.push((table.clone(), template::render(v)));
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// What the write invalidates, over `inputs`: every tag its templates name, and the
    /// `otherwise` tags and views as well if one of them names nothing (or names a value
    /// that is no tag).
    pub fn invalidates(&self, inputs: &Inputs<'_>) -> Invalidates {
        let mut tags = Vec::new();
        let mut complete = true;
        for t in &self.tags {
            match t.render_all(inputs) {
                Ok(named) if !named.is_empty() => {
                    for tag in named {
                        if super::validate_tag(&tag).is_ok() {
                            tags.push(tag);
                        } else {
                            complete = false;
                        }
                    }
                }
                _ => complete = false,
            }
        }
        let mut views = self.views.clone();
        if !complete {
            tags.extend(self.otherwise_tags.iter().cloned());
            views.extend(self.otherwise_views.iter().copied());
        }
        tags.sort_unstable();
        tags.dedup();
        views.sort_by_key(|v| v.index());
        views.dedup();
        Invalidates { tags, views }
    }

    /// What the write invalidates when its outcome is unknown (a time-out, a connection
    /// lost, a `5xx`): as if it had succeeded, with no answer to read.
    pub fn invalidates_without_answer(&self, inputs: &Inputs<'_>) -> Invalidates {
        let blind = Inputs {
            response: None,
            ..*inputs
        };
        self.invalidates(&blind)
    }
}

/// Every rule, in name order.
#[derive(Debug, Clone, Default)]
pub struct WriteRules {
    rules: Vec<WriteRule>,
}

impl WriteRules {
    /// Checks `specs` against the view table and the names of the lookup tables. The error
    /// names the setting (`invalidate.<name>.<field>`).
    pub fn compile(
        specs: &BTreeMap<String, WriteRuleSpec>,
        views: &ViewTable,
        lookup_tables: &[&str],
    ) -> Result<WriteRules, TableError> {
        let mut rules: Vec<WriteRule> = Vec::new();
        for (name, spec) in specs {
            if spec.enabled == Some(false) {
                continue;
            }
            let err = |field: &str, reason: String| TableError {
                setting: if field.is_empty() {
                    format!("invalidate.{name}")
                } else {
                    format!("invalidate.{name}.{field}")
                },
                reason,
            };
            if !view::is_view_name(name) {
                return Err(err("", "a rule name is [a-z][a-z0-9_]{0,39}".into()));
            }
            let rule = compile_rule(name, spec, views, lookup_tables)
                .map_err(|(field, reason)| err(field, reason))?;
            if let Some(other) = rules
                .iter()
                .find(|o| o.method == rule.method && o.segments == rule.segments)
            {
                return Err(err(
                    "path",
                    format!(
                        "{} {} is also the route of invalidate.{}",
                        rule.method, rule.path, other.name
                    ),
                ));
            }
            rules.push(rule);
        }
        Ok(WriteRules { rules })
    }

    /// Every rule.
    pub fn rules(&self) -> &[WriteRule] {
        &self.rules
    }

    /// The rule of a write, by method and path.
    /// The rule of a write, by method and path: of several, the most specific (the most
    /// segments before a `*`, and a path without one over a path with one).
    pub fn route(&self, method: &http::Method, path: &str) -> Option<&WriteRule> {
        self.matching(method, path).into_iter().next()
    }

    /// Every rule of a write, the most specific first (see [`Self::route`]). A write
    /// invalidates what each of them names: an extra invalidation is always safe.
    pub fn matching(&self, method: &http::Method, path: &str) -> Vec<&WriteRule> {
        let mut found: Vec<&WriteRule> = self
            .rules
            .iter()
            .filter(|r| r.method == method && r.captures(path).is_some())
            .collect();
        found.sort_by_key(|r| {
            let rest = r.segments.last() == Some(&RuleSegment::Rest);
            std::cmp::Reverse((!rest, r.segments.len()))
        });
        found
    }
}

fn compile_rule(
    name: &str,
    spec: &WriteRuleSpec,
    views: &ViewTable,
    lookup_tables: &[&str],
) -> Result<WriteRule, (&'static str, String)> {
    let method_text = spec
        .method
        .as_deref()
        .ok_or(("method", "is missing".to_owned()))?;
    let method = match method_text.to_ascii_uppercase().as_str() {
        "POST" => http::Method::POST,
        "PUT" => http::Method::PUT,
        "PATCH" => http::Method::PATCH,
        "DELETE" => http::Method::DELETE,
        _ => {
            return Err((
                "method",
                format!("{method_text:?}: a write is POST, PUT, PATCH or DELETE"),
            ));
        }
    };
    let path = spec.path.clone().ok_or(("path", "is missing".to_owned()))?;
    let (head, rest) = match path.strip_suffix("/*") {
        Some(head) => (head, true),
        None => (path.as_str(), false),
    };
    let mut segments: Vec<RuleSegment> = view::parse_path(head)
        .map_err(|e| ("path", e))?
        .into_iter()
        .map(|s| match s {
            PathSegment::Literal(l) => RuleSegment::Literal(l),
            PathSegment::Param(p) => RuleSegment::Param(p),
        })
        .collect();
    if rest {
        segments.push(RuleSegment::Rest);
    }
    let param_names: Vec<String> = segments
        .iter()
        .filter_map(|s| match s {
            RuleSegment::Param(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    let mut params = Vec::new();
    for (pname, fspec) in &spec.params {
        if !param_names.contains(pname) {
            return Err(("params", format!("{pname} is no parameter of {path}")));
        }
        params.push(Field::compile(pname, fspec, true).map_err(|e| ("params", e))?);
    }
    if spec.tags.is_empty() && spec.views.is_empty() {
        return Err((
            "tags",
            "names no tag and no view: a rule says what a write changes".into(),
        ));
    }
    let mut always = Vec::new();
    for v in &spec.views {
        let def = views
            .by_name(v)
            .ok_or_else(|| ("views", format!("{v:?} is no configured view")))?;
        always.push(def.view);
    }
    let mut tags = Vec::new();
    let mut may_name_nothing = false;
    let (mut reads_body, mut reads_response) = (false, false);
    for text in &spec.tags {
        let t = Template::parse(text, Use::Tag).map_err(|e| ("tags", e))?;
        view::check_tag(&t).map_err(|e| ("tags", e))?;
        for (e, _) in t.fields() {
            let root = match &e.root {
                Root::Lookup { table, key } => {
                    if !lookup_tables.contains(&table.as_str()) {
                        return Err(("tags", format!("{{{e}}}: no lookups.{table} is configured")));
                    }
                    &key.root
                }
                other => other,
            };
            match root {
                Root::Param(p) if !param_names.contains(p) => {
                    return Err(("tags", format!("{{{e}}} names no path parameter of {path}")));
                }
                Root::Param(_) => {}
                Root::Body => reads_body = true,
                Root::Response => reads_response = true,
                Root::Query(_) | Root::Lookup { .. } => {}
            }
            may_name_nothing |= !matches!(e.root, Root::Param(_));
        }
        tags.push(t);
    }
    let mut otherwise_tags = Vec::new();
    for tag in &spec.otherwise.tags {
        super::validate_tag(tag).map_err(|e| ("otherwise.tags", e))?;
        otherwise_tags.push(tag.clone());
    }
    let mut otherwise_views = Vec::new();
    for v in &spec.otherwise.views {
        let def = views
            .by_name(v)
            .ok_or_else(|| ("otherwise.views", format!("{v:?} is no configured view")))?;
        otherwise_views.push(def.view);
    }
    if may_name_nothing && otherwise_tags.is_empty() && otherwise_views.is_empty() {
        return Err((
            "otherwise",
            format!(
                "is required: a template of {name} reads the query, body, answer or a lookup, \
                 which may name nothing, and a write must never skip its invalidation"
            ),
        ));
    }
    // A rule whose templates read only its path needs no `otherwise`, yet one of them can
    // still name nothing: its parameters unreadable (another rule on the same path decided the
    // write's validation), or a value that is no tag. A write never skips its invalidation:
    // every view is dropped then, coarser but never less.
    if otherwise_tags.is_empty() && otherwise_views.is_empty() {
        otherwise_views = views.views().iter().map(|def| def.view).collect();
    }
    Ok(WriteRule {
        name: name.to_owned(),
        method,
        path,
        segments,
        params,
        param_names,
        tags,
        views: always,
        otherwise_tags,
        otherwise_views,
        reads_body,
        reads_response,
        description: spec.description.clone(),
    })
}

/// A write's query as its templates read it (`query.<name>`): every parameter as a string.
pub fn query_map(raw: Option<&str>) -> Map<String, Value> {
    let mut out = Map::new();
    for (name, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        // The first of a repeated parameter, as most servers read it.
        out.entry(name.into_owned())
            .or_insert_with(|| Value::String(value.into_owned()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn from_toml<T: serde::de::DeserializeOwned>(text: &str) -> T {
        config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(config::Config::try_deserialize)
            .expect("toml")
    }

    fn table() -> ViewTable {
        let specs: BTreeMap<String, view::ViewSpec> = from_toml(
            r#"
            [search]
            method = "POST"
            path = "/api/runs/search"
            key = "search:{sha256(body)}"
            tags = ["exp-runs:{body.experiment_ids[*]}"]
            ttl = 60
            "#,
        );
        ViewTable::compile(&specs).expect("table")
    }

    fn rules(text: &str) -> Result<WriteRules, TableError> {
        let specs: BTreeMap<String, WriteRuleSpec> = from_toml(text);
        WriteRules::compile(&specs, &table(), &["run_exp"])
    }

    fn inputs<'a>(
        params: &'a Map<String, Value>,
        query: &'a Map<String, Value>,
        body: Option<&'a Value>,
        response: Option<&'a Value>,
        lookups: Option<&'a Map<String, Value>>,
    ) -> Inputs<'a> {
        Inputs {
            params,
            query,
            body,
            response,
            lookups,
        }
    }

    #[test]
    fn a_write_names_its_tags_from_path_body_answer_and_lookups() {
        let r = rules(
            r#"
            [log_batch]
            method = "POST"
            path = "/api/runs/log-batch"
            tags = ["run:{body.run_id}", "hist:{body.metrics[*].key}", "exp-runs:{lookup.run_exp[body.run_id]}"]
            otherwise.views = ["search"]
            "#,
        )
        .expect("compiles");
        let rule = r
            .route(&http::Method::POST, "/api/runs/log-batch")
            .expect("route");
        assert!(rule.reads_body && !rule.reads_response);
        let empty = Map::new();
        let body = json!({"run_id": "r1", "metrics": [{"key": "loss"}, {"key": "acc"}]});
        let i = inputs(&empty, &empty, Some(&body), None, None);
        assert_eq!(rule.lookups(&i), vec![("run_exp".into(), "r1".into())]);
        // The lookup learned nothing: the searches go whole.
        let missed = rule.invalidates(&i);
        assert_eq!(missed.tags, ["hist:acc", "hist:loss", "run:r1"]);
        assert_eq!(missed.views.len(), 1);
        let learned = json!({"run_exp": {"r1": "7"}});
        let learned = learned.as_object().expect("map");
        let i = inputs(&empty, &empty, Some(&body), None, Some(learned));
        let found = rule.invalidates(&i);
        assert_eq!(
            found.tags,
            ["exp-runs:7", "hist:acc", "hist:loss", "run:r1"]
        );
        assert!(found.views.is_empty());
        // A body without the run: every template that names nothing calls for `otherwise`.
        let other = json!({"metrics": []});
        let i = inputs(&empty, &empty, Some(&other), None, Some(learned));
        assert_eq!(rule.invalidates(&i).views.len(), 1);
    }

    #[test]
    fn an_answer_that_never_came_invalidates_as_otherwise_says() {
        let r = rules(
            r#"
            [update]
            method = "POST"
            path = "/api/runs/update"
            tags = ["run:{body.run_id}", "exp-runs:{response.run_info.experiment_id}"]
            otherwise.tags = ["exp-list:all"]
            otherwise.views = ["search"]
            "#,
        )
        .expect("compiles");
        let rule = &r.rules()[0];
        let empty = Map::new();
        let body = json!({"run_id": "r1"});
        let answer = json!({"run_info": {"experiment_id": "3"}});
        let i = inputs(&empty, &empty, Some(&body), Some(&answer), None);
        assert_eq!(rule.invalidates(&i).tags, ["exp-runs:3", "run:r1"]);
        let blind = rule.invalidates_without_answer(&i);
        assert_eq!(blind.tags, ["exp-list:all", "run:r1"]);
        assert_eq!(blind.views.len(), 1);
    }

    #[test]
    fn paths_take_parameters_and_a_rest() {
        let r = rules(
            r#"
            [artifact_put]
            method = "PUT"
            path = "/artifacts/{exp}/{run}/artifacts/*"
            tags = ["run:{run}"]

            [delete_run]
            method = "DELETE"
            path = "/api/v1/models/train/{model_run_id}"
            params.model_run_id = { type = "id" }
            tags = ["run:{model_run_id}"]
            "#,
        )
        .expect("compiles");
        let put = r
            .route(&http::Method::PUT, "/artifacts/1/r9/artifacts/a/b.txt")
            .expect("route");
        let params = put
            .captures("/artifacts/1/r9/artifacts/a/b.txt")
            .expect("matches")
            .expect("valid");
        let empty = Map::new();
        let i = inputs(&params, &empty, None, None, None);
        assert_eq!(put.invalidates(&i).tags, ["run:r9"]);
        assert!(put.invalidates(&i).views.is_empty());
        // Its parameters unreadable (another rule on the path decided the write's
        // validation): with no `otherwise`, every view is dropped.
        let what = put.invalidates(&inputs(&empty, &empty, None, None, None));
        assert!(what.tags.is_empty());
        let all: Vec<View> = table().views().iter().map(|d| d.view).collect();
        assert_eq!(what.views, all);
        assert!(
            r.route(&http::Method::PUT, "/artifacts/1/r9/artifacts")
                .is_none()
        );
        assert!(
            r.route(&http::Method::PUT, "/artifacts/1/r9/artifacts/")
                .is_none()
        );
        let delete = r
            .route(&http::Method::DELETE, "/api/v1/models/train/.x")
            .expect("route");
        assert!(
            delete
                .captures("/api/v1/models/train/.x")
                .expect("m")
                .is_err()
        );
        assert!(
            delete
                .captures("/api/v1/models/train/42")
                .expect("m")
                .is_ok()
        );
    }

    #[test]
    fn configuration_errors_name_the_rule_and_the_field() {
        for (text, setting) in [
            (
                "[a]\nmethod = \"GET\"\npath = \"/x\"\ntags = [\"run:1\"]",
                "invalidate.a.method",
            ),
            (
                "[a]\nmethod = \"POST\"\ntags = [\"run:1\"]",
                "invalidate.a.path",
            ),
            ("[a]\nmethod = \"POST\"\npath = \"/x\"", "invalidate.a.tags"),
            (
                "[a]\nmethod = \"POST\"\npath = \"/x\"\ntags = [\"run:{id}\"]",
                "invalidate.a.tags",
            ),
            (
                "[a]\nmethod = \"POST\"\npath = \"/x\"\ntags = [\"run:{body.id}\"]",
                "invalidate.a.otherwise",
            ),
            (
                "[a]\nmethod = \"POST\"\npath = \"/x\"\ntags = [\"run:{lookup.nope[body.id]}\"]\notherwise.tags = [\"run:all\"]",
                "invalidate.a.tags",
            ),
            (
                "[a]\nmethod = \"POST\"\npath = \"/x\"\ntags = [\"run:{body.id}\"]\notherwise.views = [\"nope\"]",
                "invalidate.a.otherwise.views",
            ),
            (
                "[a]\nmethod = \"POST\"\npath = \"/x\"\ntags = [\"run:1\"]\n[b]\nmethod = \"POST\"\npath = \"/x\"\ntags = [\"run:2\"]",
                "invalidate.b.path",
            ),
        ] {
            let e = rules(text).expect_err(text);
            assert_eq!(e.setting, setting, "{text}: {}", e.reason);
        }
    }
}
