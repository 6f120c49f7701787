"""scripts/gpu_session.sh and what the GPU machine lacks. The whole script runs in CI
(`bash scripts/gpu_session.sh --dry-run` in .ci/run, about 2 minutes); here only what is quick:
the throughput path without fvcore (the GPU machine has none) and the script's one-line errors."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_session.sh"


def _without_fvcore(tmp_path) -> dict:
    shadow = tmp_path / "no-fvcore" / "fvcore"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("fvcore hidden by the test")\n')
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow.parent), str(ROOT)])}


def test_throughput_path_imports_and_runs_without_fvcore(tmp_path):
    env = _without_fvcore(tmp_path)
    hidden = subprocess.run([sys.executable, "-c", "import fvcore"], env=env, capture_output=True, text=True)
    assert hidden.returncode != 0 and "hidden by the test" in hidden.stderr
    bench = subprocess.run([sys.executable, "-m", "reproduce.cli", "bench", "poolformer_v1_s12", "--img-size", "32",
                            "--batch-size", "1", "--runs", "1", "--repeats", "1"],
                           env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "poolformer_v1_s12" in bench.stdout


def test_script_errors_are_one_line(tmp_path):
    bad = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr
    minutes = subprocess.run(["bash", str(SCRIPT), "--minutes", "soon"], capture_output=True, text=True)
    assert minutes.returncode == 2 and "--minutes takes a number" in minutes.stderr


def test_without_cuda_the_real_run_refuses(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    run = subprocess.run(["bash", str(SCRIPT), "--results-dir", str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 2 and "sees no CUDA device" in run.stderr and "--dry-run" in run.stderr
    assert not any(tmp_path.iterdir())


def test_table_rows_and_passes_are_checked(tmp_path):
    from click.testing import CliRunner

    from reproduce.cli import main

    result = CliRunner().invoke(main, ["table", "riformer-8", "--rows", "poolformer_s9,nope",
                                       "--results-dir", str(tmp_path), "--quiet"])
    assert result.exit_code == 2 and "riformer-8 has no row(s) nope" in result.output
    result = CliRunner().invoke(main, ["table", "riformer-8", "--runs", "0", "--results-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--runs" in result.output
