"""cluster/ and infra/ hold what they claim: manifests of the right shape, entrypoints whose module and
config exist (and the config validates), one set of image names, Serve configs that Ray accepts, and IAM
policies that grant no more than each workload needs. Each check returns its problems, and each test
also runs its check on a broken example, to show that the check can fail."""

import copy
import importlib
import json
import re
from pathlib import Path

import pytest
import yaml

from tkllm_ray.config import load_config
from tkllm_ray.config.finetune import FinetuneConfig
from tkllm_ray.config.ingest import IngestConfig
from tkllm_ray.errors import TkllmError

ROOT = Path(__file__).resolve().parents[2]
CLUSTER, INFRA = ROOT / "cluster", ROOT / "infra"
YAMLS = sorted(p for d in (CLUSTER, INFRA) for p in d.rglob("*") if p.suffix in (".yaml", ".yml"))
TEXTS = sorted(p for d in (CLUSTER, INFRA) for p in d.rglob("*") if p.is_file() and ".terraform" not in p.parts)
ENTRY = re.compile(r"python -m pipelines\.(\w+) --config ([\w./-]+\.ya?ml)")
PROJECT = (ROOT / "pyproject.toml").read_text()
VERSION = re.search(r'^version = "([^"]+)"', PROJECT, re.M).group(1)
RAY_VERSION = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', PROJECT).group(1)
THIRD_PARTY_IMAGES = {"chrislusf/seaweedfs:4.48", "registry.k8s.io/kubectl:v1.32.9"}
SECRET_ENV = re.compile(r"SECRET|ACCESS_KEY|PASSWORD|TOKEN", re.I)


def docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs() -> list:
    """Every Kubernetes object under cluster/kuberay, and the manifests that ConfigMaps carry."""
    found = [d for path in sorted((CLUSTER / "kuberay").glob("*.yaml")) for d in docs(path)]
    return found + [d for cm in found if cm.get("kind") == "ConfigMap" for k, v in cm.get("data", {}).items()
                    if k.endswith((".yaml", ".yml")) for d in yaml.safe_load_all(v) if d is not None]


def walk(obj):
    yield obj
    for v in obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ():
        yield from walk(v)


def containers(group: dict) -> list:
    return ((group or {}).get("template") or {}).get("spec", {}).get("containers") or []


def gpus(container: dict) -> int:
    return int((container.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0))


# ---- Kubernetes / KubeRay -------------------------------------------------------------------------

def ray_cluster_problems(spec: dict, where: str, need_gpu: bool = True) -> list[str]:
    spec = spec or {}
    groups = spec.get("workerGroupSpecs") or []
    pods = [containers(spec.get("headGroupSpec"))] + [containers(g) for g in groups]
    checks = {
        f"rayVersion is not pyproject's ray {RAY_VERSION}": spec.get("rayVersion") == RAY_VERSION,
        "enableInTreeAutoscaling is not true": spec.get("enableInTreeAutoscaling") is True,
        "no head containers or no worker groups": pods[0] and groups,
        "a worker group lacks groupName, containers or 0 <= minReplicas <= maxReplicas":
            all(g.get("groupName") and containers(g) and 0 <= g.get("minReplicas", 0) <= g.get("maxReplicas", -1)
                for g in groups),
        "no worker group requests nvidia.com/gpu": not need_gpu or any(gpus(c) for p in pods[1:] for c in p),
        "a Ray container lacks envFrom of the Secret tkllm-s3":
            all({"secretRef": {"name": "tkllm-s3"}} in (p[0].get("envFrom") or []) for p in pods if p)}
    return [f"{where}: {msg}" for msg, ok in checks.items() if not ok]


def ray_job_problems(spec: dict, where: str) -> list[str]:
    entry = spec.get("entrypoint") or ""
    out = [] if ENTRY.fullmatch(entry) else [f"{where}: entrypoint {entry!r} is not python -m pipelines.X --config F"]
    if "clusterSelector" in spec:
        return out
    return out + ray_cluster_problems(spec.get("rayClusterSpec"), where, need_gpu="pipelines.ingest" not in entry)


