"""`tkllm submit` refuses what would only fail on the cluster, before it uploads anything: an unknown
pipeline, a config that is missing, outside the working dir, or invalid for its pipeline's model."""

import pytest
import yaml

from tkllm_ray import jobs
from tkllm_ray.cli.main import main
from tkllm_ray.errors import TkllmError

UNREACHABLE = "http://127.0.0.1:1"  # nothing listens there: a test that got this far would fail to connect


@pytest.fixture
def wd(tmp_path, monkeypatch):
    """A working dir with the pipeline entrypoints and a valid ingest config."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    (tmp_path / "pipelines").mkdir()
    for p in ("ingest", "finetune"):
        (tmp_path / "pipelines" / f"{p}.py").write_text("")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "ingest.yaml").write_text(yaml.safe_dump({"inputs": ["raw"], "output": "ds"}))
    return tmp_path


def test_entrypoint_is_the_pipeline_module_with_a_relative_config(wd):
    cmd = "python -m pipelines.ingest --config configs/ingest.yaml"
    assert jobs.entrypoint("ingest", "configs/ingest.yaml", wd) == cmd
    assert jobs.entrypoint("ingest", wd / "configs" / "ingest.yaml", wd) == cmd  # absolute, inside wd
    (wd / "configs" / "a b.yaml").write_text("")
    assert jobs.entrypoint("ingest", "configs/a b.yaml", wd).endswith("--config 'configs/a b.yaml'")


@pytest.mark.parametrize("pipeline, config, error", [
    ("train", "configs/ingest.yaml", "unknown pipeline 'train': known pipelines are ingest, finetune, retrain"),
    ("ingest", "configs/nope.yaml", "config file not found: configs/nope.yaml"),
    ("ingest", "{outside}", "is outside the working dir"),
])
def test_bad_pipeline_or_config_path_is_named(wd, tmp_path_factory, pipeline, config, error):
    if config == "{outside}":
        config = tmp_path_factory.mktemp("elsewhere") / "c.yaml"
        config.write_text("")
    with pytest.raises(TkllmError, match=error.replace("(", r"\(")):
        jobs.submit(pipeline, config, UNREACHABLE, working_dir=wd)


@pytest.mark.parametrize("pipeline, data, error", [
    ("ingest", {"inputs": ["raw"], "output": "ds", "min_post": 3}, "min_post: Extra inputs are not permitted"),
    ("ingest", {"inputs": ["raw"]}, "output: Field required"),
    ("finetune", {"data": "ds"}, "give either account"),
    ("finetune", {"account": "a", "data": "ds", "epochs": 0}, "epochs: Input should be greater than or equal to 1"),
])
def test_invalid_config_fails_at_submit_time(wd, pipeline, data, error):
    (wd / "configs" / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(TkllmError) as e:
        jobs.submit(pipeline, "configs/bad.yaml", UNREACHABLE, working_dir=wd)
    assert str(e.value).startswith("invalid config ") and error in str(e.value)


def test_missing_pipeline_module_or_config_model_is_named(wd, monkeypatch):
    (wd / "configs" / "r.yaml").write_text("{}")
    with pytest.raises(TkllmError, match="pipelines/retrain.py is not under the working dir"):
        jobs.submit("retrain", "configs/r.yaml", UNREACHABLE, working_dir=wd)
    monkeypatch.setitem(jobs.CONFIG_MODELS, "finetune", "tkllm_ray.config.no_such_module:Nope")
    with pytest.raises(TkllmError, match="config model tkllm_ray.config.no_such_module:Nope is not available"):
        jobs.validate_config("finetune", "configs/r.yaml", wd)


def test_address_comes_from_the_flag_then_ray_address(wd, monkeypatch):
    with pytest.raises(TkllmError, match="no Ray cluster address: pass --address"):
        jobs.submit("ingest", "configs/ingest.yaml", None, working_dir=wd)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:2")
    with pytest.raises(TkllmError, match="cannot reach the Ray job server at http://127.0.0.1:2"):
        jobs.status("j", None)
    # an explicit address wins over RAY_ADDRESS (the SDK alone would take the variable's)
    with pytest.raises(TkllmError, match="cannot reach the Ray job server at http://127.0.0.1:1"):
        jobs.status("j", UNREACHABLE)


def test_runtime_env_uploads_the_working_dir_without_heavy_dirs(wd):
    env = jobs.runtime_env(wd, env_vars={"A": 1}, pip=["x==1"])
    assert env["working_dir"] == str(wd.resolve()) and env["env_vars"] == {"A": "1"} and env["pip"] == ["x==1"]
    assert {"/.git", "/.venv", "/runs", "/benchmarks/results"} <= set(env["excludes"])


def test_cli_errors_are_one_line(wd, capsys, monkeypatch):
    monkeypatch.chdir(wd)
    assert main(["submit", "ingest", "--config", "configs/ingest.yaml", "--env", "NOEQUALS"]) == 1
    assert capsys.readouterr().err.strip() == "tkllm submit: error: --env wants KEY=VALUE, got 'NOEQUALS'"
    assert main(["jobs", "logs", "--address", UNREACHABLE]) == 1
    assert "jobs logs needs a JOB_ID" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["submit", "train", "--config", "configs/ingest.yaml"])
    assert e.value.code == 2 and "invalid choice: 'train'" in capsys.readouterr().err
