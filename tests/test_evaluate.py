"""Tests of the evaluation tables (pddreg.report.evaluate)."""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from pddreg.cli import add_evaluate
from pddreg.errors import InputError
from pddreg.report.evaluate import (
    evaluate_method,
    format_table,
    summarise,
    write_results,
)

SHAPE = (32, 32)
SHIFTS = (0, 2, -1)  # rows each subject is moved by


@dataclass
class _Subject:
    image: np.ndarray
    labels: np.ndarray | None
    spacing: tuple[float, ...]
    name: str


class _Dataset:
    """Three subjects: a 12x12 square (label 1) and a 3x3 square (label 2, missing in the
    third subject), moved down by SHIFTS rows."""

    ndim = 2
    num_labels = 3
    label_names = ["background", "big", "small"]

    def __len__(self) -> int:
        return len(SHIFTS)

    def subject(self, i: int) -> _Subject:
        s = SHIFTS[i]
        labels = np.zeros(SHAPE, np.int64)
        labels[8 + s : 20 + s, 6:18] = 1
        if i != 2:
            labels[10 + s : 13 + s, 22:25] = 2
        image = (labels > 0).astype(np.float32) * 0.8 + 0.1
        return _Subject(image, labels, (1.0, 1.0), f"s{i}")

    def pairs(self, split: str = "test") -> list[tuple[int, int]]:
        return [(f, m) for f in range(3) for m in range(3) if f != m]


