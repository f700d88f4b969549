"""The results store: one SQLite file (WAL journal), one row per attack run or bound per sample.

Primary key ``(ckpt, attribution, norm, eps, method, restart, sample)`` (ckpt = SHA-256 of the
checkpoint weights, method = the attack / bound label of the spec): a rerun skips every key already
present.  A work unit (a batch of samples for one (ckpt, attribution, norm, eps, method, restart)) is
written in ONE transaction, so a campaign killed at any moment (even SIGKILL) leaves only whole units
and resumes with nothing lost and nothing counted twice.  One process writes (the campaign driver);
readers (compare, report) may read while it runs.

Tables: ``results`` (the rows), ``checkpoints`` (sha256 -> path, reference, JSON info), ``methods``
(label -> family, name, restarts, params JSON), ``unit_info`` ((ckpt, method, restart) -> what is the
same for every row of it, e.g. which network the attack's gradients came from), ``runs`` (one per campaign invocation: spec TOML text,
seed, versions, start/end time, rows written), ``meta`` (schema version).
"""
from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import CertattrError

SCHEMA_VERSION = 1
KEY_COLUMNS = ("ckpt", "attribution", "norm", "eps", "method", "restart", "sample")
VALUE_COLUMNS = ("family", "kind", "euclidean", "cosine", "topk_intersection", "kendall", "spearman",
                 "center_of_mass_shift", "label_kept", "label_certified", "correct", "time", "extra")
