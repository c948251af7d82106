//! The view table (SPEC section 8): every cached route declared as data. A [`ViewSpec`] is
//! what configuration holds; [`ViewTable::compile`] checks it (one line naming the view and
//! the field on error) and gives the [`ViewDef`]s that route, validate, key and tag requests.
//! One resolver ([`ViewDef::resolve`]) turns a request into its key, tags and origin request,
//! for the router and the hit lane alike.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::policy::TtlTier;
use super::run_id::{RawRunId, parse_run_id};
use super::template::{self, Expr, Inputs, Root, Template, Use};

/// A view as configuration declares it (`[views.<name>]`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ViewSpec {
    /// `false` turns a shipped view off (default `true`).
    pub enabled: Option<bool>,
    /// `GET` (default) or `POST`.
    pub method: Option<String>,
    /// The origin's path, with `{name}` for each parameter (a whole path segment).
    pub path: Option<String>,
    /// Validators of path parameters (default: a run-id-like id).
    #[serde(default)]
    pub params: BTreeMap<String, FieldSpec>,
    /// Validators of query parameters; any other parameter is refused.
    #[serde(default)]
    pub query: BTreeMap<String, FieldSpec>,
    /// Validators of the JSON body's members; any other member is refused unless the key
    /// covers `sha256(body)`.
    #[serde(default)]
    pub body: BTreeMap<String, FieldSpec>,
    /// The logical key template.
    pub key: Option<String>,
    /// A TTL tier name or seconds.
    pub ttl: Ttl,
    /// Seconds past the TTL an entry is served while one background refresh runs
    /// (default 60).
    #[serde(default = "default_grace")]
    pub grace: u64,
    /// Seconds past the TTL an entry may be served when the origin fails (default 300).
    #[serde(default = "default_stale_if_error")]
    pub stale_if_error: u64,
    /// Tag templates over the request.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Tag templates over the answer (`response.…`), learned before it is stored.
    #[serde(default)]
    pub response_tags: Vec<String>,
    /// `refuse` (default: `400`) or `pass` (to the origin, uncached).
    pub on_invalid: Option<String>,
    /// Entries are keyed by the caller's credential and shared with nobody else.
    pub per_credential: Option<bool>,
    /// A description for the OpenAPI document.
    pub description: Option<String>,
    /// Deprecated: the `max` of the view's `id_list` body fields (`views.comparison.max_ids`,
    /// from before the view table). `body.<field>.max` says it now.
    pub max_ids: Option<i64>,
}

fn default_grace() -> u64 {
    DEFAULT_GRACE_SECS
}

fn default_stale_if_error() -> u64 {
    DEFAULT_STALE_IF_ERROR_SECS
}

/// A TTL given as a tier name (`LONG`) or as seconds (`3600` or `"3600"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttl(pub std::time::Duration);

impl<'de> Deserialize<'de> for Ttl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Name(String),
        }
        let secs = match Raw::deserialize(d)? {
            Raw::Secs(s) => s,
            Raw::Name(name) => match name.trim().parse::<u64>() {
                Ok(s) => s,
                Err(_) => TtlTier::parse(&name).map(TtlTier::secs).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "unknown TTL tier {name:?} (expected {} or a number of seconds)",
                        TtlTier::NAMES.join(", ")
                    ))
                })?,
            },
        };
        if secs == 0 {
            return Err(serde::de::Error::custom("a TTL must be at least 1 second"));
        }
        Ok(Ttl(std::time::Duration::from_secs(secs)))
    }
}

/// A field's validator as configuration declares it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    /// `string` (default), `integer`, `boolean`, `id`, `id_list` or `json`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// A regular expression a `string` must match.
    pub pattern: Option<String>,
    /// Least value (`integer`), length (`string`) or distinct ids (`id_list`).
    pub min: Option<i64>,
    /// Greatest value (`integer`), length (`string`) or distinct ids (`id_list`).
    pub max: Option<i64>,
    /// Whether the field must be given (default: path parameters and body members yes,
    /// query parameters no).
    pub required: Option<bool>,
    /// The value of an absent field (it then counts as given).
    pub default: Option<Value>,
    /// A description for the OpenAPI document.
    pub description: Option<String>,
}

/// The kinds of field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// Text, optionally matching a pattern and within a length.
    String,
    /// A whole number within bounds.
    Integer,
    /// `true` or `false`.
    Boolean,
    /// An id, read by the one id parser: a string of `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`, or
    /// a non-negative integer (`42` is the id `"42"`).
    Id,
    /// A list of ids, de-duplicated and sorted (byte order), its length bounded after that.
    IdList,
    /// Any JSON value (a body member only; covered by a hash in the key).
    Json,
}

impl FieldKind {
    fn parse(name: Option<&str>) -> Result<FieldKind, String> {
        Ok(match name.unwrap_or("string") {
            "string" => FieldKind::String,
            "integer" => FieldKind::Integer,
            "boolean" => FieldKind::Boolean,
            "id" => FieldKind::Id,
            "id_list" => FieldKind::IdList,
            "json" => FieldKind::Json,
            other => {
                return Err(format!(
                    "unknown type {other:?} (expected string, integer, boolean, id, id_list or json)"
                ));
            }
        })
    }

    /// The name configuration gives it.
    pub fn name(self) -> &'static str {
        match self {
            FieldKind::String => "string",
            FieldKind::Integer => "integer",
            FieldKind::Boolean => "boolean",
            FieldKind::Id => "id",
            FieldKind::IdList => "id_list",
            FieldKind::Json => "json",
        }
    }
}

/// A checked field.
#[derive(Debug, Clone)]
pub struct Field {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: FieldKind,
    /// The pattern a string must match, and its text.
    pub pattern: Option<(regex::Regex, String)>,
    /// Least value, length or count.
    pub min: Option<i64>,
    /// Greatest value, length or count.
    pub max: Option<i64>,
    /// Whether it must be given.
    pub required: bool,
    /// Its value when absent.
    pub default: Option<Value>,
    /// Its description.
    pub description: Option<String>,
}

