"""A rank that raises or dies ends the whole run: non-zero exit, its error on the last line, nothing left."""
import uuid

import pytest

from conftest import processes_with

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("mode,expect", [("raise", "injected failure on rank 1 at step 2"), ("exit", "exit code 17"),
                                         ("kill", "killed by SIGKILL")])
def test_failing_rank_ends_the_run(cli, mode, expect):
    token = uuid.uuid4().hex
    # a generous subprocess timeout: a hang fails the test instead of blocking CI
    r = cli("-m", "llmopt.train", "--dp", "2", "--steps", "6", "--quiet",
            env={"LLMOPT_FAIL_AT": f"1:2:{mode}", "LLMOPT_TEST_TOKEN": token}, timeout=180)
    assert r.returncode != 0 and (r.returncode == 4) == (mode == "kill")  # a SIGKILLed rank reads as out of memory
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 1 failed") and expect in last, r.stderr[-2000:]
    assert processes_with(token) == []
