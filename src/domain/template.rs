//! Templates of the view table (SPEC section 8): keys, tags, and the event kinds' tags.
//!
//! - `{name}` is a path parameter (or, in an event kind's tags, a field of the event's body);
//! - `{query.name}`, `{body.a.b}`, `{response.runs[*].model_run_id}` name a field of the query,
//!   of the JSON request body or of the JSON answer; `.` steps into a member and `[*]` into
//!   every element of an array (one tag per element);
//! - `[ … ]` in a key is an optional segment, left out when a field inside it is absent;
//! - `{sha256(expr)}` is the lower-case hex SHA-256 of the canonical JSON of `expr` (object
//!   members sorted, no whitespace), and `{sha256(body)}` covers the whole body.
//!
//! Parsing is strict (a configuration error names the template); evaluation is total: a
//! field that is absent yields nothing, and a value is written into a key or tag in one
//! injective form (see [`render`]).

use serde_json::Value;

/// Where an expression starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    /// A path parameter (in an event kind's tags: a field of the event's body).
    Param(String),
    /// A query parameter.
    Query(String),
    /// The JSON request body.
    Body,
    /// The JSON answer.
    Response,
    /// `lookup.<table>[<expr>]`: what a lookup table learned for each value of `key`
    /// (`[invalidate.*]` rules only).
    Lookup {
        /// The table's name.
        table: String,
        /// The expression whose values are looked up.
        key: Box<Expr>,
    },
}

/// One step into a JSON value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `.name`: a member of an object.
    Member(String),
    /// `[*]`: every element of an array.
    Each,
}

/// A field named by a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expr {
    /// Where it starts.
    pub root: Root,
    /// The steps into the value.
    pub steps: Vec<Step>,
    /// `a|b` in a tag: what stands in when this names nothing (`{body.run_id|body.run_uuid}`).
    pub or: Option<Box<Expr>>,
}

impl Expr {
    /// Whether it fans out (`[*]`).
    pub fn fans_out(&self) -> bool {
        self.steps.contains(&Step::Each)
            || matches!(&self.root, Root::Lookup { key, .. } if key.fans_out())
    }

    /// The body member it starts with (`body.a.b` is `a`), if it is under the body.
    pub fn body_field(&self) -> Option<&str> {
        match (&self.root, self.steps.first()) {
            (Root::Body, Some(Step::Member(m))) => Some(m),
            _ => None,
        }
    }

    /// The values it names in `inputs`: none when a field on the way is absent, several
    /// through `[*]`.
    pub fn values<'a>(&self, inputs: &Inputs<'a>) -> Vec<&'a Value> {
        let mut current: Vec<&'a Value> = match &self.root {
            Root::Param(name) => inputs.params.get(name).into_iter().collect(),
            Root::Query(name) => inputs.query.get(name).into_iter().collect(),
            Root::Body => inputs.body.into_iter().collect(),
            Root::Response => inputs.response.into_iter().collect(),
            Root::Lookup { table, key } => {
                // All or nothing: a key the table does not know leaves the lookup naming
                // nothing (so that a rule's `otherwise` stands in), never a partial list.
                let learned = inputs.lookups.and_then(|l| l.get(table));
                let keys = key.values(inputs);
                let found: Vec<&'a Value> = keys
                    .iter()
                    .filter_map(|k| learned?.get(render(k)))
                    .collect();
                if found.len() < keys.len() {
                    Vec::new()
                } else {
                    found
                }
            }
        };
        for step in &self.steps {
            current = match step {
                Step::Member(m) => current.into_iter().filter_map(|v| v.get(m)).collect(),
                Step::Each => current
                    .into_iter()
                    .filter_map(Value::as_array)
                    .flatten()
                    .collect(),
            };
        }
        current.retain(|v| !v.is_null());
        match &self.or {
            Some(other) if current.is_empty() => other.values(inputs),
            _ => current,
        }
    }

    /// This expression and its alternatives (`a|b|c`), in order.
    pub fn alternatives(&self) -> Vec<&Expr> {
        let mut out = vec![self];
        let mut next = self.or.as_deref();
        while let Some(e) = next {
            out.push(e);
            next = e.or.as_deref();
        }
        out
    }
}

