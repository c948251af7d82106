//! Event kinds (`events.kinds`): each kind names the tags its events invalidate, as templates
//! over the event's fields (`training-completed = ["run:{model_run_id}"]`). The hooks
//! (`POST /events/{kind}`) and the event stream read events through this one table, and every
//! field through the one id parser.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::run_id::{RawRunId, parse_run_id};
use super::template::{Inputs, Root, Template, Use};

/// The checked kinds.
#[derive(Debug, Clone, Default)]
pub struct EventKinds {
    kinds: BTreeMap<String, Kind>,
}

#[derive(Debug, Clone)]
struct Kind {
    tags: Vec<Template>,
    /// The fields its templates name, sorted.
    fields: Vec<String>,
}

/// Whether `kind` is a kind name: `[a-z][a-z0-9-]{0,63}`.
pub fn is_kind_name(kind: &str) -> bool {
    let b = kind.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

impl EventKinds {
    /// Checks `spec` (kind to tag templates). The error names the setting.
    pub fn compile(spec: &BTreeMap<String, Vec<String>>) -> Result<EventKinds, (String, String)> {
        let mut kinds = BTreeMap::new();
        for (name, templates) in spec {
            let setting = format!("events.kinds.{name}");
            if !is_kind_name(name) {
                return Err((setting, "a kind is [a-z][a-z0-9-]{0,63}".into()));
            }
            if templates.is_empty() {
                return Err((setting, "names no tag".into()));
            }
            let mut tags = Vec::new();
            let mut fields = Vec::new();
            for text in templates {
                let t = Template::parse(text, Use::Tag).map_err(|e| (setting.clone(), e))?;
                for (e, _) in t.fields() {
                    match &e.root {
                        Root::Param(f) => fields.push(f.clone()),
                        _ => {
                            return Err((
                                setting.clone(),
                                format!(
                                    "{{{e}}}: an event's tags name its fields, as {{model_run_id}}"
                                ),
                            ));
                        }
                    }
                }
                if t.literal_prefix()
                    .split_once(':')
                    .is_none_or(|(k, _)| k.is_empty())
                {
                    return Err((
                        setting.clone(),
                        format!("{text:?}: a tag starts with its kind, as in run:{{model_run_id}}"),
                    ));
                }
                tags.push(t);
            }
            fields.sort();
            fields.dedup();
            kinds.insert(name.clone(), Kind { tags, fields });
        }
        Ok(EventKinds { kinds })
    }

    /// Every kind, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }

    /// Whether `kind` is configured.
    pub fn contains(&self, kind: &str) -> bool {
        self.kinds.contains_key(kind)
    }

    /// The fields an event of `kind` must carry.
    pub fn fields(&self, kind: &str) -> &[String] {
        self.kinds.get(kind).map_or(&[], |k| &k.fields)
    }

    /// The tag templates of `kind`, as configured.
    pub fn tag_templates(&self, kind: &str) -> Vec<&str> {
        self.kinds
            .get(kind)
            .into_iter()
            .flat_map(|k| k.tags.iter().map(|t| t.text()))
            .collect()
    }

    /// The tag kinds (`run`) events of `kind` invalidate.
    pub fn tag_kinds(&self, kind: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .kinds
            .get(kind)
            .into_iter()
            .flat_map(|k| &k.tags)
            .filter_map(|t| {
                t.literal_prefix()
                    .split_once(':')
                    .map(|(k, _)| k.to_owned())
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The tags an event of `kind` with `fields` (a JSON body) invalidates. `None`: no such
    /// kind. An error: a field is missing, not an id, or not one the kind names.
    pub fn tags_of(&self, kind: &str, body: &Value) -> Option<Result<Vec<String>, String>> {
        Some(self.read(kind, body)?.map(|event| event.tags))
    }

    /// An event of `kind` with `body` read: its fields (each through the id parser) and the
    /// tags it invalidates. `None`: no such kind.
    pub fn read(&self, kind: &str, body: &Value) -> Option<Result<Event, String>> {
        let k = self.kinds.get(kind)?;
        Some(read(k, body))
    }

    /// As [`EventKinds::tags_of`] for fields given as text (the event stream, where a number
    /// and a string look alike): every reading of each id is named (see
    /// [`super::run_ids_in_untyped_text`]).
    pub fn tags_of_text(
        &self,
        kind: &str,
        fields: &BTreeMap<String, String>,
    ) -> Option<Result<Vec<String>, String>> {
        let k = self.kinds.get(kind)?;
        Some((|| {
            let mut readings: Vec<(String, Vec<String>)> = Vec::new();
            for name in &k.fields {
                let raw = fields
                    .get(name)
                    .ok_or_else(|| format!("{name} is missing"))?;
                let ids = super::run_ids_in_untyped_text(raw).map_err(|e| rename(e, name))?;
                readings.push((name.clone(), ids));
            }
            // One body per combination of readings (in practice one or two).
            let mut bodies = vec![Map::new()];
            for (name, ids) in &readings {
                bodies = bodies
                    .into_iter()
                    .flat_map(|b| {
                        ids.iter().map(move |id| {
                            let mut b = b.clone();
                            b.insert(name.clone(), Value::String(id.clone()));
                            b
                        })
                    })
                    .collect();
            }
            let mut out = Vec::new();
            for b in bodies {
                out.extend(render(k, &b)?);
            }
            out.sort();
            out.dedup();
            Ok(out)
        })())
    }
}

fn rename(e: String, name: &str) -> String {
    if name == "model_run_id" {
        e
    } else {
        e.replacen("model_run_id", name, 1)
    }
}

/// An event, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The fields its kind names, normalised (`42.0` is `"42"`), by name.
    pub fields: Vec<(String, String)>,
    /// The tags it invalidates.
    pub tags: Vec<String>,
}

impl Event {
    /// What the audit trail names: the one field's value (`42`), or `name=value` pairs.
    pub fn target(&self) -> String {
        match self.fields.as_slice() {
            [(_, value)] => value.clone(),
            many => many
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

fn read(k: &Kind, body: &Value) -> Result<Event, String> {
    let Value::Object(members) = body else {
        return Err("the body must be a JSON object".into());
    };
    // Other fields a sender adds along (a timestamp, a status) are ignored.
    let mut fields = Map::new();
    for name in &k.fields {
        let v = members
            .get(name)
            .ok_or_else(|| format!("missing field {name:?}"))?;
        let id = parse_run_id(RawRunId::Json(v)).map_err(|e| rename(e, name))?;
        fields.insert(name.clone(), Value::String(id));
    }
    let tags = render(k, &fields)?;
    Ok(Event {
        fields: fields
            .into_iter()
            .map(|(n, v)| (n, v.as_str().unwrap_or_default().to_owned()))
            .collect(),
        tags,
    })
}

fn render(k: &Kind, fields: &Map<String, Value>) -> Result<Vec<String>, String> {
    let empty = Map::new();
    let inputs = Inputs {
        params: fields,
        query: &empty,
        body: None,
        response: None,
        lookups: None,
    };
    let mut out = Vec::new();
    for t in &k.tags {
        out.extend(t.render_all(&inputs)?);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kinds() -> EventKinds {
        let mut spec = BTreeMap::new();
        spec.insert(
            "training-completed".into(),
            vec!["run:{model_run_id}".into()],
        );
        spec.insert(
            "dataset-updated".into(),
            vec!["dataset:{dataset_id}".into()],
        );
        EventKinds::compile(&spec).expect("valid")
    }

    #[test]
    fn an_event_names_its_tags_through_the_id_parser() {
        let k = kinds();
        assert_eq!(
            k.tags_of("training-completed", &json!({"model_run_id": 42.0}))
                .expect("kind"),
            Ok(vec!["run:42".to_owned()])
        );
        assert_eq!(
            k.tags_of("dataset-updated", &json!({"dataset_id": "d7"}))
                .expect("kind"),
            Ok(vec!["dataset:d7".to_owned()])
        );
        assert!(k.tags_of("nope", &json!({})).is_none());
        for bad in [json!({}), json!({"model_run_id": ".."}), json!([1])] {
            assert!(
                k.tags_of("training-completed", &bad)
                    .expect("kind")
                    .is_err(),
                "{bad}"
            );
        }
        let mut text = BTreeMap::new();
        text.insert("model_run_id".to_owned(), "42.0".to_owned());
        assert_eq!(
            k.tags_of_text("training-completed", &text).expect("kind"),
            Ok(vec!["run:42".to_owned(), "run:42.0".to_owned()])
        );
    }

    #[test]
    fn bad_kinds_are_refused() {
        for (name, tags) in [
            ("Bad", vec!["run:{a}"]),
            ("ok", vec![]),
            ("ok", vec!["{a}"]),
            ("ok", vec!["run:{query.a}"]),
        ] {
            let mut spec = BTreeMap::new();
            spec.insert(
                name.to_owned(),
                tags.into_iter().map(String::from).collect(),
            );
            assert!(EventKinds::compile(&spec).is_err(), "{name}");
        }
    }
}
