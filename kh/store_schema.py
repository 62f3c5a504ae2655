"""kh's SQLite schema (kh.store) and the steps that upgrade an older state to it."""

from __future__ import annotations

SCHEMA_VERSION = 8
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE principals (
    name TEXT PRIMARY KEY, salt BLOB NOT NULL, hash BLOB NOT NULL, created REAL NOT NULL);
CREATE TABLE domains (
    netid INTEGER PRIMARY KEY, kind TEXT NOT NULL, owner TEXT REFERENCES principals(name),
    created REAL NOT NULL);
CREATE TABLE allocations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, principal TEXT NOT NULL REFERENCES principals(name),
    created REAL NOT NULL, released REAL);
CREATE TABLE alloc_domains (
    alloc INTEGER NOT NULL REFERENCES allocations(id), slot INTEGER NOT NULL,
    netid INTEGER NOT NULL REFERENCES domains(netid), PRIMARY KEY (alloc, slot));
CREATE TABLE nodes (
    number INTEGER PRIMARY KEY, uid INTEGER NOT NULL UNIQUE, state TEXT NOT NULL,
    pid INTEGER, alloc INTEGER REFERENCES allocations(id), workdir TEXT NOT NULL,
    started REAL NOT NULL, reason TEXT);
CREATE INDEX nodes_alloc ON nodes(alloc);
"""
# Each entry upgrades the schema from the version before it.
MIGRATIONS = {
    2: """
CREATE TABLE keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT, principal TEXT NOT NULL REFERENCES principals(name),
    alloc INTEGER REFERENCES allocations(id), key TEXT NOT NULL, comment TEXT NOT NULL,
    added REAL NOT NULL);
""",
    # Failed starts: how many in a row (the restart backoff), and when the next one is due
    # (NULL: none; a failed node with no retry has given up until an operator acts).
    3: """
ALTER TABLE nodes ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN retry_at REAL;
""",
    # Changes that cross the state and the host, recorded before their side effects so that a
    # khd killed half-way finishes or undoes them at its next start (kh.service.core): a node
    # being reset, a principal being removed (when that was asked for).
    4: """
ALTER TABLE nodes ADD COLUMN resetting INTEGER NOT NULL DEFAULT 0;
ALTER TABLE principals ADD COLUMN removing REAL;
""",
    # Scoped, revocable tokens for in-node tools (kh.service.tokens): only a hash of each is
    # kept; an allocation made with one names it (its node budget and its control channel).
    5: """
CREATE TABLE tokens (
    id INTEGER PRIMARY KEY AUTOINCREMENT, principal TEXT NOT NULL REFERENCES principals(name),
    hash BLOB NOT NULL UNIQUE, netids TEXT NOT NULL, max_nodes INTEGER, expires REAL,
    revoked REAL, created REAL NOT NULL);
ALTER TABLE allocations ADD COLUMN token INTEGER REFERENCES tokens(id);
""",
    # Metering (kh.metering): per sample of an allocated node, what it used since its previous
    # sample of the same generation (times and CPU in integer microseconds since the epoch), the
    # same per domain interface, the gaps (a generation changed unseen), and each node's last raw
    # counters (what the next sample is compared with, across a khd restart too). Principals and
    # allocations are named, not referenced: usage outlives a principal's removal. The rows are
    # kept in (principal, time) order, without a rowid: 30 days of 64 nodes stay small.
    6: """
CREATE TABLE meter_usage (
    principal TEXT NOT NULL, t INTEGER NOT NULL, node INTEGER NOT NULL, alloc INTEGER NOT NULL,
    node_us INTEGER NOT NULL, cpu_us INTEGER NOT NULL, mem_mib INTEGER NOT NULL,
    load_bytes INTEGER NOT NULL, PRIMARY KEY (principal, t, node)) WITHOUT ROWID;
CREATE TABLE meter_net (
    principal TEXT NOT NULL, t INTEGER NOT NULL, node INTEGER NOT NULL, slot INTEGER NOT NULL,
    alloc INTEGER NOT NULL, netid INTEGER NOT NULL, tx_bytes INTEGER NOT NULL,
    rx_bytes INTEGER NOT NULL, tx_packets INTEGER NOT NULL, rx_packets INTEGER NOT NULL,
    PRIMARY KEY (principal, t, node, slot)) WITHOUT ROWID;
CREATE TABLE meter_principals (name TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE meter_gaps (
    t0 INTEGER NOT NULL, t INTEGER NOT NULL, node INTEGER NOT NULL, alloc INTEGER NOT NULL,
    principal TEXT NOT NULL, what TEXT NOT NULL);
CREATE TABLE meter_last (
    node INTEGER PRIMARY KEY, t INTEGER NOT NULL, gen TEXT NOT NULL, alloc INTEGER,
    principal TEXT, cpu_us INTEGER NOT NULL, mem_mib INTEGER NOT NULL, nics TEXT NOT NULL);
""",
    # Metering's hourly sums (kh.metering.store): kept up to date with every sample, so a month
    # is read from ~1/360 of the rows, and kept after the samples themselves are dropped (after
    # a week): the hour is the sample time's, in us since the epoch.
    7: """
CREATE TABLE meter_hours (
    principal TEXT NOT NULL, hour INTEGER NOT NULL, node INTEGER NOT NULL,
    alloc INTEGER NOT NULL, node_us INTEGER NOT NULL, cpu_us INTEGER NOT NULL,
    mem_mib_us INTEGER NOT NULL, load_bytes INTEGER NOT NULL,
    PRIMARY KEY (principal, hour, node, alloc)) WITHOUT ROWID;
CREATE TABLE meter_net_hours (
    principal TEXT NOT NULL, hour INTEGER NOT NULL, node INTEGER NOT NULL, slot INTEGER NOT NULL,
    alloc INTEGER NOT NULL, netid INTEGER NOT NULL, tx_bytes INTEGER NOT NULL,
    rx_bytes INTEGER NOT NULL, tx_packets INTEGER NOT NULL, rx_packets INTEGER NOT NULL,
    PRIMARY KEY (principal, hour, node, slot, alloc, netid)) WITHOUT ROWID;
INSERT INTO meter_hours SELECT principal, t / 3600000000 * 3600000000, node, alloc,
    SUM(node_us), SUM(cpu_us), SUM(mem_mib * node_us), SUM(load_bytes) FROM meter_usage
    GROUP BY 1, 2, 3, 4;
INSERT INTO meter_net_hours SELECT principal, t / 3600000000 * 3600000000, node, slot, alloc,
    netid, SUM(tx_bytes), SUM(rx_bytes), SUM(tx_packets), SUM(rx_packets) FROM meter_net
    GROUP BY 1, 2, 3, 4, 5, 6;
""",
    # Hosts (kh.store_hosts, kh.service.hosts): libvirt hosts khd runs nodes on besides its
    # own (the implicit "local"), in the order they were added (seq: placement fills them in
    # that order); its underlay (address, interface there, MTU); each node's host. runner is
    # a JSON list of words (an argv prefix).
    8: """
CREATE TABLE hosts (
    name TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, uri TEXT NOT NULL,
    capacity INTEGER NOT NULL, underlay TEXT NOT NULL, underlay_if TEXT NOT NULL,
    mtu INTEGER NOT NULL, prefix TEXT NOT NULL, kh TEXT NOT NULL, runner TEXT NOT NULL,
    added REAL NOT NULL);
ALTER TABLE nodes ADD COLUMN host TEXT NOT NULL DEFAULT 'local';
""",
}