def k8s_problems(doc: dict) -> list[str]:
    meta = doc.get("metadata") or {}
    kind, spec = doc.get("kind"), doc.get("spec")
    where = f"{kind}/{meta.get('name') or meta.get('generateName')}"
    out = [f"{where}: no {k}" for k in ("apiVersion", "kind", "metadata") if not doc.get(k)]
    out += [f"{where}: no spec"] * (not spec and kind not in ("ServiceAccount", "Role", "RoleBinding", "ConfigMap"))
    spec = spec or {}
    if kind == "RayCluster":
        out += ray_cluster_problems(spec, where)
    elif kind == "RayJob":
        out += ray_job_problems(spec, where)
    elif kind == "RayService":
        out += [f"{where}: serveConfigV2 is not a YAML string"] * (not isinstance(spec.get("serveConfigV2"), str))
        out += ray_cluster_problems(spec.get("rayClusterConfig"), where)
    elif kind == "RayCronJob":
        out += [f"{where}: no schedule"] * (not spec.get("schedule"))
        out += ray_job_problems(spec.get("jobTemplate") or {}, where + ".jobTemplate")
    out += [f"{where}: a Secret's values in the repository"] * (kind == "Secret")
    return out + [f"{where}: env {n['name']} is inlined; take it from a Secret" for n in walk(doc)
                  if isinstance(n, dict) and "value" in n and SECRET_ENV.search(str(n.get("name", "")))]


def test_every_yaml_parses():
    assert len(YAMLS) >= 9, YAMLS
    assert [p for p in YAMLS if not docs(p)] == []


def test_kuberay_manifests_have_their_required_fields():
    found = k8s_docs()
    assert {"RayCluster", "RayJob", "RayService", "RayCronJob", "CronJob", "Role"} <= {d["kind"] for d in found}
    assert [p for d in found for p in k8s_problems(d)] == []
    rc = next(copy.deepcopy(d) for d in found if d["kind"] == "RayCluster")
    rc["spec"]["workerGroupSpecs"] = [g for g in rc["spec"]["workerGroupSpecs"] if not gpus(containers(g)[0])]
    assert k8s_problems(rc) == ["RayCluster/tkllm: no worker group requests nvidia.com/gpu"]
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "j"},
           "spec": {"entrypoint": "python train.py", "rayClusterSpec": rc["spec"],
                    "x": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "s"}]}}
    assert k8s_problems(job) == ["RayJob/j: entrypoint 'python train.py' is not python -m pipelines.X --config F",
                                 "RayJob/j: no worker group requests nvidia.com/gpu",
                                 "RayJob/j: env AWS_SECRET_ACCESS_KEY is inlined; take it from a Secret"]


