//! The durability promise under crashes: a writer (libnbd, two connections of
//! one multi-conn client) gets FUA writes and flushes acknowledged while stord is
//! SIGKILLed at random moments; after each restart every acknowledged block
//! reads back exactly.
//!
//! On a raw dynamic disk: a few rounds of distinct blocks (`crash_rounds`).
//! On a qcow2 linked clone: 100 trials (`STORD_CRASH_TRIALS`) of random
//! writes of 4 KiB to 128 KiB at random places (over the base's data, over
//! its holes, partial clusters copied on write, clusters written before),
//! each FUA or a write then a FLUSH on the other connection, SIGKILL at a
//! random moment; after each restart the whole disk is read back: every
//! acknowledged write is there, every block never written reads as the base,
//! and the one write in flight at the kill reads old or new, block by block;
//! `qemu-img check` finds the image clean (stord's leak repair at open done).
//! The randomness is seeded; the seed is printed and `STORD_CRASH_SEED`
//! replays it.
//!
//! Limit of what this proves: SIGKILL of the daemon keeps the host's page cache,
//! so it checks that stord acknowledges only what it has written (and orders
//! flushes correctly across connections), not the fdatasync itself reaching the
//! platter; a host power cut cannot be simulated here.

mod stord_common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::process::Stdio;
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use integration_tests::require_root;
use stord_common::qcow2::{check_clean, disk, stop};
use stord_common::{crash_rounds, dynamic, spawn_python, Rng, Stord};

#[test]
fn acknowledged_writes_survive_sigkill() {
    require_root();
    let mut s = Stord::start(&[dynamic("d", "64MiB")]).unwrap();
    crash_rounds(&mut s, "d", 4, 1, |_, _| {});
}

/// 4 KiB blocks of the clone (64 MiB); the base holds data in the first half.
const BLOCKS: u64 = 16384;
const BASE_BLOCKS: u64 = 8192;

