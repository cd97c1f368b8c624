//! The durability promise under crashes: a writer (libnbd, two connections of
//! one multi-conn client) gets FUA writes and flushes acknowledged while stord is
//! SIGKILLed at random moments; after each restart every acknowledged block
//! reads back exactly.
//!
//! Limit of what this proves: SIGKILL of the daemon keeps the host's page cache,
//! so it checks that stord acknowledges only what it has written (and orders
//! flushes correctly across connections), not the fdatasync itself reaching the
//! platter; a host power cut cannot be simulated here.

mod stord_common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use integration_tests::require_root;
use stord_common::{dynamic, python, spawn_python, Stord};

const PER_ROUND: u64 = 4096;

const WRITER: &str = r#"
import struct, sys, nbd
uri, rnd, first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
a = nbd.NBD(); a.connect_uri(uri)
b = nbd.NBD(); b.connect_uri(uri)
assert a.can_multi_conn() and a.can_fua()
for i in range(int(sys.argv[4])):
    block = first + i
    data = struct.pack(">QQQ", 0xC0FFEE, rnd, block) * (4096 // 24) + b"\0" * (4096 % 24)
    if i % 2 == 0:
        b.pwrite(data, block * 4096, nbd.CMD_FLAG_FUA)   # FUA write
    else:
        a.pwrite(data, block * 4096)                     # plain write on one connection
        b.flush()                                        # flush on the other covers it
    print(block, flush=True)
"#;

const VERIFY: &str = r#"
import struct, sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
bad = []
for line in open(sys.argv[2]):
    rnd, block = map(int, line.split())
    want = struct.pack(">QQQ", 0xC0FFEE, rnd, block) * (4096 // 24) + b"\0" * (4096 % 24)
    if h.pread(4096, block * 4096) != want:
        bad.append((rnd, block))
print("checked", sum(1 for _ in open(sys.argv[2])), "bad", bad[:10])
assert not bad
"#;

#[test]
fn acknowledged_writes_survive_sigkill() {
    require_root();
    let mut s = Stord::start(&[dynamic("d", "64MiB")]).unwrap();
    let acked_file = s.dir.path().join("acked.txt");
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut killed_mid_write = 0;
    for round in 0..4u64 {
        let first = round * PER_ROUND;
        let args = [
            s.uri("d"),
            round.to_string(),
            first.to_string(),
            PER_ROUND.to_string(),
        ];
        let mut w = spawn_python(s.dir.path(), WRITER, &args, Stdio::null()).unwrap();
        let stdout = w.child().stdout.take().unwrap();
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut blocks = Vec::new();
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(b) = l.trim().parse::<u64>() {
                    if blocks.is_empty() {
                        let _ = first_tx.send(());
                    }
                    blocks.push(b);
                }
            }
            blocks
        });
        // Once the writer is going (first acknowledgement), kill at a random
        // point while it is busy.
        first_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the writer got its first acknowledgement");
        std::thread::sleep(Duration::from_millis(rand() % 300));
        s.kill();
        let st = w
            .wait_timeout(Duration::from_secs(20))
            .expect("writer ends once stord is gone");
        if !st.success() {
            killed_mid_write += 1;
        }
        let blocks = reader.join().unwrap();
        for b in &blocks {
            acked.insert(*b, round);
        }
        let list: String = acked.iter().map(|(b, r)| format!("{r} {b}\n")).collect();
        std::fs::write(&acked_file, list).unwrap();

        s.restart().unwrap();
        let out = python(
            s.dir.path(),
            VERIFY,
            &[&s.uri("d"), acked_file.to_str().unwrap()],
        )
        .unwrap_or_else(|e| panic!("round {round}: {e:#}"));
        assert!(out.contains("bad []"), "round {round}: {out}");
        eprintln!(
            "round {round}: {} acknowledged blocks in this round, all {} verified",
            blocks.len(),
            acked.len()
        );
    }
    assert!(!acked.is_empty(), "the writer never got an acknowledgement");
    assert!(
        killed_mid_write >= 1,
        "stord was never killed while the writer was busy"
    );
}
