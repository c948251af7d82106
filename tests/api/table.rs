//! The view table (SPEC section 8), against the real binary's stack, a real `redis-server` and
//! the real sample origin: the seed views (miss, hit, the key in Redis as its template says),
//! events by tag, the ranking's cascade, per-credential views, `on_invalid = "pass"`, and the
//! configuration errors that stop a start.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::routing::get;
use http::HeaderMap;
use runcache::domain::ViewSpec;
use runcache::sample_origin::{self, SampleOriginOptions};
use serde_json::{Value, json};

use super::helpers::*;

/// The sample origin with no delay, plus two routes the tests' own views use: `/api/v1/me/{item}`
/// answers who asks (the request's `Authorization`) with a 200 for everyone, as a search
/// filtered by user does, and `/api/v1/items/{item}` echoes any item.
async fn origin() -> TestOrigin {
    let extra = Router::new()
        .route(
            "/api/v1/me/{item}",
            get(|Path(item): Path<String>, headers: HeaderMap| async move {
                let who = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("anonymous")
                    .to_owned();
                axum::Json(json!({"item": item, "for": who}))
            }),
        )
        .route(
            "/api/v1/items/{item}",
            get(|Path(item): Path<String>| async move { axum::Json(json!({"item": item})) }),
        );
    let app = sample_origin::router(SampleOriginOptions {
        delay: Duration::ZERO,
    })
    .merge(extra);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind origin");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    TestOrigin {
        url,
        control: Arc::default(),
    }
}

fn view(spec: Value) -> ViewSpec {
    serde_json::from_value(spec).expect("view spec")
}

/// An app in front of the sample origin on `redis`, with public views (so that one client's
/// hit is anyone's) unless `tweak` says otherwise.
async fn app(redis: &TestRedis, tweak: impl FnOnce(&mut runcache::config::Settings)) -> TestApp {
    let origin = origin().await;
    let mut s = test_settings(&origin.url, &redis.url());
    s.auth.frontend = "none".into();
    s.views.others.insert(
        "my_items".into(),
        view(json!({
            "path": "/api/v1/me/{item}", "key": "me:{item}", "tags": ["item:{item}"],
            "ttl": 60, "per_credential": true,
        })),
    );
    s.views.others.insert(
        "items".into(),
        view(json!({
            "path": "/api/v1/items/{item}", "params": {"item": {"pattern": "^[0-9]+$"}},
            "key": "item:{item}", "tags": ["item:{item}"], "ttl": 60, "on_invalid": "pass",
        })),
    );
    tweak(&mut s);
    spawn_with_settings(s, origin).await
}

async fn get_view(app: &TestApp, path: &str) -> (String, Value) {
    let resp = app.get(path).await;
    assert_eq!(resp.status(), 200, "{path}");
    let x_cache = header(&resp, "x-cache").to_owned();
    (x_cache, resp.json().await.expect("json"))
}

async fn event(app: &TestApp, kind: &str, body: Value) -> reqwest::Response {
    app.client
        .post(app.url(&format!("/events/{kind}")))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .expect("event")
}

#[tokio::test]
async fn each_seed_view_misses_then_hits_under_the_key_its_template_names() {
    let redis = TestRedis::start().await;
    let app = app(&redis, |_| {}).await;
    for (path, key) in [
        ("/api/v1/datasets/d7/stats", "dataset:stats:d7"),
        ("/api/v1/tuning/t1/results", "tuning:results:t1"),
        ("/api/v1/models/rankings/3", "model:ranking:3"),
    ] {
        let (first, body) = get_view(&app, path).await;
        assert_eq!(first, "MISS", "{path}");
        let (second, again) = get_view(&app, path).await;
        assert_eq!(second, "HIT", "{path}");
        assert_eq!(body, again, "{path}: a hit is the stored answer");
        let physical = format!("{}:v1:{key}", app.prefix);
        assert_eq!(
            redis
                .keys(&format!("{}:v1:*", app.prefix))
                .await
                .iter()
                .filter(|k| **k == physical)
                .count(),
            1,
            "{path}: {physical} in Redis"
        );
    }
    // Validation comes from the table: an id that is no id never reaches the origin.
    let bad = app.get("/api/v1/datasets/..%2F/stats").await;
    assert_error(bad, 400, "invalid_argument").await;
    let unknown = app.get("/api/v1/datasets/d7/stats?x=1").await;
    assert_error(unknown, 400, "invalid_argument").await;
}

