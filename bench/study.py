"""A convergence study's protocol as one object: which optimizer reaches a loss first, tuned and measured the
way careful optimizer studies do (Wen et al. 2025; Semenov et al. 2025; AlgoPerf's rules). The named matrices
(``convergence``, ``convergence-full``, ``convergence-text``) are three of them; a matrix file's
``[convergence]`` table is another, at any preset, data and hardware:

    [base]                      # fixed fields of every run (TrainConfig's names)
    preset = "gpt2"
    data = "/data/corpus.txt"
    tokenizer = "gpt2"
    seq_len = 1024
    lr_schedule = "cosine"
    [convergence]
    batches = [256, 512]        # global batch sizes (sequences)
    tokens_per_param = 20       # the largest budget: tokens per parameter (all parameters; 0: [base] max_tokens)
    optimizers = ["adamw", "muon"]   # default: every optimizer llmopt has
    presets = ["gpt2", "gpt2-medium"]  # model sizes (default: [base] preset)
    seeds = [1, 2, 3]           # evaluation seeds (never the tuning seed)
    lr_multiples = [0.5, 1, 2]  # the grid around each optimizer's measured centre
    targets = [3.3, 3.1]        # common target losses (default: the report's rule, bench.tuning.common_targets)
    wall_clock = true           # the layouts and to-target phases (false: tokens to target only)

Comparing horizons (the same task, model and batch at different ``tokens_per_param``): one study per horizon,
then ``python -m bench.report.horizons DIR DIR --out OUT`` (``bench.report.horizons``).

Every key but ``batches`` has the default of the named matrices; the whole budget is ``tokens_per_param`` or
[base]'s max_tokens. The runs are [base]'s fields on a cosine schedule (the named matrices' bases, with their
noise-scale instrument, are theirs alone). The study travels in plan.json, so a resumed sweep follows the
protocol it started with.

Phases (plan entries carry theirs; ``bench.tuning.followups`` adds the later ones from the rows):
  grid     every optimizer x model x batch x learning rate (``lr_multiples`` of its lr_centre) at the whole
           budget on the tuning seed at weight decay ``weight_decays[0]``, with evals along the way (the old
           method's first crossing, for comparison); an optimizer with an AdamW part (Muon) runs that part at
           AdamW's tuned rate, so its grid starts once AdamW's is bracketed
  widen    one more learning rate (x or / ``lr_step``) beyond a grid's edge where its best sits, until the best
           has a worse neighbour on each side, at most ``max_widenings`` times per grid
  decay    the grid's best at every other weight decay; the best of all is the finalist
  ladder   each finalist at every budget (``ladder``: fractions of the whole) and evaluation seed (``seeds``:
           not the tuning seed, so the run that selected a finalist is not evidence for it)
  stable   a finalist with a diverged ladder run is unstable: its grid's next smaller learning rate that
           finished runs the same ladder, reported beside it
  adamw-lr a finalist with an AdamW part, again at the whole budget on the evaluation seeds with that part at
           its own rate: what AdamW's rate changed, measured
  seeds    where a verdict's test has more_seeds_band[0] <= p < more_seeds_band[1], both finalists run
           ``seed_step`` more seeds, up to ``max_seeds``, before the verdict is called
  precision    each batch's winner in bf16
  layouts      (wall_clock) every finalist's shape timed on single, ddp2, fsdp2 and tp2 (seconds to target)
  to-target    (wall_clock) each finalist that reached the target on every seed, trained under fsdp2 for its mean tokens
               to target: the check of the seconds the report estimates from the layouts rows

With ``--jobs`` above 1 on CPU, the runs measured by their loss go that many at once, each on its share of the
cores, and the wall-clock phases wait for the machine and run alone on every core (``bench.run.alone_phases``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

LADDER = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)
WALL_CLOCK_PHASES = ("layouts", "to-target")  # the phases whose figure is a time (``wall_clock``)


@dataclass(frozen=True)
class Study:
    batches: tuple[int, ...]                     # global batch sizes (sequences)
    presets: tuple[str, ...] = ()                # model sizes; empty: the base's preset
    optimizers: tuple[str, ...] = ()             # empty: every optimizer llmopt has
    tokens_per_param: float = 0.0                # the whole budget per model; 0: the base's max_tokens
    # the learning-rate grid: these multiples of each optimizer's centre (its spec's lr_centre, measured for it:
    # results/README.md, "Learning-rate centres"), x2 apart (a x3 grid left AdamW's optimum unresolved, its
    # neighbours 0.87 and 3.38 nats apart at batch 32), widened by lr_step until bracketed
    lr_multiples: tuple[float, ...] = (1 / 2, 1, 2)
    lr_step: float = 2.0
    max_widenings: int = 3
    # the grid at the first (Semenov et al. 2025 find 0.1 a robust default), its best at the others
    weight_decays: tuple[float, ...] = (0.1, 0.01)
    # budgets as fractions of the whole: down to 1/16 so that an optimizer up to 8x faster than AdamW is still
    # measured, not only bounded; each its own run with its own full schedule (1.94x the longest run's tokens)
    ladder: tuple[float, ...] = LADDER
    tuning_seed: int = 0
    seeds: tuple[int, ...] = (1, 2, 3)           # the finalists' evaluation seeds
    more_seeds_band: tuple[float, float] = (0.01, 0.1)
    seed_step: int = 2
    max_seeds: int = 8
    targets: tuple[float, ...] = ()              # common target losses given; empty: the report's rule
    # the layouts and to-target phases (seconds to target per layout); false: tokens to target only, a study of
    # losses alone, which may then run several configs at once (--jobs) without a timing beside another
    wall_clock: bool = True

    @classmethod
    def from_mapping(cls, d: dict, where: str) -> "Study":
        """A study from a TOML table or plan.json, every key checked: ValueError naming ``where``, the key and
        what it must be."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: must be a table of settings")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown setting(s) {unknown}; use {', '.join(known)}")
        if "batches" not in d:
            raise ValueError(f"{where}: needs batches = [...], the global batch sizes to compare")
        out = {}
        for name, value in d.items():
            kind = str(known[name].type)
            if kind == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"{where}: {name} = {value!r} must be true or false")
                out[name] = value
            elif kind.startswith("tuple"):
                if not isinstance(value, (list, tuple)):
                    raise ValueError(f"{where}: {name} = {value!r} must be a list, e.g. {name} = [...]")
                item = str if "str" in kind else int if "int" in kind else float
                out[name] = tuple(_scalar(item, v, f"{where}: {name}") for v in value)
            else:
                out[name] = _scalar(int if kind == "int" else float, value, f"{where}: {name}")
        study = cls(**out)
        study._check(where)
        return study

    def _check(self, where: str) -> None:
        def need(ok: bool, what: str):
            if not ok:
                raise ValueError(f"{where}: {what}")

        need(len(self.batches) > 0 and all(b > 0 for b in self.batches), "batches must be positive integers")
        need(len(self.lr_multiples) > 0 and all(m > 0 for m in self.lr_multiples), "lr_multiples must be > 0")
        need(self.lr_step > 1, "lr_step must be above 1")
        need(self.max_widenings >= 0, "max_widenings must be 0 or more")
        need(len(self.weight_decays) > 0 and all(w >= 0 for w in self.weight_decays), "weight_decays must be >= 0")
        need(len(self.ladder) > 1 and all(0 < f <= 1 for f in self.ladder) and max(self.ladder) == 1,
             "ladder must be two or more fractions in (0, 1], the largest 1 (the whole budget)")
        need(len(self.seeds) > 1 and all(s >= 0 for s in self.seeds) and len(set(self.seeds)) == len(self.seeds),
             "seeds must be two or more distinct seeds >= 0 (a t-test over one seed is not one)")
        need(self.tuning_seed >= 0 and self.tuning_seed not in self.seeds,
             "tuning_seed must be >= 0 and not one of the evaluation seeds (selection and evaluation never share "
             "a run)")
        band = self.more_seeds_band
        need(len(band) == 2 and 0 <= band[0] <= band[-1] <= 1, "more_seeds_band must be [low, high] in [0, 1]")
        need(self.seed_step > 0 and self.max_seeds >= len(self.seeds), "seed_step must be > 0 and max_seeds at "
             "least the number of seeds")
        need(self.tokens_per_param >= 0, "tokens_per_param must be >= 0 (0: [base] max_tokens)")
        need(all(t > 0 for t in self.targets), "targets must be positive losses (nats)")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _scalar(kind: type, value, where: str):
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{where}: {value!r} is not a {kind.__name__}")
    if kind is str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: {value!r} is not a name")
        return value
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ValueError(f"{where}: {value!r} is not an integer")
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {value!r} is not a number") from None
    if not math.isfinite(f):
        raise ValueError(f"{where}: {value!r} is not a finite number")
    return f


# The named studies (their base fields: bench.matrix)
STUDIES = {
    # the CPU's default batch (8) and 8x it
    "convergence": Study(batches=(8, 64)),
    # every power of two between, and a wider grid
    "convergence-full": Study(batches=(4, 8, 16, 32, 64), lr_multiples=(1 / 4, 1 / 2, 1, 2, 4)),
    # real text at two model sizes 4x apart in non-embedding parameters (nano: 0.20M, tiny: 0.79M), tokens to
    # target only (seconds to target per layout: convergence's), so that it can run two configs at once
    "convergence-text": Study(batches=(16,), presets=("nano", "tiny"), wall_clock=False),
}
