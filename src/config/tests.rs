//! Unit tests of settings loading and validation.
use super::*;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn defaults_load_and_match_the_spec() {
    let s = Settings::load_from(None, Some(HashMap::new())).expect("defaults load");
    assert_eq!(s.server.addr, "127.0.0.1:8080");
    assert_eq!(s.origin.base_url, "http://127.0.0.1:8000");
    assert_eq!(s.redis.url.expose_secret(), "redis://127.0.0.1:6379");
    assert_eq!(s.cache.prefix, "runcache");
    assert_eq!(s.cache.version, "v1");
    assert_eq!(s.views.metrics.ttl.0, Duration::from_secs(3600));
    assert_eq!(s.views.feature_importance.ttl.0, Duration::from_secs(1800));
    assert_eq!(s.views.comparison.ttl.0, Duration::from_secs(1800));
    assert_eq!(s.memory.max_bytes, 256 * 1024 * 1024);
    assert!(s.admin.token.is_none());
    assert!(s.cors.allowed_origins.is_empty());
}

#[test]
fn environment_overrides_nested_keys_and_lists() {
    let s = Settings::load_from(
        None,
        Some(env(&[
            ("RUNCACHE__REDIS__URL", "redis://10.0.0.5:6380"),
            ("RUNCACHE__VIEWS__METRICS__TTL", "DAY"),
            ("RUNCACHE__VIEWS__COMPARISON__TTL", "120"),
            (
                "RUNCACHE__CORS__ALLOWED_ORIGINS",
                "https://a.example,https://b.example",
            ),
            ("RUNCACHE__WARM__MODEL_RUN_IDS", "7,run-8"),
        ])),
    )
    .expect("overrides load");
    assert_eq!(s.redis.url.expose_secret(), "redis://10.0.0.5:6380");
    assert_eq!(s.views.metrics.ttl.0, Duration::from_secs(86_400));
    assert_eq!(s.views.comparison.ttl.0, Duration::from_secs(120));
    assert_eq!(
        s.cors.allowed_origins,
        ["https://a.example", "https://b.example"]
    );
    assert_eq!(s.warm.model_run_ids, ["7", "run-8"]);
}

