//! Prometheus metrics: what a daemon exports on `GET /metrics`, and the one small
//! HTTP server that serves it (in `metrics/http.rs`), shared by netd, stord and
//! vmm-shim.
//!
//! Theory of operation. A daemon implements [`Source`]: at scrape time it reads
//! the counters it already keeps (atomics, or the same snapshots its control API
//! answers with) and writes them as metric families through [`Out`], which encodes
//! them in the Prometheus text exposition format (version 0.0.4) with the
//! `prometheus-client` crate. Nothing is kept between scrapes and nothing is added
//! to a data path but the relaxed atomic adds of a [`Histogram`].
//!
//! Names: a counter is named without its `_total` suffix, which the encoder adds
//! (`netd_port_rx_frames` is exposed as `netd_port_rx_frames_total`); a histogram
//! gets `_bucket`, `_sum` and `_count`. Each call of [`Out`] writes one whole family,
//! so every family's samples stay together as the format requires.
//!
//! The server ([`serve`]) is bounded, so a scraper cannot hurt the daemon: at most
//! [`MAX_CONNECTIONS`] connections at once (more are answered 503 and closed), a
//! request head of at most [`MAX_REQUEST`] bytes (431), [`READ_TIMEOUT`] for the
//! whole head (slowloris: 408), [`WRITE_TIMEOUT`] for the answer; only
//! `GET`/`HEAD /metrics` is served (404 for other paths, 405 for other methods);
//! one request per connection. Its threads are its own: a scrape never runs on a
//! data path's thread. Its refusals are exported too (`PREFIX_scrape_refused_total`
//! by `reason`).

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::toml_file::InvalidKey;

mod http;

pub use http::{serve, Server, MAX_CONNECTIONS, MAX_REQUEST, READ_TIMEOUT, WRITE_TIMEOUT};

/// The labels of one sample: `(name, value)` pairs.
pub type Labels = Vec<(&'static str, String)>;

/// What a daemon exports: called on the server's thread at every scrape.
pub trait Source: Send + Sync + 'static {
    /// Writes every metric family.
    fn collect(&self, out: &mut Out<'_>) -> fmt::Result;
}

/// Writes metric families in the text format (see the module doc for names).
pub struct Out<'a> {
    enc: DescriptorEncoder<'a>,
}

impl Out<'_> {
    /// A counter family (`name` without `_total`).
    pub fn counter(&mut self, name: &str, help: &str, samples: &[(Labels, u64)]) -> fmt::Result {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (l, v) in samples {
            m.encode_family(l)?
                .encode_counter::<NoLabelSet, u64, u64>(v, None)?;
        }
        Ok(())
    }

    /// A gauge family.
    pub fn gauge(&mut self, name: &str, help: &str, samples: &[(Labels, i64)]) -> fmt::Result {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (l, v) in samples {
            m.encode_family(l)?.encode_gauge(v)?;
        }
        Ok(())
    }

    /// A histogram family.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        samples: &[(Labels, HistogramSnapshot)],
    ) -> fmt::Result {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (l, h) in samples {
            m.encode_family(l)?
                .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
        }
        Ok(())
    }
}

/// Upper bounds of the [`Histogram`] buckets, in seconds: 10 µs to 10 s.
pub const LATENCY_BOUNDS: [f64; 19] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram over [`LATENCY_BOUNDS`], recorded with relaxed atomic adds
/// only (a data path may record into it; a scrape reads it without a lock, so a
/// scrape racing a record may see the count and the buckets one apart).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is above every bound.
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    /// Sum of the observations, nanoseconds.
    sum_ns: AtomicU64,
}

/// A [`Histogram`] as the encoder takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Sum of the observations, seconds.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
    /// `(upper bound, observations in that bucket)`, not cumulative, ending at +Inf.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    /// Records one observation.
    pub fn record(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Reads it.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = Vec::with_capacity(self.buckets.len());
        let mut count = 0u64;
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            count = count.saturating_add(n);
            let bound = LATENCY_BOUNDS.get(i).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, n));
        }
        HistogramSnapshot {
            sum: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            count,
            buckets,
        }
    }
}

/// Checks a config's `metrics` value: an `ADDR:PORT` to listen on
/// (`127.0.0.1:9102`, `[::1]:9102`). `path` and `key` name it in the error.
pub fn parse_addr(value: &str, path: &str, key: &str) -> Result<SocketAddr, InvalidKey> {
    value.parse().map_err(|_| {
        InvalidKey::new(
            path,
            key,
            format!(
                "an address and port to serve metrics on, e.g. \"127.0.0.1:9102\" (got {value:?})"
            ),
        )
    })
}

/// The `metrics` key of a daemon's config file `path`: `None` when absent (metrics
/// off), else its address, checked by [`parse_addr`].
pub fn config_addr(
    value: Option<&str>,
    path: &std::path::Path,
) -> Result<Option<SocketAddr>, InvalidKey> {
    let p = path.display().to_string();
    value.map(|m| parse_addr(m, &p, "metrics")).transpose()
}

/// Encodes `src` as the server answers a scrape (for tests and callers that want the
/// text without the server).
pub fn render(src: std::sync::Arc<dyn Source>) -> String {
    http::render(src)
}

#[cfg(test)]
mod tests;
