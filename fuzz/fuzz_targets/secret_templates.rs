//! Secret templates, redaction and the INI writer: substituting then
//! extracting must give back what went in, and redaction must hide it.
#![no_main]

use std::collections::HashMap;

use imfleet_agent::deploy::secrets;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\u{0}');
    let template = parts.next().unwrap_or_default();
    let value = parts.next().unwrap_or("s3cret-value");
    let ini = parts.next().unwrap_or_default();
    let values: HashMap<String, String> = [("t".to_owned(), value.to_owned())].into();
    if let Ok(actual) = secrets::substitute(template, &values) {
        let found = secrets::extract(template, &actual);
        let _ = secrets::redact(&actual, &values);
        // Whatever extract finds in a string it can locate was put there.
        if template.matches("${secret:t}").count() == 1
            && !template.contains("${secret:t}${")
            && !value.is_empty()
            && found.len() == 1
        {
            let value = found[0].as_str();
            let redacted = secrets::redact(&actual, &[("x".to_owned(), value.to_owned())].into());
            // Redaction replaces every occurrence; a value made of the
            // marker's own characters can reappear around a marker, which
            // is not a leak.
            if value.len() >= 4 && !value.chars().any(|c| "[redacted]".contains(c)) {
                assert!(!redacted.contains(value), "{redacted:?}");
            }
        }
    }
    let written = secrets::ini_set(ini, "database", "superuser_password", "pw-value");
    assert_eq!(
        secrets::ini_get(&written, "database", "superuser_password").as_deref(),
        Some("pw-value"),
        "{written:?}"
    );
});
