//! Safe edges, checked against the real binary in a fresh directory: metrics exported from the
//! first second (parsed by the Prometheus client library's own text parser), and a first start
//! that logs no error.

use std::io::Write;
use std::process::{Command, Stdio};

use runcache::metrics::names;

use crate::helpers::{Binary, TOKEN, TestOrigin};

/// Parses `text` with `prometheus_client`'s parser (PyPI; `.ci/run` installs it) and returns
/// `name{labels}` of every sample, one per line, sorted.
fn parse_exposition(text: &str) -> Vec<String> {
    const SCRIPT: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out.append(f"{s.name}{{{labels}}}")
print("\n".join(sorted(out)))
"#;
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (the exposition is checked with its prometheus_client parser)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "the Prometheus parser refused the exposition (is prometheus_client installed? \
         `python3 -m pip install prometheus-client`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn every_metric_family_is_exported_at_zero_before_any_traffic() {
    let origin = TestOrigin::start().await;
    let bin = Binary::start(&origin.url, &[]).await;
    let text = reqwest::get(bin.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let samples = parse_exposition(&text);
    let has = |sample: &str| samples.iter().any(|s| s == sample);

    for family in names::ALL {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing before any traffic:\n{text}"
        );
    }
    let views = ["metrics", "feature_importance", "comparison"];
    for view in views {
        for result in ["hit", "miss", "bypass", "stale", "error"] {
            let s = format!("runcache_view_requests_total{{result=\"{result}\",view=\"{view}\"}}");
            assert!(has(&s), "{s} missing");
            let s = format!(
                "runcache_view_request_duration_seconds_count{{result=\"{result}\",view=\"{view}\"}}"
            );
            assert!(has(&s), "{s} missing");
        }
        for outcome in ["ok", "error"] {
            let s =
                format!("runcache_origin_requests_total{{outcome=\"{outcome}\",view=\"{view}\"}}");
            assert!(has(&s), "{s} missing");
        }
        for result in ["unchanged", "changed", "gone", "refused", "error"] {
            let s = format!("runcache_refreshes_total{{result=\"{result}\",view=\"{view}\"}}");
            assert!(has(&s), "{s} missing");
        }
        let s = format!("runcache_coalesced_total{{view=\"{view}\"}}");
        assert!(has(&s), "{s} missing");
    }
    for cause in [
        "event",
        "run_deleted",
        "admin",
        "pattern",
        "version",
        "refresh",
        "peer",
    ] {
        for family in [
            "runcache_invalidations_total",
            "runcache_entries_deleted_total",
        ] {
            let s = format!("{family}{{cause=\"{cause}\"}}");
            assert!(has(&s), "{s} missing");
        }
    }
    for s in [
        "runcache_store_operations_total{tier=\"redis\"}",
        "runcache_store_operations_total{tier=\"memory\"}",
        "runcache_store_errors_total{tier=\"redis\"}",
        "runcache_memory_removals_total{cause=\"size\"}",
        "runcache_memory_removals_total{cause=\"expired\"}",
        "runcache_cache_sets_total{}",
        "runcache_redis_up{}",
        "runcache_circuit_open{}",
        "runcache_memory_bytes{}",
    ] {
        assert!(has(s), "{s} missing");
    }
}

#[tokio::test]
async fn a_first_start_in_a_fresh_directory_logs_no_error() {
    let origin = TestOrigin::start().await;
    // The default journal path, data/journal.log, in a directory without data/.
    let mut bin = Binary::start(&origin.url, &[]).await;
    let client = reqwest::Client::new();
    let view = client
        .get(bin.url("/api/v1/models/train/7/metrics"))
        .send()
        .await
        .expect("view");
    assert_eq!(view.status(), 200);
    // Redis is down: the invalidation goes to the journal, which needs data/.
    let inv = client
        .post(bin.url("/cache/invalidate"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"model_run_id": "7"}))
        .send()
        .await
        .expect("invalidate");
    assert_eq!(inv.status(), 200);
    bin.stop().await;
    assert!(
        bin.dir.join("data/journal.log").exists(),
        "the journal was not written"
    );
    let logs = bin.output();
    assert!(logs.contains("runcache listening"), "{logs}");
    assert!(
        !logs.contains("ERROR"),
        "a first start logged an error:\n{logs}"
    );
}

/// `docker compose config` (or the older `docker-compose`), which parses and interpolates the
/// file without a Docker engine, with `token` as the admin token (`None`: unset).
fn compose_config(token: Option<&str>) -> std::process::Output {
    let dir = env!("CARGO_MANIFEST_DIR");
    let with_plugin = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    let mut cmd = if with_plugin {
        let mut c = Command::new("docker");
        c.arg("compose");
        c
    } else {
        Command::new("docker-compose")
    };
    cmd.current_dir(dir)
        .args(["-f", "docker-compose.yml", "config"])
        .env_remove("RUNCACHE_ADMIN_TOKEN");
    if let Some(t) = token {
        cmd.env("RUNCACHE_ADMIN_TOKEN", t);
    }
    cmd.output()
        .expect("docker compose or docker-compose (`apt-get install -y docker-compose`)")
}

#[test]
fn the_compose_file_ships_no_admin_token() {
    let refused = compose_config(None);
    assert!(
        !refused.status.success(),
        "compose accepted the file without RUNCACHE_ADMIN_TOKEN"
    );
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("set RUNCACHE_ADMIN_TOKEN"), "{why}");

    let accepted = compose_config(Some("a-token-of-my-own"));
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    let config = String::from_utf8_lossy(&accepted.stdout);
    assert!(config.contains("a-token-of-my-own"), "{config}");
    assert!(!config.contains("change-me"), "{config}");
}
