"""The documentation matches the code: docs/options.md is what scripts/options_doc.py writes from the
dataclasses, and every ``--option`` the README and docs/ name exists in the command it belongs to."""

import argparse
import importlib.util
import re
import runpy
import sys
from pathlib import Path
from typing import Callable, Set

import pytest
import warm

REPO = Path(__file__).resolve().parents[1]

#: options of tools outside this repository and fairseq that the pages name (tool: options)
EXTERNAL = {
    "torchrun": {"--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port"},
    "srun": {"--nodes", "--ntasks-per-node", "--gpus-per-node"},
    "pip": {"--force-reinstall", "--no-build-isolation", "--no-deps", "--index-url", "--extra-index-url"},
    "python -m venv": {"--system-site-packages"},
    # the paper authors' fairseq fork, which docs/method.md compares with
    "the paper's code": {"--assignment-algorithm"},
}


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options_page_is_generated_from_the_code():
    options_doc = _load(REPO / "scripts" / "options_doc.py", "options_doc")
    page = (REPO / "docs" / "options.md").read_text()
    assert page == options_doc.render(), "docs/options.md is stale: run python scripts/options_doc.py"


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def _options_of(run: Callable[[], object]) -> Set[str]:
    """The option strings of the argparse parser that ``run`` builds and parses with."""

    def grab(self, *args, **kwargs):
        raise _Parsed(self)

    saved = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = grab
    try:
        run()
    except _Parsed as parsed:
        return set(parsed.parser._option_string_actions)
    finally:
        argparse.ArgumentParser.parse_args = saved
    raise AssertionError(f"{run} parsed no command line")


def _script(path: str) -> Callable[[], object]:
    def run():
        argv = sys.argv
        sys.argv = [path]
        try:
            runpy.run_path(str(REPO / path), run_name="__main__")
        finally:
            sys.argv = argv

    return run


def _fairseq_options() -> Set[str]:
    from fairseq import options

    user_dir = str(REPO / "fairseq_stablemoe")
    lm = ["DATA", "--user-dir", user_dir, "--task", "language_modeling"]
    mt = ["DATA", "--user-dir", user_dir, "--task", "translation"]
    known: Set[str] = set()
    multilingual = ["DATA", "--user-dir", user_dir, "--task", "translation_multi_simple_epoch", "--lang-pairs", "a-b"]
    train = ["--criterion", "stablemoe", "--optimizer", "adam"]
    for make, argv in [
        (options.get_training_parser, lm + ["--arch", "stablemoe_lm", *train, "--lr-scheduler", "polynomial_decay"]),
        (
            options.get_training_parser,
            mt + ["--arch", "stablemoe_transformer", *train, "--lr-scheduler", "inverse_sqrt"],
        ),
        (options.get_training_parser, multilingual + ["--arch", "stablemoe_transformer", *train]),
        (options.get_preprocessing_parser, []),
        (options.get_eval_lm_parser, lm + ["--path", "x.pt"]),
        (options.get_generation_parser, mt + ["--path", "x.pt"]),
        (options.get_interactive_generation_parser, mt + ["--path", "x.pt"]),
        (options.get_validation_parser, lm + ["--path", "x.pt"]),
    ]:
        parser = make()
        if argv:
            options.parse_args_and_arch(parser, argv)
        known |= set(parser._option_string_actions)
    return known


@pytest.fixture(scope="module")
def known_options() -> Set[str]:
    from fairseq_stablemoe.cli import consolidate, fluctuation, routing_summary

    known = _fairseq_options()
    for module in (consolidate, fluctuation, routing_summary):
        known |= set(module.build_parser()._option_string_actions)
    compare = _load(REPO / "examples" / "compare_moe_types.py", "compare_moe_types")
    known |= _options_of(lambda: compare.parse_options([]))
    for path in [
        "examples/shakespeare/prepare.py",
        "examples/translation/make_pig_latin.py",
        "scripts/options_doc.py",
        *(f"benchmarks/{p.name}" for p in sorted((REPO / "benchmarks").glob("*.py")) if p.name != "markdown.py"),
    ]:
        if "def main" in (REPO / path).read_text() or "argparse" in (REPO / path).read_text():
            try:
                known |= _options_of(_script(path))
            except AssertionError:
                pass  # a helper module without a command line
    for options in EXTERNAL.values():
        known |= options
    return known


#: an option named in a page (``--keep-*``, a family of options, is not one)
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*(?![\w*-])")


@pytest.mark.parametrize(
    "page",
    ["README.md", *(f"docs/{p.name}" for p in sorted((REPO / "docs").glob("*.md")))],
)
def test_named_options_exist(page, known_options):
    named = set(OPTION.findall((REPO / page).read_text()))
    unknown = sorted(named - known_options)
    assert not unknown, f"{page} names options that no command here has: {unknown}"


def test_troubleshooting_lists_every_refusal_in_the_code(tmp_path):
    refusals_doc = _load(REPO / "scripts" / "refusals_doc.py", "refusals_doc")
    page = (REPO / "docs" / "troubleshooting.md").read_text()
    assert page == refusals_doc.render(page), "docs/troubleshooting.md is stale: run python scripts/refusals_doc.py"
    # the reader finds each form of refusal: a raise, an f-string with a module constant, a collected problem
    planted = tmp_path / "pkg"
    planted.mkdir()
    (planted / "m.py").write_text(
        'HINT = "use --x 2"\n'
        "def f(args, problems):\n"
        '    problems.append(f"--x must be even (got {args.x}): {HINT}")\n'
        '    raise RuntimeError("stop " "here")\n'
        "    raise ValueError(problems[0])  # not a literal message: left out\n"
    )
    found = [(r["kind"], r["message"]) for r in refusals_doc.refusals(planted)]
    assert found == [("ValueError", "--x must be even (got {args.x}): use --x 2"), ("RuntimeError", "stop here")]
    messages = [r["message"] for r in refusals_doc.refusals()]
    assert len(messages) > 60 and any(m.startswith("--ddp-backend {ddp_backend} would average") for m in messages)
    for message in messages:
        assert message.replace("`", "'") in page, message


def test_gpu_page_tables_are_what_the_script_prints():
    """docs/gpu.md's memory and time tables: its own commands of examples/gpu_memory.py print them."""

    page = (REPO / "docs" / "gpu.md").read_text()
    commands = re.findall(r"^python (examples/gpu_memory\.py .*)$", page, re.M)
    assert len(commands) >= 2
    for command in commands:
        out = warm.run([sys.executable, *command.split()], cwd=str(REPO), check=True).stdout
        rows = [line for line in out.splitlines() if line.startswith("| ") and line[2:3].isdigit()]
        assert rows, out
        for row in rows:
            assert row in page, f"{command}: {row}"
