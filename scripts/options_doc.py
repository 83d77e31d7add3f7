"""Writes docs/options.md, the reference of every option the plugin adds, from the code.

The options come from the dataclasses that declare them: ``MoEOptions`` (both models),
``StableMoELanguageModelConfig`` (the options the language model adds, and the fairseq options
it gives its own default), ``StableMoETranslationOptions`` and ``StableMoECriterionConfig``;
the architectures from fairseq's registry and their functions' docstrings; the console tools' arguments
from their parsers (``build_parser()``).

    python scripts/options_doc.py            # rewrite docs/options.md
    python scripts/options_doc.py --check    # exit 1 if docs/options.md differs from the code
    python scripts/options_doc.py --stdout   # print the page
"""

import argparse
import dataclasses
import enum
import inspect
import sys
from pathlib import Path
from typing import List, Sequence

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "options.md"
COMMAND = "python scripts/options_doc.py"


def _plugin():
    sys.path.insert(0, str(REPO))
    from fairseq.models import ARCH_MODEL_INV_REGISTRY
    from fairseq.models.transformer_lm import TransformerLanguageModelConfig

    from fairseq_stablemoe.criterions.stablemoe import StableMoECriterionConfig
    from fairseq_stablemoe.models.stablemoe_lm import StableMoELanguageModelConfig
    from fairseq_stablemoe.models.stablemoe_transformer import StableMoETranslationOptions
    from fairseq_stablemoe.modules.options import MoEOptions

    return (
        MoEOptions,
        StableMoELanguageModelConfig,
        TransformerLanguageModelConfig,
        StableMoETranslationOptions,
        StableMoECriterionConfig,
        ARCH_MODEL_INV_REGISTRY,
    )


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default(fld: dataclasses.Field):
    if fld.default is not dataclasses.MISSING:
        return fld.default
    if fld.default_factory is not dataclasses.MISSING:
        return fld.default_factory()
    return dataclasses.MISSING


def _interpolated(fld: dataclasses.Field) -> bool:
    """A value fairseq copies from another config group (``II("...")``): not an option of its own."""
    default = _default(fld)
    return isinstance(default, str) and default.startswith("${")


