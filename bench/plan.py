"""A sweep's plan, typed: each config to run as a ``PlanEntry`` (its ``TrainConfig``, id, skip reason and phase),
the whole plan as a ``SweepPlan`` (matrix, device, timing warm-up, entries), and its file, plan.json, which
``--resume`` reads back through the same type (so a hand-edited or planted file is refused, naming the entry).

torch-free: the sweep's parent process plans before any config imports torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace

from bench.layouts import layout_name
from bench.noise import RETIME, RETIME_SUFFIX
from bench.study import STUDIES, Study
from llmopt.core.config import TrainConfig, validate
from llmopt.safe_files import write_json

WARMUP_PREFIX = "warmup-"  # the untimed run before a sweep's first timed config: its log only, never a row
# What a config id may hold (``config_id``: the layout's words, numbers, a hash): it names the config's log and
# metrics files, so one read from a plan.json someone handed us must not climb out of the sweep's directory.
CONFIG_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,200}")
ENTRY_KEYS = {"config_id", "config", "skipped", "added_as_baseline", "phase", "compare_with_baseline"}


# Fields TrainConfig gained after references were made: at their default they leave a config's id unchanged
HASHED_WHEN_SET = ("adamw_lr",)


class PlanError(ValueError):
    """A plan that cannot be made or read back: one line for the user, exit 2."""


class OlderPlan(PlanError):
    """A plan written by an older llmopt, before fields that its configs' ids now hash."""


def config_id(cfg: TrainConfig) -> str:
    """Readable and stable: the layout and toggles, then a hash of every field. 12 hex digits (48 bits): a
    million-config sweep collides with probability ~2e-3, and ``bench.matrix.expand`` refuses a plan where two
    different configs still share an id. A field added after plans were written is hashed only where it is set
    (``HASHED_WHEN_SET``), so an older plan's ids, and the rows that name them, still match."""
    fields = {k: v for k, v in asdict(cfg).items()
              if k not in HASHED_WHEN_SET or v != TrainConfig.__dataclass_fields__[k].default}
    parts = [cfg.engine] if cfg.engine != "native" else []
    parts += [cfg.model_impl] if cfg.model_impl != "llmopt" else []
    parts += [layout_name(fields), cfg.precision, f"ga{cfg.grad_accum}", cfg.optimizer]
    parts += [f"b{cfg.global_batch}"] if cfg.global_batch != TrainConfig.global_batch else []
    parts += [f"lr{cfg.lr:.3g}"] if cfg.lr else []
    parts += [f"adamw-lr{cfg.adamw_lr:.3g}"] if cfg.adamw_lr else []
    parts += ["compile"] if cfg.compile else []
    parts += ["ac"] if cfg.activation_checkpointing else []
    parts += [f"opt-{cfg.optimizer_impl}"] if cfg.optimizer_impl != "auto" else []
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    return "-".join(parts) + "-" + digest


def baseline_of(cfg: TrainConfig) -> TrainConfig:
    """llmopt's own eager step, single process, fp32, no accumulation; same model shape, data, batch,
    optimizer, seed and steps (peers -- HF's model, Accelerate -- start from the same weights)."""
    return replace(cfg, dp=1, tp=1, pp=1, dp_mode="ddp", pp_schedule="1f1b", pp_microbatches=0,
                   precision="fp32", grad_accum=1, optimizer_impl="auto", model_impl="llmopt", engine="native",
                   compile=False, activation_checkpointing=False)


