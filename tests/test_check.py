"""``python -m bagel_kernels.check`` prints its table and exits 0 when everything is within tolerance."""

from bagel_kernels import check


def test_check_report_runs_and_passes(capsys):
    assert check.main(["--tokens", "120", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    for needle in ("sdpa", "triton", "flex", "mot_linear", "all within tolerance"):
        assert needle in out
    assert "FAIL" not in out and "ERROR" not in out
