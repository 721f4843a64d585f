//! Log output: level from `log.level` (or `RUST_LOG`); text, JSON lines or
//! native journald entries, chosen by `log.format` (`auto` picks journald
//! when stderr is connected to the journal).

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::{LogFormat, LogSettings};

/// Handle to change the level filter of the running subscriber (SIGHUP).
static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Where log lines go, once `auto` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Text on stderr; `colour` only when stderr is a terminal.
    Text {
        colour: bool,
    },
    Json,
    Journald,
}

/// Resolves `log.format`. `journal_stream` is `$JOURNAL_STREAM`
/// (`<device>:<inode>` of the journal's stream, set by systemd);
/// `stderr_id` is stderr's (device, inode): systemd's own advice is to use
/// the native protocol only when they match, since a service's stderr may
/// have been redirected elsewhere.
pub fn choose(
    format: LogFormat,
    journal_stream: Option<&str>,
    stderr_id: Option<(u64, u64)>,
    terminal: bool,
) -> Output {
    match format {
        LogFormat::Text => Output::Text { colour: terminal },
        LogFormat::Json => Output::Json,
        LogFormat::Journald => Output::Journald,
        LogFormat::Auto => {
            let on_journal = journal_stream
                .and_then(|s| s.split_once(':'))
                .and_then(|(dev, ino)| Some((dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?)))
                .is_some_and(|journal| Some(journal) == stderr_id);
            if on_journal {
                Output::Journald
            } else {
                Output::Text { colour: terminal }
            }
        }
    }
}

/// stderr's (device, inode).
fn stderr_id() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let metadata = std::fs::File::from(fd).metadata().ok()?;
    Some((metadata.dev(), metadata.ino()))
}

fn filter(level: &str) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber. Logs go to stderr (or the journal);
/// stdout is for command output. Returns where they go.
pub fn init(settings: &LogSettings) -> Output {
    let terminal = std::io::stderr().is_terminal();
    let journal_stream = std::env::var("JOURNAL_STREAM").ok();
    let mut output = choose(
        settings.format,
        journal_stream.as_deref(),
        stderr_id(),
        terminal,
    );
    let (level, handle) = reload::Layer::new(filter(&settings.level));
    let mut journald_error = None;
    let layer = match output {
        Output::Journald => match tracing_journald::layer() {
            // Field names as they are (ACCOUNT=, HTTP_STATUS=), without the
            // crate's default `F_` prefix, so `journalctl ACCOUNT=x` reads well.
            Ok(layer) => Some(
                layer
                    .with_field_prefix(None)
                    .with_syslog_identifier("mews-outbox".into())
                    .boxed(),
            ),
            Err(e) => {
                journald_error = Some(e);
                output = Output::Text { colour: terminal };
                None
            }
        },
        Output::Json => Some(
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_writer(std::io::stderr)
                .boxed(),
        ),
        Output::Text { .. } => None,
    };
    let layer = layer.unwrap_or_else(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(terminal)
            .with_writer(std::io::stderr)
            .boxed()
    });
    // A second init (tests) keeps the first subscriber.
    if tracing_subscriber::registry()
        .with(level)
        .with(layer)
        .try_init()
        .is_ok()
    {
        let _ = LEVEL.set(handle);
    }
    if let Some(e) = journald_error {
        tracing::warn!(error = %e, "log.format is journald but the journal cannot be reached; logging text to stderr");
    }
    output
}

/// Applies a new `log.level` (on reload). `RUST_LOG`, when set, still wins.
pub fn set_level(level: &str) {
    if let Some(handle) = LEVEL.get()
        && let Err(e) = handle.reload(filter(level))
    {
        tracing::warn!(error = %e, "cannot change the log level");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_journald_only_when_stderr_is_the_journal_stream() {
        let stderr = Some((25, 4242));
        assert_eq!(
            choose(LogFormat::Auto, Some("25:4242"), stderr, false),
            Output::Journald
        );
        assert_eq!(
            choose(LogFormat::Auto, Some("25:9999"), stderr, false),
            Output::Text { colour: false },
            "stderr was redirected elsewhere"
        );
        assert_eq!(
            choose(LogFormat::Auto, None, stderr, true),
            Output::Text { colour: true }
        );
        assert_eq!(
            choose(LogFormat::Auto, Some("garbage"), stderr, false),
            Output::Text { colour: false }
        );
    }

    #[test]
    fn an_explicit_format_wins() {
        let stderr = Some((25, 4242));
        assert_eq!(
            choose(LogFormat::Json, Some("25:4242"), stderr, true),
            Output::Json
        );
        assert_eq!(
            choose(LogFormat::Text, Some("25:4242"), stderr, false),
            Output::Text { colour: false }
        );
        assert_eq!(
            choose(LogFormat::Journald, None, None, true),
            Output::Journald
        );
    }
}
