"""The sweep's files: results.csv (one row per config), steps.csv (one row per step) and evals.csv (one row
per held-out eval), written so that a sweep killed at any instant (SIGKILL included) can be resumed without
losing or duplicating a finished row.

Each row is appended with one write, flushed and fsync'ed. A config's steps and evals are written before its
result row, so a config is finished exactly when its result row is complete. On resume, a torn last line is
cut, detail rows of unfinished configs are dropped, and the files are rewritten atomically.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from dataclasses import fields as _fields

from bench.noise import is_noisy
from bench.plan import PlanEntry
from llmopt.core.config import TrainConfig
from llmopt.core.run_metrics import RunMetrics
from llmopt.safe_files import open_file

# The config part of a row: every TrainConfig field, in the dataclass's order (so a new flag is a new column
# with no edit here), then the two the config derives. Read as text when the field is a string or a switch.
CONFIG_COLUMNS = [f.name for f in _fields(TrainConfig)] + ["world_size", "micro_batch"]
CONFIG_TEXT_COLUMNS = {f.name for f in _fields(TrainConfig) if str(f.type) in ("str", "bool", "str | None")}
BOOL_FIELDS = {f.name for f in _fields(TrainConfig) if str(f.type) == "bool"}
# Scalars of a run's metrics (RunMetrics, the fields marked with a row) copied into its row unchanged: RUN_ for
# every run that produced metrics (a diverged run included), OK_ for finished ones. A metric that is also a
# config field (target_loss: a --target-gap resolves to a loss in the run) is the config's column, filled in
# from the metrics.
RUN_METRIC_COLUMNS = RunMetrics.columns("run")
OK_METRIC_COLUMNS = RunMetrics.columns("ok")
# What the harness derives for a row (``Row.columns``: from the run's metrics, its config and its plan entry,
# each in one place there): work done, the steps' spread, memory by category beside its prediction, MFU and the
# peak it is stated against, parity with the baseline, and where the row came from.
MEMORY_CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations")
# Derived from every row together once the sweep has finished (``ResultFiles.fill``): the update's prediction
# counts the optimizers' steps in a subprocess, which must not run beside a timed config.
FILLED_AT_END = ("predicted_optimizer_ms", "optimizer_ms_prediction_error")
HARNESS_COLUMNS = [
    "steps_run", "tokens_seen", "train_seconds", "final_loss", "step_time_p90_p50", "noisy",
    "predicted_memory_bytes", "memory_prediction_error", *FILLED_AT_END,
    *(f"memory_{c}_bytes" for c in (*MEMORY_CATEGORIES, "other")), *(f"predicted_{c}_bytes" for c in MEMORY_CATEGORIES),
    "mfu", "peak_flops", "peak_flops_source", "baseline_id", "loss_parity_max_abs", "parity_verdict",
    "added_as_baseline", "phase", "wall_s", "requeues",
]
RESULT_COLUMNS = ["config_id", "status", "error", *CONFIG_COLUMNS,
                  *(c for c in RUN_METRIC_COLUMNS + OK_METRIC_COLUMNS if c not in CONFIG_COLUMNS), *HARNESS_COLUMNS]
assert len(set(RESULT_COLUMNS)) == len(RESULT_COLUMNS), "a column is derived twice"
# Columns read as text; every other column is a number (or empty).
TEXT_COLUMNS = CONFIG_TEXT_COLUMNS | {"config_id", "status", "error", "data_description", "peak_memory_kind", "noisy",
                                      "peak_flops_source", "baseline_id", "parity_verdict", "added_as_baseline",
                                      "phase"}
STEP_COLUMNS = ["config_id", "step", "loss", "step_time_ms", "optimizer_ms"]
EVAL_COLUMNS = ["config_id", "step", "tokens", "train_seconds", "loss", "lr", "gns_b_simple"]
# Per-config detail files: name -> (columns, the columns that identify a row within a config)
DETAILS = {"steps": (STEP_COLUMNS, "step"), "evals": (EVAL_COLUMNS, "step")}
STATUSES = ("ok", "failed", "skipped", "timeout", "oom", "diverged")


# Columns renamed since a committed reference was written: old name -> current name (read under the new one).
RENAMED = {"warmup_steps": "timing_warmup"}


csv.field_size_limit(2**31 - 1)  # an error message or a path can be long; never fail on a field's size


def row_config(row) -> "TrainConfig":
    """The validated config of a results row (a pandas Series of results.csv)."""
    import pandas as pd

    from llmopt.core.config import TrainConfig, validate

    row = row.to_dict() if isinstance(row, pd.Series) else row  # a dict's look-ups, not a Series' (thousands of rows)
    kw = {f: (row[f].item() if hasattr(row[f], "item") else row[f]) for f in TrainConfig.field_names()
          if f in row and not pd.isna(row[f]) and row[f] != ""}  # empty: the field's default
    for f in BOOL_FIELDS & set(kw):  # read as text by bench.report: "False" would be truthy
        if isinstance(kw[f], str):
            kw[f] = {"true": True, "false": False}[kw[f].strip().lower()]
    if "target_gap" in kw:
        kw.pop("target_loss", None)  # the row records the target the gap resolved to
    return validate(TrainConfig(**kw))


class Unreadable(ValueError):
    """Lines of a sweep's CSV (or its env.json) that cannot be read; nothing was changed on disk."""


