//! Tracing subscriber set-up: `RUST_LOG` filter, pretty or JSON lines, to a chosen sink.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

/// Default filter when `RUST_LOG` is unset (audit lines have their own target).
pub const DEFAULT_FILTER: &str = "runcache=info,audit=info,tower_http=info";

/// Installs the global subscriber writing to `sink`, filtered by `RUST_LOG` (default
/// [`DEFAULT_FILTER`]). Later calls are ignored (tests).
pub fn init<W>(format: LogFormat, sink: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    init_with(format, filter, sink);
}

/// Like [`init`], with an explicit filter (tests capture the levels they check).
pub fn init_with<W>(format: LogFormat, filter: EnvFilter, sink: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    // Colour codes only for a terminal, never into files or log collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(sink)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}
