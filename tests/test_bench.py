"""The benchmark: its table comes out whole, its saved-bytes counter counts right.

No timing is asserted: the machine is shared and noisy. What can fail is the shape of
the report, the bookkeeping of saved tensors, and the peers computing what ours does.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from refimpl.bench import COLUMNS, count_ops, main, peers_for, saved_bytes
from refimpl.bench import core as bench_core
from refimpl.bench.core import FLOOR, MIN_ROUNDS_FOR_VERDICT, Ratio, parse_shape, verdict
from refimpl.registry import randomize_
from refimpl.squeeze_excitation.torch_module import SqueezeExcitation


def _table(markdown: str) -> list[list[str]]:
    """The rows (header first) of the results table in the report."""
    lines = markdown.splitlines()
    start = lines.index("| " + " | ".join(COLUMNS) + " |")
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    assert set(rows[1]) == {"---"}, f"no separator under the header: {rows[1]}"
    return [rows[0], *rows[2:]]


def _number(cell: str) -> float:
    return math.nan if cell == "—" else float(cell)


def test_quick_run_prints_and_writes_a_full_table(tmp_path, capsys) -> None:
    out_file = tmp_path / "bench.md"
    argv = ["--quick", "--only", "se", "--shapes", "2x32x5x6", "--repeats", "2"]
    assert main([*argv, "--output", str(out_file)]) == 0
    printed = capsys.readouterr().out
    assert out_file.read_text() == printed
    header, *rows = _table(printed)
    assert header == list(COLUMNS)
    candidates = [row[1] for row in rows]
    assert candidates[0] == "refimpl" and candidates[-1] == FLOOR, candidates
    assert {"refimpl (bias=False)", "popular nn.Linear SE"} <= set(candidates), candidates
    for row in rows:
        assert len(row) == len(COLUMNS), row
        cells = dict(zip(COLUMNS, row, strict=True))
        assert cells["component"] == "squeeze_excitation"
        assert cells["shape"] == "2x32x5x6" and cells["device"] == "cpu"
        for column in COLUMNS[4:-1]:
            value = _number(cells[column])
            assert math.isnan(value) or value >= 0, f"{column} = {cells[column]!r} in {row}"
        assert _number(cells["fwd ms"]) > 0 and _number(cells["fwd+bwd ms"]) > 0
    by_name = {row[1]: dict(zip(COLUMNS, row, strict=True)) for row in rows}
    floor, ours = by_name[FLOOR], by_name["refimpl"]
    assert floor["fwd / clone"] == "1.00" and floor["fwd+bwd / clone"] == "1.00"
    assert floor["saved / input"] == "0.00"
    assert ours["fwd / ours"] == "—" and by_name["popular nn.Linear SE"]["fwd / ours"] != "—"
    # SE saves its input (for the gradient of s) and a few (N, C) tensors, nothing larger.
    assert 1.0 <= _number(ours["saved w/o params / input"]) <= 1.1
    assert _number(ours["saved / input"]) >= _number(ours["saved w/o params / input"])
    assert "## Checks" in printed and "squeeze_excitation 2x32x5x6 cpu:" in printed
    # Two rounds cannot support a verdict on time: every timed one reads "noisy".
    checks = printed.split("## Checks")[1]
    for clause in checks.split(";"):
        if "x clone" in clause or "peer/ours" in clause:
            assert " met" not in clause and " missed" not in clause, clause
    assert "noisy (only 2 rounds" in checks


@pytest.mark.parametrize(
    "argv",
    [
        ["--only", "no_such_module"],
        ["--shapes", "8x256"],
        ["--quick", "--repeats", "-1"],
        ["--quick", "--threads", "0"],
        ["--quick", "--device", "cuda:99"],
        ["--quick", "--device", "gpu"],
    ],
)
def test_bad_arguments_exit_with_2(argv, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_component_whose_output_is_smaller_than_its_input(capsys) -> None:
    """Regression: global_context returns (N, C, 1, 1); its backward once got a gradient
    of the input's shape, the row failed and the run still exited 0."""
    argv = ["--quick", "--only", "global_context", "--repeats", "1", "--sample-ms", "0.1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    header, *rows = _table(out)
    assert [row[1] for row in rows] == ["refimpl", FLOOR]
    assert "## Failures" not in out and "not benchmarked" not in out


def test_a_failed_row_exits_1(monkeypatch, capsys) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("Mismatch in shape: grad_output[0] [2, 32, 8, 8] vs output[0]")

    monkeypatch.setattr(bench_core, "bench_component", broken)
    assert main(["--quick", "--only", "se", "--repeats", "1"]) == 1
    captured = capsys.readouterr()
    assert "## Failures" in captured.out and "Mismatch in shape" in captured.out
    assert "FAILED: squeeze_excitation 2x32x8x8 cpu: not benchmarked" in captured.err


def _ratio(low: float, median: float, high: float, rounds: int = 100) -> Ratio:
    return Ratio(median, low, high, rounds)


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [
        (_ratio(1.1, 1.2, 1.3), "met"),  # the whole quartile range above 1
        (_ratio(0.7, 0.8, 0.9), "missed"),  # the whole range below
        (_ratio(0.95, 1.05, 1.1), "noisy"),  # the median above, the range straddles 1
        (_ratio(0.9, 0.97, 1.05), "noisy"),
        (_ratio(1.1, 1.2, 1.3, rounds=3), "noisy"),  # a --quick run: too few rounds
    ],
)
def test_verdict_no_slower_than(ratio, expected) -> None:
    assert verdict(ratio, 1.0, at_most=False).split()[0] == expected


