"""What a run buys: held-out evals, the target loss and when it was reached, and divergence.

Time to quality = steps to a target loss x time per step. The steps come from here: an eval every
``eval_every`` steps (and before the first and after the last), the run stopping at the first eval at or
below the target, as MLCommons AlgoPerf and modded-nanogpt score training runs. The training seconds are
the step timer's (every training step, warm-up included: it is time the run really spent); eval time is
kept apart (``eval_seconds``).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

from llmopt.core.config import TrainConfig

# A loss this far (nats) above the first loss after the learning-rate warm-up means the run diverged.
DIVERGENCE_RISE = 1.0


@dataclass
class EvalPoint:
    step: int               # optimizer steps done before this eval
    tokens: int             # training tokens seen
    train_seconds: float    # wall time of those steps (evals excluded)
    loss: float             # mean held-out loss (nats/token)
    lr: float               # learning rate of the next step
    gns_b_simple: float | None  # running gradient noise scale estimate, sequences


def resolve_target(cfg: TrainConfig, entropy_floor: float | None) -> float | None:
    """The target loss in nats: --target-loss, or --target-gap above the known entropy floor."""
    if cfg.target_loss:
        return cfg.target_loss
    if cfg.target_gap:
        return entropy_floor + cfg.target_gap
    return None


class Convergence:
    def __init__(self, cfg, entropy_floor: float | None):
        self.cfg = cfg
        self.target = resolve_target(cfg, entropy_floor)
        self.evals: list[EvalPoint] = []
        self.eval_seconds = 0.0
        self.reached: EvalPoint | None = None
        self._reference: float | None = None  # the first training loss after the learning-rate warm-up

    def due(self, steps_done: int) -> bool:
        every = self.cfg.eval_every
        return every > 0 and (steps_done % every == 0 or steps_done == self.cfg.steps)

    def evaluate(self, state, steps_done: int, train_seconds: float) -> bool:
        """Run one eval (collective); returns True when it reached the target."""
        from llmopt.instruments import synchronize
        from llmopt.step import evaluate

        synchronize(state.device)
        t0 = time.perf_counter()
        loss = evaluate(state).item()  # host sync: the eval's figure
        self.eval_seconds += time.perf_counter() - t0
        gns = state.noise_scale.b_simple() if state.noise_scale is not None else None
        point = EvalPoint(steps_done, steps_done * self.cfg.tokens_per_step, train_seconds, loss,
                          float(state.optimizer.param_groups[0]["lr"]), gns)
        self.evals.append(point)
        if self.target is not None and self.reached is None and loss <= self.target:
            self.reached = point
            return True
        return False

    def divergence(self, step: int, loss: float) -> str | None:
        """Why the run diverged at ``step`` (a non-finite loss, or a rise of more than DIVERGENCE_RISE nats
        above the first loss after the warm-up), or None. The loss is the same on every rank, so every rank
        decides alike."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if step == self.cfg.lr_warmup:
            self._reference = loss
        elif self._reference is not None and loss > self._reference + DIVERGENCE_RISE:
            return (f"loss {loss:.4f} rose more than {DIVERGENCE_RISE:g} nat above {self._reference:.4f}, "
                    f"its value after the learning-rate warm-up (step {self.cfg.lr_warmup})")
        return None

    def to_metrics(self) -> dict:
        losses = [e.loss for e in self.evals]
        r = self.reached
        return {
            "target_loss": self.target,
            "steps_to_target": r.step if r else None,
            "tokens_to_target": r.tokens if r else None,
            "seconds_to_target": r.train_seconds if r else None,
            "final_eval_loss": losses[-1] if losses else None,
            "best_eval_loss": min(losses) if losses else None,
            "gns_b_simple": next((e.gns_b_simple for e in reversed(self.evals) if e.gns_b_simple), None),
            "eval_seconds": self.eval_seconds,
            "evals": [asdict(e) for e in self.evals],
        }
