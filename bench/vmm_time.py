#!/usr/bin/env python3
"""Times a VMM run: process start -> first serial byte, -> each marker line, -> exit.

usage: vmm_time.py RUNS -- CMD...   prints one JSON object per run on stdout.
The guest's serial console must be the command's stdout.
"""
import json
import os
import subprocess
import sys
import time


def run_once(cmd):
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
    first = None
    lines = {}
    buf = b""
    fd = p.stdout.fileno()
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        now = time.monotonic() - t0
        if first is None:
            first = now
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            lines.setdefault(line.decode(errors="replace").strip(), now)
    rc = p.wait()
    return {"first_byte": first, "exit": time.monotonic() - t0, "rc": rc, "lines": lines}


def main():
    runs = int(sys.argv[1])
    cmd = sys.argv[sys.argv.index("--") + 1:]
    for _ in range(runs):
        print(json.dumps(run_once(cmd)), flush=True)


if __name__ == "__main__":
    main()
