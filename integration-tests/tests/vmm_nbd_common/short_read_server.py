#!/usr/bin/env python3
"""A tiny lying NBD server for vmm-shim's tests (fixed newstyle, structured replies).

Usage: short_read_server.py PORT SHORT_SECTOR
Serves one 1 MiB export (any name) on 127.0.0.1:PORT, one connection at a time. A READ
that starts at sector SHORT_SECTOR is answered with a structured OFFSET_DATA chunk
covering only the first half of the request, flagged DONE (a reply that claims
success but leaves bytes out). Every other READ gets one chunk with all of its data
(byte 0x5a); WRITE and FLUSH are acknowledged; DISC ends the connection.
Prints "ready" once listening.
"""
import socket
import struct
import sys

OPT_MAGIC = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
SIMPLE_MAGIC = 0x67446698
CHUNK_MAGIC = 0x668E33EF
SIZE = 1 << 20


def exact(c, n):
    b = b""
    while len(b) < n:
        x = c.recv(n - len(b))
        if not x:
            raise EOFError
        b += x
    return b


def opt_reply(c, opt, ty, data=b""):
    c.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, ty, len(data)) + data)


def serve(c, short_off):
    c.sendall(b"NBDMAGIC" + struct.pack(">QH", OPT_MAGIC, 3))
    exact(c, 4)
    while True:
        magic, opt, ln = struct.unpack(">QII", exact(c, 16))
        exact(c, ln)
        if opt == 8:  # STRUCTURED_REPLY
            opt_reply(c, opt, 1)
        elif opt == 7:  # GO
            flags = 1 | 4  # HAS_FLAGS | SEND_FLUSH
            opt_reply(c, opt, 3, struct.pack(">HQH", 0, SIZE, flags))
            opt_reply(c, opt, 1)
            break
        else:
            opt_reply(c, opt, 0x80000001)  # ERR_UNSUP
    while True:
        magic, flags, ty, handle, off, ln = struct.unpack(">IHHQQI", exact(c, 28))
        if ty == 0:  # READ
            n = ln // 2 if off == short_off else ln
            body = struct.pack(">Q", off) + b"\x5a" * n
            c.sendall(struct.pack(">IHHQI", CHUNK_MAGIC, 1, 1, handle, len(body)) + body)
        elif ty == 2:  # DISC
            return
        else:
            if ty == 1:
                exact(c, ln)
            c.sendall(struct.pack(">IIQ", SIMPLE_MAGIC, 0, handle))


def main():
    port, sector = int(sys.argv[1]), int(sys.argv[2])
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(4)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        try:
            serve(c, sector * 512)
        except (EOFError, ConnectionError):
            pass
        c.close()


main()
