//! Text that came from another host (an agent, a container, the PBX) made
//! safe to show: on a terminal, in the daemon's log, in a webhook body. Root
//! on an IM host chooses container names, versions, error text and log
//! lines; printed raw, an escape sequence retitles, clears or recolours the
//! operator's terminal (OSC 52 even writes the clipboard), a newline forges
//! a log line, a bidirectional override makes text read other than it is.
//! [`printable`] is the one way such text is shown.

use std::borrow::Cow;
use std::fmt::Write;

/// How long one value from a host may be where nothing else says.
pub const DEFAULT_MAX_CHARS: usize = 512;

/// Whether `c` would act on a terminal, reorder text, or show as nothing:
/// controls (C0, DEL, C1), format characters and the other default-
/// ignorable code points (zero-width, direction marks and overrides,
/// invisible operators, variation selectors, tags, fillers).
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00ad}'                       // soft hyphen
            | '\u{034f}'                     // combining grapheme joiner
            | '\u{0600}'..='\u{0605}' | '\u{061c}' | '\u{06dd}' | '\u{070f}' | '\u{08e2}'
            | '\u{115f}' | '\u{1160}' | '\u{3164}' | '\u{ffa0}' // Hangul fillers
            | '\u{17b4}' | '\u{17b5}'
            | '\u{180b}'..='\u{180f}'       // Mongolian selectors
            | '\u{200b}'..='\u{200f}'       // zero-width and direction marks
            | '\u{2028}'..='\u{202e}'       // separators, embeddings, overrides
            | '\u{2060}'..='\u{206f}'       // invisible operators, isolates
            | '\u{fe00}'..='\u{fe0f}'       // variation selectors
            | '\u{feff}'                     // zero-width no-break space
            | '\u{fff0}'..='\u{fffb}'       // interlinear annotations
            | '\u{110bd}' | '\u{110cd}'
            | '\u{13430}'..='\u{1343f}'
            | '\u{1bca0}'..='\u{1bca3}'
            | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0000}'..='\u{e0fff}') // tags, variation selectors supplement
}

/// `text` with every control or reordering character escaped (`\n`, `\t`,
/// `\x1b`, `\u{202e}`) and cut to at most `max_chars` characters as shown,
/// escapes included (a cut is marked with `…`, one more). Borrowed when
/// nothing needed changing.
pub fn printable(text: &str, max_chars: usize) -> Cow<'_, str> {
    let long = text.len() > max_chars && text.chars().nth(max_chars).is_some();
    if !long && !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len().min(max_chars * 4) + 4);
    let mut shown = 0;
    let mut escape = String::new();
    for c in text.chars() {
        escape.clear();
        match c {
            '\n' => escape.push_str("\\n"),
            '\r' => escape.push_str("\\r"),
            '\t' => escape.push_str("\\t"),
            c if (c as u32) < 0x100 && is_unsafe(c) => {
                let _ = write!(escape, "\\x{:02x}", c as u32);
            }
            c if is_unsafe(c) => {
                let _ = write!(escape, "\\u{{{:x}}}", c as u32);
            }
            c => escape.push(c),
        }
        let width = escape.chars().count();
        if shown + width > max_chars {
            out.push('…');
            break;
        }
        shown += width;
        out.push_str(&escape);
    }
    Cow::Owned(out)
}

/// [`printable`] for multi-line text of our own making that quotes other
/// hosts' words (an error chain, say): each line made safe on its own, the
/// line breaks kept.
pub fn printable_lines(text: &str, max_chars_per_line: usize) -> String {
    text.split('\n')
        .map(|line| printable(line, max_chars_per_line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `value` as JSON (indented when `pretty`) that carries no character
/// [`is_unsafe`] raw in a string: serde_json escapes only C0 controls, so
/// DEL, C1 and the reordering and invisible characters are written as
/// `\uXXXX` here. (Outside strings JSON is ASCII, with line breaks when
/// indented, so every such character at or above DEL is in a string.)
pub fn json<T: serde::Serialize + ?Sized>(value: &T, pretty: bool) -> serde_json::Result<String> {
    let raw = if pretty {
        serde_json::to_string_pretty(value)?
    } else {
        serde_json::to_string(value)?
    };
    let escaped = |c: char| c >= '\u{7f}' && is_unsafe(c);
    if !raw.chars().any(escaped) {
        return Ok(raw);
    }
    let mut out = String::with_capacity(raw.len() + 16);
    for c in raw.chars() {
        if escaped(c) {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        for plain in ["", "portsip.instantmessage", "Grüße – 日本語 ✓", "a b"] {
            assert!(matches!(printable(plain, 100), Cow::Borrowed(s) if s == plain));
        }
    }

    #[test]
    fn terminal_controls_and_reordering_are_escaped() {
        let hostile = "\x1b]0;pwned\x07\x1b[2J\x1b]52;c;ZXZpbA==\x07ok\nFAKE LOG LINE\r\u{9b}31m\u{202e}txt.exe\u{2028}";
        for hidden in [
            '\u{ad}',
            '\u{180e}',
            '\u{206a}',
            '\u{fe0f}',
            '\u{e0041}',
            '\u{3164}',
        ] {
            assert!(is_unsafe(hidden), "{hidden:?}");
        }
        let shown = printable(hostile, 1000);
        assert!(!shown.chars().any(is_unsafe), "{shown}");
        assert_eq!(
            shown,
            "\\x1b]0;pwned\\x07\\x1b[2J\\x1b]52;c;ZXZpbA==\\x07ok\\nFAKE LOG LINE\\r\\x9b31m\\u{202e}txt.exe\\u{2028}"
        );
        assert_eq!(printable("\u{7f}\t", 10), "\\x7f\\t");
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary() {
        assert_eq!(printable("abcdef", 3), "abc…");
        assert_eq!(printable("ééééé", 2), "éé…");
        assert_eq!(printable("abc", 3), "abc");
        // Escapes count as long as they are shown.
        assert_eq!(printable("\x1b\x1b\x1b\x1b", 9), "\\x1b\\x1b…");
        assert_eq!(
            printable("\x1b".repeat(100).as_str(), 64).chars().count(),
            65
        );
        let huge = "x".repeat(1 << 20);
        assert_eq!(printable(&huge, DEFAULT_MAX_CHARS).chars().count(), 513);
    }

    #[test]
    fn lines_keep_their_breaks_and_lose_their_escapes() {
        assert_eq!(
            printable_lines("error: agent said\n  \x1b[31mred\x1b[0m", 100),
            "error: agent said\n  \\x1b[31mred\\x1b[0m"
        );
    }

    #[test]
    fn json_carries_no_unsafe_character_and_reads_back_the_same() {
        let value = serde_json::json!({
            "version": "1.0\u{9b}31m\u{202e}\u{7f}\x1b\u{e0041}",
            "plain": "Grüße",
        });
        for pretty in [false, true] {
            let text = json(&value, pretty).unwrap();
            assert!(!text.chars().any(|c| c != '\n' && is_unsafe(c)), "{text}");
            assert!(text.contains("Grüße") && text.contains("\\u009b"), "{text}");
            let back: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(back, value);
        }
    }
}