impl std::fmt::Display for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.root {
            Root::Param(n) => write!(f, "{n}")?,
            Root::Query(n) => write!(f, "query.{n}")?,
            Root::Body => f.write_str("body")?,
            Root::Response => f.write_str("response")?,
            Root::Lookup { table, key } => write!(f, "lookup.{table}[{key}]")?,
        }
        for step in &self.steps {
            match step {
                Step::Member(m) => write!(f, ".{m}")?,
                Step::Each => f.write_str("[*]")?,
            }
        }
        if let Some(other) = &self.or {
            write!(f, "|{other}")?;
        }
        Ok(())
    }
}

/// One part of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Text written as it is.
    Literal(String),
    /// `{expr}` or `{sha256(expr)}`.
    Field {
        /// The field.
        expr: Expr,
        /// Whether it is written as the SHA-256 of its canonical JSON.
        hashed: bool,
    },
    /// `[ … ]`: left out when a field inside is absent.
    Optional(Vec<Piece>),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
    pieces: Vec<Piece>,
}

/// The values a template is evaluated over. Parameters, query and body have been validated
/// and normalised by the view's validators before they get here.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// Path parameters (or an event's body fields).
    pub params: &'a serde_json::Map<String, Value>,
    /// Query parameters.
    pub query: &'a serde_json::Map<String, Value>,
    /// The request body.
    pub body: Option<&'a Value>,
    /// The answer.
    pub response: Option<&'a Value>,
    /// What lookup tables hold for the values their expressions name: table name, then the
    /// value written as in a tag ([`render`]), then what it maps to.
    pub lookups: Option<&'a serde_json::Map<String, Value>>,
}

/// What a template may use: keys allow optional segments and hashes, tags allow `[*]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// A logical key.
    Key,
    /// A tag.
    Tag,
}

/// Most tags one template yields for one request or answer; more is an error (a request is
/// refused, an answer is not stored), never a silent cut.
pub const MAX_TAGS: usize = 1000;

impl Template {
    /// Parses `text` for `usage`.
    pub fn parse(text: &str, usage: Use) -> Result<Template, String> {
        let mut chars = text.char_indices().peekable();
        let pieces = parse_pieces(text, &mut chars, usage, false)?;
        if pieces.is_empty() {
            return Err("is empty".into());
        }
        Ok(Template {
            text: text.to_owned(),
            pieces,
        })
    }

