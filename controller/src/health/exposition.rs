//! The Prometheus text exposition format (version 0.0.4), written by hand:
//! families are built per scrape from the latest samples, and counters keep
//! node_exporter's names (`node_cpu_seconds_total`), which the classic
//! format states as they are. Names are checked, label values and help
//! texts escaped, so no sample can break the page.

use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One metric family: name, help, type and its samples.
#[derive(Debug, Clone)]
pub struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

impl Family {
    pub fn new(name: &'static str, help: &'static str, kind: Kind) -> Family {
        debug_assert!(valid_name(name), "metric name {name}");
        Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    pub fn gauge(name: &'static str, help: &'static str) -> Family {
        Family::new(name, help, Kind::Gauge)
    }

    pub fn counter(name: &'static str, help: &'static str) -> Family {
        Family::new(name, help, Kind::Counter)
    }

    pub fn push(&mut self, labels: Vec<(&'static str, String)>, value: f64) {
        self.samples.push((labels, value));
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// Metric and label names: `[a-zA-Z_:][a-zA-Z0-9_:]*` (labels without `:`).
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// The page for `families` (empty ones are left out). A label set given
/// twice in a family is one series, the first (a duplicate spoils a page).
pub fn render(families: &[Family]) -> String {
    let mut out = String::new();
    for f in families.iter().filter(|f| !f.is_empty()) {
        let mut seen = std::collections::HashSet::new();
        let kind = match f.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(f.help));
        let _ = writeln!(out, "# TYPE {} {kind}", f.name);
        for (labels, value) in &f.samples {
            let mut series = String::from(f.name);
            if !labels.is_empty() {
                series.push('{');
                for (i, (key, value)) in labels.iter().enumerate() {
                    debug_assert!(valid_name(key) && !key.contains(':'), "label {key}");
                    if i > 0 {
                        series.push(',');
                    }
                    let _ = write!(series, "{key}=\"{}\"", escape_label(value));
                }
                series.push('}');
            }
            if seen.insert(series.clone()) {
                let _ = writeln!(out, "{series} {}", number(*value));
            }
        }
    }
    out
}

fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_with_escaped_labels() {
        let mut cpu = Family::counter(
            "node_cpu_seconds_total",
            "Seconds the CPUs spent in each mode.",
        );
        cpu.push(
            vec![
                ("host", "im1".into()),
                ("cpu", "0".into()),
                ("mode", "idle".into()),
            ],
            12.5,
        );
        let mut odd = Family::gauge("imfleet_im_stat", "A figure with a \\ and\na newline.");
        odd.push(vec![("host", "a\"b\\c\nd".into())], f64::NAN);
        odd.push(vec![("host", "a\"b\\c\nd".into())], 7.0);
        let empty = Family::gauge("imfleet_unused", "never shown");
        let page = render(&[cpu, odd, empty]);
        assert_eq!(
            page,
            "# HELP node_cpu_seconds_total Seconds the CPUs spent in each mode.\n\
             # TYPE node_cpu_seconds_total counter\n\
             node_cpu_seconds_total{host=\"im1\",cpu=\"0\",mode=\"idle\"} 12.5\n\
             # HELP imfleet_im_stat A figure with a \\\\ and\\na newline.\n\
             # TYPE imfleet_im_stat gauge\n\
             imfleet_im_stat{host=\"a\\\"b\\\\c\\nd\"} NaN\n"
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("node_load1") && valid_name("a:b_c") && valid_name("_x"));
        assert!(!valid_name("1abc") && !valid_name("a-b") && !valid_name("") && !valid_name("a b"));
        assert_eq!(number(1e21), "1000000000000000000000");
        assert_eq!(number(f64::INFINITY), "+Inf");
    }
}