impl Field {
    pub(crate) fn compile(
        name: &str,
        spec: &FieldSpec,
        required_by_default: bool,
    ) -> Result<Field, String> {
        if !template::is_name(name) {
            return Err(format!(
                "{name:?} is not a field name ([A-Za-z_][A-Za-z0-9_]*)"
            ));
        }
        let kind =
            FieldKind::parse(spec.kind.as_deref()).map_err(|e| format!("{name}.type: {e}"))?;
        let pattern = match &spec.pattern {
            Some(p) if kind == FieldKind::String => Some((
                regex::Regex::new(p).map_err(|e| format!("{name}.pattern: {e}"))?,
                p.clone(),
            )),
            Some(_) => return Err(format!("{name}.pattern: only a string has a pattern")),
            None => None,
        };
        if let (Some(min), Some(max)) = (spec.min, spec.max)
            && min > max
        {
            return Err(format!("{name}.min: {min} is above max {max}"));
        }
        if matches!(kind, FieldKind::Boolean | FieldKind::Id | FieldKind::Json)
            && (spec.min.is_some() || spec.max.is_some())
        {
            return Err(format!("{name}.min: a {} has no bounds", kind.name()));
        }
        let mut field = Field {
            name: name.to_owned(),
            kind,
            pattern,
            min: spec.min,
            max: spec.max,
            required: spec.required.unwrap_or(required_by_default),
            default: None,
            description: spec.description.clone(),
        };
        if let Some(d) = &spec.default {
            let checked = field
                .check_json(d)
                .map_err(|e| format!("{name}.default: {e}"))?;
            field.default = Some(checked);
        }
        Ok(field)
    }

    /// Checks a value given as text (a path segment or query parameter) and returns it
    /// normalised.
    pub fn check_text(&self, raw: &str) -> Result<Value, String> {
        match self.kind {
            FieldKind::Integer => {
                let n: i64 = raw.parse().map_err(|_| self.range_error())?;
                self.check_json(&Value::from(n))
            }
            FieldKind::Boolean => match raw.to_ascii_lowercase().as_str() {
                "true" | "1" => Ok(Value::Bool(true)),
                "false" | "0" => Ok(Value::Bool(false)),
                _ => Err(format!("{} must be true or false", self.name)),
            },
            FieldKind::Id => parse_run_id(RawRunId::Text(raw))
                .map(Value::String)
                .map_err(|e| self.renamed(e)),
            _ => self.check_json(&Value::String(raw.to_owned())),
        }
    }

    /// Checks a JSON value and returns it normalised.
    pub fn check_json(&self, value: &Value) -> Result<Value, String> {
        let name = &self.name;
        match self.kind {
            FieldKind::Json => Ok(value.clone()),
            FieldKind::Boolean => value
                .as_bool()
                .map(Value::Bool)
                .ok_or_else(|| format!("{name} must be true or false")),
            FieldKind::Integer => {
                let n = value.as_i64().ok_or_else(|| self.range_error())?;
                if self.min.is_some_and(|m| n < m) || self.max.is_some_and(|m| n > m) {
                    return Err(self.range_error());
                }
                Ok(Value::from(n))
            }
            FieldKind::String => {
                let s = value
                    .as_str()
                    .ok_or_else(|| format!("{name} must be a string"))?;
                let len = s.chars().count() as i64;
                if self.min.is_some_and(|m| len < m) || self.max.is_some_and(|m| len > m) {
                    return Err(format!(
                        "{name} must be {} to {} characters long",
                        self.min.unwrap_or(0),
                        self.max.map_or("any".to_owned(), |m| m.to_string())
                    ));
                }
                match &self.pattern {
                    // The run-id pattern is checked as a run id: the same set of strings, and
                    // the id parser's message, without a regular expression on every request.
                    Some((_, text)) if text == super::RUN_ID_PATTERN => {
                        super::validate_run_id(s).map_err(|e| self.renamed(e))?;
                    }
                    Some((re, text)) if !re.is_match(s) => {
                        return Err(format!("{name} must match {text}"));
                    }
                    _ => {}
                }
                Ok(Value::String(s.to_owned()))
            }
            FieldKind::Id => parse_run_id(RawRunId::Json(value))
                .map(Value::String)
                .map_err(|e| self.renamed(e)),
            FieldKind::IdList => {
                let min = self.min.unwrap_or(0).max(0) as usize;
                let max = self.max.map_or(usize::MAX, |m| m.max(0) as usize);
                let bounds = || match self.max {
                    Some(_) => format!("{name} must hold between {min} and {max} distinct ids"),
                    None => format!("{name} must hold at least {min} distinct ids"),
                };
                let items = value
                    .as_array()
                    .ok_or_else(|| format!("{name} must be a list of ids"))?;
                // Bounded before de-duplication too, so a huge list is refused unread.
                if items.len() > max.saturating_mul(4) {
                    return Err(bounds());
                }
                let ids: std::collections::BTreeSet<String> = items
                    .iter()
                    .map(|v| parse_run_id(RawRunId::Json(v)).map_err(|e| self.renamed(e)))
                    .collect::<Result<_, _>>()?;
                if !(min..=max).contains(&ids.len()) {
                    return Err(format!("{} (got {})", bounds(), ids.len()));
                }
                Ok(Value::Array(ids.into_iter().map(Value::String).collect()))
            }
        }
    }

    fn range_error(&self) -> String {
        match (self.min, self.max) {
            (Some(lo), Some(hi)) => format!("{} must be between {lo} and {hi}", self.name),
            (Some(lo), None) => format!("{} must be an integer of at least {lo}", self.name),
            (None, Some(hi)) => format!("{} must be an integer of at most {hi}", self.name),
            (None, None) => format!("{} must be an integer", self.name),
        }
    }

    /// The id parser's message, naming this field rather than `model_run_id`.
    fn renamed(&self, e: String) -> String {
        if self.name == "model_run_id" || self.name == "model_run_ids" {
            e
        } else {
            e.replacen("model_run_id", &self.name, 1)
        }
    }
}

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSegment {
    /// Matched as it is.
    Literal(String),
    /// A parameter: any non-empty segment, checked by its validator.
    Param(String),
}

/// A view's cache handle: its place in the table and its name (the namespace in stats,
/// metric labels and `/cache/invalidate`). Names are leaked once per table, which is built
/// once per process, so that a handle is `Copy` and costs nothing to pass around.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct View {
    index: usize,
    name: &'static str,
}

impl View {
    /// A handle for the view at `index` named `name`.
    pub fn new(index: usize, name: &'static str) -> View {
        View { index, name }
    }

    /// The view's name.
    pub fn name(self) -> &'static str {
        self.name
    }

    /// Index into per-view arrays.
    pub fn index(self) -> usize {
        self.index
    }
}

