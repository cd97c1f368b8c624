//! stord with libnbd (the Python binding nbdsh uses) for the protocol corners:
//! error codes of invalid requests (and that the connection survives them),
//! option haggling (LIST, INFO, GO, LIST_META_CONTEXT, STARTTLS refused, simple
//! replies when structured replies are not requested), out-of-order replies,
//! and a raw-socket probe for options libnbd cannot send (unknown option,
//! EXTENDED_HEADERS, malformed options).

mod stord_common;

use integration_tests::require_root;
use stord_common::{dynamic, python, read_only, Stord};

const ERRORS: &str = r#"
import errno, sys, nbd
uri, ro_uri = sys.argv[1], sys.argv[2]

def errname(e):
    # This libnbd's Python binding does not always fill e.errno; str(e) ends
    # with the errno name in parentheses.
    return str(e).rsplit("(", 1)[-1].rstrip(")")

def expect(err, f, *a, **kw):
    try:
        f(*a, **kw)
    except nbd.Error as e:
        assert errname(e) == errno.errorcode[err], "%s%r: want %s got %s" % (f.__name__, a[1:], errno.errorcode[err], e.string)
        return
    raise AssertionError("%s%r succeeded, wanted %s" % (f.__name__, a[1:], errno.errorcode[err]))

h = nbd.NBD()
h.set_strict_mode(0)          # let invalid requests reach the server
h.add_meta_context("base:allocation")
h.connect_uri(uri)
size = h.get_size()
assert size == 64 << 20

expect(errno.EINVAL, h.pread, 4096, size - 512)              # read past end
expect(errno.EINVAL, h.pread, 512, size)                     # read at end
expect(errno.ENOSPC, h.pwrite, b"x" * 4096, size - 512)      # write past end
expect(errno.ENOSPC, h.zero, 4096, size)                     # write zeroes past end
expect(errno.EINVAL, h.trim, 4096, size)                     # trim past end
expect(errno.EINVAL, h.cache, 4096, size)                    # cache past end
expect(errno.EINVAL, h.pread, 512, 2**63)                    # offset overflow
expect(errno.EINVAL, h.pread, 512, 0, nbd.CMD_FLAG_REQ_ONE)  # flag not valid for READ
expect(errno.EINVAL, h.pwrite, b"y" * 512, 0, nbd.CMD_FLAG_DF)
expect(errno.EINVAL, h.block_status, 0, 0, lambda *a: 0)      # zero-length status
expect(errno.EINVAL, h.block_status, 4096, size, lambda *a: 0)
big = 33 << 20                                               # over the 32 MiB maximum
expect(errno.EINVAL, h.pread, big, 0)
expect(errno.EOVERFLOW, h.pread_structured, big, 0, lambda *a: 0, nbd.CMD_FLAG_DF)
expect(errno.EINVAL, h.pwrite, b"z" * big, 0)               # payload skipped, not a disconnect

# The connection survived every one of those.
h.pwrite(b"\x5a" * 65536, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 4096) == b"\x5a" * 65536
h.flush()
# DF read of a partly sparse range comes back as one chunk with the zeroes in it.
chunks = []
def cb(subbuf, offset, status, error):
    chunks.append((offset, len(subbuf), status))
    return 0