def test_retrain_cronjob_may_only_create_rayjobs_and_names_each_tick():
    objs = {d["kind"]: d for d in docs(CLUSTER / "kuberay" / "cronjob-retrain.yaml")}
    account = objs["ServiceAccount"]["metadata"]["name"]
    assert objs["Role"]["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                                      "verbs": ["create", "get", "list"]}]
    assert objs["RoleBinding"]["subjects"][0]["name"] == account
    pod = objs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    args, mounts = pod["containers"][0]["args"], pod["containers"][0]["volumeMounts"]
    assert pod["serviceAccountName"] == account and args[:2] == ["create", "-f"]
    assert any(args[2].startswith(m["mountPath"] + "/") for m in mounts)
    (rayjob,) = yaml.safe_load_all(objs["ConfigMap"]["data"][Path(args[2]).name])
    assert rayjob["kind"] == "RayJob" and rayjob["metadata"]["generateName"] and "name" not in rayjob["metadata"]


# ---- entrypoints and their configs ----------------------------------------------------------------

def config_model(module: str):
    if module == "retrain":  # imported here: it is written alongside pipelines/retrain.py
        return importlib.import_module("tkllm_ray.config.retrain").RetrainConfig
    return {"ingest": IngestConfig, "finetune": FinetuneConfig}[module]


def entrypoint_problems(module: str, config: str) -> list[str]:
    out = [f"pipelines/{module}.py does not exist"] * (not (ROOT / "pipelines" / f"{module}.py").is_file())
    out += [f"config {config} does not exist"] * (not (ROOT / config).is_file())
    if not out:
        try:
            load_config(config_model(module), ROOT / config)
        except (TkllmError, KeyError, ImportError) as e:
            out.append(f"{config} does not load for pipelines.{module}: {e}")
    return out


ENTRYPOINTS = sorted({m.groups() for p in TEXTS for m in ENTRY.finditer(p.read_text(errors="replace"))})


@pytest.mark.parametrize("module, config", ENTRYPOINTS, ids=[f"{m}:{c}" for m, c in ENTRYPOINTS])
def test_entrypoint_module_and_config_exist_and_validate(module, config):
    assert entrypoint_problems(module, config) == []


def test_the_jobs_entrypoints_are_found_and_checked(tmp_path):
    assert {("ingest", "configs/ingest/cluster.yaml"), ("finetune", "configs/finetune/cluster.yaml"),
            ("retrain", "configs/retrain/daily.yaml")} <= set(ENTRYPOINTS)
    assert entrypoint_problems("nosuch", "configs/ingest/s3.yaml") == ["pipelines/nosuch.py does not exist"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("accounts: all\ndata: s3://b/d\nmethod: lora\n")
    (problem,) = entrypoint_problems("finetune", str(bad))
    assert "packed training (accounts) runs gspf, ts-lora, ts-dora, dora" in problem


# ---- images ---------------------------------------------------------------------------------------

def documented_tags() -> dict[str, str]:
    """target -> tag, from the build commands in infra/Dockerfile and infra/README.md (which must agree)."""
    found = [dict(re.findall(r"--target (\w+)\s+-t (\S+)", (INFRA / f).read_text()))
             for f in ("Dockerfile", "README.md")]
    assert found[0] == found[1], found
    return found[0]


def image_uses() -> list[tuple[str, str, int]]:
    """(where, image, GPUs of that container or node type) for every image cluster/ and infra/ name."""
    uses = [(f"{d['kind']} {c['name']}", c["image"], gpus(c)) for d in k8s_docs() for n in walk(d)
            if isinstance(n, dict) and isinstance(n.get("containers"), list) for c in n["containers"]]
    launcher = docs(CLUSTER / "launcher-aws.yaml")[0]
    uses.append(("launcher docker.image", launcher["docker"]["image"], 0))
    uses += [(f"launcher {name}", (t.get("docker") or {}).get("worker_image", launcher["docker"]["image"]),
              t["resources"].get("GPU", 0)) for name, t in launcher["available_node_types"].items()]
    services = docs(INFRA / "docker-compose.yaml")[0]["services"]
    return uses + [(f"compose {n}", s["image"], 0) for n, s in services.items()]


def image_problems(uses: list[tuple[str, str, int]], tags: dict[str, str]) -> list[str]:
    out = []
    for where, image, n_gpus in (u for u in uses if u[1] not in THIRD_PARTY_IMAGES):
        if image not in tags.values():
            out.append(f"{where}: {image} is not one of the documented tags {sorted(tags.values())}")
        elif (image == tags["cuda"]) != (n_gpus > 0):
            out.append(f"{where}: {image} with {n_gpus} GPUs (the cuda image is for GPU nodes, and only them)")
    return out


def test_images_are_the_documented_tags():
    tags = documented_tags()
    assert tags == {"cpu": f"tkllm/tkllm-ray:{VERSION}-cpu", "cuda": f"tkllm/tkllm-ray:{VERSION}-cuda"}
    uses = image_uses()
    assert {image for _, image, _ in uses} >= set(tags.values())
    assert image_problems(uses, tags) == []
    wrong = [("a", "tkllm/tkllm-ray:9.9-cpu", 0), ("b", tags["cuda"], 0), ("c", tags["cpu"], 1)]
    assert [p.split(":")[0] for p in image_problems(wrong, tags)] == ["a", "b", "c"]


def dockerfile_problems(text: str) -> list[str]:
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)", text.split("\nFROM ", 1)[0], re.M))
    stages = {m[2]: (m[1], m[3]) for m in re.finditer(r"^FROM (\S+) AS (\S+)\n(.*?)(?=^FROM |\Z)", text, re.M | re.S)}
    out = []
    for target, base_kind in (("cpu", "python"), ("cuda", "nvidia/cuda")):
        if target not in stages:
            out.append(f"no stage {target}")
            continue
        base, body = stages[target]
        while base in stages:  # follow the stage chain down to the image it starts from
            base, body = stages[base][0], stages[base][1] + body
        base = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m[1], ""), base)
        body = body.replace("${TORCH_VERSION}", defaults.get("TORCH_VERSION", "?"))
        checks = {f"base {base} is not {base_kind}": base_kind in base,
                  "does not install the package (pip install .)": re.search(r"pip install \.(\s|$)", body),
                  "runs as root": re.findall(r"^USER (\S+)", body, re.M)[-1:] not in ([], ["root"], ["0"]),
                  "copies no pipelines/ or configs/": re.search(r"^COPY .*pipelines", body, re.M)
                  and re.search(r"^COPY .*configs", body, re.M),
                  "no torch==2.13.0": "torch==2.13.0" in body}
        if target == "cpu":
            checks["torch not from the PyTorch CPU index"] = "download.pytorch.org/whl/cpu" in body
        out += [f"{target}: {msg}" for msg, ok in checks.items() if not ok]
    return out