/// How a view treats a request that fails validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInvalid {
    /// `400`, and the origin never sees it.
    Refuse,
    /// To the origin uncached (what a transparent gateway wants).
    Pass,
}

/// A checked view.
#[derive(Debug, Clone)]
pub struct ViewDef {
    /// Its handle.
    pub view: View,
    /// `GET` or `POST`.
    pub method: http::Method,
    /// The path template as configured, and its segments.
    pub path: String,
    /// The path's segments.
    pub segments: Vec<PathSegment>,
    /// Validators of path parameters, in path order.
    pub params: Vec<Field>,
    /// Validators of query parameters, by name.
    pub query: Vec<Field>,
    /// Validators of the body's members, by name.
    pub body: Vec<Field>,
    /// Whether the view takes a JSON body.
    pub takes_body: bool,
    /// Whether members the validators do not name are accepted (the key covers
    /// `sha256(body)`).
    pub open_body: bool,
    /// The key template.
    pub key: Template,
    /// Tag templates over the request.
    pub tags: Vec<Template>,
    /// Tag templates over the answer.
    pub response_tags: Vec<Template>,
    /// TTL, seconds.
    pub ttl_secs: u64,
    /// Grace, seconds.
    pub grace_secs: u64,
    /// Stale-if-error, seconds.
    pub stale_if_error_secs: u64,
    /// What an invalid request gets.
    pub on_invalid: OnInvalid,
    /// Entries keyed by the caller's credential.
    pub per_credential: bool,
    /// For the OpenAPI document.
    pub description: Option<String>,
}

/// A request resolved by its view: what is cached, under which key and tags, and what the
/// origin is asked on a miss.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The logical key.
    pub key: String,
    /// The tags of the request (`run:42`).
    pub tags: Vec<String>,
    /// The origin's path and query, normalised.
    pub path_and_query: String,
    /// The body sent to the origin: the canonical JSON of the normalised body.
    pub body: Option<Vec<u8>>,
    /// `use_cache` (default `true`).
    pub use_cache: bool,
}

/// Default grace and stale-if-error of a view that names none, seconds.
pub const DEFAULT_GRACE_SECS: u64 = 60;
/// Default stale-if-error.
pub const DEFAULT_STALE_IF_ERROR_SECS: u64 = 300;

/// Characters a path segment may hold as it is when the origin's path is rebuilt (RFC 3986
/// unreserved); everything else is percent-encoded.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

impl ViewDef {
    /// Whether the view has answer-learned tags.
    pub fn learns_tags(&self) -> bool {
        !self.response_tags.is_empty()
    }

    /// The view's path with `values` for its parameters, in order (percent-encoded).
    pub fn path_with(&self, values: &[&str]) -> String {
        let mut out = String::new();
        let mut values = values.iter();
        for segment in &self.segments {
            out.push('/');
            match segment {
                PathSegment::Literal(l) => out.push_str(l),
                PathSegment::Param(_) => out.extend(percent_encoding::utf8_percent_encode(
                    values.next().copied().unwrap_or_default(),
                    SEGMENT,
                )),
            }
        }
        out
    }

