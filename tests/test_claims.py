"""The claims protocol's bookkeeping (benchmarks/claims.py, benchmarks/lnl_seeds.py): verdicts,
deltas and the seed-setting choice on hand-built numbers. The protocol itself is a long run."""

from __future__ import annotations

import math
import sys

import pytest

from tests.helpers import ROOT
from wsss.platform.config import TrainConfig

sys.path.insert(0, str(ROOT / "benchmarks"))

from claims import ABLATIONS, claims_table, delta, verdict  # noqa: E402

from lnl_seeds import choose  # noqa: E402


def test_delta_pairs_seeds_and_gives_mean_and_spread():
    text, mean, std = delta([0.30, 0.32, 0.34], [0.28, 0.28, 0.28])
    assert mean == pytest.approx(4.0) and std == pytest.approx(2.0) and text == "+4.00 ± 2.00"


@pytest.mark.parametrize("mean, std, direction, seeds, expected", [
    (4.0, 2.0, +1, 3, "holds"),
    (1.0, 2.0, +1, 3, "inconclusive"),
    (-3.0, 1.0, +1, 3, "does not"),
    (-3.0, 1.0, -1, 3, "holds"),
    (-0.5, 0.3, 0, 3, "holds"),  # kept: a drop within a point
    (-5.0, 1.0, 0, 3, "does not"),
    (-6.0, 8.0, 0, 3, "inconclusive"),  # a drop within a wide spread
    (4.0, 2.0, +1, 2, "inconclusive (fewer than 3 seeds)"),
    (4.0, math.nan, +1, 3, "inconclusive (fewer than 3 seeds)"),
])
def test_verdict(mean, std, direction, seeds, expected):
    assert verdict(mean, std, direction, seeds) == expected


def test_claims_table_compares_each_method_with_cam_and_says_what_has_not_run():
    rows = [{"method": m, "seed": s, "miou": base + 0.01 * s, "body_recall": body, "part_recall": 0.8}
            for s in range(3) for m, base, body in (("cam", 0.30, 0.2), ("lnl", 0.34, 0.4))]
    table = claims_table(rows, [])
    line = next(line for line in table.splitlines() if line.startswith("| LNL raises CAM mIoU"))
    assert "| `cam` 31.00 ± 1.00 | `lnl` 35.00 ± 1.00 | +4.00 ± 0.00 | 3 | holds |" in line
    assert "| FSAE raises CAM mIoU | miou | `cam` 31.00 ± 1.00 | — | — | 0 | not run yet |" in table
    assert "| OCR lowers the out-of-candidate rate at stage 2 | oc_pixel_rate | `deeplab` — |" in table


def test_the_seed_setting_is_the_most_covering_of_the_precise_ones():
    rows = [{"kind": "cosine", "eta": 0.8, "bg_precision": 0.95, "fg_precision": 0.92, "fg_coverage": 0.05},
            {"kind": "cosine", "eta": 0.6, "bg_precision": 0.93, "fg_precision": 0.91, "fg_coverage": 0.10},
            {"kind": "cosine", "eta": 0.4, "bg_precision": 0.90, "fg_precision": 0.70, "fg_coverage": 0.30}]
    assert choose(rows)["eta"] == 0.6
    imprecise = [dict(row, bg_precision=0.5, bg_coverage=0.8 - row["eta"]) for row in rows]
    imprecise.append(dict(imprecise[0], eta=0.3, bg_coverage=0.0, fg_coverage=0.9))  # no background seeds at all
    assert choose(imprecise)["eta"] == 0.4, "none usable: the most right seeds, background and foreground"

def test_an_ablation_and_an_export_are_compared_with_the_same_method():
    rows = [{"method": "lnl", "seed": s, "miou": 0.34, "body_recall": 0.40, "shrink_miou": 0.34,
             "expand_miou": 0.30 + 0.01 * s, "shrink_body_recall": 0.40, "expand_body_recall": 0.30}
            for s in range(3)]
    rows += [{"method": "lnl-no-contrast", "seed": s, "miou": 0.31, "body_recall": 0.35} for s in range(3)]
    table = claims_table(rows, [])
    line = next(line for line in table.splitlines() if line.startswith("| LNL's gain comes from its contrastive loss"))
    assert "| `lnl-no-contrast` 31.00 ± 0.00 | `lnl` 34.00 ± 0.00 | +3.00 ± 0.00 | 3 |" in line
    line = next(line for line in table.splitlines() if line.startswith("| DFSM's expansion M_e raises mIoU"))
    assert "| `lnl` shrink_miou 34.00 ± 0.00 | `lnl` 31.00 ± 1.00 | -3.00 ± 1.00 | 3 | does not |" in line


def test_the_claims_ablation_is_csrm_with_the_option_and_is_compared_with_csrm_and_cam():
    method, overrides = ABLATIONS["csrm-decoder-warmup"]
    config = TrainConfig(method=method, data="shards").with_overrides(overrides)
    assert config.sections["csrm"].warmup_decoder_only is True
    rows = [{"method": name, "seed": seed, "miou": miou, "seg_miou": seg}
            for seed in range(3) for name, miou, seg in
            (("cam", 0.30, None), ("csrm", 0.20, 0.15), ("csrm-decoder-warmup", 0.295, 0.31))]
    lines = claims_table(rows, []).splitlines()

    def line(claim: str) -> str:
        return next(text for text in lines if text.startswith(f"| {claim} |"))

    assert "| `csrm` 20.00 ± 0.00 | `csrm-decoder-warmup` 29.50 ± 0.00 | +9.50 ± 0.00 | 3 | holds |" in line(
        "CSRM's CAMs gain when the warm-up trains only the decoders")
    assert "| `cam` 30.00 ± 0.00 | `csrm-decoder-warmup` 29.50 ± 0.00 | -0.50 ± 0.00 | 3 | holds |" in line(
        "CSRM's CAMs kept when the warm-up trains only the decoders")
    assert "| `csrm-decoder-warmup` miou 29.50 ± 0.00 | `csrm-decoder-warmup` 31.00 ± 0.00 | +1.50 ± 0.00 |" in line(
        "CSRM's segmentation branch beats its own CAMs (decoder-only warm-up)")
