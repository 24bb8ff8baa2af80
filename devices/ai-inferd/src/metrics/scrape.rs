//! Reading the endpoint's text: a [`Scrape`] holds every sample of one answer
//! ([`super::fetch`]) by metric name and labels, for `ai-inferd top` and the tests.

use std::collections::BTreeMap;

use thiserror::Error;

/// Why a scrape could not be understood.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScrapeError {
    /// A sample line is not `name{labels} value`.
    #[error("metrics line {line}: cannot parse {text:?}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// The line (shortened).
        text: String,
    },
}

/// Labels of one series, sorted by name.
pub type Labels = Vec<(String, String)>;

/// One scrape: every sample by metric name and labels.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scrape {
    samples: BTreeMap<String, Vec<(Labels, f64)>>,
}

fn parse_labels(text: &str) -> Option<Labels> {
    let mut labels = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((name.trim().to_owned(), value));
        rest = after[end + 1..].trim_start_matches(',').trim_start();
    }
    labels.sort();
    Some(labels)
}

fn parse_line(line: &str) -> Option<(String, Labels, f64)> {
    let (series, value) = line.trim_end().rsplit_once(' ')?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
        None => (series, Vec::new()),
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return None;
    }
    Some((name.to_owned(), labels, value))
}

impl Scrape {
    /// Parses the text exposition format (comments and blank lines skipped).
    pub fn parse(text: &str) -> Result<Scrape, ScrapeError> {
        let mut scrape = Scrape::default();
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, labels, value) = parse_line(line).ok_or_else(|| ScrapeError::Parse {
                line: index + 1,
                text: line.chars().take(80).collect(),
            })?;
            scrape
                .samples
                .entry(name)
                .or_default()
                .push((labels, value));
        }
        Ok(scrape)
    }

    /// The value of `name` whose labels include every pair of `want`.
    pub fn get(&self, name: &str, want: &[(&str, &str)]) -> Option<f64> {
        self.samples.get(name)?.iter().find_map(|(labels, v)| {
            let all = want
                .iter()
                .all(|(k, w)| labels.iter().any(|(lk, lv)| lk == k && lv == w));
            all.then_some(*v)
        })
    }

    /// Every sample of `name`.
    pub fn series(&self, name: &str) -> &[(Labels, f64)] {
        self.samples.get(name).map_or(&[], Vec::as_slice)
    }

    /// The values of label `label` across the samples of `name`, in order.
    pub fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (labels, _) in self.series(name) {
            if let Some((_, v)) = labels.iter().find(|(k, _)| k == label) {
                if !out.contains(v) {
                    out.push(v.clone());
                }
            }
        }
        out
    }

    /// Cumulative buckets `(le, count)` of histogram `name` for one label pair.
    pub fn buckets(&self, name: &str, key: (&str, &str)) -> Vec<(f64, f64)> {
        let mut out: Vec<(f64, f64)> = self
            .series(&format!("{name}_bucket"))
            .iter()
            .filter(|(labels, _)| labels.iter().any(|(k, v)| k == key.0 && v == key.1))
            .filter_map(|(labels, count)| {
                let le = labels.iter().find(|(k, _)| k == "le")?;
                let le = match le.1.as_str() {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().ok()?,
                };
                Some((le, *count))
            })
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}
