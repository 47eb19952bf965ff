"""benchmarks/gpu.py must work the first time it meets a GPU (a lent GPU's minutes are few): its dry
run executes the whole script on the CPU, the kernels in Triton's interpreter at toy sizes, and checks
every kernel's output against its PyTorch baseline as the GPU run does."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def dry_run(*extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", *extra], env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "WRONG" not in run.stdout and "failed" not in run.stdout, run.stdout
    return run.stdout


def test_gpu_benchmark_kernels_dry_run():
    out = dry_run("--skip-e2e")
    for section in ("measured peaks", "varlen attention", "paged decode attention", "row and elementwise fusions",
                    "int8 weight-only GEMM", "dequantize + cuBLAS first wins", "sweep: W8 GEMM tiles",
                    "split-K: 1 x 256 keys", "best over all shapes",
                    "sweep: paged attention split sizes"):
        assert section in out, out
    kernels = out.split("sweep:")[0]
    timed = [line for line in kernels.splitlines() if line.startswith("  ") and " us " in line]
    assert len(timed) >= 18 and all(" err " in line for line in timed), out   # each with its error


@pytest.mark.slow
def test_gpu_benchmark_end_to_end_dry_run():
    out = dry_run("--models", "minilm", "--gen-models", "llama")
    for line in ("minilm short: turboserve", "minilm longtail: transformers", "llama: turboserve (CUDA graphs)",
                 "llama: turboserve (eager)", "llama: transformers static/16",
                 "greedy outputs equal, eager against graphs: 2 of 2", "min cosine of 16 embeddings"):
        assert line in out, out


def test_gpu_device_script_logs_the_run(tmp_path):
    """benchmarks/gpu_device.sh, the command for a lent GPU machine, with this checkout's python and
    the dry run passed through: the environment and the benchmark land in $OUT's logs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable)
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_device.sh"), "--dry-run", "--skip-e2e"], env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"torch {torch.__version__} triton" in (tmp_path / "env.log").read_text()
    log = (tmp_path / "gpu.log").read_text()
    assert "dry run on the CPU" in log and "paged decode attention" in log and "WRONG" not in log