@dataclass(frozen=True)
class PlanEntry:
    """One config of a sweep. ``phase``: None for a matrix's own configs (each compared with its fp32
    baseline), or the step of an adaptive matrix that added it (grid, widen, ladder, precision, layouts:
    convergence runs, compared with each other) or ``retime``. ``config_id`` names its files (logs/, metrics/)
    and its row; it is ``config_id(config)``, with ``-retime`` for a second timing."""
    config: TrainConfig
    config_id: str
    skipped: str | None = None      # why it does not run (None: it runs)
    added_as_baseline: bool = False  # a baseline the matrix lacked, added so its configs can be compared
    phase: str | None = None

    @classmethod
    def of(cls, cfg: TrainConfig, device: str, max_ranks: int, added_as_baseline: bool = False,
           phase: str | None = None) -> "PlanEntry":
        """The entry of ``cfg``, skipped (with the reason) when it is not a valid config or needs more ranks than
        this sweep allows."""
        reason = None
        try:
            resolved = validate(cfg)
            if resolved.world_size > max_ranks:
                reason = f"needs {resolved.world_size} ranks; this {device} sweep allows {max_ranks}"
        except ValueError as e:
            reason = str(e)
        return cls(cfg, config_id(cfg), reason, added_as_baseline, phase)

    @property
    def compare_with_baseline(self) -> bool:
        """A matrix's own configs are compared with their baseline's loss curve; what a phase added is not."""
        return self.phase is None

    @property
    def baseline_id(self) -> str:
        return config_id(baseline_of(self.config))

    def retimed(self) -> "PlanEntry":
        return replace(self, config_id=self.config_id + RETIME_SUFFIX, phase=RETIME, added_as_baseline=False)

    def warm_up(self) -> "PlanEntry":
        return replace(self, config_id=WARMUP_PREFIX + self.config_id)

    def to_json(self) -> dict:
        d = {"config_id": self.config_id, "config": asdict(self.config), "skipped": self.skipped,
             "added_as_baseline": self.added_as_baseline}
        if self.phase is not None:
            d.update(phase=self.phase, compare_with_baseline=False)
        return d

    @classmethod
    def from_json(cls, d, where: str) -> "PlanEntry":
        """An entry as ``to_json`` writes it, or ``PlanError`` naming ``where``: known keys, a config of
        ``TrainConfig``'s fields and types, and the id that config has (recomputed, so that a planted
        ``../../x`` or another config's id cannot pass)."""
        if not isinstance(d, dict) or not isinstance(d.get("config"), dict):
            raise PlanError(f"{where} has no config table")
        if set(d) - ENTRY_KEYS or not {"config_id", "skipped", "added_as_baseline"} <= set(d):
            raise PlanError(f"{where} has keys {sorted(d)}; expected {sorted(ENTRY_KEYS)}")
        cid, phase = d["config_id"], d.get("phase")
        if not isinstance(cid, str) or not CONFIG_ID_RE.fullmatch(cid):
            raise PlanError(f"{where}'s config_id {cid!r} is not a config id")
        if not (phase is None or isinstance(phase, str)) or not isinstance(d["added_as_baseline"], bool):
            raise PlanError(f"{where}'s phase {phase!r} or added_as_baseline {d['added_as_baseline']!r} is malformed")
        if not (d["skipped"] is None or isinstance(d["skipped"], str)):
            raise PlanError(f"{where}'s skipped is {d['skipped']!r}")
        try:
            cfg = TrainConfig.from_dict(d["config"], f"{where}'s config")
        except ValueError as e:
            raise PlanError(str(e)) from None
        expected = config_id(cfg) + (RETIME_SUFFIX if phase == RETIME else "")
        if cid != expected:
            older = [k for k in TrainConfig.field_names() if k not in d["config"] and k not in HASHED_WHEN_SET]
            if older:  # the ids of a plan from before these fields were hashed differently
                raise OlderPlan(f"{where}'s config lacks {', '.join(older)}, added since, and this version computes "
                                f"its id differently")
            raise PlanError(f"{where}'s config_id {cid!r} is not its config's ({expected})")
        return cls(cfg, cid, d["skipped"], d["added_as_baseline"], phase)


@dataclass
class SweepPlan:
    """What a sweep runs: the matrix it came from, the device, the timing warm-up every config uses, and the
    entries (baselines first). Follow-ups (an adaptive matrix's next phase, re-timings) are appended and the
    file saved again, so a resume sees them."""
    matrix: str
    device: str
    timing_warmup: int
    entries: list[PlanEntry] = field(default_factory=list)
    study: Study | None = None  # a convergence study's protocol (bench.study): what its follow-ups follow

    def save(self, out_dir: str) -> None:
        write_json(os.path.join(out_dir, "plan.json"),
                   {"matrix": self.matrix, "device": self.device, "timing_warmup": self.timing_warmup,
                    "study": self.study.to_json() if self.study else None,
                    "plan": [e.to_json() for e in self.entries]})

    @classmethod
    def load(cls, path: str) -> "SweepPlan":
        """A plan.json read back for ``--resume``; ``PlanError`` naming the file unless it is one this harness
        writes."""
        def bad(why: str):
            return PlanError(f"--resume: {path} is not a plan bench.run wrote ({why}); it cannot be finished, start "
                             f"a new sweep")

        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise PlanError(f"--resume: {path} is corrupt ({e}); it cannot be finished, start a new sweep") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("plan"), list) or not saved["plan"]:
            raise bad("no list of configs under 'plan'")
        if saved.get("device") not in ("cpu", "cuda") or not isinstance(saved.get("matrix"), str):
            raise bad("'device' must be cpu or cuda and 'matrix' a name")
        warmup = saved.get("timing_warmup", saved.get("warmup_steps"))  # the name before it was renamed
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise bad(f"timing_warmup {warmup!r} is not a count of steps")
        entries = []
        for i, d in enumerate(saved["plan"]):
            try:
                entries.append(PlanEntry.from_json(d, f"entry {i}"))
            except OlderPlan as e:
                raise PlanError(f"--resume: {path} was written by an older llmopt ({e}); this version cannot finish "
                                f"it, start a new sweep") from None
            except PlanError as e:
                raise bad(str(e)) from None
        study = saved.get("study")
        if study is None:  # a plan written before studies travelled in it: a named one's protocol as it is now
            study = STUDIES.get(saved["matrix"])
        else:
            try:
                study = Study.from_mapping(study, "study")
            except ValueError as e:
                raise bad(str(e)) from None
        return cls(saved["matrix"], saved["device"], warmup, entries, study)
