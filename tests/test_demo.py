"""``alexnet-deploy demo`` end to end, shortened: every stage runs and writes where it says."""

from __future__ import annotations

import pytest

from alexnet_deploy.demo import DemoConfig, run_demo, summary_lines


@pytest.mark.slow
def test_demo_runs_every_stage_and_reuses_a_finished_run(tmp_path):
    cfg = DemoConfig(root=tmp_path, report_dir=tmp_path / "demo-report", epochs=1,
                     calibration_images=64, batch_sizes=(1, 4), bench_seconds=0.1, threads=2,
                     backend="onnxruntime")
    said: list[str] = []
    result = run_demo(cfg, say=said.append)
    assert [line.split()[0] for line in said if line.startswith("[")] == \
        [f"[{k}/7]" for k in range(1, 8)]
    assert (tmp_path / "train" / "demo" / "best.pt").is_file()
    assert sorted(result.engines) == ["fp16", "fp32", "int8"]
    assert all((path / "engine.json").is_file() for path in result.engines.values())
    assert [v.precision for v in result.validations] == ["fp32", "fp16", "int8"]
    fp32 = result.validations[0]
    assert fp32.top1_agreement == 1.0 and fp32.passed
    assert result.report == tmp_path / "demo-report" / "report.md"
    report = result.report.read_text()
    assert "Accuracy vs the FP32 PyTorch reference" in report and "demo-int8" in report
    lines = summary_lines(result)
    assert any(line.startswith("demo-int8") for line in lines)
    # a second run reuses the finished training run instead of training again
    said.clear()
    run_demo(cfg, say=said.append)
    assert any("reusing the finished run" in line for line in said)
