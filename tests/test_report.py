"""Results tables: one row per (label, shot), one column per benchmark, the mean over the columns."""

from __future__ import annotations

import pytest

from fewshot.report import results_table, row_label


def result(method: str, benchmark: str, miou: float, label: str | None = None) -> dict:
    r = {"method": method, "benchmark": benchmark, "fold": "0", "shot": 1, "seeds": [0],
         "miou_mean": miou, "miou_std": 0.0, "fbiou_mean": 0.5, "fbiou_std": 0.0}
    return {**r, "label": label} if label else r


def test_labels_tell_two_variants_of_one_method_apart():
    rows = [result("qgnet", "a", 0.2, "qgnet"), result("qgnet", "b", 0.4, "qgnet"),
            result("qgnet", "a", 0.3, "qgnet+ssp"), result("prototype", "a", 0.1)]
    lines = results_table(rows, by="benchmark").splitlines()
    assert lines[0] == "| method | shot | benchmark a | benchmark b | mean |"
    assert lines[2] == "| qgnet | 1-shot | 20.0 / 50.0 | 40.0 / 50.0 | 30.0 / 50.0 |"
    assert lines[3] == "| qgnet+ssp | 1-shot | 30.0 / 50.0 | - | 30.0 / 50.0 |"
    assert lines[4] == "| prototype | 1-shot | 10.0 / 50.0 | - | 10.0 / 50.0 |"


@pytest.mark.parametrize("r, expected", [({"method": "ssp"}, "ssp"), ({"method": "qgnet", "label": "x"}, "x"),
                                         ({}, "qgnet")])
def test_row_label_falls_back_to_the_method(r, expected):
    assert row_label(r) == expected