    /// The text it was parsed from.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The pieces.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// Every field it names, with whether it sits in an optional segment.
    pub fn fields(&self) -> Vec<(&Expr, bool)> {
        fn walk<'a>(pieces: &'a [Piece], optional: bool, out: &mut Vec<(&'a Expr, bool)>) {
            for p in pieces {
                match p {
                    Piece::Literal(_) => {}
                    Piece::Field { expr, .. } => {
                        out.extend(expr.alternatives().into_iter().map(|e| (e, optional)));
                    }
                    Piece::Optional(inner) => walk(inner, true, out),
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.pieces, false, &mut out);
        out
    }

    /// The literal text before the first field or optional segment.
    pub fn literal_prefix(&self) -> &str {
        match self.pieces.first() {
            Some(Piece::Literal(l)) => l,
            _ => "",
        }
    }

    /// The single string it renders to over `inputs` (a key), or the field that is missing.
    pub fn render_one(&self, inputs: &Inputs<'_>) -> Result<String, String> {
        let mut out = String::with_capacity(self.text.len() + 32);
        render_pieces(&self.pieces, inputs, &mut out)?;
        Ok(out)
    }

    /// Every string it renders to over `inputs` (tags): one per combination of the values of
    /// its fields, none when a field is absent. More than [`MAX_TAGS`] is an error.
    pub fn render_all(&self, inputs: &Inputs<'_>) -> Result<Vec<String>, String> {
        let mut outs = vec![String::new()];
        for piece in &self.pieces {
            match piece {
                Piece::Literal(l) => outs.iter_mut().for_each(|o| o.push_str(l)),
                Piece::Field { expr, hashed } => {
                    let values: Vec<String> = if *hashed {
                        hashed_value(expr, inputs).into_iter().collect()
                    } else {
                        expr.values(inputs).into_iter().map(render).collect()
                    };
                    if values.is_empty() {
                        return Ok(Vec::new());
                    }
                    if outs.len().saturating_mul(values.len()) > MAX_TAGS {
                        return Err(format!("{} names more than {MAX_TAGS} tags", self.text));
                    }
                    outs = outs
                        .iter()
                        .flat_map(|o| values.iter().map(move |v| [o.as_str(), v].concat()))
                        .collect();
                }
                // Tags have no optional segments (refused when parsed).
                Piece::Optional(_) => {}
            }
        }
        outs.sort_unstable();
        outs.dedup();
        Ok(outs)
    }
}

fn render_pieces(pieces: &[Piece], inputs: &Inputs<'_>, out: &mut String) -> Result<(), String> {
    for piece in pieces {
        match piece {
            Piece::Literal(l) => out.push_str(l),
            Piece::Field { expr, hashed } => {
                if *hashed {
                    let h = hashed_value(expr, inputs).ok_or_else(|| expr.to_string())?;
                    out.push_str(&h);
                } else {
                    let v = expr
                        .values(inputs)
                        .into_iter()
                        .next()
                        .ok_or_else(|| expr.to_string())?;
                    match v {
                        Value::String(s) if s.bytes().all(is_plain_value_byte) => out.push_str(s),
                        other => out.push_str(&render(other)),
                    }
                }
            }
            Piece::Optional(inner) => {
                let mut segment = String::new();
                if render_pieces(inner, inputs, &mut segment).is_ok() {
                    out.push_str(&segment);
                }
            }
        }
    }
    Ok(())
}

/// `sha256(expr)`: the hex SHA-256 of the canonical JSON of the value `expr` names.
fn hashed_value(expr: &Expr, inputs: &Inputs<'_>) -> Option<String> {
    use sha2::{Digest, Sha256};
    let value = expr.values(inputs).into_iter().next()?;
    Some(super::hex(&Sha256::digest(canonical_json(value))))
}

/// The canonical JSON of `value`: object members sorted by name (serde_json's map is
/// ordered), no whitespace, numbers as parsed.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// Whether `b` may stand in a logical key or tag as it is.
pub fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':')
}

/// A value as it is written into a key or tag: a string as it is, with `:` and every byte
/// that may not stand in a key written `%XX` (so `%` itself too: the form is injective, and a
/// value never writes a literal's separator); an integral
/// number as its integer (`42.0` is `42`, as the run-id parser reads it); another number, a
/// boolean, or an array or object as its canonical JSON, escaped the same way.
pub fn render(value: &Value) -> String {
    let text = match value {
        Value::String(s) => return escape(s),
        Value::Number(n) => match super::run_id::integral_text(n) {
            Some(t) => t,
            None => n.to_string(),
        },
        Value::Bool(b) => b.to_string(),
        other => String::from_utf8(canonical_json(other)).unwrap_or_default(),
    };
    escape(&text)
}

/// Whether `b` stands for itself in a value written into a key or tag: a key byte other than
/// `:`, the separator of templates' literals. A value holding `:` could otherwise pass for a
/// literal and a later field (`a:{x}[:b{query.n}]`: `x = "1:b5"` and `x = "1", n = 5`), and two
/// requests the origin answers differently would share a key.
fn is_plain_value_byte(b: u8) -> bool {
    is_key_byte(b) && b != b':'
}

fn escape(s: &str) -> String {
    if s.bytes().all(is_plain_value_byte) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for b in s.bytes() {
        if is_plain_value_byte(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push_str(&super::hex(&[b]).to_ascii_uppercase());
        }
    }
    out
}

