"""benchmarks/methods_table.py: one row per registered CAM method, valid numbers, and
metrics that score known maps as mathematics says they must."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from tf_gradcam.methods import METHODS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "methods_table.py"


@pytest.fixture(scope="module")
def table():
    """The script, imported as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("methods_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def quick_rows(table, tmp_path_factory):
    out = tmp_path_factory.mktemp("methods_table") / "methods.md"
    rows = table.main(["--quick", "--out", str(out)])
    return rows, out.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def setup(table):
    sizes = table.QUICK
    return table.prepare(
        sizes["images"], faithful=sizes["faithful"], steps=sizes["steps"], batch=sizes["batch"]
    )


def _check_ranges(scores) -> None:
    assert 0.0 <= scores.pointing <= 1.0
    assert 0.0 <= scores.loc_error <= 1.0
    assert np.all(np.isfinite(scores.rank)) and np.all(np.abs(scores.rank) <= 1.0)
    # areas under softmax probabilities over fractions 0..1
    for auc in (scores.deletion, scores.insertion):
        assert np.all(np.isfinite(auc)) and np.all((auc >= 0.0) & (auc <= 1.0))


def test_one_row_per_registered_method_then_the_references(table, quick_rows):
    rows, markdown = quick_rows
    names = [row.name for row in rows]
    assert names == [*METHODS, *table.REFERENCE_ROWS]
    assert [row.reference for row in rows] == [False] * len(METHODS) + [True] * 3
    for row in rows:
        if row.scores is None:  # a method not written yet: a reason, no numbers
            assert row.reason and not row.reference
            assert f"| `{row.name}` | n/a (" in markdown
        else:
            assert row.reason is None
            _check_ranges(row.scores)
            assert (row.seconds is None) == row.reference
            if not row.reference:
                assert row.seconds > 0
    # the markdown table: a header, its rule, one line per row
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + len(rows)
    assert all(line.count("|") == len(table.COLUMNS) + 1 for line in lines)
    for arrow in ("pointing % ↑", "loc. error % ↓", "deletion AUC ↓", "insertion AUC ↑"):
        assert arrow in lines[0]


def test_gradcam_has_numbers_and_beats_the_baselines(quick_rows):
    rows = {row.name: row for row in quick_rows[0]}
    gradcam = rows["gradcam"].scores
    assert gradcam is not None, rows["gradcam"].reason
    for baseline in ("random", "centre Gaussian"):
        reference = rows[baseline].scores
        assert gradcam.pointing > reference.pointing
        assert gradcam.rank.mean() > reference.rank.mean()
    assert gradcam.loc_error < rows["random"].scores.loc_error


def test_ground_truth_mask_scores_perfectly(table, setup):
    """A map equal to the object's mask: every maximum is on the object and the box
    around the largest segment is the object's box, so IoU 1; with correct classes
    the localisation error is exactly 0."""
    oracle = dataclasses.replace(setup, predicted=setup.labels.copy())
    masks = setup.masks.astype(np.float64)
    scores = table.evaluate(oracle, masks, masks)
    assert scores.pointing == 1.0
    assert scores.loc_error == 0.0
    assert scores.all_zero == 0
    _check_ranges(scores)

    # a wrong top-1 class is a localisation error whatever the box (§4.1)
    wrong = dataclasses.replace(setup, predicted=(setup.labels + 1) % 3)
    assert table.evaluate(wrong, masks, masks).loc_error == 1.0


def test_occlusion_map_is_perfectly_faithful_and_zero_maps_fail(table, setup):
    m = setup.faithful
    maps = setup.masks.astype(np.float64)
    maps[:m] = setup.occlusion  # the reference itself, as the explanation
    np.testing.assert_allclose(table.evaluate(setup, maps, maps).rank, 1.0)

    zero = np.zeros_like(maps)  # points nowhere, no box
    scores = table.evaluate(setup, zero, zero)
    assert scores.pointing == 0.0 and scores.loc_error == 1.0
    assert scores.all_zero == len(maps)
    np.testing.assert_array_equal(scores.rank, 0.0)  # constant map: no association


def test_a_method_that_cannot_be_run_is_a_row_n_a(table, setup, monkeypatch):
    """A method not written yet (or broken) is reported, and the table carries on."""

    def missing(name):
        raise ModuleNotFoundError(f"No module named 'tf_gradcam.{name}' | not yet")

    monkeypatch.setattr(table, "get_method", missing)
    row = table.method_row(setup, "scorecam")
    assert row.scores is None and row.seconds is None
    assert row.reason.startswith("ModuleNotFoundError: No module named")
    markdown = table.table([row, table.reference_row(setup, "random")])
    line = markdown.splitlines()[2]
    assert line.startswith("| `scorecam` | n/a (ModuleNotFoundError")
    assert line.count(" | ") == len(table.COLUMNS) - 1  # the reason's "|" is escaped

    class WrongShape:  # builds and runs, but returns no (batch, H, W) heatmaps
        def __init__(self, model, layer):
            pass

        def __call__(self, images, target=None):
            return type("Result", (), {"heatmaps": np.zeros((len(images), 4, 4))})()

    monkeypatch.setattr(table, "get_method", lambda name: WrongShape)
    row = table.method_row(setup, "eigencam")
    assert row.scores is None and "heatmaps of shape" in row.reason


def test_two_runs_give_the_same_numbers(table):
    first, second = (table.main(["--quick", "--methods", "gradcam"]) for _ in range(2))
    for a, b in zip(first, second, strict=True):
        assert a.name == b.name
        for field in ("pointing", "loc_error", "rank", "deletion", "insertion"):
            np.testing.assert_array_equal(getattr(a.scores, field), getattr(b.scores, field))


def test_unknown_method_is_refused(table):
    with pytest.raises(SystemExit):
        table.parse_args(["--methods", "gradcam,nosuchcam"])


def test_notes_flag_a_method_that_does_not_beat_a_baseline(table):
    def scores(pointing, loc_error, rho, deletion, insertion, all_zero=0):
        return table.Scores(
            pointing,
            loc_error,
            np.array([rho]),
            np.array([deletion]),
            np.array([insertion]),
            all_zero,
        )

    rows = [
        table.Row("good", False, scores(0.9, 0.2, 0.5, 0.3, 0.9), 1e-3, None),
        table.Row("bad", False, scores(0.1, 1.0, 0.5, 0.3, 0.9, all_zero=2), 1e-3, None),
        table.Row("missing", False, None, None, "ImportError: not yet"),
        table.Row("random", True, scores(0.2, 1.0, 0.0, 0.6, 0.5), None, None),
        table.Row("centre Gaussian", True, scores(0.3, 1.0, 0.2, 0.5, 0.8), None, None),
    ]
    notes = table.notes(rows)
    assert not [line for line in notes if "`good`" in line]
    assert "- `bad`: 2 all-zero map(s)" in notes[0]
    assert "- `bad` does not beat the *random* map on pointing." in notes
    assert "- `bad` does not beat the *centre Gaussian* map on loc. error." in notes
    assert not [line for line in notes if "missing" in line]
