"""infra/: every manifest parses, every proteoflow command line in it (Dockerfile ENTRYPOINT/CMD and RUN lines,
the RayJob entrypoint, the autoscaler's commands, and the example commands in their comments) is accepted by
the CLI's own parser; the runs keep their inputs and store on S3, every pod or node that reads or writes them
has credentials (a Kubernetes Secret, an instance profile), every model they run is in the nodes' Hugging Face
cache (baked into the image, fetched by the setup commands) and no volume hides it; the KubeRay clusters give
their worker group GPUs; and the pinned versions agree with pyproject.toml and with each other."""

from __future__ import annotations

import copy
import importlib.util
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


def compute_args(path: Path) -> list:
    """The parsed embed/fold/submit command lines of a manifest (structured and in its comments)."""
    text = path.read_text()
    lines = comment_commands(text) + ([] if path == DOCKERFILE else structured_commands(path))
    parsed = [parse(argv) for line in lines for argv in proteoflow_argvs(line)]
    return [a for a in parsed if a.command in ("embed", "fold", "submit")]


def test_rayjob_runs_on_the_cluster_with_its_inputs_and_store_on_object_storage():
    [job] = [d for d in documents(INFRA / "kuberay-rayjob.yaml") if d.get("kind") == "RayJob"]
    [argv] = proteoflow_argvs(job["spec"]["entrypoint"])
    args = parse(argv)
    assert args.command == "embed" and args.ray_address == "auto"
    assert all(p.startswith("s3://") for p in [args.store, *args.inputs]), args


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "ray-cluster.yaml"])
def test_submit_examples_send_object_store_inputs_and_store(name):
    """The clusters' main route: `proteoflow submit` with s3:// inputs and store, followed with --wait."""
    submits = [a for a in compute_args(INFRA / name) if a.command == "submit"]
    on_s3 = [a for a in submits if all(p.startswith("s3://") for p in [a.store, *a.inputs])]
    assert on_s3 and all(a.wait and a.address for a in on_s3), submits


def containers_without_secret(cluster: dict, secret: str) -> list[str]:
    """The containers of ``cluster``'s pods (head and every worker group) that do not take ``secret``'s keys
    as environment variables (``envFrom: - secretRef: {name: SECRET}``)."""
    return [container["name"] for template in pod_templates(cluster) for container in template["spec"]["containers"]
            if secret not in {e.get("secretRef", {}).get("name") for e in container.get("envFrom") or []}]  # fmt: skip


def secret_created(text: str) -> tuple[str, set[str]]:
    """(name, keys) of the ``kubectl create secret generic NAME --from-literal=KEY=VALUE ...`` example."""
    [command] = [c for c in comment_commands(text) if c.startswith("kubectl create secret generic ")]
    tokens = shlex.split(command)
    keys = {t.split("=", 2)[1] for t in tokens if t.startswith("--from-literal=")}
    return tokens[4], keys