    /// The path parameters of `path` (raw, percent-encoded) if it has this view's shape.
    pub fn captures<'a>(&self, path: &'a str) -> Option<Vec<(&'a str, &str)>> {
        let rest = path.strip_prefix('/')?;
        let mut out = Vec::new();
        let mut parts = rest.split('/');
        for segment in &self.segments {
            let part = parts.next()?;
            match segment {
                PathSegment::Literal(l) if l == part => {}
                PathSegment::Literal(_) => return None,
                PathSegment::Param(name) if !part.is_empty() => out.push((part, name.as_str())),
                PathSegment::Param(_) => return None,
            }
        }
        if parts.next().is_some() {
            return None;
        }
        Some(out)
    }

    /// Validates and normalises a request whose path has this view's shape: its key, tags
    /// and origin request, or a message for a `400`.
    pub fn resolve(
        &self,
        path: &str,
        query: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<Resolved, String> {
        let captured = self
            .captures(path)
            .ok_or_else(|| format!("{path} is not a path of view {}", self.view.name()))?;
        let mut params = Map::new();
        for ((raw, name), field) in captured.into_iter().zip(&self.params) {
            debug_assert_eq!(name, field.name);
            let decoded = percent_encoding::percent_decode_str(raw)
                .decode_utf8()
                .map_err(|_| format!("{name} is not valid UTF-8"))?;
            if decoded == "." || decoded == ".." {
                return Err(format!("{name} may not be {decoded:?}"));
            }
            params.insert(name.to_owned(), field.check_text(&decoded)?);
        }
        let (query, given, use_cache) = self.check_query(query)?;
        let body = match (self.takes_body, body) {
            (false, _) => None,
            (true, raw) => Some(self.check_body(raw.unwrap_or_default())?),
        };
        let inputs = Inputs {
            params: &params,
            query: &query,
            body: body.as_ref(),
            response: None,
            lookups: None,
        };
        let key = self
            .key
            .render_one(&inputs)
            .map_err(|missing| format!("{missing} is required"))?;
        if key.len() > super::MAX_KEY_LEN {
            return Err(format!(
                "the request's key is longer than {} bytes",
                super::MAX_KEY_LEN
            ));
        }
        let mut tags = Vec::new();
        for t in &self.tags {
            tags.extend(t.render_all(&inputs)?);
        }
        tags.sort_unstable();
        tags.dedup();
        let mut path_and_query = String::with_capacity(path.len() + 16);
        for segment in &self.segments {
            path_and_query.push('/');
            match segment {
                PathSegment::Literal(l) => path_and_query.push_str(l),
                PathSegment::Param(name) => {
                    let text = match &params[name.as_str()] {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    path_and_query.extend(percent_encoding::utf8_percent_encode(&text, SEGMENT));
                }
            }
        }
        let mut sep = '?';
        for field in &self.query {
            if let Some(v) = query
                .get(&field.name)
                .filter(|_| given.contains(&field.name))
            {
                path_and_query.push(sep);
                sep = '&';
                let text = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                path_and_query.extend(form_urlencoded::byte_serialize(field.name.as_bytes()));
                path_and_query.push('=');
                path_and_query.extend(form_urlencoded::byte_serialize(text.as_bytes()));
            }
        }
        Ok(Resolved {
            key,
            tags,
            path_and_query,
            body: body.map(|b| template::canonical_json(&b)),
            use_cache,
        })
    }

    /// The checked query (defaults filled in), the names the client gave (only those are
    /// sent to the origin: a default is the origin's too), and `use_cache`.
    fn check_query(&self, raw: Option<&str>) -> Result<CheckedQuery, String> {
        let mut out = Map::new();
        let mut given = Vec::new();
        let mut use_cache = None;
        for (name, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            if name == "use_cache" {
                if use_cache.is_some() {
                    return Err("use_cache is given twice".into());
                }
                use_cache = Some(match value.to_ascii_lowercase().as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err("use_cache must be true or false".into()),
                });
                continue;
            }
            let field = self
                .query
                .iter()
                .find(|f| f.name == name)
                .ok_or_else(|| format!("unknown query parameter {:?}", truncate(&name, 40)))?;
            if out.contains_key(&field.name) {
                return Err(format!("{} is given twice", field.name));
            }
            out.insert(field.name.clone(), field.check_text(&value)?);
            given.push(field.name.clone());
        }
        for field in &self.query {
            if out.contains_key(&field.name) {
                continue;
            }
            match &field.default {
                Some(d) => {
                    out.insert(field.name.clone(), d.clone());
                }
                None if field.required => return Err(format!("{} is required", field.name)),
                None => {}
            }
        }
        Ok((out, given, use_cache.unwrap_or(true)))
    }

    fn check_body(&self, raw: &[u8]) -> Result<Value, String> {
        let value: Value =
            serde_json::from_slice(raw).map_err(|e| format!("invalid JSON body: {e}"))?;
        let Value::Object(members) = value else {
            return Err("the body must be a JSON object".into());
        };
        let mut out = Map::new();
        for (name, v) in &members {
            match self.body.iter().find(|f| &f.name == name) {
                Some(field) => {
                    out.insert(name.clone(), field.check_json(v)?);
                }
                None if self.open_body => {
                    out.insert(name.clone(), v.clone());
                }
                None => {
                    return Err(format!(
                        "unknown field {:?} in the body",
                        truncate(name, 40)
                    ));
                }
            }
        }
        for field in &self.body {
            if out.contains_key(&field.name) {
                continue;
            }
            match &field.default {
                Some(d) => {
                    out.insert(field.name.clone(), d.clone());
                }
                None if field.required => {
                    return Err(format!("missing field {:?} in the body", field.name));
                }
                None => {}
            }
        }
        Ok(Value::Object(out))
    }

    /// The answer-learned tags of `answer` (a JSON body; anything else names none). More
    /// than [`template::MAX_TAGS`] is an error: such an answer is not stored.
    pub fn response_tags_of(&self, answer: &[u8]) -> Result<Vec<String>, String> {
        if self.response_tags.is_empty() {
            return Ok(Vec::new());
        }
        let Ok(value) = serde_json::from_slice::<Value>(answer) else {
            return Ok(Vec::new());
        };
        let empty = Map::new();
        let inputs = Inputs {
            params: &empty,
            query: &empty,
            body: None,
            response: Some(&value),
            lookups: None,
        };
        let mut tags = Vec::new();
        for t in &self.response_tags {
            tags.extend(t.render_all(&inputs)?);
            if tags.len() > template::MAX_TAGS {
                return Err(format!(
                    "the answer names more than {} tags",
                    template::MAX_TAGS
                ));
            }
        }
        tags.sort_unstable();
        tags.dedup();
        Ok(tags)
    }

    /// The tag kinds (`run` of `run:{…}`) this view's entries carry, request and answer.
    pub fn tag_kinds(&self) -> Vec<&str> {
        let mut kinds: Vec<&str> = self
            .tags
            .iter()
            .chain(&self.response_tags)
            .filter_map(|t| tag_kind(t.literal_prefix()))
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        kinds
    }

    /// When every key of this view that a tag `kind:ID` names starts `literal ID` and its
    /// entries are tagged `kind:{param}` by the parameter that follows the literal: the
    /// literal, the tag kind and whether the base key (`literal ID`, with every optional
    /// segment left out) is a whole key. What routes a run's keys to one cluster slot and
    /// lets an invalidation delete the base keys directly.
    pub fn keyed_by_tag(&self) -> Option<(&str, &str, bool)> {
        let pieces = self.key.pieces();
        let (literal, param) = match pieces {
            [
                template::Piece::Literal(l),
                template::Piece::Field {
                    expr,
                    hashed: false,
                },
                ..,
            ] => (l.as_str(), expr),
            _ => return None,
        };
        let Root::Param(name) = &param.root else {
            return None;
        };
        // The id must end at the next ':' for the literal-and-id prefix to be read back.
        let field = self.params.iter().find(|f| &f.name == name)?;
        if !id_like(field) {
            return None;
        }
        let rest = &pieces[2..];
        let base_is_whole = rest
            .iter()
            .all(|p| matches!(p, template::Piece::Optional(_)));
        if !rest.iter().all(|p| match p {
            template::Piece::Literal(l) => l.starts_with(':'),
            template::Piece::Optional(inner) => {
                matches!(inner.first(), Some(template::Piece::Literal(l)) if l.starts_with(':'))
            }
            template::Piece::Field { .. } => false,
        }) {
            return None;
        }
        let kind = self.tags.iter().find_map(|t| match t.pieces() {
            [
                template::Piece::Literal(l),
                template::Piece::Field {
                    expr,
                    hashed: false,
                },
            ] if expr.root == Root::Param(name.clone()) => tag_kind(l),
            _ => None,
        })?;
        Some((literal, kind, base_is_whole))
    }
}

/// A checked query: its values (defaults filled in), the names the client gave, and
/// `use_cache`.
type CheckedQuery = (Map<String, Value>, Vec<String>, bool);

/// Whether a field's values never hold `:` (ids, integers, booleans, or a pattern that is the
/// run-id pattern).
fn id_like(field: &Field) -> bool {
    match field.kind {
        FieldKind::Id | FieldKind::Integer | FieldKind::Boolean => true,
        FieldKind::String => field
            .pattern
            .as_ref()
            .is_some_and(|(_, p)| p == super::RUN_ID_PATTERN),
        _ => false,
    }
}

