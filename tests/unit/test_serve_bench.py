"""benchmarks/serve_bench.py end to end on the CPU with tkllm-tiny (the script that writes the
serving JSON the issue's targets are read from): its decode rows, the compiled engine's rows (both
sections taking turns) and the ratios over them. The latency section is left out (it drops the
host's page cache)."""

import json
import subprocess
import sys
from pathlib import Path

SKIP = ["peft_mixed", "merge_restore", "hf_generate_base", "latency", "admission", "ours_base_eager",
        "ours_mixed_eager", "ours_mixed_churn"]


def test_serve_bench_writes_the_serving_json_with_its_ratios(tmp_path):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_bench.py"
    out = subprocess.run([sys.executable, str(script), "--model", "tkllm-tiny", "--vocab", "512", "--accounts", "8",
                          "--batch", "4", "--prompt", "8", "--new-tokens", "4", "--skip", *SKIP, "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "serving-cpu.json").read_text())
    rows = ["ours_base", "ours_mixed", "ours_mixed_new_layouts", "ours_single_account", "ours_base_separate",
            "ours_mixed_separate", "ours_single_account_segmented", "ours_base_compiled", "ours_mixed_compiled",
            "ours_single_account_compiled"]
    for row in rows:
        assert res[row]["tokens_per_s"] > 0 and len(res[row]["tokens_per_s_runs"]) == 5
    assert not any(s in res for s in SKIP)
    base, base_c = res["ours_base"]["tokens_per_s"], res["ours_base_compiled"]["tokens_per_s"]
    assert res["base_decode_tokens_per_s_b64"] == base
    assert res["mixed64_throughput_ratio_vs_base"] == res["ours_mixed"]["tokens_per_s"] / base
    assert res["single_account_throughput_ratio_vs_base"] == res["ours_single_account"]["tokens_per_s"] / base
    assert res["mixed64_compiled_ratio_vs_compiled_base"] == res["ours_mixed_compiled"]["tokens_per_s"] / base_c
    steps = [res[r]["decode_step_ms_runs"] for r in ("ours_base_compiled", "ours_mixed_compiled")]
    assert res["mixed64_compiled_decode_step_ratio_vs_compiled_base_per_run"] == [b / m for b, m in zip(*steps)]
    assert res["mixed64_compiled_decode_step_ratio_vs_compiled_base"] == \
        res["ours_base_compiled"]["decode_step_ms_median"] / res["ours_mixed_compiled"]["decode_step_ms_median"]
    # the compiled rows took turns: one section, so they report (nearly) its same time
    times = [res[r]["section_s"] for r in ("ours_base_compiled", "ours_mixed_compiled", "ours_single_account_compiled")]
    assert max(times) - min(times) < 0.05
