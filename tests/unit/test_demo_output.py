"""What ``securefl demo`` prints, read in an 80-column terminal by someone who is not a
developer: every line fits, each model is named the same way everywhere, and the summary
leads with any hospital the federation did not help (a new user's walk of ``make demo``).

The printing functions are fed realistic figures (those of a real default run, one in
which hospital_1 came out behind); tests/integration/test_demo.py checks the real demo's
captured output the same way."""

from __future__ import annotations

from pathlib import Path

import pytest

from securefl.demo.federated import (
    WIDTH,
    RoundRow,
    closing_lines,
    summary_lines,
    table_header,
    table_legend,
    table_row,
    wrapped,
)


def _names(n: int) -> list[str]:
    return [f"hospital_{i + 1}" for i in range(n)]


def _row(names: list[str], alone: list[float], copy: list[float], pooled_alone: list[float],
         published: float, r: int = 10, seconds: float = 8.0) -> RoundRow:
    return RoundRow(r, r, seconds, dict(zip(names, copy, strict=True)),
                    dict(zip(names, alone, strict=True)), published,
                    dict(zip(names, pooled_alone, strict=True)))


NAMES = _names(3)
#: The Testing figures of a real default run in which hospital_1 lost.
ONE_LOSES = _row(NAMES, [0.617, 0.667, 0.667], [0.592, 0.675, 0.758], [0.608, 0.55, 0.53],
                 0.675)
NONE_LOSE = _row(NAMES, [0.592, 0.642, 0.667], [0.650, 0.775, 0.767], [0.586, 0.50, 0.53],
                 0.694)


def _fits(lines: list[str]) -> None:
    too_long = [line for line in lines if len(line) > WIDTH]
    assert not too_long, too_long
    assert all("\n" not in line for line in lines)


@pytest.mark.parametrize("hospitals", [2, 3, 4, 6, 11])
def test_the_round_table_fits_80_columns_whatever_the_figures(hospitals: int) -> None:
    """It was 113 columns wide with three hospitals and wrapped into a block."""
    names = _names(hospitals)
    lines = table_header(names)
    for alone, copy, seconds in [(0.529, 0.556, 26.0), (1.0, 1.0, 2700.0), (0.0, 0.05, 3.0),
                                 (float("nan"), float("nan"), 8.0)]:
        lines += table_row(_row(names, [alone] * hospitals, [copy] * hospitals,
                                [alone] * hospitals, copy, seconds=seconds), names)
    _fits(lines)
    text = "\n".join(lines)
    assert all(n in text for n in names)  # every hospital has its column


def test_each_round_is_one_line_with_the_default_three_hospitals() -> None:
    row = table_row(_row(NAMES, [0.529, 0.406, 0.459], [0.556, 0.496, 0.655],
                         [0.495, 0.40, 0.45], 0.423, r=1, seconds=26.0), NAMES)
    assert row == ["      1    52.9 -> 55.6    40.6 -> 49.6    45.9 -> 65.5    49.5 -> 42.3"
                   "    26s"]
    header = table_header(NAMES)
    assert len(header) == 2
    # the cells' arrows sit under the header's "alone -> copy"
    assert [header[0].index("->", i) for i in (0, 20, 36)] == [
        row[0].index("->", i) for i in (0, 20, 36)]


@pytest.mark.parametrize("personalise", ["best", "recalibrate", "finetune", "downloaded",
                                         "none"])
def test_the_legend_is_wrapped_and_names_both_models(personalise: str) -> None:
    """It was one line of ~428 characters; and "shared model" meant three things."""
    legend = table_legend(personalise)
    _fits(legend)
    text = " ".join(line.strip() for line in legend)
    assert "this hospital's copy of the shared model" in text
    assert "the shared model as published" in text
    assert "alone -> copy" in text and "best alone -> published" in text
    assert ("flattered" in text) == (personalise == "best")
    header = "\n".join(table_header(NAMES))
    assert "alone -> copy" in header and "best alone -> published" in header
    assert "shared" not in header  # the legend says which model; the header its short name


def test_the_summary_leads_with_the_hospital_that_lost() -> None:
    """A run printed "hospital_1 61.7% -> 59.2% (NOT better)" after a first line saying
    "federation is ahead by 6.7 points"."""
    lines = summary_lines(ONE_LOSES, 10)
    _fits(lines)
    first = " ".join(lines).split(".")[0]
    assert "hospital_1" in first and "NOT better" in first
    assert "hospital_2" not in first and "hospital_3" not in first
    assert "    hospital_1  61.7% -> 59.2%  WORSE by 2.5 points" in lines
    assert "    hospital_3  66.7% -> 75.8%  better by 9.1 points" in lines
    text = " ".join(lines)
    # the pooled figure comes after every hospital's own, and names what it measures
    assert text.index("ahead by 6.7 points") > text.index("hospital_3  66.7%")
    assert "the hospitals' copies of the shared model score 67.5% on average" in " ".join(
        line.strip() for line in lines)


def test_the_summary_names_every_hospital_that_lost_and_says_when_none_did() -> None:
    two = _row(NAMES, [0.70, 0.60, 0.66], [0.65, 0.60, 0.80], [0.6, 0.55, 0.5], 0.55)
    first = " ".join(summary_lines(two, 10)).split(".")[0]
    assert "hospital_1 and hospital_2 are NOT better off" in first  # a tie is no gain
    assert "hospital_3" not in first
    assert any(line.endswith("hospital_2  60.0% -> 60.0%  no better")
               for line in summary_lines(two, 10))
    assert "BEHIND by 5.0 points" in " ".join(summary_lines(two, 10))
    lines = summary_lines(NONE_LOSE, 10)
    _fits(lines)
    first = " ".join(lines).split(".")[0]
    assert first.startswith("summary: after 10 rounds, every hospital is better off")
    assert "NOT" not in " ".join(lines) and "WORSE" not in " ".join(lines)


def test_the_other_lines_fit_too() -> None:
    _fits(closing_lines(132.0, Path("/tmp/securefl-demo-7r6dy_or")))
    _fits(summary_lines(_row(_names(11), [0.5] * 11, [0.4] * 11, [0.5] * 11, 0.4), 10))
    lines = wrapped("a federation of 3 hospitals in /tmp/securefl-demo-7r6dy_or "
                    + "word " * 40, first="securefl demo: ")
    _fits(lines)
    assert lines[0].startswith("securefl demo: a federation") and lines[1].startswith("  ")
