"""``proteoflow runs`` and ``proteoflow report`` on a store made by real runs: a fold run through the CLI (the
tiny random ESMFold, one record too long for it) and ingest runs before and after it."""

from __future__ import annotations

import base64
import csv
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import ECOLI, MAG, run_cli, write_slice

from esm_core.random_esmfold import write_random_esmfold_checkpoint
from flows.cli import main
from storage.layout import Store
from storage.runs import list_runs

VOID = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "source", "wbr"}


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The ``proteoflow`` entry point in this process (the same code a shell runs, without its start-up)."""
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def folded(tmp_path_factory, ray_cluster) -> tuple[Path, str]:
    """A store holding an ingest run, a fold run, and a later ingest run; and the fold run's id."""
    tmp = tmp_path_factory.mktemp("folded")
    model = write_random_esmfold_checkpoint(tmp / "tiny_esmfold", tiny=True)
    inputs = tmp / "inputs"
    inputs.mkdir()
    write_slice(ECOLI, inputs / "ecoli.fasta", start=11, count=5, step=53, max_length=110)
    (inputs / "long.fasta").write_text(">too_long_for_this_run\n" + "MKV" * 60 + "\n")
    store = tmp / "store"
    result = run_cli("fold", str(inputs), "--store", str(store), "--model", str(model), "--max-length", "150",
                     "--num-recycles", "1", "--workers", "1", "--cpus-per-worker", "1", "--gpus-per-worker", "0",
                     "--ray-address", ray_cluster.address, "--no-progress")  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    later = write_slice(MAG, tmp / "later.faa", start=2, count=3, step=29, max_length=200)
    assert run_cli("ingest", str(later), "--store", str(store)).returncode == 0
    [fold] = list_runs(Store(store), "fold")
    return store, fold.run_id


def test_runs_lists_newest_first_in_every_format(folded, capsys) -> None:
    store, fold_run = folded
    rows = json.loads(cli(capsys, "runs", "--store", str(store), "--format", "json")[1])
    assert [r["kind"] for r in rows] == ["ingest", "fold", "ingest"]
    assert [r["started"] for r in rows] == sorted((r["started"] for r in rows), reverse=True)
    fold = rows[1]
    assert fold["run_id"] == fold_run and fold["status"] == "completed" and fold["model"] == "tiny_esmfold"
    assert fold["sequences"] == 5 and fold["residues_per_s"] > 0 and fold["duration_s"] >= 0
    table = cli(capsys, "runs", "--store", str(store))[1]
    header, rule, *lines = table.splitlines()
    assert header.split()[:3] == ["id", "kind", "status"] and lines[-1] == "(3 rows)"
    assert [line.split()[0] for line in lines[:-1]] == [r["run_id"] for r in rows]
    parsed = list(
        csv.DictReader(io.StringIO(cli(capsys, "runs", "--store", str(store), "--format", "csv")[1]))
    )
    assert [r["run_id"] for r in parsed] == [r["run_id"] for r in rows]
    only = json.loads(
        cli(capsys, "runs", "--store", str(store), "--status", "partial", "--format", "json")[1]
    )
    assert only == []


def test_runs_shows_one_run_in_full(folded, capsys) -> None:
    store, fold_run = folded
    code, out, _ = cli(capsys, "runs", fold_run, "--store", str(store))
    assert code == 0
    fields = dict(line.split(None, 1) for line in out.splitlines() if " " in line.strip())
    assert fields["status"].strip() == "completed" and fields["kind"].strip() == "fold"
    assert "RANDOM WEIGHTS" in fields["model"] and "5 planned" in fields["sequences"]
    full = json.loads(cli(capsys, "runs", fold_run, "--store", str(store), "--format", "json")[1])
    assert full["counts"]["sequences"] == 5 and full["params"]["ingest_run"].startswith("ingest-")
    code, _, err = cli(capsys, "runs", "fold-0000", "--store", str(store))
    assert code == 2 and err.count("\n") == 1 and "no run fold-0000" in err


class _Document(HTMLParser):
    """Checks that tags nest and close, and collects images, links and headings."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.errors: list[str] = []
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.headings: list[str] = []
        self._heading: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values)
        for name in ("href", "src"):
            if values.get(name) and tag != "img":
                self.links.append(values[name])
        if tag not in VOID:
            self.open.append(tag)
        if tag in ("h1", "h2"):
            self._heading = ""

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1:] or 'nothing'}")
        else:
            self.open.pop()
        if tag in ("h1", "h2") and self._heading is not None:
            self.headings.append(self._heading.strip())
            self._heading = None

    def handle_data(self, data: str) -> None:
        if self._heading is not None:
            self._heading += data


def test_report_is_one_offline_html_file_with_the_fold_plots(folded, tmp_path) -> None:
    store, fold_run = folded
    out = tmp_path / "fold.html"
    result = run_cli("report", fold_run, "--store", str(store), "--out", str(out))  # as a shell runs it
    assert result.returncode == 0, result.stderr.decode()
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>")
    document = _Document()
    document.feed(text)
    document.close()
    assert not document.errors and not document.open, (document.errors, document.open)
    captions = [image["alt"] for image in document.images]
    assert captions == [
        "pLDDT distribution",
        "pTM distribution",
        "mean pLDDT against length",
        "shard timeline",
    ]
    for image in document.images:
        assert image["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(image["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not document.links  # nothing fetched from anywhere: it opens offline
    assert {"Best structures", "Worst structures", "Shards", "Failures and rejections", "Parameters",
            "Versions"} <= set(document.headings)  # fmt: skip
    assert "too_long_for_this_run" in text and "too_long" in text  # the rejected record, with its rule
    assert "RANDOM WEIGHTS" in text


def test_report_of_an_unknown_run_is_one_line(folded, tmp_path, capsys) -> None:
    store, _ = folded
    code, _, err = cli(
        capsys, "report", "fold-0000", "--store", str(store), "--out", str(tmp_path / "x.html")
    )
    assert code == 2 and err.count("\n") == 1
    assert not (tmp_path / "x.html").exists()
