#!/usr/bin/env python3
"""Drives one QEMU live migration over QMP (bench/migrate.sh).

usage: migrate_qmp.py QMP_SOCKET URI DOWNTIME_LIMIT_MS
Sets downtime-limit, starts `migrate` to URI, polls query-migrate until it ends;
prints one JSON object: status, downtime_ms, total_ms, setup_ms, ram bytes
transferred, dirty-sync rounds (ram.dirty-sync-count).
"""
import json
import socket
import sys
import time


def main():
    path, uri, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    f = s.makefile("rw")

    def cmd(name, args=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        f.write(json.dumps(msg) + "\n")
        f.flush()
        while True:
            r = json.loads(f.readline())
            if "return" in r or "error" in r:
                return r

    json.loads(f.readline())  # greeting
    cmd("qmp_capabilities")
    cmd("migrate-set-parameters", {"downtime-limit": limit})
    r = cmd("migrate", {"uri": uri})
    if "error" in r:
        print(json.dumps({"status": "failed", "error": r["error"]}))
        return
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        info = cmd("query-migrate")["return"]
        if info.get("status") in ("completed", "failed", "cancelled"):
            ram = info.get("ram", {})
            print(json.dumps({
                "status": info["status"],
                "downtime_ms": info.get("downtime"),
                "total_ms": info.get("total-time"),
                "setup_ms": info.get("setup-time"),
                "bytes": ram.get("transferred"),
                "rounds": ram.get("dirty-sync-count"),
                "error": info.get("error-desc"),
            }))
            return
        time.sleep(0.01)
    print(json.dumps({"status": "timeout"}))


main()
