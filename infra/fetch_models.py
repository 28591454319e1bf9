"""Put Hugging Face models into the local Hugging Face cache the way proteoflow reads them, for machines with no
shared model volume: infra/Dockerfile bakes them into the image, infra/ray-cluster.yaml runs it on every node.

    python infra/fetch_models.py facebook/esm2_t33_650M_UR50D facebook/esmfold_v1

A compute run refuses a hub id that is not in the cache of the machine running its driver, and every worker
loads the model from its own machine, so each node needs the model before a run. Only what a run reads is
downloaded: ``config.json`` and the first weight file of esm_core.sources.WEIGHT_NAMES the repository has
(``model.safetensors``, else ``pytorch_model.bin``, an index with its shards), not the TensorFlow or Flax
copies. Arguments are hub ids (``proteoflow models`` lists the known names' ids). Needs only huggingface_hub,
so it runs before proteoflow is installed; the cache is ``$HF_HOME/hub``, so run it as the user, and with the
HF_HOME, that the runs will have.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

CONFIG_NAME = "config.json"
# esm_core.sources.WEIGHT_NAMES (tests/test_infra.py checks they agree): the files transformers reads, in order.
WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def weights_name(files: Iterable[str]) -> str:
    """The weight file (or index) a run reads from a repository holding ``files``."""
    present = set(files)
    for name in WEIGHT_NAMES:
        if name in present:
            return name
    raise ValueError(f"no weights ({' or '.join(WEIGHT_NAMES[::2])}) at the top of the repository")


def fetch(
    repo: str, list_files: Callable[[str], list[str]], download: Callable[[str, str], str]
) -> list[str]:
    """Download ``repo``'s config and weights with ``download(repo, filename) -> local path``; the file names."""
    name = weights_name(list_files(repo))
    names = [CONFIG_NAME, name]
    download(repo, CONFIG_NAME)
    index = download(repo, name)
    if name.endswith(".index.json"):
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        for shard in shards:
            download(repo, shard)
        names += shards
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("repos", nargs="+", metavar="HUB_ID", help="e.g. facebook/esm2_t33_650M_UR50D")
    args = parser.parse_args(argv)
    from huggingface_hub import hf_hub_download, list_repo_files

    for repo in args.repos:
        if "/" not in repo:
            parser.error(f"{repo}: give the hub id (e.g. facebook/{repo}); `proteoflow models` lists them")
        try:
            names = fetch(repo, list_repo_files, lambda r, f: hf_hub_download(r, f))
        except Exception as exc:  # noqa: BLE001 - HTTP, connection, missing weights: one line each
            print(f"fetch_models: {repo}: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 1
        print(f"{repo}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
