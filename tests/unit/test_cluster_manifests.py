"""cluster/: every manifest parses, and the fields the jobs rely on agree with the repository.

No kubectl / docker / cloud here: KubeRay field names are checked against the ray.io/v1 API reference, the
launcher YAML against the schema Ray 2.60 ships, the entrypoint's config against the job's config class.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import re
import shlex
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hscr_platform.core.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SHARED = "/mnt/shared"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# ray.io/v1 fields (KubeRay's API reference, docs/reference/api.md): the API server drops or rejects others
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
}  # fmt: skip
RAYCLUSTER_SPEC = {
    "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "authOptions",
}  # fmt: skip
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams",
    "template", "scaleStrategy", "numOfHosts",
}  # fmt: skip


def _pin(requirement_prefix: str, requirements: list[str]) -> str:
    (req,) = [r for r in requirements if re.match(rf"{re.escape(requirement_prefix)}(\[.*\])?==", r)]
    return req.split("==", 1)[1]


RAY_PIN = _pin("ray", PYPROJECT["project"]["dependencies"])
TORCH_PIN = _pin("torch", PYPROJECT["project"]["dependencies"])
VLLM_PIN = _pin("vllm", PYPROJECT["project"]["optional-dependencies"]["gpu"])
VERSION = PYPROJECT["project"]["version"]


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifests() -> dict[str, list[dict[str, Any]]]:
    return {str(p.relative_to(CLUSTER)): _docs(p) for p in sorted(CLUSTER.rglob("*.yaml"))}


def _kind(kind: str) -> dict[str, Any]:
    (found,) = [d for docs in _manifests().values() for d in docs if d.get("kind") == kind]
    return found


def _walk(node: Any, key: str) -> Iterator[Any]:
    """Every value stored under ``key`` anywhere in a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def _cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    return [
        ("RayCluster", _kind("RayCluster")["spec"]),
        ("RayJob", _kind("RayJob")["spec"]["rayClusterSpec"]),
    ]


def _groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("head", spec["headGroupSpec"]), *((g["groupName"], g) for g in spec["workerGroupSpecs"])]


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def _dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text()


def _workdir() -> str:
    return re.findall(r"^WORKDIR\s+(\S+)", _dockerfile(), flags=re.M)[-1]


# ---- every file ------------------------------------------------------------------------------------------


def test_every_yaml_parses_and_is_not_empty():
    manifests = _manifests()
    assert {
        "runtime_env.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "launcher/aws-gpu.yaml",
    } <= set(manifests)
    for name, docs in manifests.items():
        assert docs and all(isinstance(d, dict) for d in docs), name


def test_one_pinned_image_everywhere():
    images = {img for docs in _manifests().values() for d in docs for img in _walk(d, "image")}
    launcher = _docs(CLUSTER / "launcher/aws-gpu.yaml")[0]["docker"]
    images |= {launcher[k] for k in ("head_image", "worker_image") if k in launcher}
    assert len(images) == 1, f"one image for head, workers, RayJob and launcher: {sorted(images)}"
    (image,) = images
    name, _, tag = image.rpartition(":")
    assert name.endswith("/hscr-platform") and "/" in name, image
    assert tag not in {"", "latest"} and tag == VERSION, f"tag the image with the project version {VERSION}: {image}"
    assert f"hscr-platform:{VERSION}" in (CLUSTER / "README.md").read_text()


# ---- the image -------------------------------------------------------------------------------------------


def test_dockerfile_builds_the_wheel_and_installs_the_gpu_stack():
    text = _dockerfile()
    froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\w+))?", text, flags=re.M)
    assert len(froms) >= 2 and froms[0][1] == "builder", "a builder stage makes the wheel"
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", text, flags=re.M)
    assert base and base.group(1) == f"rayproject/ray:{RAY_PIN}-py311-gpu", "Ray image of the pinned Ray, py3.11"
    assert froms[-1][0] == "${RAY_IMAGE}"
    for folder in ("hscr/", "platform/", "jobs/"):
        assert re.search(rf"^COPY {folder} {folder}$", text, flags=re.M), f"the builder copies {folder}"
    assert "pip wheel --no-deps" in text and "COPY --from=builder /wheels" in text
    assert f"pip install --no-cache-dir torch=={TORCH_PIN}" in text, "torch first, at the project's pin"
    assert re.search(r"pip install [^\n]*hscr-\*\.whl\)\[gpu\]", text), "the project wheel with its gpu extra"
    # the gpu extra is what pins vLLM; the build asserts the installed versions against the same pins
    assert f"v('vllm') == '{VLLM_PIN}'" in text and f"v('ray') == '{RAY_PIN}'" in text
    assert VLLM_PIN == "0.32.0"
    for env in ("HF_HUB_OFFLINE=1", "OMP_WAIT_POLICY=PASSIVE", "TORCH_EXTENSIONS_DIR=/mnt/shared/"):
        assert env in text, env


