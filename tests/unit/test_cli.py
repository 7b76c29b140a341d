"""`tkllm` as a user meets it: help lists every option; mistakes give one line, no traceback."""

import subprocess
import sys

import pytest

from tkllm_ray.cli.main import main
from tkllm_ray.config.ingest import IngestConfig, RenderConfig


def test_ingest_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["ingest", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    flags = {"--input", "--config"}
    flags |= {"--" + n.replace("_", "-") for n, f in IngestConfig.model_fields.items()
              if n not in ("inputs", "render", "storage")}
    flags |= {"--render-" + n.replace("_", "-") for n in RenderConfig.model_fields}
    flags |= {"--storage-endpoint-url", "--storage-access-key-id"}
    missing = [f for f in flags if f not in out]
    assert not missing, missing
    assert "newest share of each account's posts held out" in out


def test_wrong_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["ingest", "--no-such-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tkllm ingest: error: unrecognized arguments: --no-such-flag (see 'tkllm ingest --help')"]


def test_missing_input_is_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tkllm_ray.cli.main", "ingest", "--input", str(tmp_path / "nope.csv"),
                        "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip() == f"tkllm ingest: error: no such file or directory: {tmp_path / 'nope.csv'} " \
                               "(check the path; for S3 the bucket and prefix)"


def test_missing_required_option_and_bad_value(capsys):
    assert main(["ingest", "--output", "x"]) == 1
    assert "missing required option(s): --input" in capsys.readouterr().err
    assert main(["ingest", "--input", "a.csv", "--output", "x", "--eval-fraction", "2"]) == 1
    assert "eval_fraction: Input should be less than 1" in capsys.readouterr().err
