"""scripts/gpu_check.sh, exercised where no GPU is: its matrices are valid for one CUDA device, and a dry run
(the same commands on the CPU with tiny matrices) packs each run directory into an archive under $OUT."""
import os
import subprocess
import tarfile

from bench.matrix import expand
from conftest import ROOT


def test_gpu_matrices_are_valid_on_one_gpu():
    for name in ("gpu_mfu.toml", "gpu_grid.toml"):
        plan = expand(os.path.join(ROOT, "scripts", name), "cuda", 1)
        assert plan and all(e.skipped is None for e in plan), [e.skipped for e in plan if e.skipped]
        assert {e.config.preset for e in plan} == {"gpt2"} and {e.config.seq_len for e in plan} == {1024}


def test_dry_run_packs_each_run_into_out(tmp_path):
    tiny = "[base]\nsteps = 2\nseq_len = 16\nglobal_batch = 4\n[matrix]\nprecision = ['bf16']\n"
    (tmp_path / "mfu.toml").write_text(tiny)
    (tmp_path / "grid.toml").write_text(tiny.replace("precision = ['bf16']", "optimizer = ['adamw', 'sgd']"))
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", OUT=str(out), OMP_NUM_THREADS="1",
               GPU_CHECK_MFU_MATRIX=str(tmp_path / "mfu.toml"), GPU_CHECK_GRID_MATRIX=str(tmp_path / "grid.toml"),
               GPU_CHECK_PEERS_MATRIX=str(tmp_path / "mfu.toml"))  # the peers' sweep path, on one config
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert sorted(os.listdir(out)) == ["dryrun-mfu.tar.gz", "dryrun-peers.tar.gz", "dryrun.tar.gz"]
    for name in os.listdir(out):
        with tarfile.open(out / name) as t:
            names = t.getnames()
        run = name.removesuffix(".tar.gz")
        assert {f"{run}/results.csv", f"{run}/report.md", f"{run}/env.json"} <= set(names), names
        assert not any("/logs" in n or "/metrics" in n for n in names)
