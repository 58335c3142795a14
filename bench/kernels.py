"""``python -m bench.kernels``: the kernel choices llmopt makes on CPU, measured on this machine.

* attention: ``model.causal_attention``'s explicit path against torch's SDPA, forward + backward, in bf16 and
  fp32, for sequence lengths 64-1024 (``model.explicit_attention`` takes the explicit path in bf16 up to
  T = 512 on CPUs with native bf16; this table is the evidence, per CPU kind);
* head: the fused linear + cross-entropy (``model.LinearCrossEntropy``) at several chunk sizes against the
  plain head (logits, then ``F.cross_entropy``), forward + backward.

Writes kernels.md, kernels.csv and env.json to ``--out`` (default results/runs/<UTC>-kernels). Timings are
medians of repeated runs after a warm-up, comparable only within one run.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

B, NH, HS = 8, 4, 64                  # attention shape: the `mini` preset's heads at batch 8
HEAD_ROWS, HEAD_C, HEAD_V = 2048, 256, 8192  # head shape: `mini`, batch 8 x sequence 256


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def attention_rows(reps: int) -> list[dict]:
    import torch

    from llmopt.model import causal_attention, explicit_attention

    rows = []
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for T in (64, 128, 256, 512, 1024):
            qkv = [torch.randn(B, NH, T, HS, dtype=dtype, requires_grad=True) for _ in range(3)]
            w = torch.randn(B, NH, T, HS, dtype=dtype)
            ms = {}
            for name, explicit in (("explicit", True), ("sdpa", False)):
                ms[name] = _time(lambda qkv=qkv, e=explicit, w=w: causal_attention(*qkv, explicit=e).backward(w), reps)
            rows.append({"kernel": "attention", "dtype": dtype_name, "T": T, "explicit_ms": ms["explicit"],
                         "sdpa_ms": ms["sdpa"], "explicit_over_sdpa": ms["explicit"] / ms["sdpa"],
                         "llmopt_uses": "explicit" if explicit_attention("cpu", dtype, T) else "sdpa"})
    return rows


def head_rows(reps: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from llmopt.model import HEAD_CHUNK_ROWS, linear_cross_entropy

    rows = []
    h = torch.randn(HEAD_ROWS, HEAD_C, requires_grad=True)
    wt = (torch.randn(HEAD_V, HEAD_C) * 0.02).requires_grad_()
    t = torch.randint(0, HEAD_V, (HEAD_ROWS,))
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        def plain(dtype=dtype):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                F.cross_entropy(F.linear(h, wt).float(), t).backward()

        base = _time(plain, reps)
        for chunk in (128, 256, 512, 1024):
            def fused(dtype=dtype, chunk=chunk):
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    linear_cross_entropy(h, wt, t, chunk_rows=chunk).backward()

            ms = _time(fused, reps)
            rows.append({"kernel": "head", "dtype": dtype_name, "chunk_rows": chunk, "fused_ms": ms, "plain_ms": base,
                         "fused_over_plain": ms / base, "llmopt_uses": "fused" if chunk == HEAD_CHUNK_ROWS else ""})
    return rows


def main(argv: list[str] | None = None) -> int:
    from llmopt.core import cli

    return cli.main(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from llmopt.core import cli

    p = cli.parser("python -m bench.kernels", __doc__.split("\n\n")[0])
    p.add_argument("--out", help="output directory (default results/runs/<UTC>-kernels)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per kernel (default 10)")
    a = p.parse_args(argv)
    if a.reps < 1:
        raise ValueError(f"--reps {a.reps}: must be at least 1")
    if a.out:
        from llmopt.scratch import check_writable_dir

        check_writable_dir(a.out, "--out", may_exist=True)
    import pandas as pd

    from bench.hardware import environment
    from bench.report.markdown import md_table
    from llmopt.safe_files import makedirs, open_file, refuse_links, write_json

    out = a.out or os.path.join("results", "runs", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-kernels")
    refuse_links(out, "--out")
    makedirs(out)
    env = environment(["kernels"])
    env["command"] = "python -m bench.kernels " + " ".join(argv if argv is not None else sys.argv[1:])
    write_json(os.path.join(out, "env.json"), env)
    att, head = pd.DataFrame(attention_rows(a.reps)), pd.DataFrame(head_rows(a.reps))
    with open_file(os.path.join(out, "kernels.csv"), newline="") as f:
        pd.concat([att, head]).to_csv(f, index=False)
    flags = ", ".join(env["cpu_flags"]) or "none"
    L = ["# CPU kernels llmopt chooses between", "",
         f"{env['cpu_model']}, {env['cpu_count']} CPUs, native low-precision flags: {flags}; torch {env['torch']}.",
         f"Median of {a.reps} runs after a warm-up, forward + backward, milliseconds.", "",
         f"## Attention (B={B}, heads={NH}, head size={HS})", "",
         md_table(att.round(3)), "", f"## Head ({HEAD_ROWS} rows, C={HEAD_C}, V={HEAD_V})", "",
         md_table(head.round(3)), ""]
    with open_file(os.path.join(out, "kernels.md")) as f:
        f.write("\n".join(L))
    print("\n".join(L))
    print(f"kernels: -> {out}")
    return 0


if __name__ == "__main__":
    from llmopt.core import cli

    cli.exit(main())
