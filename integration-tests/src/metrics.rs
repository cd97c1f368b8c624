//! Scraping the daemons' `/metrics` as Prometheus would, and reading it back with
//! parsers nobody here wrote: `promtool check metrics` (Prometheus's own linter) and
//! python3-prometheus-client's `text_string_to_metric_families`. Also the hostile
//! scrapers every daemon's metrics server must refuse (a huge request, a slowloris,
//! a flood of connections).

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Debian's python3, which has python3-prometheus-client (a `python3` earlier on
/// `PATH`, e.g. a pyenv shim, may not).
const PYTHON: &str = "/usr/bin/python3";

/// One sample, as the Python parser read it.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The sample's name (with `_total`, `_bucket`, ... as exposed).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// Runs `argv` after `prefix` (e.g. `ip netns exec NS`).
fn command(prefix: &[&str], argv: &[&str]) -> Command {
    let all: Vec<&str> = prefix.iter().chain(argv).copied().collect();
    let mut c = Command::new(all[0]);
    c.args(&all[1..]);
    c
}

/// `GET http://ADDR/metrics` with curl (run after `prefix`); fails unless 200.
pub fn scrape(prefix: &[&str], addr: &str) -> Result<String> {
    let url = format!("http://{addr}/metrics");
    let out = command(prefix, &["curl", "-sS", "--fail", "--max-time", "20", &url])
        .output()
        .context("run curl")?;
    if !out.status.success() {
        bail!("curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn with_stdin(cmd: &mut Command, input: &str) -> Result<std::process::Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    Ok(child.wait_with_output()?)
}

/// `promtool check metrics` on `text`: fails on any error or lint problem.
pub fn promtool_check(text: &str) -> Result<()> {
    let out = with_stdin(Command::new("promtool").args(["check", "metrics"]), text)?;
    if !out.status.success() {
        bail!(
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

/// Parses `text` with python3-prometheus-client and checks it with promtool.
pub fn parse(text: &str) -> Result<Vec<Sample>> {
    promtool_check(text)?;
    let out = with_stdin(Command::new(PYTHON).args(["-c", PARSE]), text)?;
    if !out.status.success() {
        bail!(
            "prometheus_client parser refused the text: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("parser output")?;
    let mut samples = Vec::new();
    for s in v.as_array().context("a list")? {
        let labels = s["labels"]
            .as_object()
            .context("labels")?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
            .collect();
        samples.push(Sample {
            name: s["name"].as_str().context("name")?.to_string(),
            labels,
            value: s["value"].as_f64().context("value")?,
        });
    }
    Ok(samples)
}

/// Scrapes and parses (see [`scrape`], [`parse`]).
pub fn scrape_parsed(prefix: &[&str], addr: &str) -> Result<Vec<Sample>> {
    parse(&scrape(prefix, addr)?)
}

/// The value of the one sample named `name` whose labels include `labels`.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let hits: Vec<f64> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .collect();
    match hits.as_slice() {
        [v] => Some(*v),
        _ => None,
    }
}

/// [`value`], or a panic naming what is missing.
pub fn get(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    value(samples, name, labels).unwrap_or_else(|| {
        let same: Vec<&BTreeMap<String, String>> = samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| &s.labels)
            .collect();
        panic!("no single sample {name} {labels:?}; with that name: {same:?}")
    })
}

const HOSTILE: &str = r#"
import json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
def first_line(s, timeout):
    s.settimeout(timeout)
    data = b""
    try:
        while b"\r\n" not in data:
            b = s.recv(4096)
            if not b:
                break
            data += b
    except OSError as e:
        return "error: %s" % e
    return data.split(b"\r\n")[0].decode("latin-1")
def conn():
    return socket.create_connection((host, port), timeout=10)
res = {}
# A request head far over the bound.
s = conn()
try:
    s.sendall(b"GET /metrics HTTP/1.1\r\nX-Junk: " + b"a" * 200000 + b"\r\n\r\n")
    s.shutdown(socket.SHUT_WR)
except OSError as e:
    pass
res["huge"] = first_line(s, 10)
s.close()
# A slowloris: half a request, then a byte now and then.
slow = conn()
slow.sendall(b"GET /metrics HTTP/1.1\r\n")
t0 = time.time()
# Meanwhile an honest scrape is answered.
h = conn(); h.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
res["honest_during_slowloris"] = first_line(h, 10)
h.close()
slow.settimeout(30)
data = b""
try:
    while True:
        time.sleep(0.5)
        try:
            slow.send(b"X")
        except OSError:
            pass
        slow.setblocking(False)
        try:
            b = slow.recv(4096)
            if not b:
                break
            data += b
            if b"\r\n" in data:
                break
        except BlockingIOError:
            pass
        slow.setblocking(True)
        if time.time() - t0 > 30:
            break
except OSError as e:
    data += ("error: %s" % e).encode()
res["slowloris"] = data.split(b"\r\n")[0].decode("latin-1")
res["slowloris_s"] = time.time() - t0
slow.close()
# A flood of idle connections: the ones over the bound are refused at once.
# (The first ones accepted time out after 5 s and free their slots; on a loaded
# machine that can come before a late connection, so the refusals are looked for
# among the flood's own connections.)
flood = [conn() for _ in range(64)]
refused = 0
for c in flood[16:]:
    if " 503 " in first_line(c, 10):
        refused += 1
res["flood_refused"] = refused
res["flood"] = "HTTP/1.1 503 Service Unavailable" if refused > 0 else "no 503"
for c in flood:
    c.close()
# Once they are gone, scrapes are served again.
ok = ""
for _ in range(50):
    c = conn(); c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    ok = first_line(c, 10); c.close()
    if " 200 " in ok:
        break
    time.sleep(0.2)
res["after"] = ok
print(json.dumps(res))
"#;

/// Attacks the metrics server at `host`:`port` (from after `prefix`) with a huge
/// request, a slowloris and a connection flood; asserts each is refused (431, 408,
/// 503), that an honest scrape is answered meanwhile and after, and returns the
/// daemon's `PREFIX_scrape_refused_total` samples parsed afterwards.
pub fn assert_hostile_scrapers_refused(prefix: &[&str], host: &str, port: u16) -> Vec<Sample> {
    let out = command(prefix, &[PYTHON, "-c", HOSTILE, host, &port.to_string()])
        .output()
        .expect("run the hostile scraper");
    assert!(
        out.status.success(),
        "hostile scraper failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("scraper output");
    let line = |k: &str| r[k].as_str().unwrap_or_default().to_string();
    assert!(line("huge").contains(" 431 "), "huge request: {r}");
    assert!(line("slowloris").contains(" 408 "), "slowloris: {r}");
    let secs = r["slowloris_s"].as_f64().unwrap_or(99.0);
    assert!((4.0..15.0).contains(&secs), "slowloris held {secs} s: {r}");
    assert!(line("honest_during_slowloris").contains(" 200 "), "{r}");
    assert!(line("flood").contains(" 503 "), "connection flood: {r}");
    assert!(line("after").contains(" 200 "), "after the attacks: {r}");
    scrape_parsed(prefix, &format!("{host}:{port}")).expect("scrape after the attacks")
}

/// The metric names that the queries of `configs/grafana-fabric.json` use and that
/// start with `prefix` (e.g. `netd_`); checks on the way that the dashboard is a
/// Grafana dashboard whose every query goes to its Prometheus datasource variable.
pub fn dashboard_metrics(prefix: &str) -> Vec<String> {
    let path = crate::workspace_root().join("configs/grafana-fabric.json");
    let text = std::fs::read_to_string(&path).expect("read the dashboard");
    let d: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(
        d["schemaVersion"].as_u64().is_some() && d["uid"].is_string(),
        "not a dashboard"
    );
    let vars = d["templating"]["list"].as_array().expect("templating");
    assert!(
        vars.iter().any(|v| v["type"] == "datasource"
            && v["name"] == "datasource"
            && v["query"] == "prometheus"),
        "no Prometheus datasource variable"
    );
    let mut exprs = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {}",
            p["title"]
        );
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "panel {}",
                p["title"]
            );
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    for v in vars {
        if let Some(q) = v["definition"].as_str() {
            exprs.push(q.to_string());
        }
    }
    let mut names: Vec<String> = exprs
        .iter()
        .flat_map(|e| e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|w| w.starts_with(prefix))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Asserts that every metric the dashboard uses with `prefix` is among `samples`.
pub fn assert_dashboard_covered(samples: &[Sample], prefix: &str) {
    let names = dashboard_metrics(prefix);
    assert!(!names.is_empty(), "the dashboard shows nothing of {prefix}");
    for n in names {
        assert!(
            samples.iter().any(|s| s.name == n),
            "the dashboard queries {n}, which the daemon does not export"
        );
    }
}
