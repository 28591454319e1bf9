"""infra/: every manifest parses, every proteoflow command line in it (Dockerfile ENTRYPOINT/CMD and RUN lines,
the RayJob entrypoint, the autoscaler's commands, and the example commands in their comments) is accepted by
the CLI's own parser, the KubeRay clusters mount one shared volume on every pod and give their worker group
GPUs, and the pinned versions agree with pyproject.toml and with each other."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from flows.cli import _join_negative_values, build_parser

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "Dockerfile"
MANIFESTS = sorted(INFRA.glob("*.yaml"))
AUTOSCALER_COMMANDS = ("initialization_commands", "setup_commands", "head_setup_commands",
                       "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")  # fmt: skip
# A comment line indented by two spaces or more after its '#' and starting with one of these words is an example
# command line, checked like the others.
COMMAND_WORDS = {"proteoflow", "python", "python3", "ray", "kubectl", "docker", "git", "pip", "prefect"}
PINNED = {"torch", "ray", "prefect", "transformers"}
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _is_separator(token: str) -> bool:
    return bool(token) and all(c in "();<>|&" for c in token)


def proteoflow_argvs(shell: str) -> list[list[str]]:
    """The arguments of every proteoflow invocation in a shell command line: ``proteoflow ARGS`` (any path to
    it), ``python -m flows.cli ARGS``, ``docker run ... proteoflow:TAG ARGS`` (the image's ENTRYPOINT is the
    CLI), and the same inside a quoted command (``ray exec CONFIG "proteoflow ..."``)."""
    lexer = shlex.shlex(shell, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    found: list[list[str]] = []
    docker_run = False
    for i, token in enumerate(tokens):
        command_position = i == 0 or _is_separator(tokens[i - 1]) or tokens[i - 1] in ("--", "sudo", "exec")
        start = None
        if " " in token and re.match(r"(\S*/)?proteoflow |python3? -m flows\.cli ", token):
            found += proteoflow_argvs(token)
        elif command_position and token.rsplit("/", 1)[-1] == "proteoflow":
            start = i + 1
        elif (
            command_position
            and token in ("python", "python3")
            and tokens[i + 1 : i + 3] == ["-m", "flows.cli"]
        ):
            start = i + 3
        elif docker_run and re.fullmatch(r"(\S+/)?proteoflow:[\w.-]+", token):
            start = i + 1
        docker_run = (docker_run or tokens[i - 1 : i + 1] == ["docker", "run"]) and not _is_separator(token)
        if start is not None:
            end = next((j for j in range(start, len(tokens)) if _is_separator(tokens[j])), len(tokens))
            found.append(tokens[start:end])
    return found


def parse(argv: list[str]):
    """The CLI's parse of ``argv``; a test failure (with the command) if the parser refuses it."""
    try:
        args = build_parser().parse_args(_join_negative_values(argv))
    except SystemExit as exc:
        pytest.fail(f"proteoflow's parser refuses `proteoflow {shlex.join(argv)}` (exit {exc.code})")
    assert getattr(args, "handler", None), f"`proteoflow {shlex.join(argv)}` names no command"
    return args


def comment_commands(text: str) -> list[str]:
    """Example command lines in ``#`` comments: indented (prose is not), continued with a trailing backslash."""
    commands, pending = [], None  # pending: the start of a command continued on the next comment line
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            pending = None
            continue
        raw = stripped.lstrip("#")
        body = f"{pending} {raw.strip()}" if pending is not None else raw.strip()
        if pending is None and not raw.startswith("  "):
            continue
        if body.endswith("\\"):
            pending = body[:-1].strip()
            continue
        pending = None
        if body.split(" ", 1)[0] in COMMAND_WORDS:
            commands.append(body)
    return commands


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined, comments left out."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")))  # fmt: skip
    return [tuple(line.strip().split(None, 1)) for line in joined.splitlines() if line.strip()]  # type: ignore[misc]


