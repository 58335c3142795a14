"""Fault injection, for the tests of what the harness and the launcher do when a rank fails.

``LLMOPT_FAIL_AT="RANK:STEP:MODE[:SEED],..."`` makes that rank fail at that step (of configs of that seed
only, when SEED is given, so one sweep can hold healthy and faulty configs). MODE: raise (an exception),
exit (exit code 17), kill (SIGKILL, as the kernel's OOM killer would), segv (a real segmentation fault), hang
(never returns), alloc (allocate until SIGKILLed), wait (until SIGTERM or SIGUSR2 asks a checkpointing run to
stop, then on: the preemption tests' way to be signalled mid-run; it says so on stderr first), park (the same
wait, then the rank dies of that SIGTERM, as it would without a checkpoint: ranks parked outside any
collective, so that a test can kill one and no peer is left blocked on a parked one). Read by
``llmopt.loop.timed_steps`` before each step.
MODE slow: that step takes SLOW_S longer, inside its timing (a stall a noisy machine would cause), on a
config's first timing only: the harness's re-time of a noisy row (``RETIME_ENV`` set) runs clean.
"""
from __future__ import annotations

import os
import sys
import time

FAIL_ENV = "LLMOPT_FAIL_AT"
RETIME_ENV = "LLMOPT_RETIMING"  # set by the harness in a noisy row's second timing
SLOW_S = 0.25


def slow_steps(rank: int, seed: int) -> frozenset[int]:
    """The steps this rank stalls at (MODE slow), read once before the timed loop."""
    if os.environ.get(RETIME_ENV):
        return frozenset()
    steps = set()
    for spec in filter(None, os.environ.get(FAIL_ENV, "").split(",")):
        r, s, mode, *only = spec.split(":")
        if mode == "slow" and int(r) == rank and not (only and int(only[0]) != seed):
            steps.add(int(s))
    return frozenset(steps)


def maybe_fail(rank: int, step: int, seed: int, stop_requested=lambda: False) -> None:
    """The fault-injection hook (tests only): LLMOPT_FAIL_AT="RANK:STEP:MODE[:SEED],...", a spec with SEED
    applying only to configs of that seed (so one sweep can hold healthy and faulty configs).
    ``stop_requested``: whether a stop signal has come (MODE wait)."""
    for spec in filter(None, os.environ.get(FAIL_ENV, "").split(",")):
        r, s, mode, *only = spec.split(":")
        if int(r) != rank or int(s) != step or (only and int(only[0]) != seed) or mode == "slow":
            continue
        if mode == "exit":
            os._exit(17)
        if mode == "kill":  # as the kernel's OOM killer would
            os.kill(os.getpid(), 9)
        if mode == "segv":  # a real segmentation fault: read address 0
            import ctypes

            ctypes.string_at(0)
        if mode == "hang":
            while True:
                time.sleep(1)
        if mode in ("wait", "park"):
            print(f"rank {rank} waiting for a stop signal before step {step} ({FAIL_ENV})", file=sys.stderr,
                  flush=True)
            while not stop_requested():
                time.sleep(0.05)
            if mode == "park":
                import signal

                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
            continue
        if mode == "alloc":  # allocate until killed: 256 MiB in 16 MiB chunks, then SIGKILL as the OOM killer would
            hoard: list[bytearray] = []  # small: a larger one's page faults once outlasted a test's --timeout
            while len(hoard) < 16:
                hoard.append(bytearray(16 << 20))
            os.kill(os.getpid(), 9)
        raise RuntimeError(f"injected failure on rank {rank} at step {step} ({FAIL_ENV})")
