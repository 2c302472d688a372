"""cluster/: launcher configs pass Ray's own validation, KubeRay manifests have the fields
the operator needs, and the job-submission helpers quote and redact. No cluster is
started and nothing is mocked: the validators are Ray's."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from helpers.paths import ROOT

from diffgrm_dist.cluster.submit import REDACTED, WORKING_DIR_EXCLUDES, entrypoint_for, redact, runtime_env, submit
from diffgrm_dist.core.config import load_config
from diffgrm_dist.stages import PIPELINE

CLUSTER = ROOT / "cluster"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
SHARED_MOUNT = "/mnt/diffgrm"
RAY_IMAGE = re.compile(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)")


def _load(relative: str) -> dict:
    return yaml.safe_load((CLUSTER / relative).read_text(encoding="utf-8"))


def _all_yaml() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_cluster_folder_has_the_expected_files():
    names = {p.relative_to(CLUSTER).as_posix() for p in _all_yaml()}
    assert {"aws.yaml", "gcp.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"} <= names
    assert (CLUSTER / "README.md").is_file()


@pytest.mark.parametrize("path", _all_yaml(), ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_every_yaml_parses_to_mappings(path):
    docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert docs and all(isinstance(d, dict) for d in docs)


def test_ray_versions_agree_across_all_configs():
    """Head, workers and the KubeRay rayVersion must run one Ray version."""
    versions = set()
    for path in _all_yaml():
        text = path.read_text(encoding="utf-8")
        versions.update(RAY_IMAGE.findall(text))
        versions.update(re.findall(r'rayVersion:\s*"?(\d+\.\d+\.\d+)', text))
    assert len(versions) == 1, versions


# --- Ray cluster launcher (`ray up`) --------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_ray_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(name)
    validate_config(copy.deepcopy(config))  # the file as written
    # ... and after the defaults are merged in, which is what `ray up` validates.
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_validation_is_not_vacuous(name):
    from ray.autoscaler._private.util import validate_config

    config = _load(name)
    config["max_worker"] = 3  # misspelt key
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)
    config = _load(name)
    gpu_type = next(t for t in config["available_node_types"] if t != config["head_node_type"])
    config["available_node_types"][gpu_type]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_has_cpu_head_and_autoscaling_gpu_workers(name):
    config = _load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert len(workers) == 1
    worker = next(iter(workers.values()))
    assert 0 <= worker["min_workers"] < worker["max_workers"] <= config["max_workers"]
    if name == "aws.yaml":
        assert worker["node_config"]["InstanceType"].startswith(("g4dn", "g5", "g6", "p3", "p4", "p5"))
        assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
    else:
        assert worker["resources"]["GPU"] >= 1 and "GPU" not in head["resources"]
        assert worker["node_config"]["guestAccelerators"][0]["acceleratorCount"] >= 1
        assert {"onHostMaintenance": "TERMINATE"} in worker["node_config"]["scheduling"]
    assert RAY_IMAGE.match(config["docker"]["image"]) and config["docker"]["image"].endswith("-gpu")


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_starts_ray_with_token_auth_and_shared_storage(name):
    config = _load(name)
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head_start and "--autoscaling-config" in head_start
    assert "--address=$RAY_HEAD_IP" in worker_start
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert "--dashboard-host=0.0.0.0" not in head_start  # reached through `ray dashboard`
    assert f"-v {SHARED_MOUNT}:{SHARED_MOUNT}" in config["docker"]["run_options"]
    mounts = " ".join(config["initialization_commands"])
    assert "mount -t nfs" in mounts and SHARED_MOUNT in mounts
    assert any("diffgrm-dist" in c and "pip install" in c for c in config["setup_commands"])
    meta = config["metadata"]["diffgrm"]
    assert meta["run_root"].startswith(SHARED_MOUNT + "/")
    bucket = "s3://" if name == "aws.yaml" else "gs://"
    assert meta["run_uri"].startswith(bucket)
    worker = config["available_node_types"][next(k for k in config["available_node_types"] if "worker" in k)]
    access = worker["node_config"].get("IamInstanceProfile") or worker["node_config"].get("serviceAccounts")
    assert access, "workers need bucket access for a bucket RUN_DIR"
    assert meta["data_bucket"].startswith(bucket) and meta["archive_bucket"].startswith(bucket)


# --- KubeRay ----------------------------------------------------------------------------


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert _containers(head)[0]["name"] == "ray-head"
    assert "nvidia.com/gpu" not in _containers(head)[0]["resources"]["limits"]
    groups = spec["workerGroupSpecs"]
    gpu_groups = [g for g in groups
                  if int(_containers(g)[0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"
    for group in gpu_groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
        resources = _containers(group)[0]["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    for group in [head, *groups]:
        image = _containers(group)[0]["image"]
        assert image.endswith("-gpu"), image
        mounts = {m["mountPath"]: m["name"] for m in _containers(group)[0]["volumeMounts"]}
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        claim = volumes[mounts[SHARED_MOUNT]]["persistentVolumeClaim"]["claimName"]
        assert claim == "diffgrm-shared"


def test_raycluster_manifest():
    doc = _load("kuberay/raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["metadata"]["name"]
    _check_ray_cluster_spec(doc["spec"])
    assert doc["spec"]["authOptions"]["secretName"]


def test_rayjob_manifest():
    doc = _load("kuberay/rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_ray_cluster_spec(spec["rayClusterSpec"])


def test_rayjob_entrypoint_is_a_valid_diffgrm_command():
    spec = _load("kuberay/rayjob.yaml")["spec"]
    assert spec["entrypoint"].startswith("diffgrm ")
    argv = shlex.split(spec["entrypoint"])
    assert argv[1] in (*PIPELINE, "pipeline")
    config, run_dir = argv[argv.index("-c") + 1], argv[argv.index("-o") + 1]
    assert run_dir.startswith(SHARED_MOUNT + "/")
    overrides = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
    # The config exists in the repository (the job's working directory) and the
    # overrides are accepted by the real config loader.
    cfg = load_config(ROOT / config, overrides)
    assert cfg.data.path.startswith(SHARED_MOUNT + "/")
    assert cfg.train.use_gpu is True
    gpu_group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert cfg.train.num_workers <= gpu_group["maxReplicas"]


def test_rayjob_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    spec = _load("kuberay/rayjob.yaml")["spec"]
    env = RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"])).to_dict()
    assert env["working_dir"].endswith(".zip")
    assert any("diffgrm-dist" in p for p in env["pip"]["packages"])
    assert not any(re.search(r"TOKEN|KEY|SECRET|PASSWORD", k) for k in env.get("env_vars", {}))


# --- diffgrm_dist.cluster.submit ----------------------------------------------------------------


def test_entrypoint_for_builds_a_diffgrm_command():
    cmd = entrypoint_for("train", "configs/beauty.yaml", "/mnt/diffgrm/runs/beauty", ["train.lr=1e-3"])
    assert cmd == "diffgrm train -c configs/beauty.yaml -o /mnt/diffgrm/runs/beauty train.lr=1e-3"


def test_entrypoint_for_quotes_every_argument():
    overrides = ['data.text_template=["Title: {title}", "Brand: {brand}"]',
                 "data.name=it's; rm -rf ~", "data.path=/x/$(touch pwned)`id`"]
    run_dir = "/mnt/shared runs/a b"
    cmd = entrypoint_for("pipeline", "configs/my config.yaml", run_dir, overrides)
    # A POSIX shell splits it back into exactly these words, nothing expanded.
    assert shlex.split(cmd) == ["diffgrm", "pipeline", "-c", "configs/my config.yaml",
                                "-o", run_dir, *overrides]


@pytest.mark.parametrize("run_dir", ["runs/beauty", "./runs", "bucket/runs", ""])
def test_entrypoint_for_rejects_run_dirs_the_job_would_lose(run_dir):
    with pytest.raises(ValueError, match="absolute"):
        entrypoint_for("pipeline", "configs/beauty.yaml", run_dir)


@pytest.mark.parametrize("stage", ["", "--force", "-c"])
def test_entrypoint_for_rejects_non_stages(stage):
    with pytest.raises(ValueError):
        entrypoint_for(stage, "configs/beauty.yaml", "/runs/x")


def test_redact_hides_secret_values_only():
    env = {"WANDB_API_KEY": "k-123", "HF_TOKEN": "hf_abc", "AWS_SECRET_ACCESS_KEY": "s3cr3t",
           "DB_PASSWORD": "pw", "github_token": "ghp", "WANDB_PROJECT": "diffgrm",
           "CUDA_VISIBLE_DEVICES": "0"}
    original = dict(env)
    shown = redact(env)
    assert env == original  # a copy; the job still gets the real values
    for name in ("WANDB_API_KEY", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "github_token"):
        assert shown[name] == REDACTED
    assert shown["WANDB_PROJECT"] == "diffgrm" and shown["CUDA_VISIBLE_DEVICES"] == "0"
    assert not any(v in str(shown) for v in ("k-123", "hf_abc", "s3cr3t", "ghp"))
    assert redact(None) == {} and redact({}) == {}


def test_runtime_env_excludes_bulky_and_private_paths():
    spec = runtime_env("/work/project", {"WANDB_PROJECT": "x"})
    assert spec["working_dir"] == "/work/project"
    assert set(WORKING_DIR_EXCLUDES) <= set(spec["excludes"])
    assert {".venv", "runs", ".git", "wandb", "tools/results"} <= set(spec["excludes"])
    assert spec["env_vars"] == {"WANDB_PROJECT": "x"}
    assert "env_vars" not in runtime_env("/work/project")


def test_submit_rejects_non_string_env_without_showing_the_value():
    # Raised before any connection is attempted, so no cluster is needed.
    with pytest.raises(TypeError) as info:
        submit("http://127.0.0.1:9", "diffgrm --help", str(ROOT), {"API_TOKEN": 98765})  # type: ignore[dict-item]
    assert "98765" not in str(info.value) and "API_TOKEN" in str(info.value)