@pytest.mark.parametrize("name", ["kuberay-rayjob.yaml", "kuberay-raycluster.yaml"])
def test_every_kuberay_pod_takes_the_s3_credentials_from_the_secret_the_header_creates(name):
    """The driver (head) writes run and shard records and the actors (workers) write their outputs, so every
    pod needs the credentials; the header's `kubectl create secret` makes that Secret with the variables the
    object store reads."""
    path = INFRA / name
    [cluster] = kuberay_clusters(path)
    secret, keys = secret_created(path.read_text())
    assert secret == "proteoflow-s3"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= keys, keys
    assert keys <= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_SESSION_TOKEN",
                    "AWS_ENDPOINT_URL"}, keys  # fmt: skip
    assert containers_without_secret(cluster, secret) == []
    assert "AWS_ENDPOINT_URL" in path.read_text()  # how to name an S3-compatible server
    worker_without = copy.deepcopy(cluster)  # the check can fail: a worker group without the Secret
    del worker_without["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["envFrom"]
    assert containers_without_secret(worker_without, secret) == ["ray-worker"]


def docker_env() -> dict[str, str]:
    """The Dockerfile's ENV variables (``ENV K=V \\ K=V`` form, ``$PATH`` left as written)."""
    found = {}
    for instruction, rest in dockerfile():
        if instruction == "ENV":
            found.update(pair.split("=", 1) for pair in rest.split())
    return found


def baked_models() -> set[str]:
    """The hub ids the image's build puts into its Hugging Face cache (the MODELS build argument's default)."""
    return set(docker_args()["MODELS"].strip('"').split())


def test_the_image_bakes_its_models_into_a_cache_no_volume_hides():
    steps = dockerfile()
    fetch = next(i for i, (instruction, rest) in enumerate(steps)
                 if instruction == "RUN" and "fetch_models.py" in rest and "${MODELS}" in rest)  # fmt: skip
    env_at = next(
        i for i, (instruction, rest) in enumerate(steps) if instruction == "ENV" and "HF_HOME=" in rest
    )
    assert env_at < fetch, "HF_HOME must be set before the models are fetched (else they land elsewhere)"
    assert baked_models() and all("/" in m for m in baked_models()), baked_models()
    home = docker_env()["HF_HOME"]
    for name in ("kuberay-rayjob.yaml", "kuberay-raycluster.yaml"):
        assert not [d for d in documents(INFRA / name) if d.get("kind") == "PersistentVolumeClaim"], name
        [cluster] = kuberay_clusters(INFRA / name)
        mounts = [m["mountPath"] for t in pod_templates(cluster) for c in t["spec"]["containers"]
                  for m in c.get("volumeMounts") or []]  # fmt: skip
        assert not [m for m in mounts if Path(home).is_relative_to(m)], (name, home, mounts)
        assert not [v for t in pod_templates(cluster) for v in t["spec"].get("volumes") or []
                    if "persistentVolumeClaim" in v], name  # fmt: skip


@pytest.mark.parametrize("name", ["kuberay-rayjob.yaml", "kuberay-raycluster.yaml", "Dockerfile"])
def test_the_models_the_image_runs_are_baked_into_it(name):
    """Every embed/fold the image runs (the RayJob, the examples, a default --model included) names a model
    its build caches: a run refuses a hub id its driver's cache lacks."""
    from esm_core import registry

    runs = compute_args(INFRA / name)
    assert runs, name
    for args in runs:
        assert registry.resolve(args.model) in baked_models(), (name, args.model, baked_models())


def fetched_by_setup(autoscaler: dict) -> set[str]:
    """The hub ids the autoscaler's setup commands put into each node's cache with fetch_models.py."""
    found = set()
    for command in autoscaler["setup_commands"]:
        tokens = shlex.split(command)
        scripts = [i for i, t in enumerate(tokens) if t.endswith("fetch_models.py")]
        for i in scripts:
            found |= set(tokens[i + 1 :])
    return found


def test_ray_cluster_nodes_reach_s3_and_hold_the_models_they_run():
    from esm_core import registry

    autoscaler = documents(INFRA / "ray-cluster.yaml")[0]
    profiles = {name: t["node_config"].get("IamInstanceProfile") for name, t in autoscaler["available_node_types"].items()}  # fmt: skip
    assert all(profiles.values()), f"every node type needs S3 access (an instance profile): {profiles}"
    script = next(dst for dst, src in autoscaler["file_mounts"].items() if src == "infra/fetch_models.py")
    assert any(script in c for c in autoscaler["setup_commands"]), autoscaler["setup_commands"]
    fetched = fetched_by_setup(autoscaler)
    for args in compute_args(INFRA / "ray-cluster.yaml"):
        assert registry.resolve(args.model) in fetched, (args.model, fetched)


@pytest.mark.parametrize("name", ["kuberay-rayjob.yaml", "kuberay-raycluster.yaml"])
def test_kuberay_clusters_have_gpu_workers_and_the_pinned_image(name):
    path = INFRA / name
    [cluster] = kuberay_clusters(path)
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in cluster["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]]  # fmt: skip
    assert gpus and all(int(g) >= 1 for g in gpus), gpus
    assert cluster["rayVersion"] == docker_pins()["ray"]
    images = {c["image"] for t in pod_templates(cluster) for c in t["spec"]["containers"]}
    assert images == {f"proteoflow:{PROJECT['version']}"}, images


# ---------------------------------------------------------------------------------------------- fetch_models


def fetch_models():
    spec = importlib.util.spec_from_file_location("fetch_models", INFRA / "fetch_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fetch_models_picks_the_weights_proteoflow_reads():
    from esm_core import sources

    fm = fetch_models()
    assert fm.WEIGHT_NAMES == sources.WEIGHT_NAMES and fm.CONFIG_NAME == sources.CONFIG_NAME
    both = ["config.json", "pytorch_model.bin", "model.safetensors", "tf_model.h5", "vocab.txt"]
    assert fm.weights_name(both) == "model.safetensors"
    assert fm.weights_name(["config.json", "pytorch_model.bin", "tf_model.h5"]) == "pytorch_model.bin"
    with pytest.raises(ValueError, match="no weights"):
        fm.weights_name(["config.json", "tf_model.h5", "flax_model.msgpack"])


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_fetched_models_resolve_from_the_cache_offline(sharded, tmp_path, monkeypatch):
    """What fetch_models downloads (into a Hugging Face cache laid out as the hub's client lays it out) is a
    complete checkpoint for proteoflow's own resolver, and nothing more: a hub whose repository also holds
    TensorFlow and PyTorch copies gives only the config and the safetensors weights (and their shards)."""
    from huggingface_hub import constants

    from esm_core import sources

    fm = fetch_models()
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo, revision = "facebook/esm2_t6_8M_UR50D", "0123456789abcdef0123456789abcdef01234567"
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.dumps({"weight_map": {"a": shards[0], "b": shards[1], "c": shards[0]}})
    hub = {"config.json": '{"model_type": "esm"}', "pytorch_model.bin": "bin", "tf_model.h5": "h5",
           **({"model.safetensors.index.json": index, **dict.fromkeys(shards, "st")} if sharded
              else {"model.safetensors": "st"})}  # fmt: skip
    fetched = []

    def download(repo_id: str, filename: str) -> str:  # the client's layout: refs/main, snapshots/REV/FILE
        folder = cache / f"models--{repo_id.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(revision)
        target = folder / "snapshots" / revision / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(hub[filename])
        fetched.append(filename)
        return str(target)

    assert sources.cached_snapshot(repo) is None  # the resolver finds nothing before
    names = fm.fetch(repo, lambda r: list(hub), download)
    assert sorted(names) == sorted(fetched)
    assert "pytorch_model.bin" not in fetched and "tf_model.h5" not in fetched
    source = sources.resolve_source("esm2_t6_8M_UR50D")  # the short name a run is given
    assert source.is_local and source.revision == revision
    read = {p.name for p in sources.checkpoint_files(source)}
    assert read == set(fetched), (read, fetched)


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


def readme_section_commands(title: str) -> list[str]:
    """The shell lines of the ```sh blocks of one README section (continuations and quoted newlines joined,
    trailing comments dropped)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n{title}\n")
    level = title.split(" ", 1)[0]
    end = min((i for i in (text.find(f"\n{level} ", start + 1), text.find("\n## ", start + 1)) if i > 0),
              default=len(text))  # fmt: skip
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text[start:end], re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        joined = re.sub(r"\n\s{8,}", " ", joined)  # a quoted SQL continued on an indented line
        lines += [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]
    return [line for line in lines if not line.startswith("#")]


@pytest.mark.parametrize("title", ["## Running on a cluster", "### Stores on object storage"])
def test_readme_cluster_and_object_store_commands_are_accepted_by_the_cli(title):
    argvs = [argv for line in readme_section_commands(title) for argv in proteoflow_argvs(line)]
    assert argvs, title
    for argv in argvs:
        args = parse(argv)
        if args.command in ("embed", "fold", "submit", "sql", "runs", "check", "report"):
            assert args.store.startswith("s3://"), shlex.join(argv)