#[test]
fn warm_run_ids_are_read_by_the_run_id_parser() {
    let file = std::env::temp_dir().join(format!("runcache-warm-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(
        &file,
        "[warm]\nmodel_run_ids = [42.0, 7, \"42.0\", \"run-8\"]\n",
    )
    .expect("write");
    let s = Settings::load_from(file.to_str(), Some(HashMap::new()));
    std::fs::write(&file, "[warm]\nmodel_run_ids = [1.5]\n").expect("write");
    let bad = Settings::load_from(file.to_str(), Some(HashMap::new()));
    let _ = std::fs::remove_file(&file);
    // A number is its integer, as in a JSON body; a string is itself.
    assert_eq!(
        s.expect("loads").warm.model_run_ids,
        ["42", "7", "42.0", "run-8"]
    );
    let err = bad.expect_err("1.5 is no id");
    assert!(err.to_string().contains("model_run_id"), "{err}");
}

#[test]
fn unknown_environment_key_is_an_error() {
    let err = Settings::load_from(None, Some(env(&[("RUNCACHE__REDIS__URLL", "x")])))
        .expect_err("typo must fail");
    assert!(err.to_string().contains("urll"), "{err}");
}

#[test]
fn bad_ttl_tier_names_the_setting() {
    let err = Settings::load_from(
        None,
        Some(env(&[("RUNCACHE__VIEWS__METRICS__TTL", "LONGG")])),
    )
    .expect_err("bad tier must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("views.metrics.ttl") && msg.contains("LONGG"),
        "{msg}"
    );
}

#[test]
fn bad_values_name_the_setting() {
    for (key, value, name) in [
        ("RUNCACHE__SERVER__ADDR", "nope", "server.addr"),
        ("RUNCACHE__ORIGIN__BASE_URL", "ftp://x", "origin.base_url"),
        ("RUNCACHE__CACHE__PREFIX", "a:b", "cache.prefix"),
        (
            "RUNCACHE__REDIS__COMMAND_TIMEOUT_MS",
            "0",
            "redis.command_timeout_ms",
        ),
        (
            "RUNCACHE__REDIS__COMMAND_TIMEOUT_MS",
            "750",
            "server.peer_timeout_ms",
        ),
        (
            "RUNCACHE__ADMIN__HISTORY_INTERVAL_MS",
            "10",
            "admin.history_interval_ms",
        ),
        (
            "RUNCACHE__ADMIN__HISTORY_SAMPLES",
            "0",
            "admin.history_samples",
        ),
        (
            "RUNCACHE__ADMIN__RECENT_ACTIONS",
            "100000",
            "admin.recent_actions",
        ),
    ] {
        let err =
            Settings::load_from(None, Some(env(&[(key, value)]))).expect_err("bad value must fail");
        assert!(err.to_string().contains(name), "{key}: {err}");
    }
}

#[test]
fn redaction_hides_the_password() {
    assert_eq!(
        redact_url("redis://user:hunter2@host:6379/0"),
        "redis://user:***@host:6379/0"
    );
    assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
    assert_eq!(
        redact_url("https://s3cr3t@origin.internal/api"),
        "https://***@origin.internal/api"
    );
    assert_eq!(
        redact_url("https://origin.internal/api?api_key=s3cr3t"),
        "https://origin.internal/api?***"
    );
}

#[test]
fn stored_headers_refuse_what_must_not_be_replayed() {
    let mut s = Settings::load_from(None, Some(HashMap::new())).expect("defaults load");
    assert!(s.stored_headers().is_ok());
    for refused in [
        "Set-Cookie",
        "Connection",
        "Proxy-Authenticate",
        "ETag",
        "Vary",
        "Authorization",
        "not a name",
    ] {
        s.cache.stored_headers = vec![refused.to_owned()];
        assert!(s.stored_headers().is_err(), "{refused}");
    }
    s.cache.stored_headers = vec!["X-Model-Version".into()];
    assert_eq!(s.stored_headers().expect("ok")[0], "x-model-version");
}

#[test]
fn redis_modes_and_the_event_stream_are_validated() {
    let load = |pairs: &[(&str, &str)]| Settings::load_from(None, Some(env(pairs)));
    let ok = load(&[
        ("RUNCACHE__REDIS__MODE", "sentinel"),
        (
            "RUNCACHE__REDIS__SENTINEL_URLS",
            "redis://a:26379,redis://b:26379",
        ),
        ("RUNCACHE__REDIS__MASTER_NAME", "mymaster"),
        ("RUNCACHE__EVENTS__STREAM", "runcache:events"),
    ])
    .expect("sentinel mode with a stream");
    assert_eq!(ok.redis.sentinel_urls.len(), 2);
    assert_eq!(ok.events.stream.as_deref(), Some("runcache:events"));
    for (pairs, name) in [
        (
            &[("RUNCACHE__REDIS__MODE", "sentinel")][..],
            "redis.sentinel_urls",
        ),
        (
            &[
                ("RUNCACHE__REDIS__MODE", "sentinel"),
                ("RUNCACHE__REDIS__SENTINEL_URLS", "redis://a:26379"),
            ][..],
            "redis.master_name",
        ),
        (
            &[("RUNCACHE__REDIS__SENTINEL_URLS", "http://a:26379")][..],
            "redis.sentinel_urls",
        ),
        (
            &[("RUNCACHE__REDIS__MODE", "cluster")][..],
            "redis.cluster_urls",
        ),
        (&[("RUNCACHE__REDIS__MODE", "replicated")][..], "redis.mode"),
        (&[("RUNCACHE__EVENTS__STREAM", "")][..], "events.stream"),
        (
            &[("RUNCACHE__EVENTS__STREAM_BATCH", "0")][..],
            "events.stream_batch",
        ),
        (
            &[("RUNCACHE__EVENTS__MAX_DELIVERIES", "0")][..],
            "events.max_deliveries",
        ),
        (
            &[("RUNCACHE__EVENTS__MAX_DELIVERIES", "1001")][..],
            "events.max_deliveries",
        ),
    ] {
        let err = load(pairs).expect_err("must fail");
        assert!(err.to_string().contains(name), "{pairs:?}: {err}");
    }
}

#[test]
fn peer_settings_are_validated() {
    for (pairs, name) in [
        (
            vec![("RUNCACHE__PEERS__ALLOWED", "10.0.0.0/33")],
            "peers.allowed",
        ),
        (vec![("RUNCACHE__PEERS__DOWN_MS", "0")], "peers.down_ms"),
        (vec![("RUNCACHE__PEERS__SECRET", "short")], "peers.secret"),
        (
            vec![
                ("RUNCACHE__PEERS__SECRET", "0123456789abcdef"),
                ("RUNCACHE__EVENTS__SECRET", "0123456789abcdef"),
            ],
            "peers.secret",
        ),
        (
            vec![("RUNCACHE__SERVER__ADVERTISE_URL", "http://203.0.113.9:8080")],
            "server.advertise_url",
        ),
        (
            vec![("RUNCACHE__SERVER__ADVERTISE_URL", "http://10.0.0.2:8080/x")],
            "server.advertise_url",
        ),
    ] {
        let err = Settings::load_from(None, Some(env(&pairs))).expect_err("bad value must fail");
        assert!(err.to_string().contains(name), "{pairs:?}: {err}");
    }
    let s = Settings::load_from(
        None,
        Some(env(&[
            (
                "RUNCACHE__PEERS__ALLOWED",
                "runcache-1,runcache-2,10.1.0.0/16",
            ),
            ("RUNCACHE__SERVER__ADVERTISE_URL", "http://runcache-1:8080"),
        ])),
    )
    .expect("names and ranges from the environment");
    assert_eq!(s.peers.allowed.len(), 3);
}

#[test]
fn only_the_shipped_redis_url_in_single_mode_counts_as_no_redis_asked_for() {
    let settings =
        |pairs: &[(&str, &str)]| Settings::load_from(None, Some(env(pairs))).expect("load");
    assert!(
        settings(&[]).redis_left_at_default(),
        "config/default.toml's redis.url"
    );
    let url = "RUNCACHE__REDIS__URL";
    for other in [
        "redis://127.0.0.1:6380",
        "redis://localhost:6379",
        "rediss://127.0.0.1:6379",
    ] {
        assert!(
            !settings(&[(url, other)]).redis_left_at_default(),
            "{other}"
        );
    }
    let cluster = [
        ("RUNCACHE__REDIS__MODE", "cluster"),
        ("RUNCACHE__REDIS__CLUSTER_URLS", "redis://127.0.0.1:7000"),
    ];
    assert!(!settings(&cluster).redis_left_at_default());
}

#[test]
fn the_gateway_and_the_admin_prefix_are_read_and_checked() {
    let s = Settings::load_from(None, Some(HashMap::new())).expect("defaults");
    assert!(!s.gateway.pass_through, "off by default");
    assert!(s.admin_prefix().expect("default prefix").is_empty());
    let s = Settings::load_from(
        None,
        Some(env(&[
            ("RUNCACHE__GATEWAY__PASS_THROUGH", "true"),
            ("RUNCACHE__SERVER__ADMIN_PREFIX", "/_runcache"),
        ])),
    )
    .expect("both from the environment");
    assert!(s.gateway.pass_through);
    assert_eq!(s.admin_prefix().expect("prefix").as_str(), "/_runcache");
    for (key, value, name) in [
        (
            "RUNCACHE__GATEWAY__PASS_THROUGH",
            "maybe",
            "gateway.pass_through",
        ),
        (
            "RUNCACHE__SERVER__ADMIN_PREFIX",
            "_runcache",
            "server.admin_prefix",
        ),
        (
            "RUNCACHE__SERVER__ADMIN_PREFIX",
            "/_runcache/",
            "server.admin_prefix",
        ),
        (
            "RUNCACHE__SERVER__ADMIN_PREFIX",
            "/a//b",
            "server.admin_prefix",
        ),
        (
            "RUNCACHE__SERVER__ADMIN_PREFIX",
            "/a b",
            "server.admin_prefix",
        ),
        (
            "RUNCACHE__SERVER__ADMIN_PREFIX",
            "/a?b",
            "server.admin_prefix",
        ),
    ] {
        let err =
            Settings::load_from(None, Some(env(&[(key, value)]))).expect_err("bad value must fail");
        let line = err.to_string();
        assert!(
            line.contains(name) && !line.contains('\n'),
            "{key}={value}: {line}"
        );
    }
    // A view may take a path runcache gave up, never one under the prefix.
    let path = "RUNCACHE__VIEWS__DATASET_STATS__PATH";
    let err = Settings::load_from(None, Some(env(&[(path, "/cache/{dataset_id}")])))
        .expect_err("runcache's own path");
    assert!(
        err.to_string().contains("views.dataset_stats.path"),
        "{err}"
    );
    let prefix = ("RUNCACHE__SERVER__ADMIN_PREFIX", "/_rc");
    Settings::load_from(None, Some(env(&[(path, "/cache/{dataset_id}"), prefix])))
        .expect("/cache/ is free under a prefix");
    let err = Settings::load_from(None, Some(env(&[(path, "/_rc/x/{dataset_id}"), prefix])))
        .expect_err("under the prefix");
    assert!(
        err.to_string().contains("views.dataset_stats.path"),
        "{err}"
    );
}

#[test]
fn the_mlflow_profile_loads_with_its_views_rules_and_lookup() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mlflow.toml");
    let s = Settings::load_from(Some(path.to_str().expect("path")), Some(HashMap::new()))
        .expect("config/mlflow.toml loads");
    assert!(s.gateway.pass_through);
    assert_eq!(s.server.admin_prefix, "/_runcache");
    let table = s.view_table().expect("views");
    assert!(
        table.by_name("metrics").is_none(),
        "the model views are off"
    );
    for name in [
        "api_runs_search",
        "ajax_runs_search",
        "api_runs_get",
        "graphql",
    ] {
        assert!(table.by_name(name).is_some(), "{name}");
    }
    let rules = s.write_rules().expect("rules");
    for path in [
        "/api/2.0/mlflow/runs/log-batch",
        "/ajax-api/2.0/mlflow/runs/log-metric",
        "/api/2.0/mlflow/runs/create",
        "/api/2.0/mlflow/experiments/delete",
    ] {
        assert!(rules.route(&http::Method::POST, path).is_some(), "{path}");
    }
    // The most specific rule takes a permission write, not the registry's `*`.
    let perm = rules
        .route(
            &http::Method::POST,
            "/api/2.0/mlflow/registered-models/permissions/create",
        )
        .expect("a rule");
    assert_eq!(perm.name, "api_auth_model_perms_post");
    assert_eq!(s.lookups().expect("lookups").names(), ["run_experiment"]);
}
