"""Argument helpers shared by every subcommand module: the store option, value types, the store check."""

from __future__ import annotations

import argparse
import os
import re

from flows.errors import CliError


def store_arg(parser: argparse.ArgumentParser) -> None:
    """Add --store (default $PROTEOFLOW_STORE): every subcommand that touches a store takes it."""
    parser.add_argument(
        "--store",
        default=os.environ.get("PROTEOFLOW_STORE"),
        metavar="STORE",
        help="store: a directory (local or a shared mount) or an object-store URI such as s3://bucket/prefix "
        "(endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...); created by ingest; "
        "default $PROTEOFLOW_STORE",
    )


def check_object_store(root: object) -> None:
    """For a store on object storage: write and delete one small object, so no endpoint, bad credentials or a
    missing permission is one line before any work starts (a local store is checked where it is used)."""
    from storage.objects import ObjectPath, ObjectStoreError, probe_writable

    if isinstance(root, ObjectPath):
        try:
            probe_writable(root)
        except ObjectStoreError as exc:
            raise CliError(f"--store {root}: {exc}") from None


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def run_id_arg(text: str) -> str:
    """Run ids name files and directories: letters, digits, '.', '_' and '-' only."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: use letters, digits, '.', '_' and '-' (at most 128)")
    return text


def require_store(args: argparse.Namespace) -> str:
    """The store named by --store or $PROTEOFLOW_STORE; a one-line error when neither is given."""
    if not args.store:
        raise CliError("no store given: pass --store DIR (or s3://bucket/prefix) or set PROTEOFLOW_STORE")
    return args.store


def engine_budget_args(parser: argparse.ArgumentParser) -> None:
    """--precision and --max-tokens, as every ESM-2-style engine (embed, score-variants, predict) takes them."""
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="auto = fastest safe one for the device (bf16 on CPUs with fast bf16, fp16 on GPUs)",
    )
    parser.add_argument(
        "--max-tokens",
        type=positive_int,
        metavar="N",
        help="token budget per batch, padding included (default: from the device's memory)",
    )
