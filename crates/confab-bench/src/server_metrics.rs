//! The server's own view of a scenario: `/metrics` is scraped before and
//! after, and the growth of every histogram (count, mean) and counter is
//! kept. Comparing the server's mean request time with the client's tells
//! how much of a latency was spent queueing outside the handler.

use std::collections::BTreeMap;

use serde::Serialize;

/// Metric series → value, as exposed (`name{labels}`).
pub type Scrape = BTreeMap<String, f64>;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HistogramDelta {
    pub count: f64,
    pub mean: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct MetricsDelta {
    /// Histograms that observed something during the window: series (without
    /// the `_sum`/`_count` suffix) → count and mean (milliseconds for confab's
    /// `_ms` histograms).
    pub histograms: BTreeMap<String, HistogramDelta>,
    /// Counters (`_total`) that grew.
    pub counters: BTreeMap<String, f64>,
    /// Gauges as they were at the end (in-flight requests, active streams).
    pub gauges_at_end: BTreeMap<String, f64>,
}

pub async fn scrape(client: &reqwest::Client, base: &str) -> Option<Scrape> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(parse(&text))
}

pub fn parse(text: &str) -> Scrape {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// `name{labels}` with `suffix` cut from the name: `a_count{x}` → (`a`, `{x}`).
fn strip_suffix<'a>(series: &'a str, suffix: &str) -> Option<(&'a str, &'a str)> {
    let (name, labels) = match series.find('{') {
        Some(i) => series.split_at(i),
        None => (series, ""),
    };
    name.strip_suffix(suffix).map(|stem| (stem, labels))
}

pub fn delta(before: &Scrape, after: &Scrape) -> MetricsDelta {
    let grown = |series: &str| {
        after.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0)
    };
    let mut out = MetricsDelta::default();
    for series in after.keys() {
        if let Some((stem, labels)) = strip_suffix(series, "_count") {
            let count = grown(series);
            if count > 0.0 {
                let sum_series = format!("{stem}_sum{labels}");
                out.histograms.insert(
                    format!("{stem}{labels}"),
                    HistogramDelta {
                        count,
                        mean: grown(&sum_series) / count,
                    },
                );
            }
        } else if series.contains("_total") {
            let d = grown(series);
            if d > 0.0 {
                out.counters.insert(series.clone(), d);
            }
        } else if !series.contains("_sum") && !series.contains("_bucket") {
            out.gauges_at_end.insert(series.clone(), after[series]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_and_counter_growth() {
        let before = parse(
            "# HELP x\nreq_ms_sum{route=\"/chat\"} 10.0\nreq_ms_count{route=\"/chat\"} 2\nreq_total 5\nactive 1\n",
        );
        let after = parse(
            "req_ms_sum{route=\"/chat\"} 40.0\nreq_ms_count{route=\"/chat\"} 5\nreq_ms_bucket{le=\"5\"} 3\nreq_total 9\nactive 3\n",
        );
        let d = delta(&before, &after);
        assert_eq!(
            d.histograms["req_ms{route=\"/chat\"}"],
            HistogramDelta {
                count: 3.0,
                mean: 10.0
            }
        );
        assert_eq!(d.counters["req_total"], 4.0);
        assert_eq!(d.gauges_at_end["active"], 3.0);
        assert!(!d.gauges_at_end.contains_key("req_ms_bucket{le=\"5\"}"));
    }
}