def _cell(text: str) -> str:
    """One table cell: one line, pipes escaped, reST literals as markdown code."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("``", "`")


def _value(fld: dataclasses.Field) -> str:
    default = _default(fld)
    if default is None:
        return "unset"
    if isinstance(default, enum.Enum):
        default = default.value
    if isinstance(default, bool):
        return "on" if default else "off (a flag)"
    return f"`{default}`"


def _kind(fld: dataclasses.Field) -> str:
    t = fld.type
    if inspect.isclass(t) and issubclass(t, enum.Enum):
        return "one of " + ", ".join(f"`{m.value}`" for m in t)
    args = getattr(t, "__args__", None)  # Optional[X]
    if args:
        t = next(a for a in args if a is not type(None))
    return getattr(t, "__name__", str(t))


def _table(fields: Sequence[dataclasses.Field]) -> List[str]:
    rows = ["| option | type | default | what it does |", "|---|---|---|---|"]
    for fld in fields:
        rows.append(f"| `{option(fld.name)}` | {_kind(fld)} | {_value(fld)} | {_cell(fld.metadata.get('help', ''))} |")
    return rows


def _fields(cls, skip=()) -> List[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name not in skip and not f.name.startswith("_")]


def _architectures(registry, model: str) -> List[str]:
    from fairseq.models import ARCH_CONFIG_REGISTRY

    rows = []
    for arch in registry.get(model, []):
        doc = inspect.getdoc(ARCH_CONFIG_REGISTRY[arch]) or ""
        rows.append(f"* `--arch {arch}`: {_cell(doc) or 'the defaults in the tables below'}")
    return rows


def _tools():
    from fairseq_stablemoe.cli import consolidate, fluctuation, routing_summary

    return [("stablemoe-consolidate", consolidate), ("stablemoe-fluctuation", fluctuation),
            ("stablemoe-routing-summary", routing_summary)]  # fmt: skip


def _tool_table(parser: argparse.ArgumentParser) -> List[str]:
    """The arguments of one console tool's parser, in its order."""
    rows = ["| argument | default | what it does |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.metavar or action.dest}`"
        if action.option_strings and action.nargs != 0:
            name += f" {action.metavar or action.dest.upper()}"
        if action.nargs in ("*", "+") and not action.option_strings:
            name += " ..."
        if action.nargs == 0:
            default = "off (a flag)"
        elif action.required or (not action.option_strings and action.default is None):
            default = "required"
        else:
            default = "unset" if action.default is None else f"`{action.default}`"
        rows.append(f"| {name} | {default} | {_cell(action.help or '')} |")
    return rows


def _tools_section() -> List[str]:
    lines = [
        "## Console tools",
        "",
        "`stablemoe-train [TOOL] ARGS...` takes fairseq's own arguments: TOOL is `train` (the default), "
        "`eval-lm`, `generate`, `interactive` or `validate`, run as `fairseq-<tool>` with `--user-dir` of this "
        "package and, under torchrun, its distributed flags (`docs/expert_parallel.md`).",
        "",
    ]
    for name, module in _tools():
        parser = module.build_parser()
        lines += [f"### `{name}`", "", _cell(parser.description or ""), "", *_tool_table(parser), ""]
    return lines


def render() -> str:
    moe, lm, fairseq_lm, translation, criterion, registry = _plugin()
    shared = {f.name for f in dataclasses.fields(moe)}
    fairseq_fields = {f.name: f for f in dataclasses.fields(fairseq_lm)}
    lm_new, lm_defaults = [], []
    for fld in _fields(lm, skip=shared):
        if _interpolated(fld):
            continue
        if fld.name not in fairseq_fields:
            lm_new.append(fld)
        elif _default(fairseq_fields[fld.name]) != _default(fld):
            lm_defaults.append((fld, fairseq_fields[fld.name]))
    lines = [
        "# Options",
        "",
        f"Generated from the code by `{COMMAND}` (do not edit by hand; `{COMMAND} --check` fails when this "
        "page and the code differ). Every option the plugin adds to fairseq's command line, with its default "
        "(what the model uses when the option is not given) and its help text, which `fairseq-train --user-dir "
        "fairseq_stablemoe --arch stablemoe_lm --criterion stablemoe --help` also prints; fairseq's own options "
        "are in fairseq's documentation.",
        "",
        "## Architectures",
        "",
        "Language model (`--task language_modeling`), model `stablemoe_lm`:",
        "",
        *_architectures(registry, "stablemoe_lm"),
        "",
        "Translation (`--task translation` or `translation_multi_simple_epoch`), model `stablemoe_transformer`:",
        "",
        *_architectures(registry, "stablemoe_transformer"),
        "",
        "An architecture sets its sizes only where the command line does not: any option below, or fairseq's, "
        "overrides it. The defaults below are `stablemoe_lm`'s and `stablemoe_transformer`'s.",
        "",
        "## MoE layers (both models)",
        "",
        *_table(_fields(moe)),
        "",
        "## Language model (`--arch stablemoe_lm` and its sizes)",
        "",
        "Where the MoE layers go:",
        "",
        *_table(lm_new),
        "",
        "fairseq's language-model options that `stablemoe_lm` gives its own default:",
        "",
        "| option | default here | fairseq's default | what it does |",
        "|---|---|---|---|",
        *(
            f"| `{option(f.name)}` | {_value(f)} | {_value(base)} | {_cell(f.metadata.get('help', ''))} |"
            for f, base in lm_defaults
        ),
        "",
        "## Translation model (`--arch stablemoe_transformer` and its sizes)",
        "",
        "The MoE-layer options above, and where the MoE layers go:",
        "",
        *_table(_fields(translation, skip=shared)),
        "",
        "## Criterion (`--criterion stablemoe`)",
        "",
        *_table([f for f in _fields(criterion) if not _interpolated(f)]),
        "",
        *_tools_section(),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs from the code")
    parser.add_argument("--stdout", action="store_true", help="print the page instead of writing it")
    parser.add_argument("--out", type=Path, default=PAGE, help="the page (default: docs/options.md)")
    opts = parser.parse_args(argv)
    text = render()
    if opts.stdout:
        print(text, end="")
        return 0
    if opts.check:
        current = opts.out.read_text() if opts.out.exists() else ""
        if current != text:
            print(f"{opts.out} is stale: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    opts.out.write_text(text)
    print(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
