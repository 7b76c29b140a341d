"""The serving app on real local Ray Serve, over real HTTP on 127.0.0.1: an account's completion
equals the base with its delta merged in (greedy), concurrent requests of different accounts get
their solo answers, keys reach only their accounts, and every bad request gets a clear 4xx."""

import copy
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from tkllm_ray.data.tokenizer import load_tokenizer
from tkllm_ray.models import build_model, fingerprint
from tkllm_ray.serve.api import ApiError, KeyRing, hash_key
from tkllm_ray.sparse.delta_store import save_delta
from tkllm_ray.sparse.model import AppliedDelta
from tkllm_ray.sparse.sensitivity import target_linears

pytestmark = pytest.mark.ray
KEYS = {"k-ana": ["ana"], "k-bo": ["bo"], "k-admin": "*", "k-star": "*"}  # k-admin alone is an admin key


def _delta(model, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, lin in target_linears(model).items():
        idx = torch.sort(torch.randperm(lin.weight.numel(), generator=g)[: lin.weight.numel() // 50]).values
        out[name] = (idx, torch.randn(idx.numel(), generator=g) * 0.3)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, ray_local):
    from ray import serve

    from tkllm_ray.serve.app import app_builder

    root = tmp_path_factory.mktemp("serve")
    tok = load_tokenizer("builtin")
    base = build_model("tkllm-tiny", vocab_size=len(tok), seed=0)
    base.save_pretrained(root / "tiny")
    fp = fingerprint(base)
    deltas = {a: _delta(base, i) for i, a in enumerate(["ana", "bo", "broken"])}
    for account, delta in deltas.items():
        version = save_delta(str(root / "deltas"), account, delta, "tiny", fp, "gspf", 0.02, value_dtype="fp32")
    (root / "deltas" / "broken" / version / "delta.safetensors").write_bytes(b"garbage")
    keys = root / "keys.json"  # as an operator writes it: digests only
    keys.write_text(json.dumps({"keys": [{"name": k, "sha256": hash_key(k), "accounts": a, "admin": k == "k-admin"}
                                          for k, a in KEYS.items()]}))
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    # the path `tkllm serve` and `serve deploy cluster/serve.yaml` take: ServeConfig fields -> app
    serve.run(app_builder({"model": str(root / "tiny"), "deltas": str(root / "deltas"), "base_name": "tiny",
                           "keys_file": str(keys), "batch_wait_ms": 50, "refresh_s": 1.0}), name="tkllm", route_prefix="/")
    yield f"http://127.0.0.1:{port}", base, tok, deltas, root
    serve.shutdown()


def _post(url, path, body, key="k-admin"):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(url + path, json=body, headers=headers, timeout=120)


def _reference(base, tok, delta, prompt, n):
    merged = copy.deepcopy(base)
    if delta is not None:
        AppliedDelta(merged, delta)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out = merged.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def test_completions_equal_the_merged_model_and_mix_accounts(served):
    url, base, tok, deltas, _ = served
    prompts = {"ana": "new drop this friday", "bo": "morning routine with", None: "the base says"}
    want = {a: _reference(base, tok, deltas.get(a), p, 8) for a, p in prompts.items()}
    assert want["ana"] != want[None]  # the delta matters: the comparison could fail

    def ask(account):
        model = "tiny" if account is None else f"tiny:{account}"
        r = _post(url, "/v1/completions", {"model": model, "prompt": prompts[account], "max_tokens": 8,
                                           "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(6) as pool:  # concurrent: the replica batches them together
        answers = list(pool.map(ask, ["ana", "bo", None, "ana", "bo", None]))
    for account, body in zip(["ana", "bo", None] * 2, answers):
        assert body["choices"][0]["text"] == want[account], account
        assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["finish_reason"] == "length"
    chat = _post(url, "/v1/chat/completions", {"model": "tiny:bo", "messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": 4, "temperature": 0}, key="k-bo")
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    assert chat.json()["choices"][0]["message"]["content"] == _reference(base, tok, deltas["bo"], "user: hi\nassistant:", 4)


@pytest.mark.parametrize("path,body,key,status,message", [
    ("/v1/completions", {"model": "tiny:bo", "prompt": "x"}, "k-ana", 403, "may not use account 'bo'"),
    ("/v1/completions", {"model": "tiny:ana", "prompt": "x"}, None, 401, "missing API key"),
    ("/v1/completions", {"model": "tiny:ana", "prompt": "x"}, "wrong", 401, "invalid API key"),
    ("/v1/completions", {"model": "tiny:nobody", "prompt": "x"}, "k-admin", 404, "unknown account 'nobody'"),
    ("/v1/completions", {"model": "tiny:broken", "prompt": "x"}, "k-admin", 500, "account 'broken'"),
    ("/v1/completions", {"model": "tiny:../etc", "prompt": "x"}, "k-admin", 400, "invalid account id"),
    ("/v1/completions", {"model": "other", "prompt": "x"}, "k-admin", 404, "is not served here"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}, "k-admin", 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 3}, "k-admin", 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, "k-admin", 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["a"] * 5}, "k-admin", 400, "at most 4"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, "k-admin", 400,
     "role"),
])
def test_bad_requests_get_clear_errors(served, path, body, key, status, message):
    url = served[0]
    r = _post(url, path, body, key)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


def test_a_broken_account_does_not_stop_the_others(served):
    url = served[0]
    assert _post(url, "/v1/completions", {"model": "tiny:broken", "prompt": "x"}).status_code == 500
    r = _post(url, "/v1/completions", {"model": "tiny:ana", "prompt": "x", "max_tokens": 2}, key="k-ana")
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert requests.get(url + "/v1/models", timeout=30).json()["data"][0]["id"] == "tiny"


def _sse(url, body, key="k-admin"):
    r = requests.post(url + "/v1/completions", json={**body, "stream": True}, timeout=120, stream=True,
                      headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = [line[len("data: "):] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streaming_sends_the_same_text_in_pieces_and_honours_stop(served):
    url = served[0]
    body = {"model": "tiny:ana", "prompt": "get ready with me", "max_tokens": 10, "temperature": 0}
    whole = _post(url, "/v1/completions", body).json()["choices"][0]["text"]
    chunks = _sse(url, body)
    assert len(chunks) >= 3  # pieces as they are generated, then the finish
    assert "".join(c["choices"][0].get("text", "") for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 10
    stop = whole.strip()[3:6]  # a piece of the greedy text: output must end right before it
    assert len(stop) == 3 and stop in whole
    cut = whole[: whole.index(stop)]
    stopped = _post(url, "/v1/completions", {**body, "stop": [stop]}).json()["choices"][0]
    assert stopped["text"] == cut and stopped["finish_reason"] == "stop"
    streamed = _sse(url, {**body, "stop": [stop]})
    assert "".join(c["choices"][0].get("text", "") for c in streamed) == cut
    assert streamed[-1]["choices"][0]["finish_reason"] == "stop"
    missing = requests.post(url + "/v1/completions", json={**body, "model": "tiny:nobody", "stream": True},
                            headers={"Authorization": "Bearer k-admin"}, timeout=60)
    assert missing.status_code == 404 and "unknown account" in missing.json()["error"]["message"]


def test_a_new_version_takes_over_mid_traffic_without_an_error(served):
    url, base, tok, _, root = served
    body = {"model": "tiny:bo", "prompt": "what i eat in a day", "max_tokens": 6, "temperature": 0}
    first = _post(url, "/v1/completions", body, key="k-bo").json()["choices"][0]["text"]
    new = _delta(base, 99)
    save_delta(str(root / "deltas"), "bo", new, "tiny", fingerprint(base), "gspf", 0.02, value_dtype="fp32")
    want = _reference(base, tok, new, body["prompt"], 6)
    assert want != first
    seen = []
    for _ in range(60):  # the replica checks LATEST every second; the old version serves meanwhile
        r = _post(url, "/v1/completions", body, key="k-bo")
        assert r.status_code == 200, r.text
        seen.append(r.json()["choices"][0]["text"])
        if seen[-1] == want:
            break
        time.sleep(0.5)
    assert seen[-1] == want and set(seen) <= {first, want}


def test_admin_keys_prefetch_reload_and_unload_a_replica_s_deltas(served):
    url, base, tok, _, root = served
    for key, status, message in (("k-star", 403, "not an admin key"), ("k-ana", 403, "not an admin key"),
                                 (None, 401, "missing API key")):
        r = _post(url, "/v1/admin/prefetch", {}, key)
        assert r.status_code == status and message in r.json()["error"]["message"], r.text
    for op, body, status, message in (("explode", {}, 404, "no admin operation 'explode'"),
                                      ("unload", {}, 400, "unload needs the accounts"),
                                      ("prefetch", {"accounts": ["../x"]}, 400, "invalid account id '../x'"),
                                      ("reload", {"accounts": "ana"}, 400, "accounts")):
        r = _post(url, f"/v1/admin/{op}", body)
        assert r.status_code == status and message in r.json()["error"]["message"], r.text
    body = {"model": "tiny:ana", "prompt": "get ready with me", "max_tokens": 4, "temperature": 0}
    want = _post(url, "/v1/completions", body).json()["choices"][0]["text"]
    r = _post(url, "/v1/admin/unload", {"accounts": ["ana", "nobody"]})
    assert r.status_code == 200 and r.json() == {"unloaded": ["ana"]}, r.text
    r = _post(url, "/v1/admin/prefetch", {"accounts": ["ana"]})  # back, into host memory
    assert r.status_code == 200 and r.json()["prefetched"] == ["ana"] and r.json()["host_cache_mb"] > 0, r.text
    assert _post(url, "/v1/completions", body).json()["choices"][0]["text"] == want

    fp, store = fingerprint(base), str(root / "deltas")
    body = {**body, "model": "tiny:dee"}
    save_delta(store, "dee", _delta(base, 60), "tiny", fp, "gspf", 0.02, value_dtype="fp32")
    first = _post(url, "/v1/completions", body).json()["choices"][0]["text"]
    new = _delta(base, 61)
    v2 = save_delta(store, "dee", new, "tiny", fp, "gspf", 0.02, value_dtype="fp32")
    r = _post(url, "/v1/admin/reload", {"accounts": ["dee"]})  # a publish notification: serves v2 from now on
    assert r.status_code == 200 and r.json()["errors"] == [] and r.json()["reloaded"].get("dee", v2) == v2, r.text
    want = _reference(base, tok, new, body["prompt"], 4)
    assert want != first and _post(url, "/v1/completions", body).json()["choices"][0]["text"] == want
    (root / "deltas" / "dee" / "LATEST").unlink()  # unpublished: the replica drops it at its reload
    assert _post(url, "/v1/admin/reload", {"accounts": ["dee"]}).status_code == 200
    r = _post(url, "/v1/completions", body)
    assert r.status_code == 404 and "unknown account 'dee'" in r.json()["error"]["message"], r.text


def test_style_experts_pinned_by_the_request_or_routed(served):
    """A second app on the same Serve instance, with style experts beside the deltas: a pinned
    style serves the account's delta plus that expert; an unpinned request gets the router's
    top-1 expert; an unknown style is a 400, and so is any style where no experts are served."""
    from ray import serve

    from tkllm_ray.serve.app import build_app
    from tkllm_ray.serve.experts import load_experts, save_experts

    url, base, tok, deltas, root = served
    experts = {d: _delta(base, 40 + i) for i, d in enumerate(["vlog", "storytelling"])}
    g = torch.Generator().manual_seed(5)
    save_experts(str(root / "experts"), experts, torch.randn(2, base.config.hidden_size, generator=g), torch.zeros(2),
                 "tiny", fingerprint(base), 0.02, top_k=1)
    free = {"ray_actor_options": {"num_cpus": 0}}  # beside the first app on the test's 2-CPU Ray
    serve.run(build_app(str(root / "tiny"), "builtin", str(root / "deltas"), "tiny", None, deployment_options=free,
                        ingress_options=free, experts=str(root / "experts"), batch_wait_ms=10),
              name="styles", route_prefix="/styles")
    prompt = "new drop this friday"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    served_experts = load_experts(str(root / "experts"))  # the values as stored (bf16), as the replica has them
    routed = next(iter(served_experts.route(ids, base.get_input_embeddings())))
    other = next(d for d in served_experts.domains if d != routed)
    cy = _delta(base, 50)  # an account whose manifest pins the style the router would not pick
    save_delta(str(root / "deltas"), "cy", cy, "tiny", fingerprint(base), "gspf", 0.02, value_dtype="fp32", style=other)

    def reference(*ds):
        m = copy.deepcopy(base)
        for d in ds:  # each adds its entries onto the weights
            AppliedDelta(m, d)
        out = m.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)

    def ask(style=None, path="/styles", account="ana"):
        body = {"model": f"tiny:{account}", "prompt": prompt, "max_tokens": 8, "temperature": 0}
        if style:
            body["style"] = style
        return _post(url, path + "/v1/completions", body)

    pinned = ask("storytelling")
    assert pinned.status_code == 200, pinned.text
    assert pinned.json()["choices"][0]["text"] == reference(deltas["ana"], served_experts.deltas["storytelling"])
    assert pinned.json()["choices"][0]["text"] != reference(deltas["ana"])  # the expert matters
    assert ask().json()["choices"][0]["text"] == reference(deltas["ana"], served_experts.deltas[routed])
    assert ask(account="cy").json()["choices"][0]["text"] == reference(cy, served_experts.deltas[other])
    bad = ask("cooking")
    assert bad.status_code == 400 and "unknown style 'cooking'" in bad.json()["error"]["message"]
    none = ask("vlog", path="")
    assert none.status_code == 400 and "serves no style experts" in none.json()["error"]["message"]
    serve.delete("styles")


def test_keyring_file_and_bad_entries(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": "a", "sha256": hash_key("s3cret"), "accounts": ["ana"]}]}))
    ring = KeyRing.from_file(str(path))
    assert ring.check("Bearer s3cret", "ana")["name"] == "a"
    with pytest.raises(ApiError, match="not an admin key"):
        ring.check_admin("Bearer s3cret")
    with pytest.raises(ValueError, match="accounts must be"):
        KeyRing([{"name": "b", "sha256": hash_key("x"), "accounts": ["../etc"]}])
    with pytest.raises(ValueError, match="sha256 must be"):
        KeyRing([{"name": "c", "sha256": "s3cret", "accounts": "*"}])


def test_a_token_selective_account_is_served_as_trained(served):
    """An account published as TS-LoRA adapters (not a delta) is served from the same endpoint:
    its completion equals transformers' generate on the base with the training modules attached."""
    from safetensors.torch import save

    from tkllm_ray.sparse.delta_store import save_adapters
    from tkllm_ray.train import ts_peft

    url, base, tok, _, root = served
    prompt = "unboxing the new"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    ref = copy.deepcopy(base)
    mods = ts_peft.attach(ref, "ts-lora", target_linears(ref), rank=4)
    with torch.no_grad():
        for m in mods.values():
            m.lora_B.normal_(0, 0.3)
            m.train()
        ref(torch.tensor([ids]))  # each module's median update ratio on the prompt
        for m in mods.values():
            m.tau.fill_(float(m.r_scale))
            m.eval()
    meta = {"method": "ts-lora", "rank": 4, "alpha": 8.0, "bandwidth": 0.5, "modules": list(mods)}
    save_adapters(str(root / "deltas"), "cleo", save(ts_peft.state_dict(mods)), meta, "tiny", fingerprint(base))
    out = ref.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None,
                       attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    want = tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
    assert want != _reference(base, tok, None, prompt, 8)  # the adapters matter: the comparison could fail
    r = _post(url, "/v1/completions", {"model": "tiny:cleo", "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want
