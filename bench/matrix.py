"""Matrices: named sweeps and custom TOML files -> a list of configs, each valid or a ``skipped`` reason.

A config is a dict of ``llmopt.core.config.TrainConfig`` fields (one name per thing: the flags, the CSV columns
and these keys are the same words). Nothing is dropped silently: an invalid combination, or one that needs
more ranks than the device allows, stays in the plan with the reason it is skipped.

Custom file (TOML):

    [base]                 # optional: fixed fields for every config
    preset = "tiny"
    steps = 6
    [matrix]               # each field -> a list of values; the sweep is their product
    precision = ["fp32", "bf16"]
    optimizer = ["adamw", "lamb"]
    [[config]]             # optional, repeatable: one more config, listed field by field
    dp = 2
    dp_mode = "fsdp"
    [slurm]                # optional: for --executor slurm (flags of the same names win)
    partition = "gpu"
    account = "my-project"
    gpus_per_node = 8
    cpus_per_node = 64
    share = false          # true: configs' jobs may share nodes (default: each has its nodes, --exclusive)
    time_limit = 240       # minutes per job (--slurm-time-limit); a longer config is requeued and resumed
    max_requeues = 5       # fail a config requeued more often than this
    ranks_per_node = 2     # CPU configs: ranks per node (a config of more ranks spans nodes)
    options = { constraint = "h100", qos = "high" }   # extra sbatch options
"""
from __future__ import annotations

import itertools
import math
import os
import re
import tomllib
from dataclasses import asdict, fields

from bench.layouts import BASE_LAYOUTS
from bench.plan import PlanEntry, baseline_of, config_id
from bench.study import STUDIES, Study
from llmopt.core.config import PRECISIONS, TrainConfig, check_given
from llmopt.optimizers import names as optimizer_names
from llmopt.optimizers import registry as optimizer_registry
from llmopt.optimizers import spec as optimizer_spec

FIELDS = TrainConfig.field_names()
_TYPES = {f.name: str(f.type) for f in fields(TrainConfig)}
INT_FIELDS = {f for f, t in _TYPES.items() if t == "int"}
BOOL_FIELDS = {f for f, t in _TYPES.items() if t == "bool"}
FLOAT_FIELDS = {f for f, t in _TYPES.items() if t == "float"}

# Shapes per device: small enough on a 2-core CPU that bf16/fp16 rows (slow there) still finish.
DEVICE_BASE = {
    "cpu": dict(preset="tiny", global_batch=8, seq_len=64, steps=6),
    "cuda": dict(preset="gpt2", global_batch=16, seq_len=1024, steps=12),
}
WARMUP_STEPS = {"cpu": 2, "cuda": 3}
# The peers matrix runs the shape of the CPU speed target (issue: 4 layers, 4 heads, width 256, sequence 256,
# vocabulary 8192, batch 8, AdamW); on CUDA GPT-2 124M at sequence 1024.
PEERS_SHAPE = {"cpu": dict(preset="mini", seq_len=256, global_batch=8, optimizer="adamw", steps=8),
               "cuda": dict(preset="gpt2", seq_len=1024, global_batch=16, optimizer="adamw", steps=12)}


# Convergence studies (bench.study: the protocol, its phases and the named studies). The base fields of the
# named ones, per device; the targets are chosen in the report from the rows (bench.tuning: two common to every
# model and batch size, and each batch's own), so runs never stop early.
CONVERGENCE_BASE = {
    "cpu": dict(preset="tiny-v256", seq_len=64, max_tokens=2**17, lr_schedule="cosine", grad_accum=2, gns=True),
    "cuda": dict(preset="mini", seq_len=256, max_tokens=2**22, lr_schedule="cosine", grad_accum=2, gns=True),
}
# Real text: the Python standard library's sources with a BPE trained on them (prepared once into the cache,
# offline), at two model sizes (bench.study); sized to finish within about an hour on a 2-core CPU (tiny and mini at
# 2^19 tokens would take about three).
TEXT_BASE = {"cpu": dict(data="python-stdlib", tokenizer="train:4096", seq_len=128, max_tokens=2**18,
                         lr_schedule="cosine", grad_accum=1),
             "cuda": dict(data="python-stdlib", tokenizer="train:4096", seq_len=256, max_tokens=2**24,
                          lr_schedule="cosine", grad_accum=1)}
