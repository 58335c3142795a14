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


def test_the_rank_seen_failing_first_is_the_root_cause_when_none_left_an_error_file(tmp_path):
    """A rank killed by a signal leaves no error file, nor does a rank of a script without torch elastic's
    @record: both are then timed alike, and the one seen failing first is reported (a segfaulted rank 1, then
    rank 0's exit 1 on the lost connection, was reported as rank 0's "exit code 1")."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from llmopt.launch import root_cause

    def failure(rank, code):
        return ProcessFailure(rank, 100 + rank, code, str(tmp_path / f"{rank}.json"))  # no such file

    rank, line, _ = root_cause({1: failure(1, -11), 0: failure(0, 1)})
    assert rank == 1 and "SIGSEGV" in line, line
    assert root_cause({0: failure(0, 1), 1: failure(1, -11)})[:2] == (0, "exit code 1")
