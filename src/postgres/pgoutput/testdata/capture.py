#!/usr/bin/env python3
"""Captures the pgoutput fixtures from a throwaway Postgres 15 cluster.

Usage: capture.py OUTDIR  (PGHOST/PGPORT/PGUSER select the cluster; it must run
with wal_level=logical, logical_decoding_work_mem=64kB and
max_prepared_transactions>0, on an empty `postgres` database).

Each fixture file is a sequence of frames: a 4-byte big-endian length followed
by one pgoutput message exactly as pg_logical_slot_peek_binary_changes
returned it.  Long runs of Insert messages are cut to their first two so the
files stay small.
"""
import os, struct, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1]

def psql(*args):
    return subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", "-At", *args],
                          check=True, capture_output=True, text=True).stdout

def peek(slot, *opts):
    quoted = ", ".join("'%s'" % o for o in opts)
    rows = psql("-c", "SELECT lsn, xid, encode(data, 'hex') FROM "
                "pg_logical_slot_peek_binary_changes('%s', NULL, NULL, %s)" % (slot, quoted))
    out = []
    for line in rows.splitlines():
        lsn, xid, hexdata = line.split("|")
        out.append((lsn, xid, bytes.fromhex(hexdata)))
    return out

def trim_inserts(msgs, keep=2):
    out, run = [], 0
    for m in msgs:
        run = run + 1 if m[2][:1] == b"I" else 0
        if run <= keep:
            out.append(m)
    return out

def write(name, msgs):
    path = os.path.join(OUT, name)
    with open(path, "wb") as f:
        for _, _, data in msgs:
            f.write(struct.pack(">I", len(data)) + data)
    print("== %s (%d messages, %d bytes)" % (name, len(msgs), os.path.getsize(path)))
    for lsn, xid, data in msgs:
        print("  %-12s xid=%-6s %r len=%d" % (lsn, xid, chr(data[0]), len(data)))

psql("-f", os.path.join(HERE, "schema.sql"))
oids = psql("-c", "SELECT relname, oid FROM pg_class WHERE relname IN "
            "('items','audit','docs','codes','events','parent','child','bulk') "
            "UNION ALL SELECT typname, oid FROM pg_type WHERE typname = 'mood' ORDER BY 1")
print("== oids\n" + oids)

psql("-f", os.path.join(HERE, "v1.sql"))
pub = ("publication_names", "pub", "messages", "true")
write("v1_workload.bin", peek("s1", "proto_version", "1", *pub))
first_txn = []
for m in peek("s1", "proto_version", "1", "binary", "true", *pub):
    first_txn.append(m)
    if m[2][:1] == b"C":
        break
write("v1_binary_insert.bin", first_txn)
psql("-c", "SELECT pg_drop_replication_slot('s1')")

psql("-f", os.path.join(HERE, "v2.sql"))
write("v2_streaming.bin", trim_inserts(peek("s2", "proto_version", "2", "streaming", "on", *pub)))
psql("-c", "SELECT pg_drop_replication_slot('s2')")

psql("-f", os.path.join(HERE, "v3.sql"))
write("v3_two_phase.bin", trim_inserts(
    peek("s3", "proto_version", "3", "two_phase", "on", "streaming", "on", *pub)))
psql("-c", "SELECT pg_drop_replication_slot('s3')")