def test_dockerfile_has_cpu_and_cuda_targets_that_install_the_package():
    text = (INFRA / "Dockerfile").read_text()
    assert dockerfile_problems(text) == []
    assert dockerfile_problems(text.replace(" AS cuda", " AS gpu")) == ["no stage cuda"]
    assert dockerfile_problems(text.replace("USER tkllm", "USER root")) == ["cpu: runs as root", "cuda: runs as root"]


# ---- launcher, local stack ------------------------------------------------------------------------

def launcher_problems(cfg: dict) -> list[str]:
    import jsonschema
    import ray.autoscaler

    try:  # the schema `ray up` validates against, as the installed ray ships it
        jsonschema.validate(cfg, json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text()))
    except jsonschema.ValidationError as e:
        return [f"launcher schema: {e.message} at {list(e.absolute_path)}"]
    out = [f"no {k}" for k in ("cluster_name", "max_workers", "available_node_types", "head_node_type") if k not in cfg]
    types = cfg.get("available_node_types") or {}
    workers = [t for n, t in types.items() if n != cfg.get("head_node_type")]
    out += ["head_node_type is not an available node type"] * (cfg.get("head_node_type") not in types)
    for kind, pick in (("GPU", lambda t: t["resources"].get("GPU", 0) > 0),
                       ("CPU", lambda t: "GPU" not in t["resources"])):
        if not any(pick(t) and t.get("min_workers", 0) < t.get("max_workers", 0) for t in workers):
            out.append(f"no autoscaling {kind} worker type (min_workers < max_workers)")
    commands = [c for t in types.values() for c in t.get("worker_setup_commands", [])] + cfg.get("setup_commands", [])
    if not any(f"pip install --no-deps {m}" in c for m in cfg.get("file_mounts") or {} for c in commands):
        out.append("no setup command installs the synced checkout")
    return out


def test_launcher_config_is_valid_for_ray_up():
    cfg = docs(CLUSTER / "launcher-aws.yaml")[0]
    assert launcher_problems(cfg) == []
    gpu = next(t for t in cfg["available_node_types"].values() if t["resources"].get("GPU"))
    assert any("torch==2.13.0" in c for c in gpu["worker_setup_commands"])
    assert launcher_problems(dict(cfg, max_workers="many"))[0].startswith("launcher schema")
    cpu_only = {n: t for n, t in cfg["available_node_types"].items() if not t["resources"].get("GPU")}
    assert launcher_problems(dict(cfg, available_node_types=cpu_only)) == [
        "no autoscaling GPU worker type (min_workers < max_workers)"]