#[tokio::test]
async fn an_event_by_tag_drops_exactly_the_entries_that_carry_it() {
    let redis = TestRedis::start().await;
    let app = app(&redis, |_| {}).await;
    get_view(&app, "/api/v1/datasets/d7/stats").await;
    get_view(&app, "/api/v1/datasets/d8/stats").await;
    let resp = event(&app, "dataset-updated", json!({"dataset_id": "d7"})).await;
    assert_eq!(resp.status(), 200);
    let n: Value = resp.json().await.expect("json");
    assert_eq!(n["invalidated"], 1, "{n}");
    assert_eq!(get_view(&app, "/api/v1/datasets/d7/stats").await.0, "MISS");
    assert_eq!(get_view(&app, "/api/v1/datasets/d8/stats").await.0, "HIT");
    // Unknown kinds and bad fields.
    assert_error(
        event(&app, "dataset-exploded", json!({"dataset_id": "d7"})).await,
        404,
        "not_found",
    )
    .await;
    assert_error(
        event(&app, "dataset-updated", json!({"model_run_id": "d7"})).await,
        400,
        "invalid_argument",
    )
    .await;
    assert_error(
        event(&app, "dataset-updated", json!({"dataset_id": ".."})).await,
        400,
        "invalid_argument",
    )
    .await;
    // By tag through the admin route, a number being the same id as its text.
    get_view(&app, "/api/v1/datasets/9/stats").await;
    let resp = app
        .admin(
            reqwest::Method::POST,
            "/cache/invalidate",
            Some(json!({"tags": ["dataset:9"]})),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(get_view(&app, "/api/v1/datasets/9/stats").await.0, "MISS");
    let resp = app
        .admin(
            reqwest::Method::POST,
            "/cache/invalidate",
            Some(json!({"tags": ["not a tag"]})),
        )
        .await;
    assert_error(resp, 400, "invalid_argument").await;
    // A namespace is any view name.
    let resp = app
        .admin(
            reqwest::Method::POST,
            "/cache/invalidate",
            Some(json!({"namespace": "dataset_stats"})),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(get_view(&app, "/api/v1/datasets/d8/stats").await.0, "MISS");
}

#[tokio::test]
async fn a_ranking_goes_when_a_run_it_lists_changes_and_stays_when_another_does() {
    let redis = TestRedis::start().await;
    let app = app(&redis, |_| {}).await;
    let (_, ranking) = get_view(&app, "/api/v1/models/rankings/3").await;
    let listed: Vec<&str> = ranking["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| r["model_run_id"].as_str().expect("id"))
        .collect();
    assert!(listed.contains(&"3.2"), "{ranking}");
    assert_eq!(get_view(&app, "/api/v1/models/rankings/3").await.0, "HIT");
    // Another run: the ranking stays.
    assert_eq!(
        event(&app, "training-completed", json!({"model_run_id": "9.9"}))
            .await
            .status(),
        200
    );
    assert_eq!(get_view(&app, "/api/v1/models/rankings/3").await.0, "HIT");
    // One of its runs, by a number-like id given as a string: the ranking goes (the cascade).
    assert_eq!(
        event(&app, "training-completed", json!({"model_run_id": "3.2"}))
            .await
            .status(),
        200
    );
    assert_eq!(get_view(&app, "/api/v1/models/rankings/3").await.0, "MISS");
    assert_eq!(get_view(&app, "/api/v1/models/rankings/3").await.0, "HIT");
    // A delete of one of its runs through runcache: the origin drops it from the ranking, and
    // the cached ranking goes with the run.
    let resp = app
        .client
        .delete(app.url("/api/v1/models/train/3.4"))
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status(), 200);
    let (x_cache, after) = get_view(&app, "/api/v1/models/rankings/3").await;
    assert_eq!(x_cache, "MISS");
    assert!(!after.to_string().contains("\"3.4\""), "{after}");
    // Its own tag, and the tuning results by their trials' runs.
    assert_eq!(
        event(&app, "ranking-updated", json!({"ranking_id": 3}))
            .await
            .status(),
        200
    );
    assert_eq!(get_view(&app, "/api/v1/models/rankings/3").await.0, "MISS");
    get_view(&app, "/api/v1/tuning/7/results").await;
    assert_eq!(
        event(&app, "model-deleted", json!({"model_run_id": "7.5"}))
            .await
            .status(),
        200
    );
    assert_eq!(get_view(&app, "/api/v1/tuning/7/results").await.0, "MISS");
    // The learned tags are tag sets in Redis like any other.
    let tag_set = format!("{}:_tags:v1:run:3.1", app.prefix);
    let members: Vec<String> = redis.cmd(&["SMEMBERS", &tag_set]).await.expect("smembers");
    assert_eq!(members, [format!("{}:v1:model:ranking:3", app.prefix)]);
}

#[tokio::test]
async fn per_credential_entries_are_shared_with_nobody_else() {
    let redis = TestRedis::start().await;
    let app = app(&redis, |_| {}).await;
    let as_user = |token: &'static str| {
        let app = &app;
        async move {
            let resp = app
                .client
                .get(app.url("/api/v1/me/basket"))
                .bearer_auth(token)
                .send()
                .await
                .expect("get");
            assert_eq!(resp.status(), 200);
            let x_cache = header(&resp, "x-cache").to_owned();
            let body: Value = resp.json().await.expect("json");
            (x_cache, body["for"].as_str().unwrap_or_default().to_owned())
        }
    };
    assert_eq!(
        as_user("alice").await,
        ("MISS".into(), "Bearer alice".into())
    );
    assert_eq!(as_user("bob").await, ("MISS".into(), "Bearer bob".into()));
    assert_eq!(
        as_user("alice").await,
        ("HIT".into(), "Bearer alice".into())
    );
    assert_eq!(as_user("bob").await, ("HIT".into(), "Bearer bob".into()));
    let keys = redis.keys(&format!("{}:v1:me:basket*", app.prefix)).await;
    assert_eq!(keys.len(), 2, "{keys:?}");
    for k in &keys {
        assert!(
            !k.contains("alice") && !k.contains("bob"),
            "credentials in clear: {k}"
        );
    }
    // One tag drops both.
    let resp = app
        .admin(
            reqwest::Method::POST,
            "/cache/invalidate",
            Some(json!({"tags": ["item:basket"]})),
        )
        .await;
    let n: Value = resp.json().await.expect("json");
    assert_eq!(n["invalidated"], 2, "{n}");
}

#[tokio::test]
async fn on_invalid_pass_sends_what_it_cannot_validate_to_the_origin_uncached() {
    let redis = TestRedis::start().await;
    let app = app(&redis, |_| {}).await;
    for _ in 0..2 {
        let (x_cache, body) = get_view(&app, "/api/v1/items/abc").await;
        assert_eq!(x_cache, "BYPASS");
        assert_eq!(body["item"], "abc");
    }
    assert_eq!(get_view(&app, "/api/v1/items/12").await.0, "MISS");
    assert_eq!(get_view(&app, "/api/v1/items/12").await.0, "HIT");
    assert!(
        redis
            .keys(&format!("{}:v1:item:abc*", app.prefix))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn every_view_is_in_the_openapi_document_and_the_stats() {
    let redis = TestRedis::start().await;
    let app = app(&redis, |_| {}).await;
    let doc: Value = app.get("/openapi.json").await.json().await.expect("json");
    for path in [
        "/api/v1/datasets/{dataset_id}/stats",
        "/api/v1/tuning/{tuning_id}/results",
        "/api/v1/models/rankings/{ranking_id}",
        "/api/v1/me/{item}",
        "/api/v1/items/{item}",
        "/events/dataset-updated",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from /openapi.json"
        );
    }
    let stats = app.stats().await;
    for name in [
        "metrics",
        "feature_importance",
        "comparison",
        "dataset_stats",
        "tuning_results",
        "model_ranking",
        "my_items",
        "items",
    ] {
        assert!(
            stats["views"].get(name).is_some(),
            "{name} missing from the stats: {stats}"
        );
    }
    let metrics = app.get("/metrics").await.text().await.expect("text");
    assert!(
        metrics.contains("view=\"model_ranking\""),
        "every view's labels are exported from the start"
    );
}

/// One line naming the view and the field, and no start.
#[test]
fn configuration_errors_stop_the_start_naming_the_view_and_the_field() {
    for (overlay, named) in [
        (
            "[views.ranking2]\npath = \"/r/{id}\"\nkey = \"r:{nope}\"\nttl = 60\n",
            "views.ranking2.key",
        ),
        (
            "[views.twin]\npath = \"/api/v1/models/rankings/{x}\"\nkey = \"twin:{x}\"\nttl = 60\n",
            "views.twin.path",
        ),
        (
            "[views.search]\nmethod = \"POST\"\npath = \"/s\"\nbody.q = { type = \"string\" }\nkey = \"s:all\"\nttl = 60\n",
            "views.search.key",
        ),
        (
            "[views.typo]\npath = \"/t/{id}\"\nkey = \"t:{id}\"\nttl = 60\nttl_secs = 5\n",
            "ttl_secs",
        ),
    ] {
        let file =
            std::env::temp_dir().join(format!("runcache-view-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(&file, overlay).expect("write overlay");
        let err = runcache::config::Settings::load_from(
            Some(file.to_str().expect("path")),
            Some(Default::default()),
        )
        .expect_err("refused");
        let _ = std::fs::remove_file(&file);
        let line = err.to_string();
        assert!(!line.contains('\n'), "one line: {line}");
        assert!(line.contains(named), "{named} in: {line}");
    }
}

#[tokio::test]
async fn the_event_stream_reads_every_configured_kind() {
    let redis = TestRedis::start().await;
    let stream = format!("table-events-{}", uuid::Uuid::new_v4().simple());
    let app = app(&redis, |s| {
        s.events.stream = Some(stream.clone());
        s.events.stream_block_ms = 200;
    })
    .await;
    get_view(&app, "/api/v1/datasets/d7/stats").await;
    get_view(&app, "/api/v1/models/rankings/5").await;
    assert_eq!(get_view(&app, "/api/v1/datasets/d7/stats").await.0, "HIT");
    let _: String = redis
        .cmd(&[
            "XADD",
            &stream,
            "*",
            "kind",
            "dataset-updated",
            "dataset_id",
            "d7",
        ])
        .await
        .expect("XADD");
    // A run listed by the ranking, named as a number: the ranking goes (the cascade).
    let _: String = redis
        .cmd(&[
            "XADD",
            &stream,
            "*",
            "kind",
            "training-failed",
            "model_run_id",
            "5.3",
        ])
        .await
        .expect("XADD");
    wait_for(|| async {
        let dataset = app.get("/api/v1/datasets/d7/stats").await;
        header(&dataset, "x-cache") == "MISS"
    })
    .await;
    wait_for(|| async {
        let ranking = app.get("/api/v1/models/rankings/5").await;
        header(&ranking, "x-cache") == "MISS"
    })
    .await;
}

#[test]
fn the_old_comparison_bound_still_reads_as_the_id_lists_max() {
    let file = std::env::temp_dir().join(format!("runcache-max-ids-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&file, "[views.comparison]\nmax_ids = 3\n").expect("write overlay");
    let settings = runcache::config::Settings::load_from(
        Some(file.to_str().expect("path")),
        Some(Default::default()),
    )
    .expect("loads");
    let _ = std::fs::remove_file(&file);
    let table = settings.view_table().expect("views");
    let cmp = table.by_name("comparison").expect("comparison");
    let body = |ids: &[&str]| serde_json::to_vec(&json!({"model_run_ids": ids})).expect("json");
    assert!(
        cmp.resolve(
            "/api/v1/models/compare",
            None,
            Some(&body(&["1", "2", "3"]))
        )
        .is_ok()
    );
    assert!(
        cmp.resolve(
            "/api/v1/models/compare",
            None,
            Some(&body(&["1", "2", "3", "4"]))
        )
        .is_err()
    );
}

/// Found by the consistency checker (sentinel mode, a master paused through an event): an
/// invalidation whose counter bumps reached Redis but whose deletes did not (its `WAIT` timed
/// out, so it was journaled and sent to the other instances instead) left a ranking servable to
/// every instance still reading Redis, because only the tag set stood between the ranking and
/// the run it listed. The generations of learned tags are now checked on every read, as the
/// request's own are.
#[tokio::test]
async fn a_ranking_is_unservable_once_a_listed_runs_counter_moves_even_if_its_tag_set_is_not_emptied()
 {
    let redis = TestRedis::start().await;
    let app = app(&redis, |s| s.l1.enabled = false).await;
    get_view(&app, "/api/v1/models/rankings/3").await;
    assert_eq!(get_view(&app, "/api/v1/models/rankings/3").await.0, "HIT");
    // What the invalidation's bumps do, without its deletes.
    for counter in ["learned", "run:3.1"] {
        let key = format!("{}:_gen:v1:{counter}", app.prefix);
        let _: i64 = redis.cmd(&["INCR", &key]).await.expect("INCR");
    }
    let set = format!("{}:_tags:v1:run:3.1", app.prefix);
    let members: Vec<String> = redis.cmd(&["SMEMBERS", &set]).await.expect("SMEMBERS");
    assert_eq!(
        members.len(),
        1,
        "the ranking is still in the run's tag set"
    );
    assert_eq!(get_view(&app, "/api/v1/models/rankings/3").await.0, "MISS");
    assert_eq!(get_view(&app, "/api/v1/models/rankings/3").await.0, "HIT");
    // Another run's counter: the ranking stays.
    let key = format!("{}:_gen:v1:run:9.9", app.prefix);
    let _: i64 = redis.cmd(&["INCR", &key]).await.expect("INCR");
    assert_eq!(get_view(&app, "/api/v1/models/rankings/3").await.0, "HIT");
}
