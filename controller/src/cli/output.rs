//! Presentation helpers shared by commands: JSON, tables, times, progress.

use std::io::IsTerminal;
use std::time::Duration;

use comfy_table::{ContentArrangement, Table, presets::UTF8_BORDERS_ONLY};
use indicatif::{ProgressBar, ProgressStyle};

pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    table
}

/// RFC 3339 UTC text of Unix seconds.
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

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

/// A spinner on an interactive terminal; hidden for pipes, CI logs and --json.
pub fn spinner(enabled: bool) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}
