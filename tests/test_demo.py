"""``pddreg demo`` end to end on a tiny configuration (few subjects, steps and pairs)."""

from __future__ import annotations

import base64
import json
import re

import pytest

from pddreg.cli import main
from pddreg.report.demo import DemoConfig, run_demo

TINY = ["--quick", "--subjects", "8", "--held-out", "4", "--steps", "3", "--pairs", "2"]


@pytest.mark.slow
def test_demo_writes_report_table_and_pictures(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--device", "cpu", *TINY]) == 0
    printed = capsys.readouterr().out
    for method in ("none", "mind", "pdd"):
        assert re.search(rf"^{method}\s", printed, re.M), printed
    assert "report.html" in printed

    html = (out / "report.html").read_text()
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    # two pairs: four panels of each method, grid and Jacobian of mind and pdd
    for p in (0, 1):
        for name in ("none", "mind", "pdd"):
            assert f"pair{p}_{name}_pair.png" in pngs
        for name in ("mind", "pdd"):
            assert f"pair{p}_{name}_grid.png" in pngs and f"pair{p}_{name}_jacobian.png" in pngs
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(embedded) == 2 * (3 + 2 + 2)
    assert all(base64.b64decode(e)[:4] == b"\x89PNG" for e in embedded)
    assert "Settings" in html and "fine-tuning steps" in html

    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["none", "mind", "pdd"]
    assert all(r["pairs"] == 2 for r in rows)
    assert rows[0]["folding_pct"] == 0.0
    assert (out / "results.csv").exists() and (out / "pairs.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo")]


@pytest.mark.slow
def test_demo_is_repeatable_for_a_seed(tmp_path):
    cfg = {
        "quick": True,
        "subjects": 8,
        "held_out": 4,
        "steps": 3,
        "max_pairs": 1,
        "figure_pairs": 0,
        "device": "cpu",
        "progress": False,
    }
    a = run_demo(DemoConfig(output=tmp_path / "a", seed=1, **cfg))
    b = run_demo(DemoConfig(output=tmp_path / "b", seed=1, **cfg))

    def numbers(res):
        return [{k: v for k, v in r.items() if k != "time"} for r in res.rows]

    assert json.dumps(numbers(a), sort_keys=True) == json.dumps(numbers(b), sort_keys=True)
    assert a.report.exists() and a.figures == []