COLUMNS = KEY_COLUMNS + VALUE_COLUMNS
METRIC_COLUMNS = ("euclidean", "cosine", "topk_intersection", "kendall", "spearman", "center_of_mass_shift")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    ckpt TEXT NOT NULL,               -- sha256 of the checkpoint weights
    attribution TEXT NOT NULL,
    norm TEXT NOT NULL,               -- '2' | 'inf'
    eps REAL NOT NULL,
    method TEXT NOT NULL,             -- attack or bound label (see methods)
    restart INTEGER NOT NULL,         -- restart index (0 for bounds)
    sample INTEGER NOT NULL,          -- index in the dataset split
    family TEXT NOT NULL,             -- 'attack' | 'bound'
    kind TEXT NOT NULL,               -- attack name (ifia, deviation, pgd) or bound kind
    euclidean REAL, cosine REAL, topk_intersection REAL, kendall REAL, spearman REAL,
    center_of_mass_shift REAL,
    label_kept INTEGER,               -- attacks: the returned point keeps the clean label
    label_certified INTEGER,          -- bounds: the label is certified constant on the ball
    correct INTEGER,                  -- the clean prediction equals the true label
    time REAL,                        -- seconds (the unit's wall time / samples)
    extra TEXT,                       -- JSON: method-specific per-sample extras
    PRIMARY KEY (ckpt, attribution, norm, eps, method, restart, sample)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    sha256 TEXT PRIMARY KEY, path TEXT NOT NULL, ref TEXT NOT NULL, info TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS methods (
    label TEXT PRIMARY KEY, family TEXT NOT NULL, name TEXT NOT NULL, restarts INTEGER NOT NULL,
    params TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS unit_info (   -- per (ckpt, method, restart): which network / method variant
    ckpt TEXT NOT NULL, method TEXT NOT NULL, restart INTEGER NOT NULL, info TEXT NOT NULL,
    PRIMARY KEY (ckpt, method, restart)
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, started REAL NOT NULL, finished REAL, spec TEXT NOT NULL,
    seed INTEGER NOT NULL, versions TEXT NOT NULL, options TEXT NOT NULL, rows_written INTEGER DEFAULT 0
);
"""


class Store:
    """A campaign results store (SQLite, WAL).  Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            if not self.path.is_file():
                raise CertattrError(f"results store {str(self.path)!r} not found")
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
            self._check_schema()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(self.path), timeout=30)
            self.conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit survives a killed process (the WAL is written before commit returns);
            # only an OS crash / power loss can drop the last transactions, never corrupt the file.
            self.conn.execute("PRAGMA synchronous=NORMAL")
            with self.conn:
                self.conn.executescript(_SCHEMA)
                self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self._check_schema()
        self.conn.row_factory = sqlite3.Row

    def _check_schema(self) -> None:
        try:
            row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise CertattrError(f"{self.path} is not a certattr results store: {exc}") from None
        if row is None or int(row[0]) != SCHEMA_VERSION:
            raise CertattrError(f"{self.path}: unsupported results-store schema version {row and row[0]}")

    # ------------------------------------------------------------------ context
    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:  # noqa: PYI034 (Self needs 3.11; 3.10 is supported)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ writing
    def write_unit(self, rows: Sequence[dict[str, Any]]) -> int:
        """Insert the rows of one finished unit in a single transaction (all or nothing).

        A row's optional ``unit_info`` dict (the same for the whole unit) goes to the unit_info table."""
        if not rows:
            return 0
        values = [_row_values(r) for r in rows]
        info = {(r["ckpt"], r["method"], int(r["restart"])): json.dumps(r["unit_info"], sort_keys=True)
                for r in rows if r.get("unit_info")}
        placeholders = ",".join("?" * len(COLUMNS))
        with self.conn:  # BEGIN ... COMMIT, or ROLLBACK on error
            self.conn.executemany(f"INSERT INTO results ({','.join(COLUMNS)}) VALUES ({placeholders})", values)
            self.conn.executemany("INSERT OR REPLACE INTO unit_info VALUES (?,?,?,?)",
                                  [k + (v,) for k, v in info.items()])
        return len(values)

    def add_checkpoint(self, sha256: str, path: str, ref: str, info: dict) -> None:
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?)",
                              (sha256, str(path), ref, json.dumps(info, sort_keys=True, default=str)))

    def add_method(self, label: str, family: str, name: str, restarts: int, params: dict) -> None:
        """Record a method; a label already stored with different settings is an error (its rows would mix)."""
        params_json = json.dumps(params, sort_keys=True)
        row = self.conn.execute("SELECT family, name, params FROM methods WHERE label=?", (label,)).fetchone()
        if row is not None and (row[0], row[1], row[2]) != (family, name, params_json):
            raise CertattrError(
                f"store {self.path.name} already holds method {label!r} as {row[1]} with params {row[2]}; "
                f"the spec now has {name} with {params_json}: give it another label or use another store")
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO methods VALUES (?,?,?,?,?)",
                              (label, family, name, int(restarts), params_json))

    def start_run(self, spec_text: str, seed: int, versions: dict, options: dict) -> int:
        with self.conn:
            cur = self.conn.execute(
                "INSERT INTO runs (started, spec, seed, versions, options) VALUES (?,?,?,?,?)",
                (time.time(), spec_text, int(seed), json.dumps(versions, sort_keys=True),
                 json.dumps(options, sort_keys=True)))
        return int(cur.lastrowid)

    def finish_run(self, run_id: int, rows_written: int) -> None:
        with self.conn:
            self.conn.execute("UPDATE runs SET finished=?, rows_written=? WHERE id=?",
                              (time.time(), int(rows_written), int(run_id)))

    # ------------------------------------------------------------------ reading
    def count(self, **where: Any) -> int:
        clause, args = _where(where)
        return int(self.conn.execute(f"SELECT COUNT(*) FROM results{clause}", args).fetchone()[0])

    def done_samples(self, ckpt: str, attribution: str, norm: str, eps: float, method: str,
                     restart: int) -> set[int]:
        """Samples already stored for one (ckpt, attribution, norm, eps, method, restart) (an index range scan)."""
        cur = self.conn.execute(
            "SELECT sample FROM results WHERE ckpt=? AND attribution=? AND norm=? AND eps=? AND method=? "
            "AND restart=?", (ckpt, attribution, norm, float(eps), method, int(restart)))
        return {int(r[0]) for r in cur}

    def rows(self, **where: Any) -> Iterator[dict[str, Any]]:
        """Result rows as dicts (``extra`` decoded), optionally filtered by column equality."""
        clause, args = _where(where)
        for r in self.conn.execute(f"SELECT {','.join(COLUMNS)} FROM results{clause}", args):
            d = dict(r)
            d["extra"] = json.loads(d["extra"]) if d["extra"] else {}
            yield d

    def checkpoints(self) -> dict[str, dict[str, Any]]:
        return {r["sha256"]: {"path": r["path"], "ref": r["ref"], "info": json.loads(r["info"])}
                for r in self.conn.execute("SELECT * FROM checkpoints")}

    def methods(self) -> dict[str, dict[str, Any]]:
        return {r["label"]: {"family": r["family"], "name": r["name"], "restarts": r["restarts"],
                             "params": json.loads(r["params"])}
                for r in self.conn.execute("SELECT * FROM methods")}

    def unit_info(self) -> dict[tuple[str, str, int], dict[str, Any]]:
        """(ckpt, method, restart) -> the unit-level info (network, bound method variant)."""
        return {(r["ckpt"], r["method"], r["restart"]): json.loads(r["info"])
                for r in self.conn.execute("SELECT * FROM unit_info")}

    def runs(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM runs ORDER BY id")]

    def duplicates(self) -> int:
        """Number of primary keys stored more than once (always 0 unless the file was tampered with)."""
        cols = ",".join(KEY_COLUMNS)
        return int(self.conn.execute(
            f"SELECT COUNT(*) FROM (SELECT {cols} FROM results GROUP BY {cols} HAVING COUNT(*) > 1)").fetchone()[0])


def _row_values(row: dict[str, Any]) -> tuple:
    missing = [k for k in KEY_COLUMNS + ("family", "kind") if row.get(k) is None]
    if missing:
        raise CertattrError(f"result row lacks {', '.join(missing)}")
    out = []
    for col in COLUMNS:
        v = row.get(col)
        if col == "extra":
            v = json.dumps(v, sort_keys=True, separators=(",", ":")) if v else None
        elif col in ("label_kept", "label_certified", "correct") and v is not None:
            v = int(bool(v))
        elif col == "eps":
            v = float(v)
        elif col in ("restart", "sample"):
            v = int(v)
        elif col in METRIC_COLUMNS + ("time",) and v is not None:
            v = float(v)
        out.append(v)
    return tuple(out)


def _where(where: dict[str, Any]) -> tuple[str, list]:
    for k in where:
        if k not in COLUMNS:
            raise CertattrError(f"unknown results column {k!r}")
    if not where:
        return "", []
    return " WHERE " + " AND ".join(f"{k}=?" for k in where), list(where.values())

