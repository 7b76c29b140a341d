"""Every YAML config in the repo validates against its model; typos are refused clearly."""

from pathlib import Path

import pytest

from tkllm_ray.config import load_config
from tkllm_ray.config.finetune import FinetuneConfig
from tkllm_ray.config.ingest import IngestConfig
from tkllm_ray.config.retrain import RetrainConfig
from tkllm_ray.config.serve import ServeConfig
from tkllm_ray.errors import TkllmError

ROOT = Path(__file__).resolve().parents[2]
MODELS = {"ingest": IngestConfig, "finetune": FinetuneConfig, "serve": ServeConfig, "retrain": RetrainConfig}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*/*.yaml")), ids=lambda p: p.name)
def test_repo_configs_validate(path):
    cfg = load_config(MODELS[path.parent.name], path)
    assert {"ingest": lambda: cfg.inputs, "finetune": lambda: cfg.data, "serve": lambda: cfg.deltas,
            "retrain": lambda: cfg.finetune_config(accounts="all", data="-").model}[path.parent.name]()


def test_cluster_serve_config_is_one_serve_deploy_accepts():
    """cluster/serve.yaml parses as Ray Serve's deploy schema, and its app args as a ServeConfig."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(doc)
    app = schema.applications[0]
    assert app.import_path == "tkllm_ray.serve.app:app_builder"
    assert {d.name for d in app.deployments} == {"DeltaModel", "Ingress"}
    ServeConfig(**app.args)
    with pytest.raises(ValueError, match="give keys_file"):
        ServeConfig(**{k: v for k, v in app.args.items() if k != "keys_file"})


def test_unknown_key_and_bad_value_are_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inputs: [a.csv]\noutput: out\nrender: {modez: [tiny]}\n")
    with pytest.raises(TkllmError, match=r"render.modez: Extra inputs are not permitted"):
        load_config(IngestConfig, p)
    p.write_text("inputs: [a.csv]\noutput: out\neval_fraction: 1.5\n")
    with pytest.raises(TkllmError, match=r"eval_fraction: Input should be less than 1"):
        load_config(IngestConfig, p)
    p.write_text("inputs: [{uri: a.csv, field_map: {txt: caption}}]\noutput: out\n")
    with pytest.raises(TkllmError, match=r"unknown canonical field"):
        load_config(IngestConfig, p)


@pytest.mark.parametrize("model, text, error", [
    (FinetuneConfig, "account: a\ndata: d\nadapter_bottleneck: 0\n", r"adapter_bottleneck: Input should be greater than or equal to 1"),
    (FinetuneConfig, "account: a\ndata: d\ndiffpruning_l0: -1\n", r"diffpruning_l0: Input should be greater than or equal to 0"),
    (FinetuneConfig, "account: a\ndata: d\nmethod: adapters\n", r"method: Input should be 'gspf', 'full', 'lora', 'dora', 'adapter', 'diffpruning', 'ts-lora' or 'ts-dora'"),
    (FinetuneConfig, "account: a\ndata: d\nts_target_rate: 1.5\n", r"ts_target_rate: Input should be less than or equal to 1"),
    (FinetuneConfig, "account: a\ndata: d\nzero3: true\n", r"zero3 shards the base over packed workers: name the accounts"),
    (FinetuneConfig, "data: d\n", r"give either account \(one\) or accounts"),
    (FinetuneConfig, "accounts: all\ndata: d\nrun_id: a/b\n", r"run_id 'a/b': letters, digits"),
    (IngestConfig, "inputs: [a.csv]\noutput: o\naccounts: [../x]\n", r"invalid account id '../x'"),
    (RetrainConfig, "inputs: [a]\ndeltas: d\nwork: w\nevery: 1w\n", r"invalid interval '1w'"),
    (RetrainConfig, "inputs: [a]\ndeltas: d\nwork: w\ntick: today\n", r"tick 'today': YYYYMMDDTHHMMSSZ"),
    (RetrainConfig, "inputs: [a]\ndeltas: d\nwork: w\nfinetune: {data: x}\n", r"finetune: \['data'\] are set by the retrain job"),
    (RetrainConfig, "inputs: [a]\ndeltas: d\nwork: w\nfinetune: {epochs: 0}\n", r"epochs: Input should be greater"),
    (FinetuneConfig, "account: a\naccounts: all\ndata: d\n", r"give either account \(one\) or accounts"),
    (FinetuneConfig, "accounts: all\ndata: d\nmethod: lora\n", r"packed training \(accounts\) runs gspf, ts-lora, ts-dora, dora; 'lora'"),
    (FinetuneConfig, "accounts: all\ndata: d\nmethod: ts-lora\nzero3: true\n", r"zero3 runs packed GSPF over a sharded base; 'ts-lora'"),
    (FinetuneConfig, "accounts: all\ndata: d\nhost_state_memory_gb: 64\n", r"set state_memory_gb too"),
    (ServeConfig, "model: tkllm-tiny\ndeltas: d\nallow_anonymous: true\ndtype: float16\n",
     r"dtype: Input should be 'auto', 'float32' or 'bfloat16'"),
])
def test_config_errors_are_named(tmp_path, model, text, error):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(TkllmError, match=error):
        load_config(model, p)


def test_serve_dtype_and_compile_load(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("model: tkllm-tiny\ndeltas: d\nallow_anonymous: true\ndtype: bfloat16\ncompile_decode: true\n"
                 "layout_cache_mb: 0\nprefill_graph_tokens: 0\n")
    cfg = load_config(ServeConfig, p)
    assert cfg.dtype == "bfloat16" and cfg.compile_decode is True and cfg.layout_cache_mb == 0
    assert cfg.prefill_graph_tokens == 0
    p.write_text("model: tkllm-tiny\ndeltas: d\nallow_anonymous: true\nlayout_cache_mb: -1\n")
    with pytest.raises(TkllmError, match="layout_cache_mb"):
        load_config(ServeConfig, p)
    p.write_text("model: tkllm-tiny\ndeltas: d\nallow_anonymous: true\nprefill_graph_tokens: -1\n")
    with pytest.raises(TkllmError, match="prefill_graph_tokens"):
        load_config(ServeConfig, p)
