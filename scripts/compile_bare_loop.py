"""Issue 14's "bare loop" question: what does torch.compile buy a plain training loop, and is it the head?

llmopt's GPT blocks trained by a loop of its own (torch's fused AdamW, no clipping, no harness) at the peers'
shape (mini, 8 x 256, fp32), with either a plain head (logits, then F.cross_entropy) or llmopt's fused head
(llmopt.model.linear_cross_entropy), eager or compiled per block or as one graph. Prints the median step of 20
after 5 warm-up steps. Run each variant in its own process, several times, in varied order: on a 2-core
machine one run's noise is 5-10%.

    python scripts/compile_bare_loop.py {plain,fused} {eager,blocks,whole}
"""
import time

import torch
import torch.nn.functional as F

from llmopt.core.shapes import PRESETS
from llmopt.model import GPT, linear_cross_entropy


def main(head: str, mode: str) -> None:
    torch.manual_seed(0)
    cfg = PRESETS["mini"]
    model = GPT(cfg)
    if mode == "blocks":
        for block in model.h.values():
            block.compile()

    def loss_of(x, y):
        h = model.wte(x) + model.wpe(torch.arange(x.size(1)))
        for block in model.h.values():
            h = block(h)
        h = model.ln_f(h)
        if head == "plain":
            return F.cross_entropy(F.linear(h, model.wte.weight).flatten(0, 1), y.flatten())
        return linear_cross_entropy(h.flatten(0, 1), model.wte.weight, y.flatten())

    step_loss = torch.compile(loss_of) if mode == "whole" else loss_of
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x, y = (torch.randint(0, cfg.vocab_size, (8, 256)) for _ in range(2))
    times = []
    for _ in range(25):
        t = time.perf_counter()
        step_loss(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    median = sorted(times[5:])[10]
    print(f"{head} {mode}: median {median * 1e3:.1f} ms, {8 * 256 / median:,.0f} tokens/s")


if __name__ == "__main__":
    from llmopt.core import cli

    p = cli.parser("python scripts/compile_bare_loop.py", __doc__.split("\n\n")[0])
    p.add_argument("head", choices=("plain", "fused"), help="logits then F.cross_entropy, or llmopt's fused head")
    p.add_argument("mode", choices=("eager", "blocks", "whole"), help="no compile, per block, or one graph")
    a = p.parse_args()
    main(a.head, a.mode)
    cli.exit(0)
