"""Token-selective adapters as artifacts: the per-module activation-rate plot, publishing an
account's adapters as a delta-store version, and loading them back onto a base."""

from __future__ import annotations

from torch import nn

from tkllm_ray.train.ts_peft import TSAdapterLinear, attach, load_state, state_dict


def plot_rates(modules: dict[str, TSAdapterLinear], path: str, title: str = "token activation rate per module") -> str:
    """A bar chart of each module's measured activation rate, in model order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, rates = list(modules), [m.activation_rate() for m in modules.values()]
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(names)), 3.5))
    ax.bar(range(len(names)), rates)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of tokens updated")
    ax.set_title(title)
    ax.set_xticks(range(len(names)), [n.replace("model.layers.", "") for n in names], rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def publish_ts(modules: dict[str, TSAdapterLinear], cfg, base_fingerprint: str, metrics: dict | None = None,
               run_id: str | None = None, data_watermark: str | None = None) -> str:
    """Publish an account's token-selective adapters as a version in the delta store (cfg.output:
    {account}/{version}/ with manifest.json, LATEST; sparse/delta_store.save_adapters):
    adapter.safetensors (A, B, τ, DoRA's magnitude per module), ts_config.json (method, rank,
    modules, base), rates.png (activation rate per module). Returns the version id."""
    import os
    import tempfile

    from safetensors.torch import save

    from tkllm_ray.sparse.delta_store import save_adapters

    first = next(iter(modules.values()))
    meta = {"method": first.kind, "trained_as": cfg.method, "base_model": cfg.model,
            "base_fingerprint": base_fingerprint, "rank": first.rank, "alpha": first.scale * first.rank,
            "bandwidth": first.bandwidth, "modules": list(modules), "account": cfg.account,
            "activation_rate": {n: round(m.activation_rate(), 4) for n, m in modules.items()}}
    with tempfile.TemporaryDirectory() as d:
        plot = plot_rates(modules, os.path.join(d, "rates.png"), f"{meta['method']} {cfg.account}: tokens updated per module")
        with open(plot, "rb") as f:
            png = f.read()
    return save_adapters(cfg.output, cfg.account, save(state_dict(modules)), meta, cfg.model,
                         base_fingerprint, metrics, data_watermark, {"rates.png": png}, run_id, cfg.storage)


def load_ts(model: nn.Module, uri: str, options=None, base_fingerprint: str | None = None) -> dict[str, TSAdapterLinear]:
    """Attach the adapters `publish_ts` published (`uri`: the version's directory) to `model` (its
    base); refuses another base's."""
    import json
    import os

    from safetensors.torch import load_file

    from tkllm_ray.errors import TkllmError
    from tkllm_ray.storage.cache import local_dir

    d = local_dir(uri, "token-selective adapter directory", options)
    with open(os.path.join(d, "ts_config.json")) as f:
        meta = json.load(f)
    if base_fingerprint is not None and meta["base_fingerprint"] != base_fingerprint:
        raise TkllmError(f"adapters at {uri} were trained on another base ({meta['base_model']}); load that base")
    mods = attach(model, meta["method"], {n: model.get_submodule(n) for n in meta["modules"]}, meta["rank"],
                  meta["alpha"], bandwidth=meta["bandwidth"])
    load_state(mods, load_file(os.path.join(d, "adapter.safetensors"), device=str(next(model.parameters()).device)))
    return mods
