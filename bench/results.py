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
import os

RESULT_COLUMNS = [
    "config_id", "status", "error",
    "engine", "model_impl", "preset", "device", "world_size", "dp", "dp_mode", "tp", "pp", "pp_schedule",
    "pp_microbatches", "precision", "grad_accum", "micro_batch", "global_batch", "seq_len", "optimizer",
    "optimizer_impl", "compile", "activation_checkpointing", "lr", "lr_schedule", "lr_warmup", "min_lr_ratio",
    "weight_decay", "max_grad_norm", "steps", "max_tokens", "timing_warmup", "seed", "data",
    "eval_every", "eval_batches", "target_loss", "target_gap", "gns",
    "steps_run", "tokens_seen", "steps_to_target", "tokens_to_target", "seconds_to_target", "final_eval_loss",
    "best_eval_loss", "gns_b_simple", "train_seconds", "eval_seconds", "diverged_at_step",
    "tokens_per_s", "step_time_ms_p50", "step_time_ms_p90",
    "peak_memory_bytes", "peak_memory_kind", "predicted_memory_bytes", "memory_prediction_error",
    "memory_parameters_bytes", "memory_gradients_bytes", "memory_optimizer_state_bytes",
    "memory_activations_bytes", "memory_other_bytes",
    "predicted_parameters_bytes", "predicted_gradients_bytes", "predicted_optimizer_state_bytes",
    "predicted_activations_bytes", "peak_rss_bytes",
    "mfu", "peak_flops", "peak_flops_source", "flops_per_token",
    "final_loss", "entropy_floor_nats", "baseline_id", "loss_parity_max_abs", "parity_verdict",
    "fp16_skipped_steps", "energy_j_per_token", "gpu_util_mean", "gpu_power_w_mean",
    "added_as_baseline", "wall_s",
]
# Columns read as text; every other column is a number (or empty).
TEXT_COLUMNS = {"config_id", "status", "error", "engine", "model_impl", "preset", "device", "dp_mode", "pp_schedule",
                "precision", "optimizer", "optimizer_impl", "compile", "activation_checkpointing", "data",
                "lr_schedule", "gns", "peak_memory_kind", "peak_flops_source", "baseline_id", "parity_verdict",
                "added_as_baseline"}
STEP_COLUMNS = ["config_id", "step", "loss", "step_time_ms"]
EVAL_COLUMNS = ["config_id", "step", "tokens", "train_seconds", "loss", "lr", "gns_b_simple"]
# Per-config detail files: name -> (columns, the columns that identify a row within a config)
DETAILS = {"steps": (STEP_COLUMNS, "step"), "evals": (EVAL_COLUMNS, "step")}
STATUSES = ("ok", "failed", "skipped", "timeout", "oom", "diverged")


# Columns renamed since a committed reference was written: old name -> current name (read under the new one).
RENAMED = {"warmup_steps": "timing_warmup"}


def _complete_rows(path: str) -> tuple[list[str], list[dict]]:
    """(header, rows) of a CSV, keeping only lines written whole: a torn or malformed tail is dropped. The
    header is the file's own, so a file written by another version of the schema is read as it was written."""
    if not os.path.exists(path):
        return [], []
    with open(path, newline="") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # the last line was cut mid-write
    lines = list(csv.reader(io.StringIO(text)))
    if not lines:
        return [], []
    header = [RENAMED.get(c, c) for c in lines[0]]
    return header, [dict(zip(header, row)) for row in lines[1:] if len(row) == len(header)]


class ResultFiles:
    def __init__(self, out_dir: str):
        self.results_path = os.path.join(out_dir, "results.csv")
        self.paths = {name: os.path.join(out_dir, f"{name}.csv") for name in DETAILS}
        self.steps_path = self.paths["steps"]

    def load(self, repair: bool = False) -> tuple[list[dict], dict[str, list[dict]]]:
        """Finished rows and their detail rows by file (one row per config; torn lines and details of
        unfinished configs left out). Read-only unless ``repair`` (resume), which rewrites the files clean in
        the current schema; a file with columns this version does not know is refused rather than rewritten."""
        header, raw = _complete_rows(self.results_path)
        results, seen = [], set()
        for row in raw:
            if row.get("config_id") and row["config_id"] not in seen and row.get("status") in STATUSES:
                seen.add(row["config_id"])
                results.append(row)
        details, headers = {}, {}
        for name, (_, key) in DETAILS.items():
            headers[name], rows = _complete_rows(self.paths[name])
            kept, seen_keys = [], set()
            for row in rows:
                k = (row.get("config_id"), row.get(key))
                if k[0] in seen and k not in seen_keys:
                    seen_keys.add(k)
                    kept.append(row)
            details[name] = kept
        if repair:
            unknown = set(header) - set(RESULT_COLUMNS)
            for name, (columns, _) in DETAILS.items():
                unknown |= set(headers[name]) - set(columns)
            if unknown:
                raise ValueError(f"{self.results_path} has columns this version does not write "
                                 f"({', '.join(sorted(unknown))}); resume it with the version that started it")
            self._rewrite(self.results_path, RESULT_COLUMNS, results)
            for name, (columns, _) in DETAILS.items():
                self._rewrite(self.paths[name], columns, details[name])
        return results, details

    def drop(self, config_ids: set[str]) -> None:
        """Remove these configs' rows and details (to run them again), rewriting the files atomically."""
        results, details = self.load()
        self._rewrite(self.results_path, RESULT_COLUMNS, [r for r in results if r["config_id"] not in config_ids])
        for name, (columns, _) in DETAILS.items():
            self._rewrite(self.paths[name], columns, [d for d in details[name] if d["config_id"] not in config_ids])

    @staticmethod
    def _rewrite(path: str, columns: list[str], rows: list[dict]) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows({k: row.get(k, "") for k in columns} for row in rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @staticmethod
    def _append(path: str, columns: list[str], rows: list[dict]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, extrasaction="raise")
        for row in rows:
            w.writerow({k: _fmt(row.get(k)) for k in columns})
        with open(path, "a", newline="") as f:
            f.write(buf.getvalue())  # one write per config
            f.flush()
            os.fsync(f.fileno())

    def append(self, result: dict, details: dict[str, list[dict]]) -> None:
        for name, rows in details.items():
            if rows:
                self._append(self.paths[name], DETAILS[name][0], rows)
        self._append(self.results_path, RESULT_COLUMNS, [result])


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.8g}"
    return v
