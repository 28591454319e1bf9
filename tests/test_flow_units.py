"""Pure pieces of the flows: shard planning, poison isolation; and the small CLI commands."""

from __future__ import annotations

import json

from conftest import run_cli

from flows.planning import MAX_SHARD_SEQUENCES, cut_shards, embedding_cost, folding_cost


def test_shards_cover_every_sequence_once_longest_first_and_balanced() -> None:
    lengths = [50 + (i * 37) % 1400 for i in range(3000)]
    shards = cut_shards(lengths, embedding_cost, workers=4)
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    costs = [sum(embedding_cost(lengths[i]) for i in shard) for shard in shards]
    assert len(shards) >= 16 and max(costs) <= 1.3 * (sum(costs) / len(costs))
    assert all(len(s) <= MAX_SHARD_SEQUENCES for s in shards)


def test_folding_cost_isolates_long_chains() -> None:
    lengths = [2000] + [100] * 200
    shards = cut_shards(lengths, folding_cost, workers=2)
    assert shards[0] == [0]  # the cubic cost of one long chain fills a shard on its own


def test_empty_plan() -> None:
    assert cut_shards([], embedding_cost, workers=3) == []


def test_models_lists_known_names() -> None:
    result = run_cli("models", "--format", "json")
    assert result.returncode == 0
    names = {row["name"] for row in json.loads(result.stdout)}
    assert {
        "esm2_t6_8M_UR50D",
        "esm2_t48_15B_UR50D",
        "esm1b_t33_650M_UR50S",
        "esm1v_t33_650M_UR90S_5",
    } <= names


def test_help_teaches() -> None:
    for command in ("embed", "fold", "ingest", "sql", "export-structures"):
        result = run_cli(command, "--help")
        assert result.returncode == 0 and b"--store" in result.stdout
    assert b"example" in run_cli("embed", "--help").stdout


def test_isolate_failures_keeps_results_and_pins_the_poison() -> None:
    from types import SimpleNamespace

    from flows.engines import isolate_failures

    calls = []

    def run(items):
        calls.append(len(items))
        for key, seq in items:
            if seq == "POISON":
                raise RuntimeError("bad residue")
            yield SimpleNamespace(key=key)

    items = [(f"h{i}", "POISON" if i == 5 else "MKV") for i in range(12)]
    found, errors = isolate_failures(run, items)
    assert sorted(r.key for r in found) == sorted(k for k, _ in items if k != "h5")
    assert errors == [("h5", "RuntimeError: bad residue")]
    assert sum(calls) < 2 * len(items)  # finished results are kept, not recomputed


def test_every_option_of_every_command_has_help_text() -> None:
    import argparse

    from flows.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {' '.join(action.option_strings) or action.dest}"
        for name, command in sub.choices.items()
        for action in command._actions
        if not action.help and not isinstance(action, argparse._HelpAction)
    ]
    assert len(sub.choices) >= 6 and not missing, missing


def test_export_names_are_portable() -> None:
    from flows.export import safe_file_stem

    assert safe_file_stem("sp|P0A7V8|RS4_ECOLI", "x") == "sp_P0A7V8_RS4_ECOLI"
    assert safe_file_stem("CON", "x") == "CON_" and safe_file_stem("com1.2", "x") == "com1.2_"
    assert safe_file_stem("console", "x") == "console"
    assert safe_file_stem("..//", "record_7") == "record_7"
