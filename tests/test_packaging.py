"""The package works when installed (pip install .), not only from the source tree."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installed_package_registers_and_trains(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    installed = target / "fairseq_stablemoe"
    source = REPO / "fairseq_stablemoe"
    want = sorted(str(p.relative_to(source)) for p in source.rglob("*.py"))
    got = {str(p.relative_to(installed)) for p in installed.rglob("*.py")}
    assert not set(want) - got, "not installed: every subpackage must be in setup.py's packages"
    env = dict(os.environ, PYTHONPATH=str(target))
    # a tiny corpus, binarised
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("\n".join(f"a b c d {i % 7} e f" for i in range(200)) + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fairseq_cli.preprocess",
            "--only-source",
            "--trainpref",
            str(data / "train.txt"),
            "--validpref",
            str(data / "train.txt"),
            "--destdir",
            str(data / "bin"),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
        env=env,
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fairseq_cli.train",
            str(data / "bin"),
            "--user-dir",
            str(installed),
            "--task",
            "language_modeling",
            "--arch",
            "stablemoe_lm",
            "--criterion",
            "stablemoe",
            "--decoder-layers",
            "1",
            "--decoder-embed-dim",
            "16",
            "--decoder-ffn-embed-dim",
            "32",
            "--decoder-attention-heads",
            "2",
            "--optimizer",
            "adam",
            "--lr",
            "0.001",
            "--max-tokens",
            "128",
            "--tokens-per-sample",
            "16",
            "--max-update",
            "2",
            "--cpu",
            "--no-save",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "done training" in out.stdout + out.stderr
    where = subprocess.run(
        [sys.executable, "-c", "import fairseq_stablemoe; print(fairseq_stablemoe.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=True,
    )
    assert where.stdout.strip() == str(installed / "__init__.py")


def test_plain_install_brings_the_plotting_library(monkeypatch):
    """``pip install .`` without extras installs matplotlib (``--plot``)."""
    import runpy

    import setuptools

    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch.chdir(REPO)
    runpy.run_path(str(REPO / "setup.py"))
    assert any(r.split(";")[0].strip().startswith("matplotlib") for r in seen["install_requires"])


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys, tmp_path):
    import pytest

    from fairseq_stablemoe.cli import fluctuation

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as exit_info:
        fluctuation.cli_main([str(tmp_path), str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--plot", "x.png"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "Traceback" not in err