type Chars<'a> = std::iter::Peekable<std::str::CharIndices<'a>>;

fn parse_pieces(
    text: &str,
    chars: &mut Chars<'_>,
    usage: Use,
    in_optional: bool,
) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let flush = |literal: &mut String, pieces: &mut Vec<Piece>| {
        if !literal.is_empty() {
            pieces.push(Piece::Literal(std::mem::take(literal)));
        }
    };
    while let Some((at, c)) = chars.next() {
        match c {
            '{' => {
                flush(&mut literal, &mut pieces);
                let mut inner = String::new();
                loop {
                    match chars.next() {
                        Some((_, '}')) => break,
                        Some((_, ch)) => inner.push(ch),
                        None => return Err(format!("{text:?}: '{{' at {at} is never closed")),
                    }
                }
                pieces.push(parse_field(&inner, usage).map_err(|e| format!("{text:?}: {e}"))?);
            }
            '[' if usage == Use::Key => {
                if in_optional {
                    return Err(format!("{text:?}: optional segments do not nest"));
                }
                flush(&mut literal, &mut pieces);
                let inner = parse_pieces(text, chars, usage, true)?;
                if !inner.iter().any(|p| matches!(p, Piece::Field { .. })) {
                    return Err(format!("{text:?}: an optional segment must name a field"));
                }
                pieces.push(Piece::Optional(inner));
            }
            ']' if in_optional => {
                flush(&mut literal, &mut pieces);
                return Ok(pieces);
            }
            c if c.is_ascii() && is_key_byte(c as u8) => literal.push(c),
            c => {
                return Err(format!(
                    "{text:?}: {c:?} may not stand in a key or tag (use A-Z, a-z, 0-9, '_', '.', '-', ':')"
                ));
            }
        }
    }
    if in_optional {
        return Err(format!("{text:?}: '[' is never closed"));
    }
    flush(&mut literal, &mut pieces);
    Ok(pieces)
}

fn parse_field(inner: &str, usage: Use) -> Result<Piece, String> {
    let inner = inner.trim();
    if let Some(arg) = inner
        .strip_prefix("sha256(")
        .and_then(|r| r.strip_suffix(')'))
    {
        let expr = parse_expr(arg.trim())?;
        if expr.fans_out() {
            return Err(format!("sha256({expr}) cannot fan out with [*]"));
        }
        return Ok(Piece::Field { expr, hashed: true });
    }
    if split_alternatives(inner).len() > 1 {
        if usage == Use::Key {
            return Err(format!(
                "{{{inner}}}: alternatives (a|b) stand in tags only; a key names each field"
            ));
        }
        let expr = parse_alternatives(inner)?;
        for e in expr.alternatives() {
            if matches!(e.root, Root::Body | Root::Response) && e.steps.is_empty() {
                return Err(format!("{{{e}}} names a whole document"));
            }
        }
        return Ok(Piece::Field {
            expr,
            hashed: false,
        });
    }
    let expr = parse_expr(inner)?;
    if usage == Use::Key && expr.fans_out() {
        return Err(format!(
            "{{{expr}}}: a key names one value; hash a list with sha256(…)"
        ));
    }
    if matches!(expr.root, Root::Body | Root::Response) && expr.steps.is_empty() {
        return Err(format!(
            "{{{expr}}} names a whole document; use sha256({expr})"
        ));
    }
    Ok(Piece::Field {
        expr,
        hashed: false,
    })
}

/// Whether `name` is a field or parameter name: `[A-Za-z_][A-Za-z0-9_]{0,63}`.
pub fn is_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// `text` split at each `|` outside brackets.
fn split_alternatives(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            '|' if depth == 0 => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out
}