# env.json's fields that the harness reads back (resume, report) and the type each must have: the file may
# come from someone else, and a string where a number goes would otherwise surface as a TypeError mid-report.
ENV_TYPES = {"command": str, "started_utc": str, "finished_utc": str, "sweep_seconds": float, "jobs": int,
             "concurrent_cpu": bool, "executor": str, "slurm_shared_nodes": bool, "slurm_most_per_node": int,
             "cpu_model": str, "cpu_count": int, "gpus": list, "cpu_flags": list, "torch": str, "cuda": str,
             "nccl": str, "git_commit": str, "alone_phases": list, "warm_up": str}


def read_env(out_dir: str) -> dict:
    """A sweep's env.json ({} when there is none), each field the harness reads checked for its type."""
    path = os.path.join(out_dir, "env.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            env = json.load(f)
    except (OSError, ValueError) as e:
        raise Unreadable(f"{path} is not readable JSON ({e}); restore it from the sweep's copy, or delete it "
                         f"(the report then leaves the machine out)") from None
    if not isinstance(env, dict):
        raise Unreadable(f"{path} holds a {type(env).__name__}, not an object; restore or delete it")
    for key, kind in ENV_TYPES.items():
        value = env.get(key)
        if value is None:
            continue
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if kind in (int, float) and ok:
            ok = value >= 0
        if not ok:
            raise Unreadable(f"{path}: {key} is {value!r}, not a{'n' if kind is int else ''} "
                             f"{'non-negative ' if kind in (int, float) else ''}{kind.__name__}; fix or delete "
                             f"that key")
    return env


# Numeric columns that may hold a negative value (an error ratio; a noise-scale estimate below zero is noise)
SIGNED_COLUMNS = {"memory_prediction_error", "optimizer_ms_prediction_error", "gns_b_simple"}
FLOAT32_MAX = 3.4028234663852886e38  # every figure a run records fits in float32: beyond it is no measurement
# Loss columns where a diverged run records NaN or inf (its last loss): allowed there, never in an ok row
LOSS_COLUMNS = {"loss", "final_loss", "final_eval_loss", "best_eval_loss"}


def bad_number(row: dict, text_columns: set[str]) -> str | None:
    """Why a CSV line's numbers cannot be a run's (text where a number goes, inf or NaN, a negative loss, time
    or count, a value beyond float32), or None. Such a line is unreadable, like one with a wrong field count:
    a planted 1e308 or -1 would otherwise be reported as a figure."""
    for col, value in row.items():
        if col in text_columns or value in ("", None):
            continue
        try:
            x = float(value)
        except (TypeError, ValueError):
            return f"{col} is {value!r}, not a number"
        if (math.isnan(x) or x == math.inf) and col in LOSS_COLUMNS and row.get("status") != "ok":
            continue  # a diverged run's last loss
        if not math.isfinite(x) or abs(x) > FLOAT32_MAX or (x < 0 and col not in SIGNED_COLUMNS):
            return f"{col} is {value!r}"
    return None


def _read(path: str, text_columns: set[str] | None = None) -> tuple[list[str], list[dict], list[list[str]]]:
    """(header, rows, rejected) of a CSV. A torn last line (cut mid-write by a kill) is dropped: that is the
    one damage a crash can do. Any other line whose field count differs from the header's, or whose numbers
    cannot be a run's (``bad_number``; every column not in ``text_columns`` is a number), is *rejected*, never
    silently dropped. The header is the file's own (a file written by another version of the schema is read as
    it was written), with renamed columns under their current names. A file that is not CSV text at all (a
    binary, NUL bytes) is ``Unreadable``, naming it."""
    if not os.path.exists(path):
        return [], [], []
    try:
        with open(path, newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise Unreadable(f"{path} is not a CSV text file ({e}); restore it from a copy of the sweep") from None
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # the last line was cut mid-write
    # newline="": quoted fields keep their line breaks, and a stray carriage return (a hand edit, a Windows
    # tool) ends a record as a newline would, so its pieces are rejected by their field count, not a crash
    try:
        lines = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise Unreadable(f"{path} is not a CSV text file ({e}); restore it from a copy of the sweep") from None
    if not lines:
        return [], [], []
    header = [RENAMED.get(c, c) for c in lines[0]]
    rows, rejected = [], []
    for row in lines[1:]:
        ok = len(row) == len(header) and (text_columns is None or bad_number(dict(zip(header, row)),
                                                                              text_columns) is None)
        (rows.append(dict(zip(header, row))) if ok else rejected.append(row))
    return header, rows, rejected


class ResultFiles:
    def __init__(self, out_dir: str):
        self.results_path = os.path.join(out_dir, "results.csv")
        self.paths = {name: os.path.join(out_dir, f"{name}.csv") for name in DETAILS}

    def load(self, repair: bool = False, reject: bool = False) -> tuple[list[dict], dict[str, list[dict]]]:
        """Finished rows and their detail rows by file (one row per config; torn last lines and details of
        unfinished configs left out). Read-only unless ``repair`` (resume), which rewrites the files clean in
        the current schema. A resume never deletes what it cannot read: a header it does not understand or a
        line with the wrong field count stops it (``Unreadable``, nothing changed) unless ``reject``, which
        first moves those lines into ``<file>.rejected`` beside the CSV."""
        header, raw, bad = _read(self.results_path, TEXT_COLUMNS)
        self.unreadable = {self.results_path: len(bad)}
        results, seen = [], set()
        for row in raw:
            if row.get("config_id") and row["config_id"] not in seen and row.get("status") in STATUSES:
                seen.add(row["config_id"])
                results.append(row)
        details, headers, rejected = {}, {}, {self.results_path: (header, bad)}
        for name, (_, key) in DETAILS.items():
            headers[name], rows, bad = _read(self.paths[name], {"config_id"})
            rejected[self.paths[name]] = (headers[name], bad)
            self.unreadable[self.paths[name]] = len(bad)
            kept, seen_keys = [], set()
            for row in rows:
                k = (row.get("config_id"), row.get(key))
                if k[0] in seen and k not in seen_keys:
                    seen_keys.add(k)
                    kept.append(row)
            details[name] = kept
        if repair:
            self._check_headers(header, headers)
            self._handle_rejected(rejected, reject)
            self._rewrite(self.results_path, RESULT_COLUMNS, results)
            for name, (columns, _) in DETAILS.items():
                self._rewrite(self.paths[name], columns, details[name])
        return results, details

    def _check_headers(self, header: list[str], headers: dict[str, list[str]]) -> None:
        unknown = set(header) - set(RESULT_COLUMNS)
        for name, (columns, _) in DETAILS.items():
            unknown |= set(headers[name]) - set(columns)
        if unknown:
            raise Unreadable(f"{self.results_path} has columns this version does not write "
                             f"({', '.join(sorted(unknown))}); resume it with the version that started it")
        if header and not {"config_id", "status"} <= set(header):
            raise Unreadable(f"{self.results_path}: its header has no config_id/status columns; restore the header "
                             f"line ({','.join(RESULT_COLUMNS[:3])},...) before resuming")

    @staticmethod
    def _handle_rejected(rejected: dict, reject: bool) -> None:
        for path, (header, bad) in rejected.items():
            if not bad:
                continue
            if not reject:
                first = (f"the first has {len(bad[0])} fields" if len(bad[0]) != len(header)
                         else f"the first: {bad_number(dict(zip(header, bad[0])), TEXT_COLUMNS | {'config_id'})}")
                raise Unreadable(f"{path}: {len(bad)} line(s) have a field count other than the header's "
                                 f"{len(header)} or numbers no run records ({first}); nothing was changed. Fix the "
                                 f"file, or add --repair to move them to {os.path.basename(path)}.rejected and "
                                 f"continue")
            with open_file(path + ".rejected", "a", newline="") as f:
                csv.writer(f).writerows(bad)
                f.flush()
                os.fsync(f.fileno())

    def drop(self, config_ids: set[str]) -> None:
        """Remove these configs' rows and details (to run them again), rewriting the files atomically."""
        results, details = self.load()
        self._rewrite(self.results_path, RESULT_COLUMNS, [r for r in results if r["config_id"] not in config_ids])
        for name, (columns, _) in DETAILS.items():
            self._rewrite(self.paths[name], columns, [d for d in details[name] if d["config_id"] not in config_ids])

    def fill(self, values: dict[str, dict]) -> None:
        """Set FILLED_AT_END columns of finished rows (config_id -> {column: value}) after the sweep, rewriting
        results.csv atomically; every other field stays as recorded."""
        if not values:
            return
        unknown = {k for v in values.values() for k in v} - set(FILLED_AT_END)
        if unknown:
            raise ValueError(f"ResultFiles.fill: {sorted(unknown)} are recorded by the run, not filled in after it")
        results, _ = self.load()
        for row in results:
            row.update({k: _fmt(v) for k, v in values.get(row["config_id"], {}).items()})
        self._rewrite(self.results_path, RESULT_COLUMNS, results)

    @staticmethod
    def _rewrite(path: str, columns: list[str], rows: list[dict]) -> None:
        tmp = path + ".tmp"
        try:
            with open_file(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=columns)
                w.writeheader()
                w.writerows({k: row.get(k, "") for k in columns} for row in rows)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError:
            if os.path.exists(tmp) and not os.path.islink(tmp):
                os.remove(tmp)  # a full disk leaves the original file, never a .tmp beside it
            raise

    @staticmethod
    def _append(path: str, columns: list[str], rows: list[dict]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, extrasaction="raise")
        for row in rows:
            w.writerow({k: _fmt(row.get(k)) for k in columns})
        with open_file(path, "a", newline="") as f:
            f.write(buf.getvalue())  # one write per config
            f.flush()
            os.fsync(f.fileno())

    def append(self, row: Row) -> dict:
        """Write ``row``'s details, then its results line (the config is finished exactly when that line is
        complete); returns the line's values."""
        for name, lines in row.details().items():
            if lines:
                self._append(self.paths[name], DETAILS[name][0], lines)
        line = row.columns()
        self._append(self.results_path, RESULT_COLUMNS, [line])
        return line


EXACT = 1e-4         # nats: "exact" parity (fp32 layouts agree to ~1e-6; this leaves room for reduction order)
AMP_TOLERANCE = 5e-2  # nats: a bf16/fp16 curve within this of the fp32 baseline is "within AMP tolerance"


def parity_verdict(max_abs: float | None, precision: str, is_baseline: bool) -> str:
    if is_baseline:
        return "baseline"
    if max_abs is None:
        return ""
    if max_abs <= EXACT:
        return "exact"
    if precision != "fp32" and max_abs <= AMP_TOLERANCE:
        return "within AMP tolerance"
    return "drifted"


@dataclass(frozen=True)
class Row:
    """One config's result as the harness knows it: its plan entry, how it ended (status, error, wall seconds),
    its run's metrics (None when it produced none), and what the row is judged against: the sweep's timing
    warm-up, the loss curve of its baseline when that has run, and the peak FLOP/s of one device for its dtype
    (value, source). ``columns()`` is its results.csv line and ``details()`` its steps.csv and evals.csv lines:
    pure functions of these fields, whose names are ``RESULT_COLUMNS`` (the config's fields, the metrics' row
    fields, ``HARNESS_COLUMNS``)."""
    entry: PlanEntry
    status: str
    error: str
    wall_s: float
    metrics: RunMetrics | None
    timing_warmup: int
    baseline_losses: tuple[float, ...] | None = None
    peak: tuple[float, str] | None = None
    requeues: int = 0  # how many times SLURM requeued its job (resumed from its checkpoint each time)

    def columns(self) -> dict:
        cfg, m = self.entry.config, self.metrics
        row = cfg.to_dict()
        row.update(config_id=self.entry.config_id, status=self.status, error=self.error,
                   timing_warmup=self.timing_warmup, added_as_baseline=self.entry.added_as_baseline,
                   phase=self.entry.phase, wall_s=round(self.wall_s, 2), requeues=self.requeues)
        # The target the run was given, "" when none (the config's 0 means "no target"); a --target-gap resolves
        # to a loss only inside the run, so a row without metrics leaves it empty and keeps target_gap
        row["target_loss"] = cfg.target_loss or None
        if m is None:
            return row
        row.update({k: m.config[k] for k in ("lr", "pp_microbatches", "device", "steps")})  # as resolved
        row.update({k: getattr(m, k) for k in RUN_METRIC_COLUMNS})
        row.update(steps_run=len(m.losses), tokens_seen=len(m.losses) * cfg.tokens_per_step,
                   train_seconds=sum(m.step_time_ms) / 1e3)
        if self.status != "ok":
            row["final_loss"] = m.losses[-1] if m.losses else None
            return row
        row.update({k: getattr(m, k) for k in OK_METRIC_COLUMNS})
        spread = m.step_time_ms_p90 / m.step_time_ms_p50 if m.step_time_ms_p50 else None
        row.update(step_time_p90_p50=spread, noisy=is_noisy(m.step_time_cv, spread), final_loss=m.losses[-1],
                   **prediction_columns(m.predicted_memory, m.peak_memory_bytes))
        for cat in (*MEMORY_CATEGORIES, "other"):
            row[f"memory_{cat}_bytes"] = (m.memory_breakdown or {}).get(cat)
        if self.peak is not None:
            from llmopt.instruments import mfu

            n_devices = cfg.world_size if m.config["device"] == "cuda" else 1  # CPU ranks share one CPU
            value, source = self.peak
            row.update(peak_flops=value * n_devices, peak_flops_source=source,
                       mfu=mfu(m.tokens_per_s, m.flops_per_token, value * n_devices))
        if self.entry.compare_with_baseline:
            row.update(self._parity())
        return row

    def _parity(self) -> dict:
        base_id = self.entry.baseline_id
        is_baseline = base_id == self.entry.config_id
        losses = self.metrics.losses
        ref = losses if is_baseline else self.baseline_losses
        out = {"baseline_id": base_id}
        if ref is not None and len(ref) == len(losses):
            out["loss_parity_max_abs"] = max((abs(a - b) for a, b in zip(losses, ref)), default=0.0)
        out["parity_verdict"] = parity_verdict(out.get("loss_parity_max_abs"), self.entry.config.precision,
                                               is_baseline)
        return out

    def details(self) -> dict[str, list[dict]]:
        """Its steps.csv and evals.csv lines (none without metrics)."""
        m, cid = self.metrics, self.entry.config_id
        if m is None:
            return {"steps": [], "evals": []}
        optimizer_ms = m.optimizer_ms or [None] * len(m.losses)
        return {"steps": [{"config_id": cid, "step": i, "loss": l, "step_time_ms": t, "optimizer_ms": o}
                          for i, (l, t, o) in enumerate(zip(m.losses, m.step_time_ms, optimizer_ms))],
                "evals": [{"config_id": cid, **e} for e in m.evals or []]}


def prediction_columns(pred: dict, peak) -> dict:
    """A row's memory-prediction columns from ``llmopt.memory``'s prediction (``to_dict()``) and the measured
    peak: the harness writes them, scripts/repredict_memory.py rewrites them."""
    cols = {"predicted_memory_bytes": pred["total"],
            "memory_prediction_error": (pred["total"] - peak) / peak if peak else None}
    for cat in MEMORY_CATEGORIES:
        cols[f"predicted_{cat}_bytes"] = pred[cat]
    return cols


FLOAT_DIGITS = 8  # significant digits of a float in results.csv


def as_written(v: float) -> float:
    """``v`` as results.csv holds it, so that a row read back from the file and one still in memory compare
    equal (a resumed sweep's rows are both)."""
    return float(f"{v:.{FLOAT_DIGITS}g}")


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{FLOAT_DIGITS}g}"
    return v