def compose_problems(compose: dict) -> list[str]:
    services = compose.get("services") or {}
    out = [f"port {p} is not bound to 127.0.0.1" for s in services.values() for p in s.get("ports", [])
           if not str(p).startswith("127.0.0.1:")]
    commands = [[str(c) for c in s.get("command") or []] for s in services.values()]
    head = {"--head", "--block", "--dashboard-port=8265"}
    if not any(c[:2] == ["ray", "start"] and head <= set(c) for c in commands):
        out.append("no `ray start --head --block` service with the dashboard on 8265")
    out += ["no `weed server -s3` service"] * (not any({"server", "-s3"} <= set(c) for c in commands))
    return out + ["no bucket-creating step"] * (not any("create_bucket" in " ".join(c) for c in commands))


def test_local_stack_compose():
    compose = docs(INFRA / "docker-compose.yaml")[0]
    assert compose_problems(compose) == []
    keys = re.compile(r'"accessKey": "([\w-]+)", "secretKey": "([\w-]+)"')
    expected = keys.search((INFRA / "local-s3.sh").read_text()).groups()
    assert keys.search(compose["configs"]["s3-identities"]["content"]).groups() == expected
    env = compose["services"]["ray-head"]["environment"]
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == expected
    broken = copy.deepcopy(compose)
    broken["services"]["s3"]["ports"] = ["8333:8333"]
    broken["services"]["ray-head"]["command"].remove("--block")
    assert compose_problems(broken) == ["port 8333:8333 is not bound to 127.0.0.1",
                                        "no `ray start --head --block` service with the dashboard on 8265"]


# ---- Serve configs --------------------------------------------------------------------------------

def serve_problems(doc: dict) -> list[str]:
    from ray.serve.schema import ServeDeploySchema

    try:
        schema = ServeDeploySchema.model_validate(doc)
    except Exception as e:  # pydantic's ValidationError (of whichever pydantic Ray wraps)
        return [f"ServeDeploySchema: {e}"]
    # (the app's args are a ServeConfig: tests/unit/test_configs.py checks serve.yaml's; the RayService's are equal)
    return [f"{app.name}/{d.name}: autoscaling needs 1 <= min_replicas <= max_replicas"
            for app in schema.applications for d in app.deployments if isinstance(d.autoscaling_config, dict)
            and not 1 <= d.autoscaling_config.get("min_replicas", 1) <= d.autoscaling_config.get("max_replicas", 1)]


def test_serve_configs_pass_ray_serve_schema_and_match():
    standalone = docs(CLUSTER / "serve.yaml")[0]
    service = next(d for d in k8s_docs() if d["kind"] == "RayService")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_problems(standalone) == [] and serve_problems(embedded) == []
    assert embedded["applications"] == standalone["applications"]
    keys_dir = str(Path(standalone["applications"][0]["args"]["keys_file"]).parent)
    mounts = [m["mountPath"] for n in walk(service) if isinstance(n, dict) for m in n.get("volumeMounts", [])]
    assert mounts.count(keys_dir) == 2  # the head and the GPU workers see the API keys Secret
    broken = copy.deepcopy(standalone)
    del broken["applications"][0]["import_path"]
    assert serve_problems(broken)[0].startswith("ServeDeploySchema")
    broken = copy.deepcopy(standalone)
    broken["applications"][0]["deployments"][0]["autoscaling_config"]["min_replicas"] = 99
    assert serve_problems(broken) == ["tkllm/DeltaModel: autoscaling needs 1 <= min_replicas <= max_replicas"]


# ---- Terraform ------------------------------------------------------------------------------------

def hcl_blocks(text: str, header: str) -> list[tuple[re.Match, str]]:
    """(header match, body) of each block whose header matches; braces inside strings do not count."""
    out, pos, pattern = [], 0, re.compile(header)
    while m := pattern.search(text, pos):
        depth, i, quoted = 1, m.end(), False
        while depth:
            quoted ^= text[i] == '"' and text[i - 1] != "\\"
            depth += 0 if quoted or text[i] == '"' else (text[i] == "{") - (text[i] == "}")
            i += 1
        out.append((m, text[m.end():i - 1]))
        pos = i
    return out