@given(
    st.lists(st.floats(0.2, 5.0), min_size=1, max_size=40),
    st.floats(0.5, 2.0),
    st.booleans(),
)
def test_verdict_met_only_when_every_middle_round_keeps_the_limit(ratios, limit, at_most):
    ratio = Ratio.of(ratios, [1.0] * len(ratios))
    said = verdict(ratio, limit, at_most=at_most)
    assert said == "met" or said == "missed" or said.startswith("noisy (")
    if said == "met":
        assert ratio.rounds >= MIN_ROUNDS_FOR_VERDICT
        inside = ratio.high <= limit if at_most else ratio.low >= limit
        assert inside
    if said == "missed":
        assert (ratio.low > limit) if at_most else (ratio.high < limit)


def test_parse_shape() -> None:
    assert parse_shape("8x256x28x28") == (8, 256, 28, 28)
    with pytest.raises(ValueError, match="NxCxHxW"):
        parse_shape("8x0x28x28")


def _leaf(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_saved_bytes_nothing_saved_for_a_scalar_product() -> None:
    x = _leaf(2, 3, 4, 5)
    assert saved_bytes(lambda x: x * 2, x) == 0


def test_saved_bytes_counts_a_tensor_saved_twice_once() -> None:
    x = _leaf(2, 3, 4, 5)
    assert saved_bytes(lambda x: x * x, x) == _nbytes(x)


def test_saved_bytes_counts_a_broadcast_view_as_its_small_base() -> None:
    x, s = _leaf(2, 3, 4, 5), _leaf(2, 3, 1, 1)
    # mul saves x and the expanded s; the expanded view holds only s's 6 floats.
    assert saved_bytes(lambda x: x * s.expand_as(x), x) == _nbytes(x) + _nbytes(s)


def test_saved_bytes_counts_a_real_copy() -> None:
    x = _leaf(2, 3, 4, 5)
    # sigmoid saves its output, a new tensor of x's size; mul saves it and x.
    assert saved_bytes(lambda x: torch.sigmoid(x) * x, x) == 2 * _nbytes(x)
    # a materialised broadcast is a copy of the full size
    s = _leaf(2, 3, 1, 1)
    assert saved_bytes(lambda x: x * s.expand_as(x).contiguous(), x) == 2 * _nbytes(x)


def test_saved_bytes_counts_the_whole_storage_of_a_saved_slice() -> None:
    x = _leaf(2, 3, 4, 5)
    assert saved_bytes(lambda x: x[:, :1].pow(2), x) == _nbytes(x)


def test_saved_bytes_leaves_out_excluded_parameters() -> None:
    z, weight = _leaf(4, 8), _leaf(3, 8)
    assert saved_bytes(lambda z: F.linear(z, weight), z) == _nbytes(z) + _nbytes(weight)
    assert saved_bytes(lambda z: F.linear(z, weight), z, exclude=[weight]) == _nbytes(z)


def test_count_ops_of_a_single_op() -> None:
    x = torch.randn(2, 3)
    ops = count_ops(lambda x: x * 2, [x], torch.ones(2, 3))
    assert ops is not None
    forward, backward = ops
    assert forward == 1 and backward >= 1


def test_ratio_is_the_median_of_per_round_ratios() -> None:
    ratio = Ratio.of([2.0, 9.0, 3.0], [1.0, 3.0, 1.0])
    assert (ratio.median, ratio.low, ratio.high, ratio.rounds) == (3.0, 2.5, 3.0, 3)
    assert ratio.spread() == "quartiles 2.50-3.00 of 3 rounds"


@pytest.mark.parametrize("peer", peers_for("squeeze_excitation"), ids=lambda p: p.name)
def test_se_peers_compute_what_ours_computes(peer) -> None:
    channels, hidden = 24, 3
    ours = SqueezeExcitation(channels, hidden_channels=hidden, **peer.ours_options)
    randomize_(ours.double(), seed=3)
    try:
        theirs = peer.build(channels, hidden).double()
    except ImportError as err:
        pytest.skip(f"{peer.name} does not import here: {err}")
    peer.load(theirs, ours)
    x = torch.randn(
        2, channels, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4)
    )
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-12, atol=1e-12)
