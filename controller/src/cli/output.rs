//! Presentation helpers shared by commands: JSON, tables, times, progress.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use imfleet_controller::progress::{Progress as ProgressEvent, ProgressSink};

use comfy_table::{ContentArrangement, presets::UTF8_BORDERS_ONLY};
use indicatif::{ProgressBar, ProgressStyle};

/// `value` as indented JSON on stdout, no raw unsafe character in it (see
/// `imfleet_controller::text::json`).
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", imfleet_controller::text::json(value, true)?);
    Ok(())
}

/// Per host, `{"host", "ok": true, key: value}` or `{"host", "ok": false,
/// "error"}`: what a fleet-wide command prints with `--json`.
pub fn host_results_json<T: serde::Serialize>(
    results: &[imfleet_controller::fleet::HostResult<T>],
    key: &str,
) -> Vec<serde_json::Value> {
    results
        .iter()
        .map(|r| match &r.result {
            Ok(value) => serde_json::json!({"host": r.host.name, "ok": true, key: value}),
            Err(e) => serde_json::json!({
                "host": r.host.name,
                "ok": false,
                "error": imfleet_controller::error_chain(e),
            }),
        })
        .collect()
}

/// Success only when every host succeeded.
pub fn exit_for<T>(results: &[imfleet_controller::fleet::HostResult<T>]) -> ExitCode {
    if results.iter().all(|r| r.result.is_ok()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Each failed host's error on stderr, then [`exit_for`].
pub fn host_errors<T>(results: &[imfleet_controller::fleet::HostResult<T>]) -> ExitCode {
    for r in results {
        if let Err(e) = &r.result {
            let error = imfleet_controller::error_chain(e);
            eprintln!("{}: {}", r.host.name, shown(&error, 4096));
        }
    }
    exit_for(results)
}

/// `value` as one line of JSON, no raw unsafe character in it.
pub fn json_line<T: serde::Serialize>(value: &T) -> serde_json::Result<String> {
    imfleet_controller::text::json(value, false)
}

pub fn table(header: &[&str]) -> Table {
    let mut table = comfy_table::Table::new();
    table
        .load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    Table(table)
}

/// Longest cell shown; longer text from a host is cut.
const CELL_MAX_CHARS: usize = 512;

/// A table for the terminal whose every cell is made printable: cells hold
/// what hosts reported (names, versions, errors), which may carry terminal
/// controls. Line breaks stay: a cell may span lines.
pub struct Table(comfy_table::Table);

impl Table {
    pub fn add_row<S: AsRef<str>>(&mut self, cells: Vec<S>) {
        self.0.add_row(
            cells
                .iter()
                .map(|c| imfleet_controller::text::printable_lines(c.as_ref(), CELL_MAX_CHARS))
                .collect::<Vec<_>>(),
        );
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Text from a host, safe for the terminal (see `imfleet_controller::text`).
pub fn shown(text: &str, max_chars: usize) -> String {
    imfleet_controller::text::printable(text, max_chars).into_owned()
}

pub use imfleet_controller::rfc3339;

/// "in 396 days" / "EXPIRED 3 days ago".
pub fn expiry(unix: i64) -> String {
    let days = (unix - imfleet_controller::now_unix()) / 86_400;
    if days >= 0 {
        format!("{} (in {days} d)", &rfc3339(unix)[..10])
    } else {
        format!("{} (EXPIRED {} d ago)", &rfc3339(unix)[..10], -days)
    }
}

pub fn uptime(seconds: u64) -> String {
    humantime::format_duration(Duration::from_secs(seconds)).to_string()
}

pub fn millis(d: f64) -> String {
    format!("{d:.1} ms")
}

/// A command's progress: library events drawn as a spinner or lines, or
/// with `--json` one JSON object per event on stderr (stdout keeps the result).
pub struct Progress {
    bar: ProgressBar,
    sink: Arc<dyn ProgressSink>,
}

impl Progress {
    pub fn new(json: bool) -> Progress {
        let bar = spinner(!json);
        let sink: Arc<dyn ProgressSink> = if json {
            Arc::new(|event: ProgressEvent| {
                if let Ok(line) = json_line(&event) {
                    eprintln!("{line}");
                }
            })
        } else {
            let bar = bar.clone();
            Arc::new(move |event: ProgressEvent| {
                // The spinner shows what runs now; endings are in the result.
                if !matches!(event, ProgressEvent::PhaseFinished { .. }) {
                    bar.set_message(shown(&event.text(), CELL_MAX_CHARS));
                }
            })
        };
        Progress { bar, sink }
    }

    pub fn sink(&self) -> Arc<dyn ProgressSink> {
        self.sink.clone()
    }

    /// Shows `message` as the current activity (text mode only).
    pub fn message(&self, message: String) {
        self.bar.set_message(shown(&message, CELL_MAX_CHARS));
    }

    /// Prints around the spinner.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Progress: a spinner on an interactive terminal; on a pipe or log, each
/// new phase as one plain line on stderr; nothing with --json.
fn spinner(enabled: bool) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    if !std::io::stderr().is_terminal() {
        let bar = ProgressBar::with_draw_target(
            None,
            indicatif::ProgressDrawTarget::term_like_with_hz(Box::new(PhaseLines::default()), 4),
        );
        bar.set_style(
            ProgressStyle::with_template("{msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        return bar;
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// A "terminal" that prints each distinct progress line once, for logs.
#[derive(Debug, Default)]
struct PhaseLines {
    last: std::sync::Mutex<String>,
}

impl indicatif::TermLike for PhaseLines {
    fn width(&self) -> u16 {
        200
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, line: &str) -> std::io::Result<()> {
        self.write_str(line)
    }
    fn write_str(&self, text: &str) -> std::io::Result<()> {
        let text = text.trim();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if !text.is_empty() && *last != text {
            eprintln!("... {text}");
            *last = text.to_owned();
        }
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}