/// The writer and verifier, one process for all trials (commands on stdin):
/// `run T` connects twice, prints `up`, then writes until stord dies,
/// printing `ack` after each acknowledged write, and `down N` at the end;
/// `verify` reads the whole disk and prints `verified N bad [...]`. What it
/// expects of each block: the last acknowledged write, else the base's
/// pattern (zeroes past the base's data); a block of the write in flight
/// when stord died may read old or new, and what it reads is kept.
const CLIENT: &str = r#"
import random, struct, sys, nbd
uri, seed, blocks, base_blocks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
BS = 4096
rng = random.Random(seed)
def base(block):
    if block >= base_blocks:
        return bytes(BS)
    return struct.pack(">QQQQ", 0xBA5E, block, 0, 0) * (BS // 32)
want, maybe = {}, {}
def connect():
    h = nbd.NBD()
    h.connect_uri(uri)
    return h
while True:
    cmd = sys.stdin.readline().split()
    if not cmd or cmd[0] == 'quit':
        break
    if cmd[0] == 'run':
        trial = int(cmd[1])
        a, b = connect(), connect()
        assert a.can_multi_conn() and a.can_fua()
        print('up', flush=True)
        n = 0
        try:
            while True:
                count = rng.randint(1, 32)
                first = rng.randrange(blocks - count + 1)
                data = b''.join(struct.pack(">QQQQ", 0xC0FFEE, trial, n, first + i) * (BS // 32)
                                for i in range(count))
                maybe = {first + i: data[i * BS:(i + 1) * BS] for i in range(count)}
                if n % 2 == 0:
                    b.pwrite(data, first * BS, nbd.CMD_FLAG_FUA)
                else:
                    a.pwrite(data, first * BS)
                    b.flush()
                want.update(maybe)
                maybe = {}
                n += 1
                print('ack', flush=True)
        except nbd.Error:
            pass
        del a, b
        print('down', n, flush=True)
    elif cmd[0] == 'verify':
        h = connect()
        bad = []
        step = 256
        for start in range(0, blocks, step):
            got = h.pread(step * BS, start * BS)
            for i in range(step):
                blk = start + i
                g = got[i * BS:(i + 1) * BS]
                if g == want.get(blk, None) or (blk not in want and g == base(blk)):
                    continue
                if blk in maybe and g == maybe[blk]:
                    want[blk] = g
                    continue
                bad.append(blk)
        maybe = {}
        del h
        print('verified', len(want), 'bad', bad[:10], flush=True)
"#;

/// The next line of the client that starts with `prefix` (others skipped).
fn expect(lines: &Receiver<String>, prefix: &str, trial: u64) -> String {
    loop {
        match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.starts_with(prefix) => return l,
            Ok(_) => {}
            Err(e) => panic!("trial {trial}: no {prefix:?} from the client: {e}"),
        }
    }
}

#[test]
fn sigkill_during_flushed_random_writes_to_a_qcow2_clone() {
    require_root();
    let seed = std::env::var("STORD_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        | 1;
    let trials: u64 = std::env::var("STORD_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    eprintln!("seed {seed} (STORD_CRASH_SEED replays it), {trials} trials");
    let mut rng = Rng(seed);

    let work = tempfile::tempdir().unwrap();
    let base = work.path().join("base.raw");
    let f = std::fs::File::create(&base).unwrap();
    f.set_len(BLOCKS * 4096).unwrap();
    let block = |b: u64| -> Vec<u8> {
        let mut one = [0u8; 32];
        one[..8].copy_from_slice(&0xBA5Eu64.to_be_bytes());
        one[8..16].copy_from_slice(&b.to_be_bytes());
        one.repeat(4096 / 32)
    };
    let data: Vec<u8> = (0..BASE_BLOCKS).flat_map(block).collect();
    f.write_all_at(&data, 0).unwrap();
    drop(f);
    let mut s = Stord::start(&[]).unwrap();
    disk(&s, &["import", "golden", "--from", base.to_str().unwrap()]).unwrap();
    disk(&s, &["clone", "golden", "vm"]).unwrap();
    let img = s.state().join("disks/vm.img");

    let args = [
        s.uri("vm"),
        seed.to_string(),
        BLOCKS.to_string(),
        BASE_BLOCKS.to_string(),
    ];
    let mut client = spawn_python(s.dir.path(), CLIENT, &args, Stdio::inherit()).unwrap();
    let mut stdin = client.child().stdin.take().unwrap();
    let stdout = client.child().stdout.take().unwrap();
    let (tx, lines) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });

    let started = Instant::now();
    let mut restarts = Vec::new();
    let mut acked = 0u64;
    for trial in 0..trials {
        writeln!(stdin, "run {trial}").unwrap();
        expect(&lines, "up", trial);
        expect(&lines, "ack", trial);
        // Killed at a random moment once the writer is going: most often
        // within a few writes, sometimes after many.
        let delay = match rng.next() % 4 {
            0 => rng.next() % 5,
            _ => rng.next() % 400,
        };
        std::thread::sleep(Duration::from_millis(delay));
        s.kill();
        let down = expect(&lines, "down", trial);
        let n: u64 = down[5..].trim().parse().unwrap();
        acked += n;

        let t0 = Instant::now();
        s.restart().unwrap();
        restarts.push(t0.elapsed());
        writeln!(stdin, "verify").unwrap();
        let v = expect(&lines, "verified", trial);
        assert!(
            v.ends_with("bad []"),
            "trial {trial} (seed {seed}, killed {delay} ms after the first acknowledgement): {v}"
        );
        check_clean(&img, true);
    }
    writeln!(stdin, "quit").unwrap();
    assert!(
        client.wait_timeout(Duration::from_secs(10)).is_some(),
        "the client did not end"
    );
    restarts.sort();
    eprintln!(
        "{trials} trials, {acked} acknowledged writes, {:.1} s; stord restart (until it serves) min {:?} median {:?} max {:?}",
        started.elapsed().as_secs_f64(),
        restarts[0],
        restarts[restarts.len() / 2],
        restarts[restarts.len() - 1]
    );
    assert!(acked >= trials, "every trial had an acknowledged write");
    stop(&mut s);
    check_clean(&img, false);
}
