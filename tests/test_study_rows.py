"""`make study`'s row names and its seed table (tests/bench/study.py): NAME-seedN runs row NAME with --seed N, and
the paired ratio and its 95% interval equal a hand computation."""
from __future__ import annotations

import math
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "bench"))
import study  # noqa: E402


def test_a_seed_suffix_runs_the_row_with_that_seed():
    name, what, extra = study.find_row("kd-auto-sys88-seed7")
    base = study.find_row("kd-auto-sys88")
    assert name == "kd-auto-sys88-seed7"
    assert extra == [*base[2], "--seed", "7"]
    assert what.startswith(base[1]) and what.endswith("--seed 7")
    assert study.find_row("online-auto-lr1e-3-seed12")[2][-2:] == ["--seed", "12"]


@pytest.mark.parametrize("name", ["no-such-row", "no-such-row-seed1", "kd-auto-sys88-seedx", "kd-auto-sys88-seed1-seed2"])
def test_unknown_rows_and_double_seeds_are_not_rows(name):
    assert study.find_row(name) is None


def test_the_seed_table_pairs_each_seed_with_the_reference_of_the_same_seed():
    rows = {"online-auto-lr1e-3": {"perplexity": 90.0}, "online-auto-lr1e-3-seed1": {"perplexity": 100.0},
            "online-auto-lr1e-3-seed2": {"perplexity": 95.0},
            "kd-auto-sys88": {"perplexity": 94.5}, "kd-auto-sys88-seed1": {"perplexity": 99.0},
            "kd-auto-sys88-seed3": {"perplexity": 50.0}}  # seed 3 has no reference: left out of the pairs
    lines, summary = study.seed_lines(rows)
    got = summary["seeds"]["kd-auto-sys88"]
    logs = [math.log(94.5 / 90.0), math.log(99.0 / 100.0)]
    m, sd = sum(logs) / 2, abs(logs[0] - logs[1]) / math.sqrt(2)
    half = math.tan(math.pi * 0.475) * sd / math.sqrt(2)  # Student's t (1 degree of freedom: Cauchy), two-sided 95%
    assert got["paired_ratio"] == pytest.approx(math.exp(m), rel=1e-12)
    assert got["paired_95"] == pytest.approx([math.exp(m - half), math.exp(m + half)], rel=1e-12)
    assert got["ratio_of_means"] == pytest.approx((94.5 + 99.0) / 190.0, rel=1e-12)
    assert got["seeds"] == {0: 94.5, 1: 99.0, 3: 50.0}
    assert summary["seeds"]["online-auto-lr1e-3"]["mean"] == pytest.approx(95.0)
    many = {**rows, **{f"kd-auto-sys88-seed{i}": {"perplexity": 99.0} for i in range(4, 16)},
            **{f"online-auto-lr1e-3-seed{i}": {"perplexity": 100.0} for i in range(3, 16)}}
    assert study.seed_lines(many)[1]["seeds"]["kd-auto-sys88"]["paired_95"][0] < 1  # 15 pairs: past any small table
    assert "fresh-online" not in summary["seeds"]  # a group of fewer than two seeds has no row
    assert sum(line.startswith("| kd-auto-sys88 |") for line in lines) == 1
