"""fairseq-stablemoe: StableMoE (Dai et al., ACL 2022) as a fairseq plugin."""

from setuptools import find_packages, setup

setup(
    name="fairseq-stablemoe",
    version="0.1.0",
    description="StableMoE: stable routing for mixture-of-experts, as a fairseq --user-dir plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fairseq_stablemoe", "fairseq_stablemoe.*"]),
    license="MIT",
    python_requires=">=3.8",
    install_requires=[
        # fairseq 0.12.2 does not import on Python >= 3.11 (dataclass "mutable default"
        # error); fairseq-fixed is a fairseq-main snapshot that installs the `fairseq` module.
        "fairseq>=0.12.2; python_version < '3.11'",
        "fairseq-fixed>=0.12.3; python_version >= '3.11'",
        "torch>=1.13",
        "fairscale",
        "sentencepiece",
        "matplotlib",  # stablemoe-fluctuation --plot, examples/compare_moe_types.py
    ],
    extras_require={"test": ["pytest", "pytest-xdist", "hypothesis", "ruff"]},  # ruff: scripts/test.sh lints first
    entry_points={
        "console_scripts": [
            "stablemoe-routing-summary=fairseq_stablemoe.cli.routing_summary:cli_main",
            "stablemoe-fluctuation=fairseq_stablemoe.cli.fluctuation:cli_main",
            "stablemoe-consolidate=fairseq_stablemoe.cli.consolidate:cli_main",
            "stablemoe-train=fairseq_stablemoe.cli.train:cli_main",
        ],
    },
)
