import json

from dpjax import report


def _write(root, name, **summary):
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(summary))


def _done(eps, acc, sigma, dp=True):
    return dict(status="completed", dp_enabled=dp, epsilon=eps if dp else None,
                delta=1e-5 if dp else None, noise_multiplier=sigma if dp else None, steps=10,
                test_accuracy=acc, stopped_reason="completed", dataset="digits", model="mlp",
                unit="example" if dp else None)


def test_report_writes_one_row_per_run_and_lists_failures(tmp_path):
    _write(tmp_path, "0", **_done(8.0, 0.9, 0.5))
    _write(tmp_path, "1", **_done(1.0, 0.7, 2.0))
    _write(tmp_path, "2", status="failed", error="ConfigError: Expected dp.delta=2.0 in (0, 1).")
    _write(tmp_path, "3", **_done(None, 0.95, None, dp=False))
    rows = report.report(tmp_path)
    assert [r["run"] for r in rows] == ["1", "0", "3", "2"]  # by epsilon, baseline, failures
    csv_lines = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("run,status")
    md = (tmp_path / "results.md").read_text()
    assert "| 1 | example | 2 | 1 | 1e-05 | 10 | 70.00% |" in md  # the unit of privacy too
    assert "non-private" in md and "`2`: ConfigError: Expected dp.delta=2.0" in md
    png = (tmp_path / "privacy_utility.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_a_resumed_run_directory_counts_once(tmp_path):
    _write(tmp_path, "0", **_done(2.0, 0.8, 1.0))
    (tmp_path / "0" / "checkpoints").mkdir()
    rows = report.report(tmp_path)
    assert len(rows) == 1


def test_an_empty_directory_is_a_clear_error(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "No summary.json under" in capsys.readouterr().err
