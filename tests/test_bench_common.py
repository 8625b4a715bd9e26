"""benchmarks/_common.py: RESULTS.md sections are rewritten in place, and only their own."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("_bench_common", ROOT / "benchmarks" / "_common.py")
common = importlib.util.module_from_spec(_spec)
sys.modules["_bench_common"] = common
_spec.loader.exec_module(common)


def test_write_section_replaces_its_own_section_in_place(tmp_path):
    path = tmp_path / "RESULTS.md"
    common.write_section("## Quality", "## Quality (benchmarks/quality.py)\n\nold figures\n", path)
    common.write_section("## Quality on independently drawn clips",
                         "## Quality on independently drawn clips (benchmarks/quality.py --generator spec)\n\nspec\n",
                         path)
    common.write_section("## Batch", "## Batch (benchmarks/batch.py)\n\nbatch\n", path)
    common.write_section("## Quality", "## Quality (benchmarks/quality.py)\n\nnew figures\n", path)
    text = path.read_text()
    assert "old figures" not in text and text.count("new figures") == 1
    assert text.count("\nspec\n") == 1  # a heading that merely starts like another is another section
    assert text.index("new figures") < text.index("\nspec\n") < text.index("\nbatch\n")  # order kept
    assert text.startswith("# Benchmark results\n\n## Quality (benchmarks/quality.py)")
