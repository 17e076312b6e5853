"""report: markdown tables, PNG plots beside the report, extra sections, atomic writes."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from alexnet_deploy import report
from alexnet_deploy.bench import BatchResult, BenchResult, LatencyStats
from alexnet_deploy.errors import UserError
from alexnet_deploy.report import Section, markdown_table, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _result(name: str, precision: str, ms_per_image: float, sizes=(1, 8, 32)) -> BenchResult:
    res = BenchResult(name=name, backend="onnxruntime", precision=precision,
                      backend_version="1.32.0", host="test-host: 2 CPUs",
                      inputs="random N(0, 1) data", method="1 s warm-up, 3 s timed")
    for b in sizes:
        p50 = ms_per_image * b
        lat = [p50 * f for f in (0.9, 1.0, 1.0, 1.0, 1.05, 1.1, 1.3)]
        res.results.append(BatchResult(b, iterations=len(lat), timed_s=sum(lat) / 1e3,
                                       latency_ms=LatencyStats.from_ms(lat)))
    return res


@pytest.fixture
def results():
    return [_result("engines/fp32", "fp32", 10.0), _result("engines/int8", "int8", 4.0)]


def test_report_writes_markdown_and_matplotlib_pngs(tmp_path, results):
    written = write_report(tmp_path / "bench.md", results)
    md, throughput, latency = written
    assert md == tmp_path / "bench.md"
    assert throughput.name == "bench-throughput.png" and latency.name == "bench-latency.png"
    for png in (throughput, latency):
        data = png.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width >= 600 and im.height >= 400
    text = md.read_text()
    assert "](bench-throughput.png)" in text and "](bench-latency.png)" in text
    # the table: one row per engine and batch, ratios against the first engine
    assert "| engines/int8 | onnxruntime | int8 | 8 |" in text
    assert "2.50x" in text and "1.00x" in text
    assert "test-host: 2 CPUs" in text
    # nothing temporary left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bench-latency.png", "bench-throughput.png", "bench.md"]


def test_single_engine_report_has_no_ratio_column(tmp_path):
    (md, *_pngs) = write_report(tmp_path / "one.md", [_result("e", "fp32", 2.0, sizes=(16,))])
    text = md.read_text()
    assert "vs first" not in text and "| e | onnxruntime | fp32 | 16 |" in text


def test_extra_sections_come_before_the_benchmark(tmp_path, results):
    extra = [Section("Accuracy against the reference", text="INT8 meets the threshold.",
                     rows=[{"engine": "int8", "top-1 agreement": 0.995, "passed": True}]),
             ("Files", [["a.onnx", 12]], ["file", "MB"])]
    md = write_report(tmp_path / "r.md", results, extra_tables=extra, title="Demo",
                      intro="Summary line.")[0]
    text = md.read_text()
    assert text.startswith("# Demo\n\nSummary line.")
    assert text.index("## Accuracy against the reference") < text.index("## Files") \
        < text.index("## Benchmark")
    assert "| int8 | 0.995 | yes |" in text and "| a.onnx | 12 |" in text


def test_report_of_extra_sections_only_has_no_plots(tmp_path):
    written = write_report(tmp_path / "v.md", [], extra_tables=[("Validation", [{"a": 1}])])
    assert written == [tmp_path / "v.md"]
    assert "## Benchmark" not in written[0].read_text()


def test_markdown_table_alignment_and_escaping():
    table = markdown_table([{"name": "a|b", "ms": 1.23456, "n": 3}, {"name": "c", "ms": None}])
    lines = table.splitlines()
    assert lines[0] == "| name | ms | n |"
    assert lines[1] == "|---|---:|---:|"
    assert lines[2] == "| a\\|b | 1.23 | 3 |" and lines[3] == "| c | - | - |"


def test_unwritable_report_path_is_one_line_error(tmp_path, results):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        write_report(tmp_path / "file" / "r.md", results)
    with pytest.raises(UserError, match="is a folder"):
        write_report(tmp_path, results)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match="not writable"):
            write_report(locked / "r.md", results)


def test_failed_plot_leaves_no_report_behind(tmp_path, results, monkeypatch):
    def broken(results, dest):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "plot_latency", broken)
    with pytest.raises(UserError, match="No space left"):
        write_report(tmp_path / "r.md", results)
    assert not (tmp_path / "r.md").exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