/// `run` of a tag template's literal start `run:`.
pub fn tag_kind(literal: &str) -> Option<&str> {
    let (kind, rest) = literal.split_once(':')?;
    (rest.is_empty() && !kind.is_empty()).then_some(kind)
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The configured views, checked. Routing, validation, keys, tags, stats and the OpenAPI
/// document all read this one table.
#[derive(Debug, Clone)]
pub struct ViewTable {
    views: Vec<ViewDef>,
}

/// A configuration error in the view table: the setting at fault and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableError {
    /// The dotted setting, e.g. `views.ranking.key`.
    pub setting: String,
    /// What is wrong.
    pub reason: String,
}

/// Longest view name.
pub const MAX_VIEW_NAME: usize = 40;

/// Whether `name` is a view name: `[a-z][a-z0-9_]{0,39}`.
pub fn is_view_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_VIEW_NAME
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

impl ViewTable {
    /// Checks `specs` (name to spec; disabled views are left out) in name order.
    pub fn compile(specs: &BTreeMap<String, ViewSpec>) -> Result<ViewTable, TableError> {
        Self::compile_with(specs, &[])
    }

    /// As [`ViewTable::compile`], refusing views on any of `reserved` (paths runcache serves
    /// itself, `*` ending a prefix).
    pub fn compile_with(
        specs: &BTreeMap<String, ViewSpec>,
        reserved: &[&str],
    ) -> Result<ViewTable, TableError> {
        let mut views: Vec<ViewDef> = Vec::new();
        for (name, spec) in specs {
            if spec.enabled == Some(false) {
                continue;
            }
            let err = |field: &str, reason: String| TableError {
                setting: if field.is_empty() {
                    format!("views.{name}")
                } else {
                    format!("views.{name}.{field}")
                },
                reason,
            };
            if !is_view_name(name) {
                return Err(err("", "a view name is [a-z][a-z0-9_]{0,39}".into()));
            }
            // Names are leaked once per table (see `View`).
            let leaked: &'static str = Box::leak(name.clone().into_boxed_str());
            let def = compile_view(View::new(views.len(), leaked), spec)
                .map_err(|(field, reason)| err(&field, reason))?;
            for other in &views {
                if other.method == def.method && same_route(&other.segments, &def.segments) {
                    return Err(err(
                        "path",
                        format!(
                            "{} {} is also the route of view {}",
                            def.method,
                            def.path,
                            other.view.name()
                        ),
                    ));
                }
            }
            for r in reserved {
                let clash = match r.strip_suffix('*') {
                    Some(prefix) => def.path.starts_with(prefix),
                    None => def.path == *r,
                };
                if clash {
                    return Err(err(
                        "path",
                        format!("{} is a route of runcache itself", def.path),
                    ));
                }
            }
            views.push(def);
        }
        Ok(ViewTable { views })
    }

    /// Every view, in table order.
    pub fn views(&self) -> &[ViewDef] {
        &self.views
    }

    /// Every view handle.
    pub fn handles(&self) -> Vec<View> {
        self.views.iter().map(|d| d.view).collect()
    }

    /// The view of a handle.
    pub fn get(&self, view: View) -> &ViewDef {
        &self.views[view.index()]
    }

    /// The view named `name`.
    pub fn by_name(&self, name: &str) -> Option<&ViewDef> {
        self.views.iter().find(|d| d.view.name() == name)
    }

    /// The view whose method and path `method path` is, if any.
    pub fn route(&self, method: &http::Method, path: &str) -> Option<&ViewDef> {
        // A literal segment wins over a parameter, as in the router.
        self.views
            .iter()
            .filter(|d| d.method == *method && d.captures(path).is_some())
            .max_by_key(|d| {
                d.segments
                    .iter()
                    .filter(|s| matches!(s, PathSegment::Literal(_)))
                    .count()
            })
    }

    /// The views whose keys `pattern` (a logical key, or a glob of `*` and `?`) may match:
    /// those whose key's literal start agrees with the pattern's. Conservative: a view it
    /// cannot match is never named, one it might is.
    pub fn matched_by(&self, pattern: &str) -> Vec<View> {
        let literal = pattern.split(['*', '?']).next().unwrap_or_default();
        self.views
            .iter()
            .filter(|d| {
                let start = d.key.literal_prefix();
                start.starts_with(literal) || literal.starts_with(start)
            })
            .map(|d| d.view)
            .collect()
    }

    /// The views every key of which `pattern` matches: `*`, or a literal that starts a view's
    /// key followed by `*`.
    pub fn covered_by(&self, pattern: &str) -> Vec<View> {
        let Some(literal) = pattern.strip_suffix('*') else {
            return Vec::new();
        };
        if literal.contains(['*', '?']) {
            return Vec::new();
        }
        self.views
            .iter()
            .filter(|d| d.key.literal_prefix().starts_with(literal))
            .map(|d| d.view)
            .collect()
    }

    /// The views whose entries carry tags of `kind`.
    pub fn tagged_with_kind(&self, kind: &str) -> Vec<View> {
        self.views
            .iter()
            .filter(|d| d.tag_kinds().contains(&kind))
            .map(|d| d.view)
            .collect()
    }
}

fn same_route(a: &[PathSegment], b: &[PathSegment]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| match (x, y) {
            (PathSegment::Literal(l), PathSegment::Literal(m)) => l == m,
            (PathSegment::Param(_), PathSegment::Param(_)) => true,
            _ => false,
        })
}

type FieldError = (String, String);

