//! Command-line entry: `serve` (default), `demo`, `sample-origin`, `openapi`.

use std::time::Duration;

use anyhow::{Context, bail};

use crate::config::Settings;
use crate::sample_origin::{self, SampleOriginOptions};
use crate::shutdown::shutdown_signal;
use crate::startup::Application;

const USAGE: &str =
    "usage: runcache [serve | demo | sample-origin [--addr HOST:PORT] [--delay-ms N] | openapi]

  serve          run the cache (default); settings from config/default.toml,
                 $RUNCACHE_CONFIG and RUNCACHE__SECTION__KEY variables
  demo           run the cache and a slow sample origin on origin.base_url
  sample-origin  run only the sample origin (default 127.0.0.1:8000, 300 ms)
  openapi        print the OpenAPI document (YAML) of the configured views";

/// Runs the command named by `args` (without the program name).
pub async fn run(args: Vec<String>) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        None | Some("serve") => serve(false).await,
        Some("demo") => serve(true).await,
        Some("sample-origin") => run_sample_origin(&args[1..]).await,
        Some("openapi") => {
            let settings = load_settings()?;
            let invalid = |e| anyhow::anyhow!("invalid configuration: {e}");
            let table = settings.view_table().map_err(invalid)?;
            let kinds = settings.event_kinds().map_err(invalid)?;
            let rules = settings.write_rules().map_err(invalid)?;
            let prefix = settings.admin_prefix().map_err(invalid)?;
            print!(
                "{}",
                crate::http::openapi_yaml_for(&table, &kinds, &rules, &prefix)
            );
            Ok(())
        }
        Some("-h" | "--help" | "help") => {
            eprintln!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

fn load_settings() -> anyhow::Result<Settings> {
    // Settings decide the log format, so a bad setting is reported before logging exists:
    // one line, naming the setting.
    Settings::load().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
}

async fn serve(with_sample_origin: bool) -> anyhow::Result<()> {
    let settings = load_settings()?;
    crate::telemetry::init(settings.log.format, std::io::stdout);
    if with_sample_origin {
        let url = reqwest::Url::parse(&settings.origin.base_url)?;
        let host = url.host_str().context("origin.base_url has no host")?;
        let addr = format!("{host}:{}", url.port_or_known_default().unwrap_or(80));
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("bind the sample origin on {addr}"))?;
        tracing::info!(%addr, "sample origin listening (300 ms per view)");
        tokio::spawn(sample_origin::serve(
            listener,
            SampleOriginOptions::default(),
            shutdown_signal(),
        ));
    }
    let app = Application::build(settings).await?;
    app.run_until_stopped(shutdown_signal()).await
}

async fn run_sample_origin(args: &[String]) -> anyhow::Result<()> {
    let mut addr = "127.0.0.1:8000".to_owned();
    let mut opts = SampleOriginOptions::default();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--addr" => addr = value.clone(),
            "--delay-ms" => {
                opts.delay = Duration::from_millis(value.parse().context("--delay-ms")?)
            }
            other => bail!("unknown flag {other:?}\n{USAGE}"),
        }
    }
    crate::telemetry::init(crate::config::LogFormat::Pretty, std::io::stdout);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("bind {addr}"))?;
    tracing::info!(%addr, delay_ms = opts.delay.as_millis() as u64, "sample origin listening");
    sample_origin::serve(listener, opts, shutdown_signal()).await?;
    Ok(())
}
