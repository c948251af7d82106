//! The OpenAPI operations of the view table: every configured view, with its parameters,
//! query and body as its validators check them, and the answers every view gives.

use serde_json::{Map, Value, json};
use utoipa::PartialSchema;
use utoipa::openapi::OpenApi;
use utoipa::openapi::path::{HttpMethod, Operation};

use super::views::RunId;
use crate::domain::RUN_ID_PATTERN;
use crate::domain::WriteRules;
use crate::domain::view::{Field, FieldKind, ViewDef, ViewTable};

/// The component standing for any JSON value (utoipa reads a schema with no type back as
/// nothing, so the operations built as JSON refer to it).
const ANY_JSON: &str = "AnyJson";

fn any_json() -> Value {
    json!({"$ref": format!("#/components/schemas/{ANY_JSON}")})
}

/// Adds an operation for every view of `table` to `api`.
pub(super) fn document(table: &ViewTable, api: &mut OpenApi) {
    for def in table.views() {
        let method = if def.method == http::Method::POST {
            HttpMethod::Post
        } else {
            HttpMethod::Get
        };
        // Built as JSON, the shape the document is read in; a view the builder could not
        // describe would be a bug in this function, and is left out rather than half-written.
        match serde_json::from_value::<Operation>(operation(def)) {
            Ok(op) => api.paths.add_path_operation(&def.path, vec![method], op),
            Err(e) => {
                tracing::error!(view = def.view.name(), error = %e, "view left out of the OpenAPI document")
            }
        }
    }
    let components = api.components.get_or_insert_with(Default::default);
    components
        .schemas
        .insert("RunId".to_owned(), RunId::schema());
    components
        .schemas
        .insert(ANY_JSON.to_owned(), serde_json::Value::schema());
    // `/cache/invalidate`'s namespace is a view name: exactly the configured ones.
    if let Some(body) = components.schemas.get_mut("InvalidateBody")
        && let Ok(mut doc) = serde_json::to_value(&*body)
        && doc["properties"]["namespace"].is_object()
    {
        let names: Vec<&str> = table.views().iter().map(|d| d.view.name()).collect();
        doc["properties"]["namespace"]["enum"] = json!(names);
        if let Ok(schema) = serde_json::from_value(doc) {
            *body = schema;
        }
    }
}

/// Adds an operation for every write of `rules` to `api`.
pub(super) fn document_rules(rules: &WriteRules, api: &mut OpenApi) {
    for rule in rules.rules() {
        let method = match rule.method {
            http::Method::PUT => HttpMethod::Put,
            http::Method::PATCH => HttpMethod::Patch,
            http::Method::DELETE => HttpMethod::Delete,
            _ => HttpMethod::Post,
        };
        // A rest segment (`*`) has no OpenAPI form: such a rule is left out of the document.
        if rule.path.ends_with("/*") {
            continue;
        }
        match serde_json::from_value::<Operation>(rule_operation(rule)) {
            Ok(op) => api.paths.add_path_operation(&rule.path, vec![method], op),
            Err(e) => {
                tracing::error!(rule = %rule.name, error = %e, "write rule left out of the OpenAPI document")
            }
        }
    }
}