fn compile_view(view: View, spec: &ViewSpec) -> Result<ViewDef, FieldError> {
    let fe = |field: &str, reason: String| (field.to_owned(), reason);
    let method = match spec
        .method
        .as_deref()
        .unwrap_or("GET")
        .to_ascii_uppercase()
        .as_str()
    {
        "GET" => http::Method::GET,
        "POST" => http::Method::POST,
        other => return Err(fe("method", format!("{other:?}: a view is GET or POST"))),
    };
    let path = spec
        .path
        .clone()
        .ok_or_else(|| fe("path", "is missing".into()))?;
    let segments = parse_path(&path).map_err(|e| fe("path", e))?;
    let mut params = Vec::new();
    for s in &segments {
        if let PathSegment::Param(name) = s {
            let field = match spec.params.get(name) {
                Some(p) => {
                    Field::compile(name, p, true).map_err(|e| fe(&format!("params.{name}"), e))?
                }
                None => Field::compile(
                    name,
                    &FieldSpec {
                        kind: Some("id".into()),
                        ..FieldSpec::default()
                    },
                    true,
                )
                .map_err(|e| fe("path", e))?,
            };
            if !field.required || field.default.is_some() {
                return Err(fe(
                    &format!("params.{name}"),
                    "a path parameter is always required".into(),
                ));
            }
            if matches!(field.kind, FieldKind::IdList | FieldKind::Json) {
                return Err(fe(
                    &format!("params.{name}.type"),
                    "a path parameter is one value".into(),
                ));
            }
            params.push(field);
        }
    }
    for name in spec.params.keys() {
        if !params.iter().any(|p| &p.name == name) {
            return Err(fe(
                &format!("params.{name}"),
                format!("the path {path} has no {{{name}}}"),
            ));
        }
    }
    let mut query = Vec::new();
    for (name, s) in &spec.query {
        if name == "use_cache" {
            return Err(fe(
                "query.use_cache",
                "use_cache is every view's own parameter".into(),
            ));
        }
        let f = Field::compile(name, s, false).map_err(|e| fe(&format!("query.{name}"), e))?;
        if matches!(f.kind, FieldKind::IdList | FieldKind::Json) {
            return Err(fe(
                &format!("query.{name}.type"),
                "a query parameter is one value (string, integer, boolean or id)".into(),
            ));
        }
        query.push(f);
    }
    let mut body = Vec::new();
    for (name, s) in &spec.body {
        let mut s = s.clone();
        if let Some(max) = spec.max_ids
            && s.kind.as_deref() == Some("id_list")
        {
            if !(2..=1000).contains(&max) {
                return Err(fe("max_ids", "must be between 2 and 1000".into()));
            }
            s.max = Some(max);
        }
        body.push(Field::compile(name, &s, true).map_err(|e| fe(&format!("body.{name}"), e))?);
    }
    if spec.max_ids.is_some() && !body.iter().any(|b| b.kind == FieldKind::IdList) {
        return Err(fe("max_ids", "the view has no id_list body field".into()));
    }
    let key_text = spec
        .key
        .clone()
        .ok_or_else(|| fe("key", "is missing".into()))?;
    let key = Template::parse(&key_text, Use::Key).map_err(|e| fe("key", e))?;
    let open_body = key
        .fields()
        .iter()
        .any(|(e, _)| e.root == Root::Body && e.steps.is_empty());
    let takes_body = !body.is_empty() || open_body;
    if takes_body && method == http::Method::GET {
        return Err(fe("body", "a GET view takes no body".into()));
    }
    let names_field = |e: &Expr| -> Result<(), String> {
        match &e.root {
            Root::Param(n) if !params.iter().any(|p| &p.name == n) => {
                Err(format!("{{{e}}} names no path parameter of {path}"))
            }
            Root::Query(n) if !query.iter().any(|q| &q.name == n) => {
                Err(format!("{{{e}}} names no declared query parameter"))
            }
            Root::Body if !takes_body => Err(format!("{{{e}}}: the view takes no body")),
            Root::Body => match e.body_field() {
                Some(m) if !open_body && !body.iter().any(|b| b.name == m) => {
                    Err(format!("{{{e}}} names no declared body field"))
                }
                _ => Ok(()),
            },
            Root::Response => Err(format!("{{{e}}}: only response_tags read the answer")),
            Root::Lookup { .. } => Err(format!(
                "{{{e}}}: lookup tables are read by [invalidate.*] rules only"
            )),
            _ => Ok(()),
        }
    };
    for (e, optional) in key.fields() {
        names_field(e).map_err(|r| fe("key", r))?;
        // A field that may be absent must sit in an optional segment, or two requests
        // would fail to render rather than share a key.
        if !optional {
            let may_be_absent = match &e.root {
                Root::Query(n) => query
                    .iter()
                    .any(|q| &q.name == n && !q.required && q.default.is_none()),
                Root::Body => e.body_field().is_some_and(|m| {
                    body.iter()
                        .any(|b| b.name == m && !b.required && b.default.is_none())
                }),
                _ => false,
            };
            if may_be_absent {
                return Err(fe(
                    "key",
                    format!("{{{e}}} may be absent: put it in an optional segment [ … ]"),
                ));
            }
        }
    }
    // One key, one answer: every field the view accepts is in its key.
    let in_key = |pred: &dyn Fn(&Expr) -> bool| key.fields().iter().any(|(e, _)| pred(e));
    for p in &params {
        if !in_key(&|e| e.root == Root::Param(p.name.clone())) {
            return Err(fe(
                "key",
                format!("the key does not cover path parameter {}", p.name),
            ));
        }
    }
    for q in &query {
        if !in_key(&|e| e.root == Root::Query(q.name.clone())) {
            return Err(fe(
                "key",
                format!("the key does not cover query parameter {}", q.name),
            ));
        }
    }
    if !open_body {
        for b in &body {
            if !in_key(&|e| e.body_field() == Some(b.name.as_str())) {
                return Err(fe(
                    "key",
                    format!("the key does not cover body field {}", b.name),
                ));
            }
        }
    }
    let mut tags = Vec::new();
    for (i, text) in spec.tags.iter().enumerate() {
        let t = Template::parse(text, Use::Tag).map_err(|e| fe(&format!("tags[{i}]"), e))?;
        check_tag(&t).map_err(|e| fe(&format!("tags[{i}]"), e))?;
        for (e, _) in t.fields() {
            names_field(e).map_err(|r| fe(&format!("tags[{i}]"), r))?;
        }
        tags.push(t);
    }
    let mut response_tags = Vec::new();
    for (i, text) in spec.response_tags.iter().enumerate() {
        let t =
            Template::parse(text, Use::Tag).map_err(|e| fe(&format!("response_tags[{i}]"), e))?;
        check_tag(&t).map_err(|e| fe(&format!("response_tags[{i}]"), e))?;
        for (e, _) in t.fields() {
            if e.root != Root::Response {
                return Err(fe(
                    &format!("response_tags[{i}]"),
                    format!("{{{e}}}: a response tag reads the answer (response.…)"),
                ));
            }
        }
        response_tags.push(t);
    }
    let ttl_secs = spec.ttl.0.as_secs();
    let on_invalid = match spec.on_invalid.as_deref().unwrap_or("refuse") {
        "refuse" => OnInvalid::Refuse,
        "pass" => OnInvalid::Pass,
        other => {
            return Err(fe(
                "on_invalid",
                format!("{other:?}: expected \"refuse\" or \"pass\""),
            ));
        }
    };
    Ok(ViewDef {
        view,
        method,
        path,
        segments,
        params,
        query,
        body,
        takes_body,
        open_body,
        key,
        tags,
        response_tags,
        ttl_secs,
        grace_secs: spec.grace,
        stale_if_error_secs: spec.stale_if_error,
        on_invalid,
        per_credential: spec.per_credential.unwrap_or(false),
        description: spec.description.clone(),
    })
}