TARGET_FRACTION = 1 / 2        # the per-batch target: AdamW's mean end-of-budget loss at this fraction of the budget
# Warm-up: WARMUP_FRACTION of the steps, at least WARMUP_MIN_STEPS (a 32-step run once warmed up for 1), at most
# half the run (the smallest ladder budgets are a few steps)
WARMUP_FRACTION = 0.05
WARMUP_MIN_STEPS = 3
EVAL_EVERY_TOKENS = 2**14
EVAL_SEQUENCES = 64


# The layouts every optimizer and speed toggle is shown on: one process, and each 2-rank layout once


def wrapped_optimizers() -> list[str]:
    """The optimizers whose update needs whole tensors, wrapped under sharded layouts (llmopt.optim: the whole
    tensor's update from its gathered shards)."""
    return [s.name for s in optimizer_registry().values() if s.whole_tensors]


def convergence_run(base: dict, batch: int, study: Study, **fields) -> dict:
    """One tuning run at global batch ``batch`` over the whole budget (``base``'s max_tokens), on the study's
    tuning seed at its grid's weight decay, with its complete schedule (warm-up: ``warmup_steps``; decay to its
    last step) and an eval every EVAL_EVERY_TOKENS on the first EVAL_SEQUENCES held-out sequences (the same set
    at every batch size)."""
    base = dict(base, global_batch=batch, weight_decay=study.weight_decays[0], seed=study.tuning_seed, **fields)
    schedules = optimizer_spec(base.get("optimizer", "adamw")).lr_schedules
    if schedules and base.get("lr_schedule", "constant") not in schedules:
        base["lr_schedule"] = schedules[0]  # a schedule-free optimizer: its averaging is the decay
    cfg = at_budget(base, 1, base["seed"])
    return dict(cfg, eval_every=max(1, EVAL_EVERY_TOKENS // (batch * base["seq_len"])),
                eval_batches=max(1, EVAL_SEQUENCES // batch))


def waits_for_adamw(study: Study, optimizer: str) -> bool:
    """Whether ``optimizer``'s grid waits for AdamW's tuned rate: it has an AdamW part (Muon's embeddings, head
    and gains), which runs at that rate, and the study tunes AdamW (``bench.tuning.followups`` adds the grid)."""
    return optimizer_spec(optimizer).adamw_part and "adamw" in (study.optimizers or optimizer_names())


def study_grid(study: Study, base: dict) -> list[dict]:
    """A study's tuning runs (phase grid): every model, optimizer, batch size and learning-rate multiple, each
    model's whole budget its ``tokens_per_param`` times its parameters (all of them, the data's vocabulary's
    embedding included) where that is set. An optimizer that ``waits_for_adamw`` is left to the follow-ups."""
    from llmopt.core.shapes import param_count

    out = []
    for preset in study.presets or (base["preset"],):
        b = dict(base, preset=preset)
        if study.tokens_per_param:
            model = TrainConfig(**{k: v for k, v in b.items() if k in FIELDS}).model_config
            b["max_tokens"] = max(1, round(study.tokens_per_param * param_count(model)))
        for o in study.optimizers or optimizer_names():
            if waits_for_adamw(study, o):
                continue
            for batch in study.batches:
                out += [convergence_run(b, batch, study, optimizer=o, lr=optimizer_spec(o).lr_centre * m)
                        for m in study.lr_multiples]
    return out


def study_of(matrix: str, device: str) -> tuple[Study, dict] | None:
    """(the study, its base fields) of a named convergence matrix or of a matrix file with a [convergence]
    table, else None."""
    if matrix in STUDIES:
        base = dict(TEXT_BASE if matrix == "convergence-text" else CONVERGENCE_BASE)[device]
        return STUDIES[matrix], dict(base, device=device)
    if matrix in NAMED or not (matrix.endswith(".toml") or os.path.sep in matrix):
        return None
    doc = _read_toml(matrix)
    if "convergence" not in doc:
        return None
    try:
        study = Study.from_mapping(doc["convergence"], f"--matrix {matrix} [convergence]")
    except ValueError as e:
        raise MatrixError(str(e)) from None
    if study.optimizers:
        known = set(optimizer_names())
        bad = [o for o in study.optimizers if o not in known]
        if bad:
            raise MatrixError(f"--matrix {matrix} [convergence]: unknown optimizer(s) {bad}; use "
                              f"{', '.join(sorted(known))}")
    # a study of the user's own: a cosine schedule (each budget's run ends its decay) and what [base] says; no
    # instrument the named matrices add (the noise scale needs DDP, which a [base] layout may not be)
    return study, dict(lr_schedule="cosine", device=device)


def at_budget(cfg: dict, fraction: float, seed: int) -> dict:
    """``cfg`` (a whole-budget run) at ``fraction`` of its budget and with ``seed``: its own complete schedule
    over fewer steps (warm-up: ``warmup_steps``), and an eval only before the first and after the last step:
    the end-of-budget loss is all a ladder point needs."""
    max_tokens = int(cfg["max_tokens"] * fraction)
    steps = -(-max_tokens // (cfg["global_batch"] * cfg["seq_len"]))
    every = cfg.get("eval_every") if fraction == 1 and seed == cfg.get("seed", 0) else steps
    return dict(cfg, max_tokens=max_tokens, steps=steps, lr_warmup=warmup_steps(steps), eval_every=every or steps,
                seed=seed)


def warmup_steps(steps: int) -> int:
    """WARMUP_FRACTION of ``steps``, at least WARMUP_MIN_STEPS, at most half of them."""
    return min(max(math.ceil(WARMUP_FRACTION * steps), WARMUP_MIN_STEPS), steps // 2)


def layouts(max_ranks: int, degrees=(2,)) -> list[dict]:
    """Every parallel layout within ``max_ranks``: each dimension off or at one of ``degrees``, both
    dp modes wherever dp is on, both schedules for pipeline alone (1F1B, the memory-lean one, in pairs)."""
    out = []
    for dp, tp, pp in itertools.product((1, *degrees), repeat=3):
        if dp * tp * pp > max_ranks:
            continue
        modes = ("ddp", "fsdp") if dp > 1 else ("ddp",)
        schedules = ("gpipe", "1f1b") if pp > 1 and dp == tp == 1 else ("1f1b",)
        for mode, sched in itertools.product(modes, schedules):
            out.append(dict(dp=dp, tp=tp, pp=pp, dp_mode=mode, pp_schedule=sched))
    return out


def _named(name: str, device: str, max_ranks: int) -> list[dict]:
    if name == "smoke":
        return [{}, {"grad_accum": 2}, {"optimizer": "lamb"}, {"dp": 2}, {"tp": 2}]
    if name == "default":
        single = [{"precision": p} for p in PRECISIONS] + [{"grad_accum": 4}]
        single += [{"optimizer": o} for o in ("sgd", "adam", "lamb")]
        multi = [l for l in layouts(max_ranks) if l["dp"] * l["tp"] * l["pp"] > 1
                 and (l["dp"] == 1 or l["tp"] * l["pp"] == 1 or l["dp_mode"] == "fsdp")]
        return single + multi
    if name == "parity":
        degrees = (2, 4) if max_ranks >= 4 else (2,)
        return [dict(l, optimizer=o) for l in layouts(max_ranks, degrees) for o in ("adamw", "lamb")]
    if name == "peers":  # each engine eager, and its candidates for "best"; the report picks the best
        peers = [dict(engine="native", model_impl="llmopt"), dict(engine="native", model_impl="hf"),
                 dict(engine="accelerate", model_impl="hf")]
        toggles = [dict(), dict(precision="bf16"), dict(compile=True), dict(compile=True, precision="bf16")]
        return [dict(p, **t, **PEERS_SHAPE[device]) for p in peers for t in toggles]
    if name == "extras":  # speed toggles on the baseline layouts, and the optimizers of llmopt.optim's wrappers
        toggles = [dict(compile=True), dict(activation_checkpointing=True)]
        toggles += [dict(optimizer_impl=i) for i in ("for-loop", "foreach", "fused")]
        toggles += [dict(optimizer=o) for o in wrapped_optimizers()]
        return [dict(l, **t) for l in BASE_LAYOUTS for t in [dict(), *toggles]
                if not (t.get("optimizer_impl") and l)]  # optimizer kernels: single process is enough
    if name == "optimizers":  # every optimizer on every baseline layout: its step's share, memory, parity
        return [dict(l, optimizer=o) for l in BASE_LAYOUTS for o in optimizer_names()]
    if name in STUDIES:
        study, base = study_of(name, device)
        return study_grid(study, base)
    if name == "full":
        return ([dict(l, precision=p, grad_accum=g, optimizer=o)
                 for l in layouts(max_ranks) for p in PRECISIONS for g in (1, 2)
                 for o in ("sgd", "adam", "adamw", "lamb")]
                + [dict(l, precision=p, grad_accum=g, optimizer=o)  # Muon and Adafactor on the baseline layouts
                   for l in BASE_LAYOUTS for p in PRECISIONS for g in (1, 2) for o in wrapped_optimizers()])
    raise KeyError(name)


NAMED = ("smoke", "default", "parity", "full", "peers", "extras", "optimizers", *STUDIES)


class MatrixError(ValueError):
    """A bad matrix file or filter: the CLI prints it as one line and exits 2."""


def _coerce(field: str, value, where: str):
    """``value`` as the field's type, and valid on its own (``llmopt.core.config.check_field``): a value that is wrong
    whatever the other fields (seed = -1, global_batch = [0], lr = [nan], a missing data path, an unknown
    preset) is the user's mistake, refused before any config is built; a bad *combination* of valid values
    stays a skipped row."""
    value = _as_type(field, value, where)
    try:
        check_given(field, value)
    except ValueError as e:
        raise MatrixError(f"{where}: {field} = {value!r}: {str(e).split(': ', 1)[-1]}") from None
    return value


def _as_type(field: str, value, where: str):
    if field not in FIELDS:
        raise MatrixError(f"{where}: unknown field {field!r}; known fields: {', '.join(FIELDS)}")
    if field in BOOL_FIELDS:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
        raise MatrixError(f"{where}: {field} = {value!r} is not true or false")
    if field in INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not re.fullmatch(r"-?[0-9]+", str(value)):
            raise MatrixError(f"{where}: {field} = {value!r} is not an integer")
        return int(value)
    if field in FLOAT_FIELDS:
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise MatrixError(f"{where}: {field} = {value!r} is not a number") from None
    return value if value is None else str(value)


def _read_toml(path: str) -> dict:
    if not os.path.isfile(path):
        raise MatrixError(f"--matrix: no such file {path!r}; use one of {', '.join(NAMED)} or a .toml file")
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MatrixError(f"--matrix {path}: not valid TOML ({e})") from None
    extra = set(doc) - {"base", "matrix", "config", "slurm", "convergence"}
    if extra:
        raise MatrixError(f"--matrix {path}: unknown table(s) {sorted(extra)}; use [base], [matrix], [[config]], "
                          f"[convergence] and [slurm]")
    if "convergence" in doc and ("matrix" in doc or "config" in doc):
        raise MatrixError(f"--matrix {path}: a [convergence] study plans its own runs from [base]; drop [matrix] "
                          f"and [[config]] (or make them a separate sweep)")
    return doc


def _base_table(doc: dict, path: str) -> dict:
    if not isinstance(doc.get("base", {}), dict):
        raise MatrixError(f"--matrix {path}: base must be a table ([base] with field = value lines)")
    return {k: _coerce(k, v, f"{path} [base]") for k, v in doc.get("base", {}).items()}


def load_toml(path: str, max_configs: int = 10_000) -> tuple[dict, list[dict]]:
    """([base]'s fields, every config of [matrix] and [[config]]); a [convergence] study: ([base], [])."""
    doc = _read_toml(path)
    if "convergence" in doc:
        return _base_table(doc, path), []
    listed = doc.get("config", [])
    if not isinstance(listed, list) or not all(isinstance(c, dict) for c in listed):
        raise MatrixError(f"--matrix {path}: config must be an array of tables ([[config]] with field = value lines)")
    if "matrix" in doc and (not isinstance(doc["matrix"], dict) or not doc["matrix"]):
        raise MatrixError(f"--matrix {path}: [matrix] must map config fields to lists of values")
    if not doc.get("matrix") and not listed:
        raise MatrixError(f"--matrix {path}: needs a [matrix] table mapping config fields to lists of values, "
                          f"or [[config]] tables, one per config")
    base = _base_table(doc, path)
    grid = doc.get("matrix", {})
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise MatrixError(f"--matrix {path}: [matrix] {k} must be a non-empty list, e.g. {k} = [...]")
    count = (math.prod(len(v) for v in grid.values()) if grid else 0) + len(listed)  # before expanding
    if count > max_configs:
        raise MatrixError(f"--matrix {path}: {count:,} combinations, more than --max-configs {max_configs:,}; "
                          f"shrink the matrix or raise --max-configs")
    axes = {k: [_coerce(k, x, f"{path} [matrix]") for x in v] for k, v in grid.items()}
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())] if grid else []
    combos += [{k: _coerce(k, v, f"{path} [[config]] {i + 1}") for k, v in c.items()} for i, c in enumerate(listed)]
    return base, combos


SLURM_KEYS = {"partition": str, "account": str, "gpus_per_node": int, "cpus_per_node": int, "share": bool,
              "options": dict, "time_limit": int, "max_requeues": int, "ranks_per_node": int}


def slurm_table(path: str) -> dict:
    """The matrix file's [slurm] table (see the module docstring), checked key by key."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f).get("slurm", {})
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MatrixError(f"--matrix {path}: cannot read its [slurm] table ({e})") from None
    if not isinstance(table, dict):
        raise MatrixError(f"--matrix {path}: slurm must be a table ([slurm] with key = value lines)")
    for key, value in table.items():
        kind = SLURM_KEYS.get(key)
        if kind is None:
            raise MatrixError(f"--matrix {path}: [slurm] {key} is not a setting; use {', '.join(SLURM_KEYS)}")
        least = 0 if key == "max_requeues" else 1
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < least)):
            raise MatrixError(f"--matrix {path}: [slurm] {key} = {value!r} must be a {kind.__name__}"
                              + (f" of at least {least}" if kind is int else ""))
    return {k: ({str(a): str(b) for a, b in v.items()} if k == "options" else v) for k, v in table.items()}


# sbatch options a sweep may add (``--slurm-option`` or the [slurm] table's ``options``): those that ask the
# scheduler for resources, placement, priority or mail, and nothing else. Left out on purpose: options that
# run or load something (wrap, export, export-file, get-user-env, bbf, container), move the job's files or
# identity (chdir, output, error, input, open-mode, uid, gid), and what llmopt or submitit already sets.
SBATCH_OPTIONS = frozenset("""
acctg-freq begin cluster-constraint clusters comment constraint contiguous core-spec cores-per-socket cpu-freq
cpus-per-gpu deadline delay-boot dependency distribution exclude extra-node-info gpu-bind gpu-freq gpus
gpus-per-socket gpus-per-task gres gres-flags hint kill-on-invalid-dep licenses mail-type mail-user mcs-label mem
mem-bind mem-per-cpu mem-per-gpu mincpus network nice no-requeue nodelist ntasks-per-core ntasks-per-gpu
ntasks-per-socket overcommit oversubscribe power priority profile qos requeue reservation sockets-per-node
spread-job switches thread-spec threads-per-core time-min tmp use-min-nodes wait-all-nodes
""".split())
# Options llmopt or submitit sets for every job: the flag to use instead, or why it is llmopt's own.
SBATCH_SET = {"partition": "--slurm-partition", "account": "--slurm-account", "cpus-per-task": "--cpus-per-node",
              "gpus-per-node": "--gpus-per-node", "exclusive": "--slurm-share (off: each job has its nodes)",
              "time": "--slurm-time-limit", "nodes": "the config's world size and --ranks-per-node",
              "requeue": "llmopt (every job is requeueable: it resumes from its checkpoint)",
              "ntasks-per-node": "llmopt (one task per node; the launcher starts the ranks)",
              "job-name": "submitit", "output": "submitit", "error": "submitit", "open-mode": "submitit",
              "signal": "llmopt (the checkpoint signal before the limit)", "wckey": "submitit"}


def check_slurm_options(options: dict, where: str) -> dict:
    """sbatch options from a user or a file someone handed them: each key an sbatch option this harness lets a
    sweep set (``SBATCH_OPTIONS``), each value one printable line. A key that would become a line of its own in
    the job's script, or an option that runs something, is refused, never rewritten."""
    for key, value in options.items():
        key, value = str(key), str(value)
        if key in SBATCH_SET:
            raise MatrixError(f"{where}: {key} is set by llmopt for every job; use {SBATCH_SET[key]} instead")
        if key not in SBATCH_OPTIONS:
            shown = key if key.isprintable() else repr(key)
            raise MatrixError(f"{where}: {shown!r} is not an sbatch option a sweep may set; use one of "
                              f"{', '.join(sorted(SBATCH_OPTIONS))} (without the leading --)")
        if not value.isprintable() or len(value) > 1000:
            raise MatrixError(f"{where}: the value of {key} must be one line of printable text, got {value!r}")
    return {str(k): str(v) for k, v in options.items()}


def parse_filter(text: str | None) -> dict[str, list]:
    """key -> the values a config may have: keys are all required, a key given twice is either value
    (``optimizer=muon,optimizer=sgd`` keeps both optimizers)."""
    if not text:
        return {}
    out: dict[str, list] = {}
    for part in text.split(","):
        if "=" not in part:
            raise MatrixError(f"--filter: {part!r} is not key=value; e.g. --filter precision=fp32,dp=2")
        k, v = (s.strip() for s in part.split("=", 1))
        out.setdefault(k, []).append(_coerce(k, v, "--filter"))
    return out


def _budget_steps(cfg: dict) -> dict:
    """A config with a token budget states the steps that budget takes (its ``steps`` would otherwise be a
    device default that no run uses, and llmopt.train refuses a --steps that disagrees with --max-tokens)."""
    if cfg.get("max_tokens"):
        return dict(cfg, steps=-(-cfg["max_tokens"] // (cfg["global_batch"] * cfg["seq_len"])))
    return cfg


def _paths_resolved(cfg: dict, preset_given: bool) -> dict:
    """Paths the user wrote (data, a local --init) made absolute against the directory the sweep was started
    in, since each config runs from the repository root; with --init and no preset, the checkpoint's shape."""
    from llmopt.prepare import BUILTIN

    cfg = dict(cfg)
    if cfg.get("data") and cfg["data"] not in BUILTIN and os.path.exists(cfg["data"]):
        cfg["data"] = os.path.abspath(cfg["data"])
    if cfg.get("init") and ":" in str(cfg["init"]):
        kind, path = str(cfg["init"]).split(":", 1)
        if os.path.exists(path):
            cfg["init"] = f"{kind}:{os.path.abspath(path)}"
    if cfg.get("init") and not preset_given:
        from llmopt.core.config import CHECKPOINT

        cfg["preset"] = CHECKPOINT
    return cfg


def expand(matrix: str, device: str, max_ranks: int, steps: int | None = None,
           filters: dict | None = None, max_configs: int = 10_000) -> list[PlanEntry]:
    """The plan's entries, each valid or skipped with its reason. Baselines that the matrix lacks are added
    (each ok config's loss curve is compared with one)."""
    base = dict(DEVICE_BASE[device], device=device)
    extra: dict = {}
    study = study_of(matrix, device)
    if matrix in NAMED:
        combos = _named(matrix, device, max_ranks)
    elif matrix.endswith(".toml") or os.path.sep in matrix:
        extra, combos = load_toml(matrix, max_configs)
        base.update(extra)
        if study is not None:
            if not (study[0].tokens_per_param or extra.get("max_tokens")):
                raise MatrixError(f"--matrix {matrix}: a [convergence] study needs its whole budget: tokens_per_param "
                                  f"in [convergence], or max_tokens in [base]")
            combos = study_grid(study[0], {**study[1], **extra})
    else:
        raise MatrixError(f"--matrix: unknown matrix {matrix!r}; use one of {', '.join(NAMED)} or a .toml file")
    if steps is not None:
        base["steps"] = steps
    defaults = asdict(TrainConfig())
    configs = [_budget_steps(_paths_resolved({**defaults, **base, **c}, "preset" in extra or "preset" in c))
               for c in combos]
    for k, values in (filters or {}).items():
        configs = [c for c in configs if c[k] in values]
    if not configs:
        raise MatrixError(f"--filter {filters} leaves no config in matrix {matrix!r}; loosen it")
    if len(configs) > max_configs:  # a TOML file was counted before expanding; a named matrix is counted here
        raise MatrixError(f"--matrix {matrix}: {len(configs):,} configs, more than --max-configs {max_configs:,}; "
                          f"add --filter or raise --max-configs")

    plan: list[PlanEntry] = []
    seen: dict[str, TrainConfig] = {}

    def add(cfg: TrainConfig, added: bool):
        cid = config_id(cfg)
        if cid in seen:
            if seen[cid] != cfg:
                raise MatrixError(f"configs {seen[cid]} and {cfg} share the id {cid}; change one of them")
            return
        seen[cid] = cfg
        plan.append(PlanEntry.of(cfg, device, max_ranks, added_as_baseline=added,
                                 phase="grid" if study is not None else None))

    for cfg in configs:
        add(TrainConfig(**cfg), False)
    if study is None:  # convergence rows are compared with each other, not with a fp32 baseline
        for entry in list(plan):
            if entry.skipped is None:
                add(baseline_of(entry.config), True)
    # baselines first, so every other row can be compared with its baseline when it is written
    ids = {e.baseline_id for e in plan}
    plan.sort(key=lambda e: e.config_id not in ids)
    return plan


CPU_RANKS = 4  # the most gloo ranks one CPU config may start (the matrices' layouts reach 2 x 2)


def rank_budget(device: str) -> int:
    """The most ranks one config may use here: the GPUs, or CPU_RANKS."""
    if device == "cuda":
        import torch

        return max(1, torch.cuda.device_count())
    return CPU_RANKS