fn rule_operation(rule: &crate::domain::WriteRule) -> Value {
    let parameters: Vec<Value> = rule
        .param_names
        .iter()
        .map(|name| match rule.params.iter().find(|f| &f.name == name) {
            Some(f) => parameter(f, "path"),
            None => {
                json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}})
            }
        })
        .collect();
    let origin = |what: &str| json!({"description": what, "content": {"application/json": {"schema": any_json()}}});
    let error = |what: &str| json!({"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}});
    let mut responses = Map::new();
    responses.insert(
        "200".into(),
        json!({
            "description": "The origin's answer, passed through",
            "headers": {
                "X-Invalidated": {"schema": {"type": "integer", "format": "int64", "minimum": 0}, "description": "Entries invalidated"},
            },
            "content": {"application/json": {"schema": any_json()}},
        }),
    );
    responses.insert(
        "400".into(),
        error("An invalid path parameter, or two `Authorization` headers"),
    );
    for (status, what) in [
        (
            "401",
            "The origin refused the request's credentials: its answer, passed through",
        ),
        (
            "403",
            "The origin refused the request's credentials: its answer, passed through",
        ),
        ("404", "The origin's 404, passed through"),
        ("422", "The origin's 422, passed through"),
        (
            "500",
            "The origin's 5xx, passed through (invalidated as if the write had succeeded)",
        ),
    ] {
        responses.insert(status.into(), origin(what));
    }
    responses.insert(
        "502".into(),
        error("Origin unreachable (invalidated as if the write had succeeded)"),
    );
    responses.insert(
        "503".into(),
        error("runcache is still starting: nothing was sent"),
    );
    responses.insert(
        "504".into(),
        error("Origin timed out (invalidated as if the write had succeeded)"),
    );
    let tags: Vec<&str> = rule.tags.iter().map(|t| t.text()).collect();
    json!({
        "tags": ["views"],
        "summary": rule.description.clone().unwrap_or_else(|| format!("The `{}` write", rule.name)),
        "description": format!("Write `{}`, passed to the origin; invalidates `{}`.", rule.name, tags.join("`, `")),
        "operationId": rule.name,
        "parameters": parameters,
        "responses": responses,
    })
}

/// The schema of a field given as text (a path segment or a query parameter).
fn text_schema(f: &Field) -> Value {
    match f.kind {
        FieldKind::Integer => bounded(
            json!({"type": "integer", "format": "int64"}),
            f,
            "minimum",
            "maximum",
        ),
        FieldKind::Boolean => json!({"type": "boolean"}),
        FieldKind::Id => json!({"type": "string", "pattern": RUN_ID_PATTERN}),
        _ => string_schema(f),
    }
}

fn string_schema(f: &Field) -> Value {
    let mut s = bounded(json!({"type": "string"}), f, "minLength", "maxLength");
    if let Some((_, p)) = &f.pattern {
        s["pattern"] = json!(p);
    }
    s
}

fn bounded(mut schema: Value, f: &Field, lo: &str, hi: &str) -> Value {
    if let Some(min) = f.min {
        schema[lo] = json!(min);
    }
    if let Some(max) = f.max {
        schema[hi] = json!(max);
    }
    if let Some(d) = &f.default {
        schema["default"] = d.clone();
    }
    schema
}

/// The schema of a body member.
fn json_schema(f: &Field) -> Value {
    let run_id = json!({"$ref": "#/components/schemas/RunId"});
    let mut s = match f.kind {
        FieldKind::Id => run_id,
        FieldKind::IdList => {
            let mut s = json!({"type": "array", "items": run_id});
            if let Some(min) = f.min {
                s["minItems"] = json!(min);
            }
            // Repetitions are allowed before de-duplication, up to four times the bound.
            if let Some(max) = f.max {
                s["maxItems"] = json!(max.saturating_mul(4));
            }
            s
        }
        FieldKind::Json => any_json(),
        _ => text_schema(f),
    };
    if let Some(d) = &f.description
        && let Some(obj) = s.as_object_mut()
    {
        obj.insert("description".into(), json!(d));
    }
    s
}

fn parameter(f: &Field, place: &str) -> Value {
    let description = f.description.clone().unwrap_or_else(|| match f.kind {
        FieldKind::Id => {
            "An id: 1-128 characters of A-Z, a-z, 0-9, `_`, `.`, `-`, not starting with `.` or `-`"
                .to_owned()
        }
        _ if f.pattern.as_ref().is_some_and(|(_, p)| p == RUN_ID_PATTERN) => {
            "Run id, `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`".to_owned()
        }
        kind => format!("A {}", kind.name()),
    });
    json!({
        "name": f.name,
        "in": place,
        "description": description,
        "required": place == "path" || (f.required && f.default.is_none()),
        "schema": text_schema(f),
    })
}

fn operation(def: &ViewDef) -> Value {
    let name = def.view.name();
    let mut parameters: Vec<Value> = def.params.iter().map(|f| parameter(f, "path")).collect();
    parameters.push(json!({
        "name": "If-None-Match", "in": "header", "required": false, "example": "*",
        "description": "ETags (strong or weak) or `*`: a match is answered `304` with no body",
        "schema": {"type": ["string", "null"]},
    }));
    parameters.extend(def.query.iter().map(|f| parameter(f, "query")));
    parameters.push(json!({
        "name": "use_cache", "in": "query", "required": false,
        "description": "`false`: fetch from the origin and neither read nor write the cache (default `true`).",
        "schema": {"type": "boolean"},
    }));
    let origin = |what: &str| json!({"description": what, "content": {"application/json": {"schema": any_json()}}});
    let error = |what: &str| json!({"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}});
    let header = |ty: &str, what: &str| json!({"schema": {"type": ty}, "description": what});
    let mut responses = Map::new();
    responses.insert(
        "200".into(),
        json!({
            "description": "The origin's body, byte for byte, with its content type",
            "headers": {
                "Age": {"schema": {"type": "integer", "format": "int64", "minimum": 0}, "description": "Seconds since the entry was stored (hits)"},
                "Cache-Status": header("string", "RFC 9211"),
                "ETag": header("string", "Strong; weak (`W/`) when the body is compressed"),
                "X-Cache": header("string", "HIT, MISS, BYPASS or STALE"),
            },
            "content": {"application/json": {"schema": any_json()}},
        }),
    );
    responses.insert(
        "304".into(),
        json!({"description": "If-None-Match matched: no body", "headers": {"ETag": {"schema": {"type": "string"}}}}),
    );
    responses.insert(
        "400".into(),
        error("A parameter, the query or the body is invalid (with `on_invalid = \"pass\"`: the origin's answer)"),
    );
    responses.insert("401".into(), origin("Credentials refused: the origin's answer, passed through (`auth.frontend = forward`), or an ErrorBody for a missing or invalid JWT (`jwt`)"));
    responses.insert(
        "403".into(),
        origin("The origin refused the request's credentials: its answer, passed through"),
    );
    responses.insert("404".into(), origin("The origin's 404, passed through"));
    if def.takes_body {
        responses.insert(
            "413".into(),
            error("Body larger than `server.max_body_bytes`"),
        );
    }
    responses.insert("422".into(), origin("The origin's 422, passed through"));
    responses.insert("502".into(), error("Origin failed"));
    responses.insert("504".into(), error("Origin timed out"));
    let mut op = json!({
        "tags": ["views"],
        "summary": def.description.clone().unwrap_or_else(|| format!("The `{name}` view")),
        "description": format!("View `{name}`: key `{}`.", def.key.text()),
        "operationId": format!("{}_{name}", def.method.as_str().to_ascii_lowercase()),
        "parameters": parameters,
        "responses": responses,
    });
    if def.takes_body {
        let mut properties = Map::new();
        let mut required = Vec::new();
        for f in &def.body {
            properties.insert(f.name.clone(), json_schema(f));
            if f.required && f.default.is_none() {
                required.push(json!(f.name));
            }
        }
        let mut schema = json!({"type": "object", "properties": properties, "required": required});
        if !def.open_body {
            schema["additionalProperties"] = json!(false);
        }
        op["requestBody"] =
            json!({"content": {"application/json": {"schema": schema}}, "required": true});
    }
    op
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_shipped_view_is_documented() {
        let table = crate::http::tests::shipped_table();
        for def in table.views() {
            let op = super::operation(def);
            if let Err(e) = serde_json::from_value::<utoipa::openapi::path::Operation>(op.clone()) {
                panic!("{}: {e}\n{op:#}", def.view.name());
            }
        }
    }
}
