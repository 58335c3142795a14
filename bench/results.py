"""The sweep's files: results.csv (one row per config), steps.csv (one row per step), written so that a
sweep killed at any instant (SIGKILL included) can be resumed without losing or duplicating a finished row.

Each row is appended with one write, flushed and fsync'ed. A config's steps are written before its result
row, so a config is finished exactly when its result row is complete. On resume, a torn last line is cut,
steps of unfinished configs are dropped, and both files are rewritten atomically.
"""
from __future__ import annotations

import csv
import io
import os

RESULT_COLUMNS = [
    "config_id", "status", "error",
    "engine", "model_impl", "preset", "device", "world_size", "dp", "dp_mode", "tp", "pp", "pp_schedule",
    "pp_microbatches", "precision", "grad_accum", "micro_batch", "global_batch", "seq_len", "optimizer",
    "optimizer_impl", "compile", "activation_checkpointing", "lr", "weight_decay", "max_grad_norm", "steps",
    "warmup_steps", "seed", "data",
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
STEP_COLUMNS = ["config_id", "step", "loss", "step_time_ms"]
STATUSES = ("ok", "failed", "skipped", "timeout", "oom", "diverged")


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
    header = lines[0]
    return header, [dict(zip(header, row)) for row in lines[1:] if len(row) == len(header)]


class ResultFiles:
    def __init__(self, out_dir: str):
        self.results_path = os.path.join(out_dir, "results.csv")
        self.steps_path = os.path.join(out_dir, "steps.csv")

    def load(self, repair: bool = False) -> tuple[list[dict], list[dict]]:
        """Finished rows and their steps (one row per config; torn lines and steps of unfinished configs
        left out). Read-only unless ``repair`` (resume), which rewrites both files clean in the current
        schema; a file with columns this version does not know is refused rather than rewritten."""
        header, raw = _complete_rows(self.results_path)
        results, seen = [], set()
        for row in raw:
            if row.get("config_id") and row["config_id"] not in seen and row.get("status") in STATUSES:
                seen.add(row["config_id"])
                results.append(row)
        step_header, raw_steps = _complete_rows(self.steps_path)
        steps, seen_steps = [], set()
        for row in raw_steps:
            key = (row.get("config_id"), row.get("step"))
            if key[0] in seen and key not in seen_steps:
                seen_steps.add(key)
                steps.append(row)
        if repair:
            unknown = (set(header) - set(RESULT_COLUMNS)) | (set(step_header) - set(STEP_COLUMNS))
            if unknown:
                raise ValueError(f"{self.results_path} has columns this version does not write "
                                 f"({', '.join(sorted(unknown))}); resume it with the version that started it")
            self._rewrite(self.results_path, RESULT_COLUMNS, results)
            self._rewrite(self.steps_path, STEP_COLUMNS, steps)
        return results, steps

    def drop(self, config_ids: set[str]) -> None:
        """Remove these configs' rows and steps (to run them again), rewriting both files atomically."""
        results, steps = self.load()
        self._rewrite(self.results_path, RESULT_COLUMNS, [r for r in results if r["config_id"] not in config_ids])
        self._rewrite(self.steps_path, STEP_COLUMNS, [s for s in steps if s["config_id"] not in config_ids])

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

    def append(self, result: dict, steps: list[dict]) -> None:
        if steps:
            self._append(self.steps_path, STEP_COLUMNS, steps)
        self._append(self.results_path, RESULT_COLUMNS, [result])


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.8g}"
    return v