buf = h.pread_structured(131072, 0, cb, nbd.CMD_FLAG_DF)
assert chunks == [(0, 131072, nbd.READ_DATA)], chunks
assert buf[:4096] == b"\0" * 4096 and buf[4096:69632] == b"\x5a" * 65536
# Without DF the same range is fragmented into hole and data chunks.
chunks.clear()
h.pread_structured(131072, 0, cb)
kinds = sorted(set(c[2] for c in chunks))
assert kinds == [nbd.READ_DATA, nbd.READ_HOLE], chunks
# REQ_ONE returns exactly one extent; without it, the whole range.
ext = []
h.block_status(size, 0, lambda ctx, off, entries, err: ext.append(entries) or 0, nbd.CMD_FLAG_REQ_ONE)
assert len(ext) == 1 and len(ext[0]) == 2, ext
ext.clear()
h.block_status(size, 0, lambda ctx, off, entries, err: ext.append(entries) or 0)
e = ext[0]
assert sum(e[0::2]) == size, e
assert e[1] == 3 and e[3] == 0 and e[5] == 3, e           # hole, data, hole
# CACHE (prefetch) of a valid range succeeds.
h.cache(1 << 20, 0)
# FAST_ZERO and NO_HOLE are accepted.
h.zero(65536, 4096, nbd.CMD_FLAG_FAST_ZERO)
h.zero(65536, 4096, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
assert h.pread(65536, 4096) == b"\0" * 65536
h.shutdown()

r = nbd.NBD()
r.set_strict_mode(0)
r.connect_uri(ro_uri)
assert r.is_read_only()
expect(errno.EPERM, r.pwrite, b"w" * 512, 0)
expect(errno.EPERM, r.trim, 512, 0)
expect(errno.EPERM, r.zero, 512, 0)
assert r.pread(512, 0) == b"\0" * 512
r.flush()
r.shutdown()
print("ok")
"#;

#[test]
fn invalid_requests_get_nbd_errors_and_the_connection_survives() {
    require_root();
    let s = Stord::start(&[dynamic("d", "64MiB"), read_only("ro", "1MiB")]).unwrap();
    let out = python(s.dir.path(), ERRORS, &[&s.uri("d"), &s.uri("ro")]).unwrap();
    assert!(out.contains("ok"), "{out}");
    let status = s.cli(&["status"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(v["invalid_requests"].as_u64().unwrap() >= 17, "{v}");
    assert_eq!(v["protocol_errors"].as_u64(), Some(0), "{v}");
}

const NEGOTIATION: &str = r#"
import errno, sys, nbd
port, base = sys.argv[1], sys.argv[2]

# Option mode: LIST, LIST_META_CONTEXT, INFO on a bad and a good name, then GO.
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(base + "/")
names = []
h.opt_list(lambda name, desc: names.append((name, desc)) or 0)
assert [n for n, _ in names] == ["a", "b"], names
h.set_export_name("a")
ctxs = []
h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
assert ctxs == ["base:allocation"], ctxs
h.set_export_name("nope")
try:
    h.opt_info()
    raise AssertionError("INFO on an unknown export succeeded")
except nbd.Error:
    pass
h.set_export_name("b")
h.set_full_info(True)
h.opt_info()
assert h.get_size() == 2 << 20
assert h.get_canonical_export_name() == "b"
assert "dynamic" in h.get_export_description()
h.set_export_name("a")
h.add_meta_context("base:allocation")
h.opt_go()
assert h.get_size() == 1 << 20
assert h.can_meta_context("base:allocation")
h.pwrite(b"A" * 512, 0)
h.shutdown()

# ABORT in option mode ends the session cleanly.
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(base + "/a")
h.opt_abort()
assert h.aio_is_closed() or h.aio_is_dead() or True

# STARTTLS is refused with ERR_UNSUP and the session goes on without TLS.
h = nbd.NBD()
h.set_tls(nbd.TLS_ALLOW)
h.set_export_name("a")
h.connect_tcp("127.0.0.1", port)
assert not h.get_tls_negotiated()
assert h.pread(512, 0) == b"A" * 512
h.shutdown()

# Without structured replies: simple replies, no DF, no block status.
h = nbd.NBD()
h.set_request_structured_replies(False)
h.add_meta_context("base:allocation")
h.connect_uri(base + "/a")
assert not h.get_structured_replies_negotiated()
assert not h.can_df()
assert not h.can_meta_context("base:allocation")
h.pwrite(b"S" * 4096, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(8192, 0) == b"A" * 512 + b"\0" * 3584 + b"S" * 4096
h.set_strict_mode(0)
try:
    h.pread(512, 1 << 20)
    raise AssertionError("read past end succeeded")
except nbd.Error as e:
    assert str(e).endswith("(EINVAL)"), e
assert h.pread(512, 4096) == b"S" * 512
h.shutdown()

# Old-style EXPORT_NAME (no GO): libnbd falls back to it when told to.
h = nbd.NBD()
h.set_request_structured_replies(False)
h.set_handshake_flags(0)          # no fixed newstyle, no NO_ZEROES: plain EXPORT_NAME
h.connect_uri(base + "/b")
assert h.get_size() == 2 << 20
h.pwrite(b"E" * 512, 0)
assert h.pread(512, 0) == b"E" * 512
h.shutdown()
# EXPORT_NAME cannot carry an error: an unknown name closes the connection.
h = nbd.NBD()
h.set_request_structured_replies(False)
h.set_handshake_flags(0)
try:
    h.connect_uri(base + "/nope")
    raise AssertionError("EXPORT_NAME of an unknown export was accepted")
except nbd.Error:
    pass
print("ok")
"#;

#[test]
fn option_haggling_with_libnbd() {
    require_root();
    let s = Stord::start(&[dynamic("a", "1MiB"), dynamic("b", "2MiB")]).unwrap();
    let base = format!("nbd://127.0.0.1:{}", s.port);
    let out = python(s.dir.path(), NEGOTIATION, &[&s.port.to_string(), &base]).unwrap();
    assert!(out.contains("ok"), "{out}");
}

const RAW: &str = r#"
import socket, struct, sys
port = int(sys.argv[1])
IHAVEOPT = 0x49484156454F5054
ERR = 2**31

s = socket.create_connection(("127.0.0.1", port))
magic, ihave, flags = struct.unpack(">QQH", recv_exact(s, 18))
assert magic == 0x4e42444d41474943 and ihave == IHAVEOPT and flags == 3, (hex(magic), flags)
s.sendall(struct.pack(">I", 3))

def opt(o, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, o, len(data)) + data)

def reply():
    m, o, t, l = struct.unpack(">QIII", recv_exact(s, 20))
    assert m == 0x3e889045565a9
    return o, t, recv_exact(s, l)

def name(n):
    return struct.pack(">I", len(n)) + n

opt(99, b"junk")                                   # unknown option
assert reply()[:2] == (99, ERR + 1)
opt(99, b"\0" * 100000)                           # oversized option data: skipped
assert reply()[:2] == (99, ERR + 9)
opt(11)                                            # EXTENDED_HEADERS
assert reply()[:2] == (11, ERR + 1)
opt(5)                                             # STARTTLS
assert reply()[:2] == (5, ERR + 1)
opt(3, b"x")                                       # LIST with data
assert reply()[:2] == (3, ERR + 3)
opt(7, struct.pack(">I", 100) + b"d")              # GO with a name past the end
assert reply()[:2] == (7, ERR + 3)
opt(10, name(b"d") + struct.pack(">I", 0))         # SET_META_CONTEXT before STRUCTURED_REPLY
assert reply()[:2] == (10, ERR + 3)
opt(8)                                             # STRUCTURED_REPLY
assert reply()[:2] == (8, 1)
opt(10, name(b"d") + struct.pack(">I", 2) + name(b"base:allocation") + name(b"x-other:thing"))
o, t, d = reply()
assert (o, t) == (10, 4) and d[4:] == b"base:allocation", (o, t, d)
ctx_id = struct.unpack(">I", d[:4])[0]
assert reply()[:2] == (10, 1)
opt(6, name(b"zzz") + struct.pack(">H", 0))        # INFO on an unknown export
assert reply()[:2] == (6, ERR + 6)
opt(7, name(b"d") + struct.pack(">HH", 1, 2))      # GO asking for the description
infos = {}
while True:
    o, t, d = reply()
    if t == 1:
        break
    assert t == 3, t
    infos[struct.unpack(">H", d[:2])[0]] = d[2:]
size, tflags = struct.unpack(">QH", infos[0])
assert size == 1 << 20 and tflags & 1, infos
assert b"dynamic" in infos[2]
assert struct.unpack(">III", infos[3]) == (1, 4096, 32 << 20)

REQ = 0x25609513
def request(flags, kind, handle, offset, length, payload=b""):
    s.sendall(struct.pack(">IHHQQI", REQ, flags, kind, handle, offset, length) + payload)

def chunk():
    magic, flags, kind, handle, length = struct.unpack(">IHHQI", recv_exact(s, 20))
    return magic, flags, kind, handle, recv_exact(s, length)

# Pipeline three requests; every reply carries its own handle.
request(0, 1, 11, 0, 4096, b"\x77" * 4096)          # WRITE
request(0, 0, 12, 0, 4096)                          # READ (may run before or after 11)
request(0, 7, 13, 0, 1 << 20)                       # BLOCK_STATUS
seen = {}
while len(seen) < 3:
    head = recv_exact(s, 4)
    magic = struct.unpack(">I", head)[0]
    if magic == 0x67446698:
        err, handle = struct.unpack(">IQ", recv_exact(s, 12))
        seen[handle] = ("simple", err)
    else:
        flags, kind, handle, length = struct.unpack(">HHQI", recv_exact(s, 16))
        data = recv_exact(s, length)
        if flags & 1:
            seen[handle] = (kind, data)
assert seen[11] == ("simple", 0), seen[11]
assert struct.unpack(">I", seen[13][1][:4])[0] == ctx_id
request(0, 99, 14, 0, 0)                            # unknown command -> EINVAL
magic, flags, kind, handle, data = chunk()
assert handle == 14 and kind == 2**15 + 1 and struct.unpack(">I", data[:4])[0] == 22, (kind, data)
request(0, 2, 15, 0, 0)                             # DISC
assert s.recv(1) == b""
print("ok")
"#;

#[test]
fn raw_option_corners_and_pipelined_requests() {
    require_root();
    let s = Stord::start(&[dynamic("d", "1MiB")]).unwrap();
    let out = python(s.dir.path(), RAW, &[&s.port.to_string()]).unwrap();
    assert!(out.contains("ok"), "{out}");
}

const OUT_OF_ORDER: &str = r#"
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
big = nbd.Buffer(8 << 20)
small = nbd.Buffer(512)
overtook = 0
for i in range(5):
    w = h.aio_pwrite(big, 0, flags=nbd.CMD_FLAG_FUA)
    r = h.aio_pread(small, 40 << 20)
    while not h.aio_command_completed(r):
        h.poll(-1)
    if not h.aio_command_completed(w):
        overtook += 1
    while not h.aio_command_completed(w):
        h.poll(-1)
# Many commands in flight at once all complete.
bufs = [nbd.Buffer(4096) for _ in range(64)]
cookies = [h.aio_pread(b, i * 4096) for i, b in enumerate(bufs)]
while h.aio_in_flight() > 0:
    h.poll(-1)
h.shutdown()
print("overtook", overtook)
assert overtook >= 1, "a small read never overtook a large FUA write: replies are serialized"
"#;

#[test]
fn small_requests_overtake_large_ones() {
    require_root();
    let s = Stord::start(&[dynamic("d", "64MiB")]).unwrap();
    let out = python(s.dir.path(), OUT_OF_ORDER, &[&s.uri("d")]).unwrap();
    assert!(out.contains("overtook"), "{out}");
}

const FAST_ZERO: &str = r#"
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.can_fast_zero()
h.pwrite(b"\xee" * 65536, 0)
try:
    # tmpfs cannot zero a range in place: with NO_HOLE that means writing
    # zeroes, which FAST_ZERO forbids.
    h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    raise AssertionError("FAST_ZERO succeeded where zeroing is slow")
except nbd.Error as e:
    assert str(e).endswith("(ENOTSUP)"), e
assert h.pread(65536, 0) == b"\xee" * 65536, "a refused FAST_ZERO changed data"
h.zero(65536, 0, nbd.CMD_FLAG_NO_HOLE)             # slow path: zero buffers
assert h.pread(65536, 0) == b"\0" * 65536
h.pwrite(b"\xee" * 65536, 0)
h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)           # punching a hole is fast
assert h.pread(65536, 0) == b"\0" * 65536
h.shutdown()
print("ok")
"#;

#[test]
fn fast_zero_refused_when_it_would_be_slow() {
    require_root();
    let shm = std::path::Path::new("/dev/shm");
    assert!(shm.is_dir(), "this test needs a tmpfs at /dev/shm");
    let s = Stord::start_in(shm, &[dynamic("d", "1MiB")]).unwrap();
    let out = python(s.dir.path(), FAST_ZERO, &[&s.uri("d")]).unwrap();
    assert!(out.contains("ok"), "{out}");
}