def _oracle(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """Perfect method for pure row shifts: the integer shift that matches the images best."""
    errs = {s: float((torch.roll(moving, -s, dims=2) - fixed).square().sum()) for s in range(-5, 6)}
    best = min(errs, key=errs.get)
    disp = torch.zeros(1, 2, *fixed.shape[2:])
    disp[:, 0] = best
    return disp


def _zero(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    return torch.zeros(1, 2, *fixed.shape[2:])


def _expected_none(f: int, m: int) -> dict[int, float]:
    d = abs(SHIFTS[f] - SHIFTS[m])
    out = {1: (12 - d) / 12}
    out[2] = math.nan if 2 in (f, m) else max(3 - d, 0) / 3
    return out


def test_none_matches_analytic_overlap_and_oracle_is_perfect() -> None:
    ds = _Dataset()
    pairs = ds.pairs()
    none = evaluate_method(ds, "none", _zero, pairs)
    oracle = evaluate_method(ds, "oracle", _oracle, pairs)
    assert len(none) == len(oracle) == 6
    for r in none:
        f, m = int(r["fixed"][1]), int(r["moving"][1])
        exp = _expected_none(f, m)
        assert r["dice"][1] == pytest.approx(exp[1])
        if math.isnan(exp[2]):
            assert math.isnan(r["dice"][2])
        else:
            assert r["dice"][2] == pytest.approx(exp[2])
        assert r["sdlogj"] == pytest.approx(0.0) and r["folding"] == 0.0
        assert r["time"] >= 0.0 and r["error"] is None
    for r in oracle:
        assert r["dice"][1] == pytest.approx(1.0)
        assert r["mean_dice"] == pytest.approx(1.0)
        assert r["mean_hd95"] == pytest.approx(0.0)

    rows = summarise(none + oracle, {1: "big", 2: "small"})
    assert [r["method"] for r in rows] == ["none", "oracle"]
    r_none, r_oracle = rows
    assert r_oracle["dice_mean"] == pytest.approx(1.0) and r_oracle["dice_std"] == pytest.approx(0)
    exp_means = [np.nanmean(list(_expected_none(f, m).values())) for f, m in pairs]
    assert r_none["dice_mean"] == pytest.approx(np.mean(exp_means))
    assert r_none["dice_std"] == pytest.approx(np.std(exp_means))
    # the missing label is ignored, not counted as zero
    exp_small = np.nanmean([_expected_none(f, m)[2] for f, m in pairs])
    assert r_none["dice_small"] == pytest.approx(exp_small)
    assert r_none["large"] == ["big"] and r_none["small"] == ["small"]
    assert r_none["dice:big"] == pytest.approx(np.mean([_expected_none(f, m)[1] for f, m in pairs]))
    assert r_none["dice_mean"] < r_oracle["dice_mean"]

    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["method", "big", "small"]
    assert lines[2].startswith("none") and lines[3].startswith("oracle")
    assert "1.000 +- 0.000" in lines[3]
    md = format_table(rows, markdown=True)
    assert md.splitlines()[0].startswith("| method | big | small |")


def test_structure_rows_group_by_size() -> None:
    from pddreg.report.evaluate import structure_rows

    ds = _Dataset()
    rec = evaluate_method(ds, "none", _zero, ds.pairs())
    rows = structure_rows(rec, {1: "big", 2: "small"})
    assert [(r["structure"], r["group"]) for r in rows] == [("big", "large"), ("small", "small")]
    assert rows[0]["volume"] == pytest.approx(144.0) and rows[1]["volume"] == pytest.approx(
        6.0
    )  # absent from s2
    exp = [_expected_none(f, m)[1] for f, m in ds.pairs()]
    assert rows[0]["dice_mean"] == pytest.approx(np.mean(exp))
    assert rows[0]["dice_std"] == pytest.approx(np.std(exp))


def test_size_threshold_override_moves_structures() -> None:
    ds = _Dataset()
    rec = evaluate_method(ds, "none", _zero, ds.pairs())
    rows = summarise(rec, {1: "big", 2: "small"}, size_threshold=1.0)
    assert rows[0]["large"] == ["big", "small"] and rows[0]["small"] == []
    assert math.isnan(rows[0]["dice_small"])


def test_nan_fields_are_reported_not_fatal(tmp_path) -> None:
    ds = _Dataset()

    def broken(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        d = torch.zeros(1, 2, *fixed.shape[2:])
        d[0, 0, 0, 0] = math.nan
        return d

    rec = evaluate_method(ds, "broken", broken, ds.pairs()[:2])
    assert all(r["error"] == "non-finite displacement" for r in rec)
    assert all(math.isnan(r["mean_dice"]) for r in rec)
    rows = summarise(rec + evaluate_method(ds, "none", _zero, ds.pairs()[:2]))
    assert rows[0]["failed"] == 2 and math.isnan(rows[0]["dice_mean"])
    assert rows[1]["failed"] == 0 and rows[1]["dice_mean"] > 0.5
    assert "nan" in format_table(rows).splitlines()[2]

    paths = write_results(rows, tmp_path / "out")
    data = json.loads(paths["json"].read_text())  # strict JSON: NaN written as null
    assert [d["method"] for d in data] == ["broken", "none"]
    assert data[0]["dice_mean"] is None and data[1]["dice_mean"] == pytest.approx(
        rows[1]["dice_mean"]
    )
    with paths["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and table[0]["dice_mean"] == "nan"
    assert float(table[1]["dice_mean"]) == pytest.approx(rows[1]["dice_mean"])
    assert paths["txt"].read_text().startswith("method")


def test_wrong_field_shape_raises() -> None:
    ds = _Dataset()
    with pytest.raises(ValueError, match="expected \\(1, 2, 32, 32\\)"):
        evaluate_method(ds, "bad", lambda f, m: torch.zeros(1, 2, 8, 8), ds.pairs()[:1])


def test_subcommand_writes_tables(tmp_path, monkeypatch, capsys) -> None:
    import pddreg.data

    monkeypatch.setattr(pddreg.data, "open_dataset", lambda spec: _Dataset(), raising=False)
    parser = argparse.ArgumentParser()
    add_evaluate(parser.add_subparsers(dest="command"))
    out = tmp_path / "res"
    args = parser.parse_args(
        ["evaluate", "tiny", "--method", "none", "-o", str(out), "--device", "cpu"]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("method") and "none" in printed
    assert (out / "results.csv").is_file() and (out / "results.json").is_file()
    groups = {s["group"] for s in json.loads((out / "structures.json").read_text())}
    assert groups == {"large", "small"}
    records = json.loads((out / "records.json").read_text())
    assert len(records) == 6 and records[0]["method"] == "none"

    args = parser.parse_args(["evaluate", "tiny", "--device", "cpu"])
    with pytest.raises(InputError, match="--method or --model"):
        args.func(args)
    args = parser.parse_args(["evaluate", "tiny", "--model", str(tmp_path / "nope.pt")])
    with pytest.raises(InputError, match="nope.pt"):
        args.func(args)


def test_unknown_method_is_an_input_error() -> None:
    from pddreg.report.evaluate import make_register_fn

    with pytest.raises(InputError, match="--method: unknown method 'deeds'"):
        make_register_fn("deeds", 2)
    zero = make_register_fn("none", 3)
    assert zero(torch.rand(1, 1, 4, 5, 6), torch.rand(1, 1, 4, 5, 6)).shape == (1, 3, 4, 5, 6)