def policy_statements(text: str) -> dict[str, list[dict]]:
    """The statements of each `data "aws_iam_policy_document"` (a dynamic block's `content` included)."""
    def strings(key, s):  # list items: "quoted" as is, a bare reference x.y as "${x.y}"
        return [q or "${%s}" % ref for lst in re.findall(rf"\b{key}\s*=\s*\[(.*?)\]", s, re.S)
                for q, ref in re.findall(r'"([^"]*)"|([\w.]+)', lst)]

    return {m[1]: [{"effect": (re.findall(r'\beffect\s*=\s*"(\w+)"', s) or ["Allow"])[0],
                    "actions": strings("actions", s), "resources": strings("resources", s),
                    "principals": strings("identifiers", s), "prefix_condition": '"s3:prefix"' in s}
                   for _, s in hcl_blocks(body, r'(?<!")\b(?:statement|content) \{')]
            for m, body in hcl_blocks(text, r'data "aws_iam_policy_document" "(\w+)" \{')}


def statement_problems(doc: str, st: dict) -> list[str]:
    if st["effect"] == "Deny":
        return []
    out = [f"{doc}: wildcard action {a}" for a in st["actions"] if "*" in a]
    if st["principals"]:  # a trust policy
        return out + [f"{doc}: assumable by anyone"] * ("*" in st["principals"]) + \
            [f"{doc}: trust policy grants {a}" for a in st["actions"] if not a.startswith("sts:")]
    out += [f"{doc}: {st['actions']} on no resource"] * (not st["resources"])
    out += [f"{doc}: resource {r} is not the bucket or one prefix of it" for r in st["resources"]
            if r != "${local.bucket_arn}" and not re.fullmatch(r"\$\{local\.bucket_arn\}/[a-z-]+/\*", r)]
    return out + [f"{doc}: ListBucket without an s3:prefix condition"] * (
        "s3:ListBucket" in st["actions"] and not st["prefix_condition"])


def grants(sts: list[dict]) -> dict[str, set[str]]:
    """action -> the prefixes it is granted on."""
    return {a: {p for s in sts if a in s["actions"] for r in s["resources"] for p in re.findall(r"\}/([a-z-]+)/\*$", r)}
            for st in sts for a in st["actions"]}


def test_terraform_bucket_and_least_privilege_roles():
    tf = {n: (INFRA / "terraform" / n).read_text() for n in ("main.tf", "variables.tf", "outputs.tf")}
    main = tf["main.tf"]
    assert re.search(r'versioning_configuration \{\s*status\s*=\s*"Enabled"', main)
    assert "apply_server_side_encryption_by_default" in main
    assert all(re.search(rf"{k}\s*=\s*true", main)
               for k in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"))
    statements = policy_statements(main)
    assert {"ingest", "trainer", "server", "assume"} <= set(statements)
    assert [p for d, sts in statements.items() for st in sts for p in statement_problems(d, st)] == []
    g = {d: grants(statements[d]) for d in ("ingest", "trainer", "server")}
    assert g["trainer"]["s3:GetObject"] >= {"datasets", "models"} and g["trainer"]["s3:PutObject"] == {"deltas"}
    assert g["server"]["s3:GetObject"] == {"deltas", "models"} and set(g["server"]) == {"s3:ListBucket", "s3:GetObject"}
    assert "raw" in g["ingest"]["s3:GetObject"] and g["ingest"]["s3:PutObject"] == {"datasets"}
    assert 'variable "bucket_name"' in tf["variables.tf"] and "role_arns" in tf["outputs.tf"]
    broken = ('data "aws_iam_policy_document" "x" {\n  statement {\n    actions = ["s3:*"]\n'
              '    resources = ["*"]\n  }\n  statement {\n    actions = ["s3:GetObject"]\n'
              '    resources = ["${local.bucket_arn}/*"]\n  }\n}\n')
    assert [p for d, sts in policy_statements(broken).items() for st in sts for p in statement_problems(d, st)] == [
        "x: wildcard action s3:*", "x: resource * is not the bucket or one prefix of it",
        "x: resource ${local.bucket_arn}/* is not the bucket or one prefix of it"]