/// `a|b|c`: `a`, with `b` standing in when it names nothing, then `c`.
fn parse_alternatives(text: &str) -> Result<Expr, String> {
    let mut parsed = split_alternatives(text)
        .into_iter()
        .map(|a| parse_expr(a.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut expr = parsed.pop().ok_or_else(|| format!("{text:?} is empty"))?;
    while let Some(mut earlier) = parsed.pop() {
        earlier.or = Some(Box::new(expr));
        expr = earlier;
    }
    Ok(expr)
}

pub(crate) fn parse_expr(text: &str) -> Result<Expr, String> {
    if let Some(rest) = text.strip_prefix("lookup.") {
        let (table, key) = rest
            .split_once('[')
            .and_then(|(t, k)| Some((t, k.strip_suffix(']')?)))
            .ok_or_else(|| format!("{text:?}: a lookup is lookup.<table>[<field>]"))?;
        if !is_name(table) {
            return Err(format!("{text:?}: {table:?} is not a table name"));
        }
        let key = parse_alternatives(key.trim())?;
        if key
            .alternatives()
            .iter()
            .any(|k| matches!(k.root, Root::Lookup { .. }))
        {
            return Err(format!("{text:?}: lookups do not nest"));
        }
        return Ok(Expr {
            root: Root::Lookup {
                table: table.to_owned(),
                key: Box::new(key),
            },
            steps: Vec::new(),
            or: None,
        });
    }
    let mut parts = text.split('.');
    let head = parts.next().unwrap_or_default();
    let (root, head_each) = match head.strip_suffix("[*]") {
        Some(h) => (h, true),
        None => (head, false),
    };
    let root = match root {
        "query" => {
            let name = parts
                .next()
                .ok_or_else(|| format!("{text:?}: query.<name>"))?;
            if !is_name(name) || parts.next().is_some() || head_each {
                return Err(format!("{text:?}: a query field is query.<name>"));
            }
            return Ok(Expr {
                root: Root::Query(name.to_owned()),
                steps: Vec::new(),
                or: None,
            });
        }
        "body" => Root::Body,
        "response" => Root::Response,
        name if is_name(name) => Root::Param(name.to_owned()),
        _ => return Err(format!("{text:?} is not a field")),
    };
    let mut steps = Vec::new();
    if head_each {
        steps.push(Step::Each);
    }
    for part in parts {
        let mut name = part;
        let mut each = 0;
        while let Some(n) = name.strip_suffix("[*]") {
            name = n;
            each += 1;
        }
        if !is_name(name) {
            return Err(format!("{text:?}: {part:?} is not a member name"));
        }
        steps.push(Step::Member(name.to_owned()));
        steps.extend(std::iter::repeat_n(Step::Each, each));
    }
    if matches!(root, Root::Param(_)) && !steps.is_empty() {
        return Err(format!("{text:?}: a path parameter has no members"));
    }
    Ok(Expr {
        root,
        steps,
        or: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_alternative_stands_in_when_a_field_names_nothing() {
        let t = Template::parse("run:{body.run_id|body.run_uuid}", Use::Tag).expect("parses");
        let l =
            Template::parse("exp:{lookup.t[body.run_id|body.run_uuid]}", Use::Tag).expect("parses");
        let empty = serde_json::Map::new();
        let table = json!({"t": {"r2": "9"}});
        let tags = |body: Value, t: &Template| {
            t.render_all(&Inputs {
                params: &empty,
                query: &empty,
                body: Some(&body),
                response: None,
                lookups: table.as_object(),
            })
            .expect("renders")
        };
        assert_eq!(
            tags(json!({"run_id": "r1", "run_uuid": "x"}), &t),
            ["run:r1"]
        );
        assert_eq!(tags(json!({"run_uuid": "r2"}), &t), ["run:r2"]);
        assert!(tags(json!({}), &t).is_empty());
        assert_eq!(tags(json!({"run_uuid": "r2"}), &l), ["exp:9"]);
        let many = Template::parse("exp:{lookup.t[body.ids[*]]}", Use::Tag).expect("parses");
        assert_eq!(tags(json!({"ids": ["r2"]}), &many), ["exp:9"]);
        assert!(
            tags(json!({"ids": ["r2", "unknown"]}), &many).is_empty(),
            "one key unknown: the lookup names nothing, not a part"
        );
        assert_eq!(t.fields().len(), 2);
        assert!(Template::parse("k:{query.a|query.b}", Use::Key).is_err());
    }

    fn map(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn keys_render_with_optional_segments_and_hashes() {
        let t = Template::parse(
            "model:feature_importance:{model_run_id}[:top_{query.top_n}]",
            Use::Key,
        )
        .expect("parses");
        let params = map(json!({"model_run_id": "42"}));
        let mut query = map(json!({}));
        let empty = map(json!({}));
        let inputs = Inputs {
            params: &params,
            query: &empty,
            body: None,
            response: None,
            lookups: None,
        };
        assert_eq!(
            t.render_one(&inputs).expect("renders"),
            "model:feature_importance:42"
        );
        query.insert("top_n".into(), json!(5));
        let inputs = Inputs {
            params: &params,
            query: &query,
            body: None,
            response: None,
            lookups: None,
        };
        assert_eq!(
            t.render_one(&inputs).expect("renders"),
            "model:feature_importance:42:top_5"
        );
        assert_eq!(t.literal_prefix(), "model:feature_importance:");

        let c = Template::parse("model:comparison:{sha256(body.model_run_ids)}", Use::Key)
            .expect("parses");
        let body = json!({"model_run_ids": ["1", "2"]});
        let empty = map(json!({}));
        let key = c
            .render_one(&Inputs {
                params: &empty,
                query: &empty,
                body: Some(&body),
                response: None,
                lookups: None,
            })
            .expect("renders");
        // The SHA-256 of `["1","2"]`, the list sent to the origin.
        assert_eq!(
            key,
            "model:comparison:cc3f2a1ffd63c4db19e0114b93a94b774e4a2d07a2a5ec5b193303ac1387d633"
        );
    }

    #[test]
    fn tags_fan_out_over_arrays() {
        let t = Template::parse("run:{response.runs[*].model_run_id}", Use::Tag).expect("tag");
        let answer = json!({"runs": [{"model_run_id": "b"}, {"model_run_id": 7.0}, {"x": 1}, {"model_run_id": "a b"}]});
        let empty = map(json!({}));
        let tags = t
            .render_all(&Inputs {
                params: &empty,
                query: &empty,
                body: None,
                response: Some(&answer),
                lookups: None,
            })
            .expect("renders");
        assert_eq!(tags, ["run:7", "run:a%20b", "run:b"]);
    }

    #[test]
    fn bad_templates_are_refused() {
        for (bad, usage) in [
            ("model:{", Use::Key),
            ("model:{a b}", Use::Key),
            ("model:[x]", Use::Key),
            ("model:[[{a}]]", Use::Key),
            ("model:{body.ids[*]}", Use::Key),
            ("model:{body}", Use::Key),
            ("run:{query.a.b}", Use::Tag),
            ("run/{a}", Use::Tag),
            ("m:{sha256(body.x[*])}", Use::Key),
        ] {
            assert!(Template::parse(bad, usage).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_value_cannot_pass_for_a_literal_and_a_later_field() {
        let t = Template::parse("a:{x}[:b{query.n}]", Use::Key).expect("parses");
        let key = |x: &str, n: Option<i64>| {
            let params = map(json!({ "x": x }));
            let query = match n {
                Some(n) => map(json!({ "n": n })),
                None => map(json!({})),
            };
            t.render_one(&Inputs {
                params: &params,
                query: &query,
                body: None,
                response: None,
                lookups: None,
            })
            .expect("renders")
        };
        assert_ne!(key("1:b5", None), key("1", Some(5)));
    }

    #[test]
    fn rendering_is_injective_on_strings() {
        assert_eq!(render(&json!("a%b")), "a%25b");
        assert_eq!(render(&json!("a/b")), "a%2Fb");
        assert_ne!(render(&json!("a%2Fb")), render(&json!("a/b")));
        assert_eq!(render(&json!("1:b5")), "1%3Ab5");
        assert_eq!(render(&json!(true)), "true");
        assert_eq!(render(&json!(1.5)), "1.5");
    }
}
