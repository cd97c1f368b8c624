use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use super::*;

struct Fixed;

impl Source for Fixed {
    fn collect(&self, out: &mut Out<'_>) -> fmt::Result {
        out.counter(
            "t_frames",
            "Frames",
            &[
                (vec![("port", "a".to_string())], 3),
                (vec![("port", "b\"q".to_string())], 4),
            ],
        )?;
        out.gauge("t_open", "Open", &[(Labels::new(), -2)])?;
        let h = Histogram::default();
        h.record(Duration::from_micros(5));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60));
        out.histogram(
            "t_latency_seconds",
            "Latency",
            &[(vec![("cmd", "read".to_string())], h.snapshot())],
        )
    }
}

#[test]
fn encodes_the_text_format() {
    let t = render(Arc::new(Fixed));
    assert!(t.contains("# TYPE t_frames_total counter\n"), "{t}");
    assert!(t.contains("t_frames_total{port=\"a\"} 3\n"), "{t}");
    assert!(t.contains("t_frames_total{port=\"b\\\"q\"} 4\n"), "{t}");
    assert!(t.contains("# TYPE t_open gauge\nt_open -2\n"), "{t}");
    assert!(
        t.contains("t_latency_seconds_bucket{cmd=\"read\",le=\"1e-05\"} 1\n"),
        "{t}"
    );
    assert!(
        t.contains("t_latency_seconds_bucket{cmd=\"read\",le=\"0.005\"} 2\n"),
        "{t}"
    );
    assert!(
        t.contains("t_latency_seconds_bucket{cmd=\"read\",le=\"10\"} 2\n"),
        "{t}"
    );
    assert!(
        t.contains("t_latency_seconds_bucket{cmd=\"read\",le=\"+Inf\"} 3\n"),
        "{t}"
    );
    assert!(
        t.contains("t_latency_seconds_count{cmd=\"read\"} 3\n"),
        "{t}"
    );
}

#[test]
fn histogram_buckets_by_bound() {
    let h = Histogram::default();
    h.record(Duration::from_micros(10));
    h.record(Duration::from_micros(11));
    h.record(Duration::from_secs(11));
    let s = h.snapshot();
    assert_eq!(s.count, 3);
    assert_eq!(s.buckets[0], (0.000_01, 1));
    assert_eq!(s.buckets[1], (0.000_025, 1));
    assert_eq!(s.buckets.last(), Some(&(f64::INFINITY, 1)));
    assert!((s.sum - 11.000_021).abs() < 1e-9, "{}", s.sum);
}

#[test]
fn parse_addr_names_the_key() {
    assert_eq!(
        parse_addr("127.0.0.1:9102", "f.toml", "metrics").unwrap(),
        "127.0.0.1:9102".parse().unwrap()
    );
    let e = parse_addr("localhost", "f.toml", "metrics").unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("f.toml") && m.contains("`metrics`") && m.contains("localhost"),
        "{m}"
    );
}

fn ask(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// How many of `conns` the server holds open without an answer (a refused one has
/// its 503, or its reset, waiting).
fn held(conns: &[TcpStream]) -> usize {
    let mut buf = [0u8; 1];
    conns
        .iter()
        .filter(|s| {
            s.set_nonblocking(true).unwrap();
            let r = s.peek(&mut buf);
            s.set_nonblocking(false).unwrap();
            matches!(r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count()
}

#[test]
fn server_answers_and_refuses() {
    let srv = serve("127.0.0.1:0".parse().unwrap(), "t", Arc::new(Fixed)).unwrap();
    let a = srv.local_addr();
    let ok = ask(a, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(ok.contains("t_frames_total{port=\"a\"} 3"), "{ok}");
    assert!(ask(a, b"GET /other HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(ask(a, b"PUT /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    huge.resize(MAX_REQUEST + 100, b'a');
    let r = {
        let mut s = TcpStream::connect(a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The server may close before taking it all: a write error is fine.
        let _ = s.write_all(&huge);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    // Fill every slot with idle connections: the next one is refused at once. A
    // thread of an earlier connection may not have ended yet when the idle ones come
    // (it ends after its client has read the answer), so some of them may be refused
    // instead: those are replaced until MAX_CONNECTIONS are held. A probe accepted
    // after them is refused exactly when all of them are held, and they are never
    // more than MAX_CONNECTIONS.
    let mut idle: Vec<TcpStream> = Vec::new();
    let mut refused = false;
    let mut seen = Vec::new();
    for _ in 0..100 {
        idle.retain(|s| held(std::slice::from_ref(s)) == 1);
        while idle.len() < MAX_CONNECTIONS {
            idle.push(TcpStream::connect(a).unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
        if held(&idle) < MAX_CONNECTIONS {
            continue;
        }
        let r = ask(a, b"GET /metrics HTTP/1.1\r\n\r\n");
        let held = held(&idle);
        assert!(held <= MAX_CONNECTIONS, "{held} connections served at once");
        if r.starts_with("HTTP/1.1 503") && held == MAX_CONNECTIONS {
            refused = true;
            break;
        }
        seen.push(r.lines().next().unwrap_or("(nothing)").to_string());
    }
    assert!(
        refused,
        "a connection over the cap was served: {} idle held, answers {seen:?}",
        held(&idle)
    );
    drop(idle);
    // Slots come back once the idle ones are gone.
    let mut served = false;
    for _ in 0..100 {
        if ask(a, b"GET /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(served);
    let t = ask(a, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert!(
        t.contains("t_scrape_refused_total{reason=\"too_large\"} 1"),
        "{t}"
    );
    assert!(
        t.contains("t_scrape_refused_total{reason=\"not_found\"} 1"),
        "{t}"
    );
    assert!(
        !t.contains("t_scrape_refused_total{reason=\"too_many_connections\"} 0"),
        "{t}"
    );
}
