"""Every script answers --help and refuse a bad flag before torch is imported (exit codes 0 and 2)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# each script with a flag it refuses while parsing
REFUSED = {"main.py": ["--lr", "1e300"],
           "finetune.py": ["--model_path", "x_model.pth", "--label_fraction", "2"],
           "linear.py": ["--model_path", "x_model.pth", "--batch_size", "0"],
           "neighbors.py": ["--model_path", "x_model.pth", "--k", "0"],
           "embed.py": ["--model_path", "x_model.pth", "--method", "umap"],
           "plot.py": ["a_statistics.csv", "--bogus"],
           "bench.py": ["--arch", "vgg"],
           "export_images.py": ["--format", "gif"]}


def run_script(script: str, *args: str) -> tuple[int, str, list[str], list[str]]:
    """python -X importtime SCRIPT ARGS: (exit code, stdout, stderr's own lines, every module imported)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", script, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    timing = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    other = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    modules = [line.rsplit("|", 1)[1].strip() for line in timing[1:]]  # the first line is the header
    return proc.returncode, proc.stdout, other, modules


def heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if m.split(".")[0] in ("torch", "torchvision", "numpy", "pandas", "matplotlib")]


@pytest.mark.parametrize("script", sorted(REFUSED))
def test_help_imports_no_torch(script):
    code, out, err, modules = run_script(script, "--help")
    assert code == 0 and "usage:" in out, err
    assert "simclr.flags" in modules or script == "plot.py"  # the listing works: it sees the project's modules
    assert not heavy(modules), heavy(modules)[:5]


@pytest.mark.parametrize("script", sorted(REFUSED))
def test_a_refused_flag_is_one_line_and_exit_2_without_torch(script):
    code, out, err, modules = run_script(script, *REFUSED[script])
    assert code == 2 and out == ""
    assert len(err) == 1 and err[0].startswith("error:") and "(see --help)" in err[0], err
    assert not heavy(modules), heavy(modules)[:5]