/// A tag is `kind:…` with a literal kind, so that invalidation by kind and the cluster's
/// slots can read it.
pub(crate) fn check_tag(t: &Template) -> Result<(), String> {
    match t.pieces().first() {
        Some(template::Piece::Literal(l))
            if l.split_once(':').is_some_and(|(k, _)| !k.is_empty()) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "{:?}: a tag starts with its kind, as in run:{{model_run_id}}",
            t.text()
        )),
    }
}

pub(crate) fn parse_path(path: &str) -> Result<Vec<PathSegment>, String> {
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| format!("{path:?} must start with '/'"))?;
    let mut out = Vec::new();
    for seg in rest.split('/') {
        if seg.is_empty() {
            return Err(format!("{path:?} has an empty segment"));
        }
        if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            if !template::is_name(name) {
                return Err(format!("{path:?}: {{{name}}} is not a parameter name"));
            }
            if out.contains(&PathSegment::Param(name.to_owned())) {
                return Err(format!("{path:?} names {{{name}}} twice"));
            }
            out.push(PathSegment::Param(name.to_owned()));
        } else if seg.contains(['{', '}', '?', '#', '*', '%']) || seg == "." || seg == ".." {
            return Err(format!(
                "{path:?}: {seg:?} is neither a literal segment nor a {{parameter}}"
            ));
        } else {
            out.push(PathSegment::Literal(seg.to_owned()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(toml_text: &str) -> BTreeMap<String, ViewSpec> {
        #[derive(Deserialize)]
        struct Doc {
            views: BTreeMap<String, ViewSpec>,
        }
        // TOML is a JSON superset for these tables: parsed by hand as JSON.
        let doc: Doc = serde_json::from_str(toml_text).expect("spec");
        doc.views
    }

    fn table() -> ViewTable {
        ViewTable::compile(&spec(
            r#"{"views": {
            "feature_importance": {
                "path": "/api/v1/models/train/{model_run_id}/feature-importance",
                "params": {"model_run_id": {"pattern": "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"}},
                "query": {"top_n": {"type": "integer", "min": 1, "max": 1000}},
                "key": "model:feature_importance:{model_run_id}[:top_{query.top_n}]",
                "tags": ["run:{model_run_id}"], "ttl": "MEDIUM"},
            "comparison": {
                "method": "POST", "path": "/api/v1/models/compare",
                "body": {"model_run_ids": {"type": "id_list", "min": 2, "max": 50}},
                "key": "model:comparison:{sha256(body.model_run_ids)}",
                "tags": ["run:{body.model_run_ids[*]}"], "ttl": 60},
            "model_ranking": {
                "path": "/api/v1/models/rankings/{ranking_id}",
                "key": "model:ranking:{ranking_id}", "tags": ["ranking:{ranking_id}"],
                "response_tags": ["run:{response.runs[*].model_run_id}"], "ttl": "SHORT"},
            "search": {
                "method": "POST", "path": "/search",
                "body": {"q": {"type": "string", "max": 100}, "limit": {"type": "integer", "min": 1, "max": 50, "default": 10}},
                "key": "search:{sha256(body)}", "tags": ["search:all"], "ttl": 30}
        }}"#,
        ))
        .expect("valid table")
    }

    #[test]
    fn the_shipped_views_resolve_as_section_1_says() {
        let t = table();
        let fi = t.by_name("feature_importance").expect("fi");
        let r = fi
            .resolve(
                "/api/v1/models/train/4%32/feature-importance",
                Some("top_n=05&use_cache=FALSE"),
                None,
            )
            .expect("valid");
        assert_eq!(r.key, "model:feature_importance:42:top_5");
        assert_eq!(r.tags, ["run:42"]);
        assert_eq!(
            r.path_and_query,
            "/api/v1/models/train/42/feature-importance?top_n=5"
        );
        assert!(!r.use_cache);
        for (path, query) in [
            ("/api/v1/models/train/../feature-importance", None),
            ("/api/v1/models/train/.a/feature-importance", None),
            (
                "/api/v1/models/train/42/feature-importance",
                Some("top_n=0"),
            ),
            (
                "/api/v1/models/train/42/feature-importance",
                Some("top_n=1001"),
            ),
            (
                "/api/v1/models/train/42/feature-importance",
                Some("top_n=5&top_n=6"),
            ),
            ("/api/v1/models/train/42/feature-importance", Some("x=1")),
            (
                "/api/v1/models/train/42/feature-importance",
                Some("use_cache=maybe"),
            ),
        ] {
            assert!(fi.resolve(path, query, None).is_err(), "{path} {query:?}");
        }
        let cmp = t.by_name("comparison").expect("cmp");
        let r = cmp
            .resolve(
                "/api/v1/models/compare",
                None,
                Some(br#"{"model_run_ids": ["b", 42, "a", "42"]}"#),
            )
            .expect("valid");
        assert_eq!(r.tags, ["run:42", "run:a", "run:b"]);
        assert_eq!(
            r.body.as_deref(),
            Some(br#"{"model_run_ids":["42","a","b"]}"#.as_slice())
        );
        for bad in [
            &br#"{"model_run_ids": ["1"]}"#[..],
            br#"{"model_run_ids": ["1", 1]}"#,
            br#"{"model_run_ids": ["1", "2"], "x": 1}"#,
            br#"{"model_run_ids": ["1", -2]}"#,
            br#"[1, 2]"#,
            b"",
        ] {
            assert!(
                cmp.resolve("/api/v1/models/compare", None, Some(bad))
                    .is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn answers_name_their_tags_and_routes_prefer_literals() {
        let t = table();
        let ranking = t.by_name("model_ranking").expect("ranking");
        let tags = ranking
            .response_tags_of(br#"{"runs": [{"model_run_id": "7"}, {"model_run_id": 8}]}"#)
            .expect("tags");
        assert_eq!(tags, ["run:7", "run:8"]);
        assert!(
            ranking
                .response_tags_of(b"not json")
                .expect("none")
                .is_empty()
        );
        assert_eq!(
            ranking.keyed_by_tag(),
            Some(("model:ranking:", "ranking", true))
        );
        assert_eq!(
            t.route(&http::Method::GET, "/api/v1/models/rankings/3")
                .map(|d| d.view.name()),
            Some("model_ranking")
        );
        assert!(
            t.route(&http::Method::POST, "/api/v1/models/rankings/3")
                .is_none()
        );
        assert_eq!(t.matched_by("model:*").len(), 3);
        assert_eq!(
            t.covered_by("model:ranking:*")
                .iter()
                .map(|v| v.name())
                .collect::<Vec<_>>(),
            ["model_ranking"]
        );
    }

    #[test]
    fn an_open_body_is_keyed_whole_with_its_defaults() {
        let t = table();
        let search = t.by_name("search").expect("search");
        let a = search
            .resolve("/search", None, Some(br#"{"q": "x", "extra": [1]}"#))
            .expect("valid");
        let b = search
            .resolve(
                "/search",
                None,
                Some(br#"{"extra": [1], "limit": 10, "q": "x"}"#),
            )
            .expect("valid");
        assert_eq!(a.key, b.key, "the default is filled in, members sorted");
        let c = search
            .resolve("/search", None, Some(br#"{"q": "x", "extra": [2]}"#))
            .expect("valid");
        assert_ne!(a.key, c.key);
    }

    fn refused(json: &str) -> TableError {
        ViewTable::compile(&spec(json)).expect_err("refused")
    }

    #[test]
    fn configuration_errors_name_the_view_and_the_field() {
        let base = |extra: &str| {
            format!(
                r#"{{"views": {{"v": {{"path": "/a/{{id}}", "key": "a:{{id}}", "ttl": 60{extra}}}}}}}"#
            )
        };
        for (extra, setting) in [
            (r#", "tags": ["run:{nope}"]"#, "views.v.tags[0]"),
            (r#", "query": {"n": {"type": "integer"}}"#, "views.v.key"),
            (r#", "method": "DELETE""#, "views.v.method"),
            (
                r#", "response_tags": ["run:{id}"]"#,
                "views.v.response_tags[0]",
            ),
            (r#", "on_invalid": "maybe""#, "views.v.on_invalid"),
            (r#", "params": {"other": {}}"#, "views.v.params.other"),
        ] {
            assert_eq!(refused(&base(extra)).setting, setting, "{extra}");
        }
        let e = refused(
            r#"{"views": {"a": {"path": "/x/{id}", "key": "a:{id}", "ttl": 60},
                          "b": {"path": "/x/{other}", "key": "b:{other}", "ttl": 60}}}"#,
        );
        assert_eq!(e.setting, "views.b.path");
        assert!(e.reason.contains("view a"), "{}", e.reason);
        let e = ViewTable::compile_with(
            &spec(r#"{"views": {"v": {"path": "/cache/x", "key": "v", "ttl": 60}}}"#),
            &["/cache/*"],
        )
        .expect_err("a route of runcache");
        assert_eq!(e.setting, "views.v.path");
    }

    proptest! {
        #[test]
        fn a_hashed_body_is_keyed_by_its_canonical_json(
            q in "[a-z ]{0,20}",
            r in "[a-z ]{0,20}",
            limit in 1i64..=50,
            extra in proptest::collection::btree_map("[a-z]{1,6}", 0i64..100, 0..4),
        ) {
            let t = table();
            let search = t.by_name("search").expect("search");
            let key = |body: &Value| search
                .resolve("/search", None, Some(&serde_json::to_vec(body).expect("json")))
                .map(|r| r.key);
            let mut body = serde_json::json!({"q": q, "limit": limit});
            for (k, v) in &extra {
                if k != "q" && k != "limit" {
                    body[k] = serde_json::json!(v);
                }
            }
            // The same members in another order: the same key.
            let mut reordered = serde_json::Map::new();
            for (k, v) in body.as_object().expect("object").iter().rev() {
                reordered.insert(k.clone(), v.clone());
            }
            let a = key(&body).expect("valid");
            prop_assert_eq!(&a, &key(&Value::Object(reordered)).expect("valid"));
            // Another value of an accepted member: another key.
            let mut other = body.clone();
            other["q"] = serde_json::json!(r);
            prop_assert_eq!(q == r, a == key(&other).expect("valid"));
        }

        #[test]
        fn one_request_one_key_and_accepted_fields_never_share_one(
            a in "[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}",
            b in "[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}",
            n in proptest::option::of(1u32..=1000),
            m in proptest::option::of(1u32..=1000),
            ids in proptest::collection::vec("[a-z0-9]{1,8}", 2..6),
            extra in proptest::collection::vec("[a-z0-9]{1,8}", 1..3),
        ) {
            let t = table();
            let fi = t.by_name("feature_importance").expect("fi");
            let path = |id: &str| format!("/api/v1/models/train/{id}/feature-importance");
            let query = |n: Option<u32>| n.map(|n| format!("top_n={n}"));
            let key = |id: &str, n: Option<u32>| fi.resolve(&path(id), query(n).as_deref(), None).map(|r| r.key);
            if a == "." || a == ".." || b == "." || b == ".." {
                return Ok(());
            }
            let ka = key(&a, n).expect("valid");
            prop_assert_eq!(&ka, &key(&a, n).expect("valid"));
            prop_assert_eq!(a == b && n == m, ka == key(&b, m).expect("valid"));

            let cmp = t.by_name("comparison").expect("cmp");
            let body = |ids: &[String]| serde_json::to_vec(&serde_json::json!({"model_run_ids": ids})).expect("json");
            let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
            let first = cmp.resolve("/api/v1/models/compare", None, Some(&body(&ids)));
            if distinct.len() < 2 {
                prop_assert!(first.is_err());
                return Ok(());
            }
            let first = first.expect("valid");
            let mut reversed = ids.clone();
            reversed.reverse();
            reversed.push(ids[0].clone());
            let second = cmp.resolve("/api/v1/models/compare", None, Some(&body(&reversed))).expect("valid");
            prop_assert_eq!(&first.key, &second.key, "order and repetition do not matter");
            let mut more = ids.clone();
            more.extend(extra.iter().map(|e| format!("x-{e}")));
            let third = cmp.resolve("/api/v1/models/compare", None, Some(&body(&more))).expect("valid");
            prop_assert_ne!(&first.key, &third.key, "another set of ids is another key");
        }
    }
}
