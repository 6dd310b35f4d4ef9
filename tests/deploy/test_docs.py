"""The documentation: the configuration reference is the schema's (generated, every key described), the site builds
with warnings as errors (broken links and anchors included), the README stays short and its links resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from ortho_lora_dist.config import Config
from ortho_lora_dist.config.reference import SECTIONS, reference_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_config_reference_is_generated_from_the_schema():
    committed = (ROOT / "docs" / "reference" / "config.md").read_text()
    assert committed == reference_markdown(), "regenerate: ortho-lora config > docs/reference/config.md"
    for _, cls in [("", Config), *SECTIONS]:
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description (a docstring under the field)"
            assert f"| `{name}` |" in committed, name


def test_cli_prints_the_reference(capsys):
    from ortho_lora_dist.cli import main

    assert main(["config"]) == 0
    assert capsys.readouterr().out == reference_markdown()


def test_site_builds_without_a_warning(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [str(mkdocs), "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def test_readme_support_table_is_the_tests_declaration():
    """The README's family x feature table is written from tests/family_support.py, whose every cell a test asserts
    (tests/core/test_families.py, tests/core/test_families_distributed.py)."""
    proc = subprocess.run(
        [sys.executable, "scripts/support_table.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
