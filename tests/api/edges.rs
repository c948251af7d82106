//! Safe edges, checked against the real binary in a fresh directory: metrics exported from the
//! first second (parsed by the Prometheus client library's own text parser), and a first start
//! that logs no error.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use runcache::metrics::names;

use crate::helpers::{Binary, TOKEN, TestOrigin, wait_for};

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
        "event", "write", "admin", "pattern", "version", "refresh", "peer",
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
    // Redis is down: the invalidation goes to the journal, which needs data/. The harness
    // waited for `/health` only: until its start-up work is done, an instance answers an
    // invalidation 503 ("still starting"), so this waits for the 200.
    wait_for(|| async {
        client
            .post(bin.url("/cache/invalidate"))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({"model_run_id": "7"}))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
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
    compose_config_with(token, &[])
}

/// [`compose_config`] with `profiles` enabled.
fn compose_config_with(token: Option<&str>, profiles: &[&str]) -> std::process::Output {
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
    cmd.current_dir(dir).args(["-f", "docker-compose.yml"]);
    for profile in profiles {
        cmd.args(["--profile", profile]);
    }
    cmd.arg("config")
        .env_remove("RUNCACHE_ADMIN_TOKEN")
        .env_remove("GRAFANA_ADMIN_PASSWORD")
        .env_remove("GRAFANA_ANONYMOUS_VIEWER");
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

/// The `cluster` profile parses: a Redis Cluster formed once, three runcache replicas in
/// cluster mode sharing one token, and a balancer whose configuration file exists.
#[test]
fn the_cluster_profile_runs_three_replicas_behind_a_balancer() {
    assert!(
        !compose_config_with(None, &["cluster"]).status.success(),
        "the cluster profile accepted no admin token"
    );
    let accepted = compose_config_with(Some("a-token-of-my-own"), &["cluster"]);
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    let config = String::from_utf8_lossy(&accepted.stdout);
    for service in [
        "redis-c1:",
        "redis-c2:",
        "redis-c3:",
        "redis-cluster-init:",
        "runcache-a:",
        "runcache-b:",
        "runcache-c:",
        "balancer:",
    ] {
        assert!(config.contains(service), "{service} missing:\n{config}");
    }
    assert_eq!(
        config.matches("RUNCACHE__REDIS__MODE: cluster").count(),
        3,
        "{config}"
    );
    let balancer =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx-cluster.conf");
    let conf = std::fs::read_to_string(&balancer).expect("deploy/nginx-cluster.conf");
    for replica in ["runcache-a:8080", "runcache-b:8080", "runcache-c:8080"] {
        assert!(conf.contains(replica), "{replica} not balanced");
    }
}

/// The `mlflow` profile parses: a real MLflow server, and runcache in front of it on port
/// 5000 with the MLflow profile, its own key prefix in the shared Redis, and no default token.
#[test]
fn the_mlflow_profile_puts_runcache_in_front_of_a_real_mlflow() {
    assert!(
        !compose_config_with(None, &["mlflow"]).status.success(),
        "the mlflow profile accepted no admin token"
    );
    let accepted = compose_config_with(Some("a-token-of-my-own"), &["mlflow"]);
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    let config = String::from_utf8_lossy(&accepted.stdout);
    for needle in [
        "mlflow:",
        "runcache-mlflow:",
        "ghcr.io/mlflow/mlflow:v3.17.2",
        "config/mlflow.toml",
        "http://mlflow:5000",
        "mlflow:5000,localhost:*",
    ] {
        assert!(config.contains(needle), "{needle} missing:\n{config}");
    }
    let profile = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mlflow.toml");
    assert!(
        profile.exists(),
        "the image copies config/, which holds the profile"
    );
}

/// The `observability` profile parses: Prometheus and Grafana on the loopback interface only,
/// their configuration files in place, and no Grafana password in the file (its start refuses
/// an empty one, since compose would refuse every profile if the file required it).
#[test]
fn the_observability_profile_adds_prometheus_and_grafana_on_loopback() {
    let accepted = compose_config_with(Some("a-token-of-my-own"), &["observability"]);
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    let config = String::from_utf8_lossy(&accepted.stdout);
    for needle in [
        "prometheus:",
        "grafana:",
        "prom/prometheus:v",
        "grafana/grafana:11.",
        // The entrypoint that refuses to start Grafana without a password.
        "GRAFANA_ADMIN_PASSWORD",
        "/run.sh",
    ] {
        assert!(config.contains(needle), "{needle} missing:\n{config}");
    }
    // `docker-compose` 1.x prints `127.0.0.1:9090:9090`, the plugin a long form.
    for port in [9090, 3000] {
        let short = config.contains(&format!("127.0.0.1:{port}:{port}"));
        let long = config.contains("host_ip: 127.0.0.1")
            && (config.contains(&format!("published: \"{port}\""))
                || config.contains(&format!("published: {port}")));
        assert!(
            short || long,
            "port {port} not on 127.0.0.1 only:\n{config}"
        );
    }
    let value = |key: &str| {
        config
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(|v| v.trim().trim_matches(['"', '\'']).to_owned())
            .unwrap_or_else(|| panic!("{key} missing:\n{config}"))
    };
    assert_eq!(value("GF_AUTH_ANONYMOUS_ENABLED:"), "false");
    assert_eq!(
        value("GF_SECURITY_ADMIN_PASSWORD:"),
        "",
        "a Grafana password is committed"
    );

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |path: &str| {
        std::fs::read_to_string(dir.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    for (mounted, target) in [
        (
            "deploy/prometheus/prometheus.yml",
            "/etc/prometheus/prometheus.yml",
        ),
        ("deploy/grafana/provisioning", "/etc/grafana/provisioning"),
        (
            "deploy/grafana/runcache.json",
            "/etc/grafana/dashboards/runcache.json",
        ),
    ] {
        assert!(dir.join(mounted).exists(), "{mounted} missing");
        let source = dir.join(mounted).display().to_string();
        assert!(
            config.contains(&source) && config.contains(target),
            "{mounted} not mounted on {target}:\n{config}"
        );
    }
    assert!(read("deploy/prometheus/prometheus.yml").contains("\"runcache:8080\""));
    let source = read("deploy/grafana/provisioning/datasources/prometheus.yml");
    assert!(source.contains("uid: prometheus"), "{source}");
    assert!(source.contains("url: http://prometheus:9090"), "{source}");
    let provider = read("deploy/grafana/provisioning/dashboards/runcache.yml");
    assert!(
        provider.contains("path: /etc/grafana/dashboards"),
        "{provider}"
    );
}

/// A slowloris: 200 connections that trickle a request head one byte every 200 ms, for far
/// longer than `server.header_read_timeout_ms` (2 s here). Each is closed by the server while
/// it is still trickling, and normal requests are served meanwhile. The time until the last
/// one was closed, and the p99 of the normal requests, are printed (not asserted).
#[tokio::test]
async fn a_slowloris_is_closed_after_the_header_time_out_while_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const TRICKLERS: usize = 200;
    let app = crate::helpers::spawn_app_with(None, |s| {
        s.server.header_read_timeout_ms = 2_000;
        s.auth.frontend = "none".into();
    })
    .await;
    assert_eq!(app.metrics("1").await.status(), 200);
    let addr = app.url("").trim_start_matches("http://").to_owned();
    let started = std::time::Instant::now();
    let mut tricklers = Vec::new();
    for _ in 0..TRICKLERS {
        let addr = addr.clone();
        tricklers.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect");
            let head = b"GET /api/v1/models/train/1/metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ";
            // 100 bytes at 200 ms each: 20 s of trickling, ten times the time-out.
            for byte in head
                .iter()
                .copied()
                .chain(std::iter::repeat(b'a'))
                .take(100)
            {
                if s.write_all(&[byte]).await.is_err() {
                    return Some(started.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                // The server closing shows as EOF (or a reset) on a read that does not wait.
                let mut buf = [0u8; 512];
                match tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
                    _ => {}
                }
            }
            None
        }));
    }
    let mut latencies = Vec::new();
    let client = reqwest::Client::new();
    let normal_until = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < normal_until {
        let t = std::time::Instant::now();
        let resp = client
            .get(app.url("/api/v1/models/train/1/metrics"))
            .send()
            .await
            .expect("a normal request during the slowloris");
        assert_eq!(resp.status(), 200);
        latencies.push(t.elapsed());
    }
    let mut closed = Vec::new();
    for t in tricklers {
        closed.push(
            t.await
                .expect("trickler")
                .expect("a trickling connection was still open after 20 s"),
        );
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    let last = closed.iter().max().expect("closed");
    println!(
        "slowloris: {TRICKLERS} connections closed by {last:?} (header time-out 2 s); \
         {} normal requests meanwhile, p50 {:?}, p99 {p99:?}",
        latencies.len(),
        latencies[latencies.len() / 2]
    );
}

/// `server.max_connections` bounds open connections: past it, a new one waits in the backlog
/// until one closes (it is not refused, as with nginx's `worker_connections`).
#[tokio::test]
async fn connections_past_the_bound_wait_until_one_closes() {
    let app = crate::helpers::spawn_app_with(None, |s| {
        s.server.max_connections = 1;
    })
    .await;
    let addr = app.url("").trim_start_matches("http://").to_owned();
    let holder = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    // Accepted, and holding the only slot, once the server has taken it from the backlog.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = reqwest::Client::new();
    let waiting = tokio::spawn({
        let url = app.url("/health");
        async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a second connection was served past the bound"
    );
    drop(holder);
    let status = waiting
        .await
        .expect("task")
        .expect("served once the slot is free");
    assert_eq!(status, 200);
}
