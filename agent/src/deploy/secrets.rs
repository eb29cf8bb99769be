//! Secrets on the host: generated once, kept in files with fixed modes,
//! substituted into container settings as `${secret:ID}`, and redacted from
//! everything the agent reports.

use std::collections::HashMap;
use std::io::Read;

/// Generates `length` random alphanumeric characters from the OS RNG.
pub fn generate(length: usize) -> std::io::Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(length);
    let mut urandom = std::fs::File::open("/dev/urandom")?;
    let mut byte = [0u8; 1];
    while out.len() < length {
        urandom.read_exact(&mut byte)?;
        // Rejection sampling keeps the distribution uniform (248 = 62 * 4).
        if byte[0] < 248 {
            out.push(ALPHABET[(byte[0] % 62) as usize] as char);
        }
    }
    Ok(out)
}

/// The value of `key` in `[section]` of an INI text.
pub fn ini_get(text: &str, section: &str, key: &str) -> Option<String> {
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.trim().to_owned();
        } else if current == section
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            let v = v.trim();
            return (!v.is_empty()).then(|| v.to_owned());
        }
    }
    None
}

/// `text` with `key = value` set in `[section]`, other content kept as is.
pub fn ini_set(text: &str, section: &str, key: &str, value: &str) -> String {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut done = false;
    let mut section_seen = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(name) = trimmed.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            if current == section && !done {
                out.push(format!("{key} = {value}"));
                done = true;
            }
            current = name.trim().to_owned();
            section_seen |= current == section;
        } else if current == section
            && trimmed
                .split_once('=')
                .is_some_and(|(k, _)| k.trim() == key)
        {
            if !done {
                out.push(format!("{key} = {value}"));
                done = true;
            }
            continue;
        }
        out.push(line.to_owned());
    }
    if !done {
        if !section_seen {
            if out.last().is_some_and(|l| !l.trim().is_empty()) {
                out.push(String::new());
            }
            out.push(format!("[{section}]"));
        }
        out.push(format!("{key} = {value}"));
    }
    out.join("\n") + "\n"
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("${{secret:{0}}} is referenced but no such secret was given or generated")]
pub struct UnknownSecret(pub String);

/// Replaces every `${secret:ID}` in `text`.
pub fn substitute(text: &str, secrets: &HashMap<String, String>) -> Result<String, UnknownSecret> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${secret:") {
        out.push_str(&rest[..start]);
        let after = &rest[start + "${secret:".len()..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let id = &after[..end];
        let value = secrets
            .get(id)
            .ok_or_else(|| UnknownSecret(id.to_owned()))?;
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The secret values in `actual`, a string made from `template` by
/// [`substitute`]: the literal text between placeholders locates them.
/// Values that cannot be located unambiguously (two placeholders with
/// nothing between them) are skipped; a mismatch yields nothing.
pub fn extract(template: &str, actual: &str) -> Vec<String> {
    // The template as literal, id, literal, id, ..., literal.
    let mut literals = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("${secret:") {
        let after = &rest[start + "${secret:".len()..];
        let Some(end) = after.find('}') else {
            break;
        };
        literals.push(&rest[..start]);
        rest = &after[end + 1..];
    }
    literals.push(rest);
    let Some(tail) = actual.strip_prefix(literals[0]) else {
        return Vec::new();
    };
    let mut values = Vec::new();
    let mut tail = tail;
    for (i, literal) in literals.iter().enumerate().skip(1) {
        let last = i == literals.len() - 1;
        let at = if last {
            match tail.len().checked_sub(literal.len()) {
                Some(at) if tail.ends_with(literal) => at,
                _ => return values,
            }
        } else if literal.is_empty() {
            return values;
        } else {
            match tail.find(literal) {
                Some(at) => at,
                None => return values,
            }
        };
        if at > 0 {
            values.push(tail[..at].to_owned());
        }
        tail = &tail[at + literal.len()..];
    }
    values
}

/// `text` with every secret value replaced by `[redacted]`.
pub fn redact(text: &str, secrets: &HashMap<String, String>) -> String {
    let mut out = text.to_owned();
    let mut values: Vec<&String> = secrets.values().filter(|v| v.len() >= 4).collect();
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    for value in values {
        out = out.replace(value.as_str(), "[redacted]");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extract_finds_what_substitute_put_in() {
        let secrets: HashMap<String, String> =
            [("t".into(), "tok-123".into()), ("p".into(), "pw".into())].into();
        for template in [
            "${secret:t}",
            "im serve -t ${secret:t} -a 10.0.0.2",
            "-t${secret:t}",
            "a ${secret:t} b ${secret:p} c",
            "x=${secret:p}",
        ] {
            let actual = substitute(template, &secrets).unwrap();
            let mut want: Vec<String> = Vec::new();
            if template.contains(":t}") {
                want.push("tok-123".into());
            }
            if template.contains(":p}") {
                want.push("pw".into());
            }
            assert_eq!(extract(template, &actual), want, "{template}");
        }
        assert!(extract("-t ${secret:t} -a", "something else").is_empty());
        assert!(extract("${secret:a}${secret:b}", "ab").is_empty());
        assert!(extract("plain", "plain").is_empty());
    }

    #[test]
    fn generated_secrets_are_alphanumeric_and_differ() {
        let a = generate(20).unwrap();
        let b = generate(20).unwrap();
        assert_eq!(a.len(), 20);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }

    #[test]
    fn ini_round_trip_keeps_other_content() {
        let original =
            "[general]\nname = im\n\n[database]\nhost = 127.0.0.1\nsuperuser_password = old\n";
        assert_eq!(
            ini_get(original, "database", "superuser_password").as_deref(),
            Some("old")
        );
        let updated = ini_set(original, "database", "superuser_password", "new");
        assert_eq!(
            ini_get(&updated, "database", "superuser_password").as_deref(),
            Some("new")
        );
        assert!(updated.contains("name = im") && updated.contains("host = 127.0.0.1"));
        assert_eq!(updated.matches("superuser_password").count(), 1);
        let fresh = ini_set("", "database", "superuser_password", "pw");
        assert_eq!(fresh, "[database]\nsuperuser_password = pw\n");
        let other = ini_set(
            "[general]\nname = im\n",
            "database",
            "superuser_password",
            "pw",
        );
        assert_eq!(
            ini_get(&other, "database", "superuser_password").as_deref(),
            Some("pw")
        );
        assert_eq!(ini_get(&other, "general", "superuser_password"), None);
    }

    #[test]
    fn substitution_and_redaction() {
        let secrets: HashMap<String, String> =
            [("im_token".to_owned(), "tok-123456".to_owned())].into();
        assert_eq!(
            substitute("-t ${secret:im_token} x", &secrets).unwrap(),
            "-t tok-123456 x"
        );
        assert_eq!(substitute("plain", &secrets).unwrap(), "plain");
        assert_eq!(
            substitute("${secret:nope}", &secrets),
            Err(UnknownSecret("nope".into()))
        );
        assert_eq!(
            redact("error: bad token tok-123456", &secrets),
            "error: bad token [redacted]"
        );
    }
}