def docker_args() -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in dockerfile() if i == "ARG")


def docker_pins() -> dict[str, str]:
    """Package -> version pinned in the Dockerfile's pip installs (``"name==${ARG}"``, ARG defaults resolved)."""
    args = docker_args()
    pins = {}
    for instruction, rest in dockerfile():
        if instruction == "RUN":
            for name, version in re.findall(r"([A-Za-z0-9_.\-\[\],]+)==\$\{(\w+)\}", rest):
                pins[canonicalize_name(Requirement(name).name)] = args[version]
    return pins


def project_specifiers() -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, PROJECT["dependencies"])}


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kuberay_clusters(path: Path) -> list[dict]:
    """The RayCluster specs of a manifest: a RayCluster's spec, a RayJob's rayClusterSpec."""
    found = []
    for doc in documents(path):
        if doc.get("kind") == "RayCluster":
            found.append(doc["spec"])
        elif doc.get("kind") == "RayJob":
            found.append(doc["spec"]["rayClusterSpec"])
    return found


def pod_templates(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def structured_commands(path: Path) -> list[str]:
    """The shell command lines a manifest runs: autoscaler commands, a RayJob's entrypoint, container commands."""
    commands = []
    for doc in documents(path):
        for key in AUTOSCALER_COMMANDS:
            commands += doc.get(key) or []
        spec = doc.get("spec") or {}
        if doc.get("kind") == "RayJob":
            commands.append(spec["entrypoint"])
    for cluster in kuberay_clusters(path):
        for template in pod_templates(cluster):
            for container in template["spec"]["containers"]:
                if container.get("command") or container.get("args"):
                    commands.append(shlex.join(container.get("command", []) + container.get("args", [])))
    return commands


# ---------------------------------------------------------------------------------------------- tests


def test_every_manifest_parses():
    assert {p.name for p in MANIFESTS} >= {
        "ray-cluster.yaml",
        "kuberay-rayjob.yaml",
        "kuberay-raycluster.yaml",
    }
    for path in MANIFESTS:
        assert documents(path), path
    instructions = [i for i, _ in dockerfile()]
    assert instructions[0] == "FROM" and {"ENTRYPOINT", "CMD"} <= set(instructions)


def test_the_command_check_refuses_what_the_cli_refuses():
    """The check below can fail: a misspelt option or a missing store value is refused by the parser."""
    for bad in ("proteoflow embed /data/x.faa --store /data/s --ray-adress auto",
                "ray exec c.yaml \"proteoflow submit embed /x --store\"",
                "docker run --gpus all proteoflow:0.1.0 fold /x --num-recycles many"):  # fmt: skip
        [argv] = proteoflow_argvs(bad)
        with pytest.raises(pytest.fail.Exception):
            parse(argv)
    assert proteoflow_argvs("python3 -m venv ~/proteoflow && ls /opt/proteoflow") == []


def test_dockerfile_entrypoint_and_commands_are_accepted_by_the_cli():
    steps = dockerfile()
    entrypoint = json.loads(next(rest for i, rest in steps if i == "ENTRYPOINT"))
    cmd = json.loads(next(rest for i, rest in steps if i == "CMD"))
    assert entrypoint == ["proteoflow"]
    parse(cmd)  # `docker run IMAGE` with no arguments
    runs = [argv for i, rest in steps if i == "RUN" for argv in proteoflow_argvs(rest)]
    examples = [argv for line in comment_commands(DOCKERFILE.read_text()) for argv in proteoflow_argvs(line)]
    assert runs and examples, (runs, examples)
    for argv in runs + examples:
        parse(argv)
    assert steps[0][1].startswith("nvidia/cuda:") and "runtime" in steps[0][1]  # a CUDA base image


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_command_lines_are_accepted_by_the_cli(path):
    structured = [argv for line in structured_commands(path) for argv in proteoflow_argvs(line)]
    examples = [argv for line in comment_commands(path.read_text()) for argv in proteoflow_argvs(line)]
    for argv in structured + examples:
        parse(argv)
    if path.name in ("kuberay-rayjob.yaml", "ray-cluster.yaml"):  # they run proteoflow themselves
        assert structured, path.name
    if path.name != "prefect.yaml":  # the Prefect deployment runs flows, not the CLI
        assert examples, path.name


def test_rayjob_runs_on_the_cluster_with_its_store_on_the_shared_volume():
    [job] = [d for d in documents(INFRA / "kuberay-rayjob.yaml") if d.get("kind") == "RayJob"]
    [argv] = proteoflow_argvs(job["spec"]["entrypoint"])
    args = parse(argv)
    assert args.command == "embed" and args.ray_address == "auto"
    [cluster] = kuberay_clusters(INFRA / "kuberay-rayjob.yaml")
    mount = shared_mount(INFRA / "kuberay-rayjob.yaml", cluster)
    assert all(Path(p).is_relative_to(mount) for p in [args.store, *args.inputs]), (mount, args)


def shared_mount(path: Path, cluster: dict) -> str:
    """The path at which every pod of ``cluster`` mounts the manifest's ReadWriteMany claim (asserted)."""
    [claim] = [d for d in documents(path) if d.get("kind") == "PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    mounts = set()
    for template in pod_templates(cluster):
        volumes = {v["name"] for v in template["spec"]["volumes"]
                   if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]}  # fmt: skip
        container = template["spec"]["containers"][0]
        mounts |= {m["mountPath"] for m in container["volumeMounts"] if m["name"] in volumes}
        assert any(m["name"] in volumes for m in container["volumeMounts"]), (
            f"{path.name}: a pod lacks the store"
        )
    assert len(mounts) == 1, f"{path.name}: the store is mounted at different paths: {mounts}"
    return mounts.pop()


@pytest.mark.parametrize("name", ["kuberay-rayjob.yaml", "kuberay-raycluster.yaml"])
def test_kuberay_clusters_have_gpu_workers_the_shared_volume_and_the_pinned_image(name):
    path = INFRA / name
    [cluster] = kuberay_clusters(path)
    shared_mount(path, cluster)
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in cluster["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]]  # fmt: skip
    assert gpus and all(int(g) >= 1 for g in gpus), gpus
    assert cluster["rayVersion"] == docker_pins()["ray"]
    images = {c["image"] for t in pod_templates(cluster) for c in t["spec"]["containers"]}
    assert images == {f"proteoflow:{PROJECT['version']}"}, images


def test_pinned_versions_agree_with_pyproject_and_each_other():
    pins = docker_pins()
    assert set(pins) >= PINNED, pins
    wanted = project_specifiers()
    for name, version in pins.items():
        assert wanted[name].specifier.contains(version), (
            f"{name}=={version} is outside pyproject's {wanted[name]}"
        )
    autoscaler = documents(INFRA / "ray-cluster.yaml")[0]
    text = " ".join(autoscaler["setup_commands"])
    installed = {canonicalize_name(Requirement(n).name): v
                 for n, v in re.findall(r"([A-Za-z0-9_.\-\[\],]+)==([\w.]+)", text)}  # fmt: skip
    assert installed == {k: pins[k] for k in installed} and set(installed) >= PINNED, (installed, pins)
    wheel = f"proteoflow-{PROJECT['version']}-py3-none-any.whl"
    assert any(Path(src).name == wheel for src in autoscaler["file_mounts"].values()), autoscaler[
        "file_mounts"
    ]
    assert wheel in text and "example.invalid" not in (INFRA / "ray-cluster.yaml").read_text()
    gpu_types = [t for t in autoscaler["available_node_types"].values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t.get("min_workers", 0) >= 1 for t in gpu_types)  # GPUs exist when a run starts