def test_image_workdir_holds_the_configs_the_containers_start_in():
    text = _dockerfile()
    workdir = _workdir()
    assert re.search(r"^COPY --chown=ray:users jobs/ jobs/$", text, flags=re.M)
    assert "COPY platform/" not in text.split("FROM ${RAY_IMAGE}")[1], "platform/ would shadow the stdlib"
    for kind, spec in _cluster_specs():
        for group, g in _groups(spec):
            for c in _containers(g):
                assert c.get("workingDir") == workdir, f"{kind}/{group}: workingDir {workdir}"


# ---- KubeRay ---------------------------------------------------------------------------------------------


def test_kuberay_fields_exist_in_the_ray_io_v1_api():
    job = _kind("RayJob")
    assert job["apiVersion"] == "ray.io/v1" and _kind("RayCluster")["apiVersion"] == "ray.io/v1"
    assert set(job["spec"]) <= RAYJOB_SPEC, set(job["spec"]) - RAYJOB_SPEC
    for kind, spec in _cluster_specs():
        assert set(spec) <= RAYCLUSTER_SPEC, (kind, set(spec) - RAYCLUSTER_SPEC)
        assert set(spec["headGroupSpec"]) <= HEAD_GROUP, kind
        for g in spec["workerGroupSpecs"]:
            assert set(g) <= WORKER_GROUP, (kind, set(g) - WORKER_GROUP)
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (kind, g["groupName"])
        assert spec["rayVersion"] == RAY_PIN
        for _, g in _groups(spec):
            params = g["rayStartParams"]
            assert all(isinstance(v, str) for v in params.values()), f"{kind}: rayStartParams values are strings"


def test_rayjob_runs_on_the_same_cluster_spec_and_cleans_up():
    spec = _kind("RayJob")["spec"]
    assert spec["rayClusterSpec"] == _kind("RayCluster")["spec"], "rayjob.yaml and raycluster.yaml drifted apart"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0


