//! Human-readable output of the CLI client: aligned tables and confirmation lines.
//!
//! The CLI asks the daemon over the control socket (`fabric_api::Client`) and
//! gets JSON back. With `--json` it prints that JSON unchanged (scripts depend on
//! its shape); otherwise it renders it here. The renderers read the JSON values
//! rather than the daemon's Rust types so that the table is exactly a view of what
//! `--json` shows, and so that a field a newer daemon adds or an older one lacks
//! shows as "-" instead of failing the whole command.

use serde_json::Value;

pub mod net;

/// Column alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Text.
    Left,
    /// Numbers.
    Right,
}

/// An aligned text table: a header row and data rows, columns separated by two
/// spaces, the last column unpadded (no trailing blanks).
#[derive(Debug, Clone)]
pub struct Table {
    cols: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(cols: &[(&'static str, Align)]) -> Self {
        Table {
            cols: cols.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (missing cells show as "-", extra cells are dropped).
    pub fn row(&mut self, mut cells: Vec<String>) {
        cells.resize(self.cols.len(), "-".into());
        self.rows.push(cells);
    }

    /// The table as text, one line per row, each ending in '\n'.
    pub fn render(&self) -> String {
        let mut width: Vec<usize> = self.cols.iter().map(|(h, _)| h.chars().count()).collect();
        for r in &self.rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let header: Vec<String> = self.cols.iter().map(|(h, _)| h.to_string()).collect();
        let mut out = String::new();
        for r in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, ((_, align), w))) in
                r.iter().zip(self.cols.iter().zip(&width)).enumerate()
            {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = w.saturating_sub(cell.chars().count());
                match align {
                    Align::Left => {
                        line.push_str(cell);
                        line.push_str(&" ".repeat(pad));
                    }
                    Align::Right => {
                        line.push_str(&" ".repeat(pad));
                        line.push_str(cell);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A field as display text: strings as-is, numbers and booleans printed, null or
/// absent as "-".
fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(x)) => x.clone(),
        Some(Value::Bool(b)) => if *b { "yes" } else { "no" }.into(),
        Some(other) => other.to_string(),
    }
}

fn u(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn rows(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// A table of left-aligned text columns, given as (header, JSON key), one row
/// per element of the array `v`.
fn text_table(v: &Value, cols: &[(&'static str, &str)]) -> String {
    let heads: Vec<(&'static str, Align)> = cols.iter().map(|&(h, _)| (h, Align::Left)).collect();
    let mut t = Table::new(&heads);
    for r in rows(v) {
        t.row(cols.iter().map(|&(_, k)| s(r, k)).collect());
    }
    t.render()
}

/// A byte count in binary units: "512 B", "1.5 KiB", "3.0 GiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut x = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for next in &UNITS[1..] {
        if x < 1024.0 {
            break;
        }
        x /= 1024.0;
        unit = next;
    }
    format!("{x:.1} {unit}")
}

/// A duration in seconds, short: "45s", "3m07s", "2h05m", "3d04h".
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// `netd net list`.
pub fn net_list(v: &Value) -> String {
    use Align::*;
    let mut t = Table::new(&[
        ("NAME", Left),
        ("MODE", Left),
        ("SUBNET", Left),
        ("GATEWAY", Left),
        ("DHCP", Left),
        ("PORTS", Right),
        ("MTU", Right),
        ("UPLINK", Left),
        ("SOURCE", Left),
    ]);
    let mut notes = String::new();
    for n in rows(v) {
        let conflict = n.get("conflict").and_then(Value::as_str);
        let mut source = s(n, "source");
        if let Some(c) = conflict {
            source.push('!');
            notes.push_str(&format!("{}: {c}\n", s(n, "name")));
        }
        t.row(vec![
            s(n, "name"),
            s(n, "mode"),
            s(n, "subnet"),
            s(n, "gateway"),
            s(n, "dhcp"),
            s(n, "ports"),
            s(n, "mtu"),
            s(n, "host_ifname"),
            source,
        ]);
    }
    let mut out = t.render();
    if !notes.is_empty() {
        // The config file and the runtime state disagree: say how, under the table.
        out.push_str("\nconflicts (SOURCE marked !):\n");
        out.push_str(&notes);
    }
    out
}

/// `netd reservation list NET`.
pub fn reservations(v: &Value) -> String {
    text_table(
        v,
        &[
            ("MAC", "mac"),
            ("IP", "ip"),
            ("HOSTNAME", "hostname"),
            ("SOURCE", "source"),
        ],
    )
}

/// The drop reasons of a port's counters, in the order the table shows them, as
/// (column header, JSON key).
const DROPS: [(&str, &str); 17] = [
    ("MALFORMED", "drop_malformed"),
    ("TOO-BIG", "drop_mtu"),
    ("FULL", "drop_full"),
    ("DOWN", "drop_down"),
    ("IO", "drop_io"),
    ("HAIRPIN", "drop_hairpin"),
    ("OFFLOAD", "drop_offload"),
    ("GSO", "drop_gso"),
    ("SPOOFED-MAC", "drop_spoofed_mac"),
    ("SPOOFED-IP", "drop_spoofed_ip"),
    ("SPOOFED-ARP", "drop_spoofed_arp"),
    ("SPOOFED-DHCP", "drop_spoofed_dhcp"),
    ("MAC-LIMIT", "drop_mac_limit"),
    ("SPOOFED-IP6", "drop_spoofed_ip6"),
    ("ROGUE-ROUTER", "drop_rogue_router"),
    ("SPOOFED-ND", "drop_spoofed_nd"),
    ("ND-LIMIT", "drop_nd_limit"),
];

/// `netd port list NET`: one row per port with its traffic and its total drops, or
/// with `by_reason` one column per drop reason instead of the total.
pub fn port_list(v: &Value, by_reason: bool) -> String {
    use Align::*;
    let mut cols = vec![
        ("NAME", Left),
        ("KIND", Left),
        ("IFNAME", Left),
        ("MAC", Left),
        ("MTU", Right),
        ("RX-FRAMES", Right),
        ("RX-BYTES", Right),
        ("TX-FRAMES", Right),
        ("TX-BYTES", Right),
    ];
    if by_reason {
        // With the drops, the guard they come from.
        cols.push(("GUARD", Left));
        cols.extend(DROPS.iter().map(|(h, _)| (*h, Right)));
    } else {
        cols.push(("DROPS", Right));
    }
    let mut t = Table::new(&cols);
    for p in rows(v) {
        let c = p.get("counters").unwrap_or(&Value::Null);
        // A stream port has a socket path where a TAP port has an interface.
        let ifname = match (p.get("ifname"), p.get("path")) {
            (Some(Value::String(i)), _) => i.clone(),
            (_, Some(Value::String(path))) => path.clone(),
            _ => "-".into(),
        };
        let mut row = vec![
            s(p, "name"),
            s(p, "kind"),
            ifname,
            s(p, "mac"),
            s(p, "mtu"),
            u(c, "rx_frames").to_string(),
            bytes(u(c, "rx_bytes")),
            u(c, "tx_frames").to_string(),
            bytes(u(c, "tx_bytes")),
        ];
        if by_reason {
            row.push(s(p, "guard"));
            row.extend(DROPS.iter().map(|(_, k)| u(c, k).to_string()));
        } else {
            let total: u64 = DROPS.iter().map(|(_, k)| u(c, k)).sum();
            row.push(total.to_string());
        }
        t.row(row);
    }
    t.render()
}

/// `netd mac NET`.
pub fn mac_table(v: &Value) -> String {
    use Align::*;
    let mut t = Table::new(&[
        ("MAC", Left),
        ("PORT", Left),
        ("REMOTE", Left),
        ("AGE", Right),
    ]);
    for e in rows(v) {
        let remote = e["remote"].as_str().unwrap_or("-").to_string();
        t.row(vec![
            s(e, "mac"),
            s(e, "port"),
            remote,
            duration(u(e, "age_secs")),
        ]);
    }
    t.render()
}

/// `netd vxlan show NET PORT`: settings and flood list, then the tunnel counters.
pub fn vxlan(v: &Value) -> String {
    let opt = |k: &str| match &v[k] {
        Value::Null => "-".to_string(),
        Value::String(x) => x.clone(),
        x => x.to_string(),
    };
    let remotes: Vec<String> = rows(&v["remotes"])
        .iter()
        .filter_map(|r| r.as_str().map(str::to_string))
        .collect();
    let mut out = format!(
        "vni {}  local {}  port {}  group {}  learning {}  accept_any {}\nremotes: {}\n",
        opt("vni"),
        opt("local"),
        opt("port"),
        opt("group"),
        opt("learning"),
        opt("accept_any"),
        if remotes.is_empty() {
            "-".to_string()
        } else {
            remotes.join(" ")
        }
    );
    out.push_str(&counters(&v["counters"]));
    out
}

/// `netd leases NET`; `now` is the Unix time leases' expiry is shown against.
pub fn leases(v: &Value, now: u64) -> String {
    use Align::*;
    let mut t = Table::new(&[
        ("MAC", Left),
        ("IP", Left),
        ("EXPIRES", Left),
        ("HOSTNAME", Left),
    ]);
    for l in rows(v) {
        let exp = u(l, "expires");
        let expires = if exp > now {
            format!("in {}", duration(exp - now))
        } else {
            "expired".into()
        };
        t.row(vec![s(l, "mac"), s(l, "ip"), expires, s(l, "hostname")]);
    }
    t.render()
}

/// `netd forward list NET`.
pub fn forwards(v: &Value) -> String {
    text_table(
        v,
        &[("PROTO", "proto"), ("HOST", "host"), ("GUEST", "guest")],
    )
}

/// `netd flows NET`.
pub fn flows(v: &Value) -> String {
    use Align::*;
    let mut t = Table::new(&[
        ("PROTO", Left),
        ("GUEST", Left),
        ("DST", Left),
        ("HOST-PEER", Left),
        ("STATE", Left),
        ("FORWARD", Left),
        ("IDLE", Right),
    ]);
    for f in rows(v) {
        t.row(vec![
            s(f, "proto"),
            s(f, "guest"),
            s(f, "dst"),
            s(f, "host_peer"),
            s(f, "state"),
            s(f, "forward"),
            duration(u(f, "idle_s")),
        ]);
    }
    t.render()
}

/// `netd outbound NET list`: host_loopback, then one row per list entry.
pub fn outbound(v: &Value) -> String {
    use Align::*;
    let mut out = format!(
        "host_loopback: {}\n",
        v.get("host_loopback")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    );
    let mut t = Table::new(&[("LIST", Left), ("CIDR", Left)]);
    for list in ["allow", "deny"] {
        for c in v.get(list).and_then(Value::as_array).into_iter().flatten() {
            t.row(vec![list.into(), c.as_str().unwrap_or("?").into()]);
        }
    }
    out.push_str(&t.render());
    out
}

/// `netd dns NET`: the names the network's DNS answers.
pub fn dns_names(v: &Value) -> String {
    text_table(v, &[("NAME", "name"), ("IP", "ip"), ("SOURCE", "source")])
}

/// `netd flows NET --stats`, `netd leases NET --stats`: one "name  value" line
/// per counter.
pub fn counters(v: &Value) -> String {
    use Align::*;
    let mut t = Table::new(&[("COUNTER", Left), ("VALUE", Right)]);
    if let Some(o) = v.as_object() {
        for (k, x) in o {
            t.row(vec![k.clone(), x.to_string()]);
        }
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table_aligns_columns_and_trims_the_last() {
        let mut t = Table::new(&[
            ("A", Align::Left),
            ("NUM", Align::Right),
            ("Z", Align::Left),
        ]);
        t.row(vec!["long-name".into(), "7".into(), "x".into()]);
        t.row(vec!["b".into(), "12345".into()]);
        assert_eq!(
            t.render(),
            "A            NUM  Z\nlong-name      7  x\nb          12345  -\n"
        );
    }

    #[test]
    fn units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(duration(45), "45s");
        assert_eq!(duration(187), "3m07s");
        assert_eq!(duration(7500), "2h05m");
        assert_eq!(duration(3 * 86400 + 4 * 3600), "3d04h");
    }

    #[test]
    fn net_list_shows_absent_fields_as_dash() {
        let v = json!([{"name":"lan","mode":"internal","subnet":null,"gateway":null,
            "dhcp":false,"mtu":1500,"ports":2,"host_ifname":null}]);
        let out = net_list(&v);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("NAME  MODE"), "{out}");
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cells,
            ["lan", "internal", "-", "-", "no", "2", "1500", "-", "-"]
        );
    }

    #[test]
    fn net_list_marks_conflicts_and_explains_them_below() {
        let v = json!([{"name":"lab","mode":"nat","subnet":"10.0.2.0/24","gateway":"10.0.2.2",
            "dhcp":true,"mtu":1500,"ports":3,"host_ifname":null,"source":"config",
            "conflict":"a network \"lab\" was added through the API"},
            {"name":"b","mode":"internal","dhcp":false,"mtu":1500,"ports":1,"source":"api"}]);
        let out = net_list(&v);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].ends_with("SOURCE"), "{out}");
        assert!(lines[1].ends_with("config!"), "{out}");
        assert!(lines[2].ends_with("api"), "{out}");
        assert!(
            out.contains("lab: a network \"lab\" was added through the API"),
            "{out}"
        );
        let r = reservations(&json!([{"mac":"52:54:00:00:00:01","ip":"10.0.2.50",
            "hostname":null,"source":"api"}]));
        let cells: Vec<&str> = r.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(cells, ["52:54:00:00:00:01", "10.0.2.50", "-", "api"]);
    }

    #[test]
    fn port_list_totals_drops_or_splits_them() {
        let v = json!([{"name":"a","kind":"tap","mtu":1500,"ifname":"tap0","netns":null,
            "path":null,"mac":null,"guard":"clean","counters":{"rx_frames":3,"rx_bytes":2048,
            "tx_frames":1,"tx_bytes":60,"drop_malformed":1,"drop_mtu":2,"drop_full":0,
            "drop_down":0,"drop_io":0,"drop_hairpin":4,"drop_offload":0,"drop_gso":10,
            "drop_spoofed_mac":5,"drop_spoofed_ip":6,"drop_spoofed_arp":7,"drop_spoofed_dhcp":8,
            "drop_mac_limit":9}},
            {"name":"s","kind":"stream","mtu":1500,"ifname":null,"path":"/run/x.sock",
            "counters":{}}]);
        let out = port_list(&v, false);
        let a: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            a,
            ["a", "tap", "tap0", "-", "1500", "3", "2.0", "KiB", "1", "60", "B", "52"]
        );
        assert!(out.lines().nth(2).unwrap().contains("/run/x.sock"), "{out}");
        let out = port_list(&v, true);
        assert!(
            out.lines().next().unwrap().ends_with(
                "SPOOFED-DHCP  MAC-LIMIT  SPOOFED-IP6  ROGUE-ROUTER  SPOOFED-ND  ND-LIMIT"
            ),
            "{out}"
        );
        let a: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            &a[a.len() - 18..],
            [
                "clean", "1", "2", "0", "0", "0", "4", "0", "10", "5", "6", "7", "8", "9", "0",
                "0", "0", "0"
            ]
        );
    }

    #[test]
    fn leases_show_time_left() {
        let v = json!([{"mac":"02:00:00:00:0a:01","ip":"10.0.0.5","expires":1100,"hostname":"vm1"},
            {"mac":"02:00:00:00:0a:02","ip":"10.0.0.6","expires":900}]);
        let out = leases(&v, 1000);
        assert!(out.contains("in 1m40s"), "{out}");
        assert!(out.contains("expired"), "{out}");
        assert!(out.lines().nth(2).unwrap().ends_with('-'), "{out}");
    }
}