def _job_config_class(module: str) -> type:
    """The config class a job module passes to job_main (read from its source, then imported)."""
    tree = ast.parse((REPO / Path(*module.split("."))).with_suffix(".py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "job_main"]
    name = calls[0].args[0].id  # type: ignore[attr-defined]
    (origin,) = [n.module for n in tree.body if isinstance(n, ast.ImportFrom) and name in {a.name for a in n.names}]
    return getattr(importlib.import_module(str(origin)), name)


def test_rayjob_entrypoint_is_a_job_with_an_existing_valid_config(monkeypatch):
    argv = shlex.split(_kind("RayJob")["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[3] == "--config", argv
    module, config, overrides = argv[2], argv[4], argv[5:]
    name = module.removeprefix("jobs.")
    assert re.fullmatch(r"jobs\.\w+", module) and (REPO / "jobs" / f"{name}.py").is_file(), module
    assert re.fullmatch(rf"jobs/configs/{name}/\w+\.yaml", config) and (REPO / config).is_file(), config
    assert config == "jobs/configs/pipeline/base.yaml"
    cfg = load_config(_job_config_class(module), REPO / config, overrides)
    if name == "pipeline":  # every stage's profile resolves too (the profiles are relative to the workdir)
        from hscr_platform.pipeline import plan

        monkeypatch.chdir(REPO)
        plan(cfg)


def test_gpu_workers_request_gpus_and_every_pod_sets_resources():
    for kind, spec in _cluster_specs():
        assert spec["workerGroupSpecs"], kind
        for group, g in _groups(spec):
            for c in _containers(g):
                res = c["resources"]
                for part in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(res[part]), f"{kind}/{group}: {part} cpu + memory"
                gpus = int(res["limits"].get("nvidia.com/gpu", 0))
                if group == "head":
                    assert gpus == 0, f"{kind}: the head needs no GPU"
                else:
                    assert gpus >= 1, f"{kind}/{group}: GPU workers request nvidia.com/gpu"
                    assert res["requests"].get("nvidia.com/gpu", res["limits"]["nvidia.com/gpu"]) == str(gpus)


def test_mlflow_uri_comes_from_a_secret_in_every_container():
    for kind, spec in _cluster_specs():
        for group, g in _groups(spec):
            for c in _containers(g):
                (env,) = [e for e in c["env"] if e["name"] == "MLFLOW_TRACKING_URI"]
                assert "value" not in env, f"{kind}/{group}: no literal tracking URI"
                ref = env["valueFrom"]["secretKeyRef"]
                assert ref["name"] and ref["key"], f"{kind}/{group}"


def test_every_ray_cluster_has_token_auth_with_the_token_from_a_secret():
    for kind, spec in _cluster_specs():
        assert spec["authOptions"] == {"mode": "token"}, f"{kind}: authOptions (KubeRay >= 1.5.1)"
        for group, g in _groups(spec):
            for c in _containers(g):
                names = {e["name"]: e for e in c.get("env", [])}
                # KubeRay sets both from the Secret it creates; a literal here would disable or leak it
                assert "RAY_AUTH_MODE" not in names and "RAY_AUTH_TOKEN" not in names, f"{kind}/{group}"


def test_mlflow_credentials_come_only_from_the_secret():
    for kind, spec in _cluster_specs():
        for group, g in _groups(spec):
            for c in _containers(g):
                mlflow = [e for e in c["env"] if e["name"].startswith("MLFLOW_TRACKING_")]
                assert {e["name"] for e in mlflow} >= {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD"}, (kind, group)
                for env in mlflow:
                    assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"] == "hscr-mlflow", env
    (runtime,) = _docs(CLUSTER / "runtime_env.yaml")
    leaked = [k for k in runtime["env_vars"] if k.startswith(("MLFLOW_TRACKING_", "RAY_AUTH_"))]
    assert not leaked, f"credentials never go in the runtime env: {leaked}"


def test_launcher_starts_every_node_with_token_auth_from_a_file_outside_git():
    cfg = _launcher()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in cfg[key] if "ray start" in c]
        assert "RAY_AUTH_MODE=token" in start, key
        (path,) = re.findall(r"RAY_AUTH_TOKEN_PATH=(\S+)", start)
        assert path in cfg["file_mounts"], f"{key}: the token file is copied to every node"
        assert cfg["file_mounts"][path].startswith("~/"), "the token comes from the laptop, not the repository"
        assert any("chmod 600" in c and path in c for c in cfg["setup_commands"]), "owner-only on the nodes"


def test_nothing_turns_ray_auth_off():
    value = "disabled"  # the opt-out value, kept on its own line so this file does not match itself
    mode = "RAY_AUTH_MODE"
    off, quoted = f"{mode}={value}", f'"{mode}": "{value}"'
    hits = []
    for top in ("platform", "jobs", "tests", "cluster", "docs", "scripts", "README.md", "Makefile"):
        root = REPO / top
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if path.is_file() and path.suffix in {"", ".py", ".md", ".yaml", ".yml", ".sh", ".toml"}:
                text = path.read_text(errors="replace")
                hits += [str(path.relative_to(REPO)) for needle in (off, quoted) if needle in text]
    assert not hits, f"Ray token auth is turned off in {hits}"


def test_shared_volume_is_a_pvc_at_mnt_shared_and_holds_the_base_profiles_paths():
    (pvc,) = [d for d in _docs(CLUSTER / "kuberay/shared-storage.yaml") if d["kind"] == "PersistentVolumeClaim"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for kind, spec in _cluster_specs():
        for group, g in _groups(spec):
            volumes = {v["name"]: v for v in g["template"]["spec"]["volumes"]}
            for c in _containers(g):
                (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == SHARED]
                claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
                assert claim == pvc["metadata"]["name"], f"{kind}/{group}"
    absolute = []
    for base in sorted((REPO / "jobs/configs").glob("*/base.yaml")):
        absolute += [(base, v) for v in _strings(yaml.safe_load(base.read_text())) if v.startswith("/")]
    assert absolute, "the base profiles name shared paths"
    outside = [(str(b.relative_to(REPO)), v) for b, v in absolute if not v.startswith(SHARED + "/")]
    assert not outside, f"base profiles' absolute paths must be on the shared volume {SHARED}: {outside}"


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


# ---- runtime env -----------------------------------------------------------------------------------------


def test_runtime_env_excludes_local_state_and_keeps_the_secret_uri():
    (env,) = _docs(CLUSTER / "runtime_env.yaml")
    for needed in ("runs/", ".venv/", ".venv-*/", "build/", ".git/"):
        assert needed in env["excludes"], needed
    assert "working_dir" not in env, "the working dir is the submit command's --working-dir"
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "Ray wants string env vars"
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and env["env_vars"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "MLFLOW_TRACKING_URI" not in env["env_vars"], "would override the Secret for every job"
    rayjob_env = yaml.safe_load(_kind("RayJob")["spec"]["runtimeEnvYAML"])
    assert rayjob_env == {"env_vars": env["env_vars"]}, "rayjob.yaml's runtimeEnvYAML drifted from runtime_env.yaml"


def test_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    (env,) = _docs(CLUSTER / "runtime_env.yaml")
    parsed = RuntimeEnv(**env, working_dir=str(REPO))
    assert json.loads(parsed.serialize())["env_vars"] == env["env_vars"]


# ---- cluster launcher ------------------------------------------------------------------------------------


def _launcher() -> dict[str, Any]:
    return _docs(CLUSTER / "launcher/aws-gpu.yaml")[0]


def test_launcher_yaml_matches_rays_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_launcher(), schema)


def test_launcher_has_head_and_gpu_node_types_on_the_image_and_shared_storage():
    cfg = _launcher()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu = [k for k, v in workers.items() if re.match(r"(g|p)\d", v["node_config"]["InstanceType"])]
    assert gpu and all(types[k]["max_workers"] >= 1 for k in gpu), "a GPU worker node type"
    assert cfg["docker"]["image"] and f"-v {SHARED}:{SHARED}" in cfg["docker"]["run_options"]
    assert any(SHARED in c for c in cfg["initialization_commands"]), "the hosts mount the shared storage"
    assert cfg["setup_commands"] and cfg["file_mounts"]
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])


# ---- README ----------------------------------------------------------------------------------------------


def test_readme_has_the_exact_commands():
    text = (CLUSTER / "README.md").read_text()
    for cmd in (
        "docker build -f cluster/Dockerfile -t $REGISTRY/hscr-platform:",
        "kubectl apply -f cluster/kuberay/raycluster.yaml",
        "kubectl apply -f cluster/kuberay/rayjob.yaml",
        "port-forward service/hscr-head-svc 8265:8265",
        "ray job submit --address http://127.0.0.1:8265 --working-dir . \\\n"
        "        --runtime-env cluster/runtime_env.yaml \\\n"
        "        -- python -m jobs.pipeline --config jobs/configs/pipeline/base.yaml",
        "ray up cluster/launcher/aws-gpu.yaml",
        "ray dashboard cluster/launcher/aws-gpu.yaml",
        "kubectl -n hscr get secret hscr -o jsonpath='{.data.auth_token}'",
        "RAY_AUTH_TOKEN_PATH=",
        "scripts/ship_job.py --address http://127.0.0.1:8265 --token-file",
    ):
        assert cmd in text, cmd
    assert f"{_kind('RayCluster')['metadata']['name']}-head-svc" in text


def _expand(key: str) -> list[str]:
    """``a.{b,c}`` -> ``a.b``, ``a.c``; ``a.{...}`` -> ``a``."""
    m = re.fullmatch(r"(.*)\.\{(.*)\}", key)
    if not m:
        return [key]
    return [m.group(1)] if m.group(2) == "..." else [f"{m.group(1)}.{p}" for p in m.group(2).split(",")]


def _resolves(cls: type, dotted: str) -> bool:
    node: Any = cls
    for part in dotted.split("."):
        if not (dataclasses.is_dataclass(node) and isinstance(node, type)):
            return typing.get_origin(node) is dict  # free-form mapping (e.g. decoder.vllm)
        hints = typing.get_type_hints(node)
        if part not in hints:
            return False
        node = hints[part]
    return True


def test_readme_scaling_knobs_are_real_config_keys():
    text = (CLUSTER / "README.md").read_text()
    rows = re.findall(r"^\| `(jobs\.\w+)` \| (.+) \|$", text, flags=re.M)
    assert {job for job, _ in rows} >= {"jobs.pipeline", "jobs.sft", "jobs.generate", "jobs.train"}
    for job, cell in rows:
        cls = _job_config_class(job)
        keys = [k for k in re.findall(r"`([a-z_][\w.{},]*)`", cell) if "." in k or k in _field_names(cls)]
        assert keys, job
        bad = [k for key in keys for k in _expand(key) if not _resolves(cls, k)]
        assert not bad, f"{job}: README names config keys that do not exist: {bad}"


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in CLUSTER.rglob("*.yaml")))
def test_no_secret_values_committed(path):
    text = (REPO / path).read_text().lower()
    assert not re.search(r"(password|secret_access_key|aws_secret|token)\s*[:=]\s*\S", text), path
