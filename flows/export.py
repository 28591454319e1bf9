"""Write stored structures as PDB / mmCIF files named after their records, ready for PyMOL or ChimeraX."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flows.errors import CliError
from storage.catalog import open_catalog
from storage.layout import safe_name, write_bytes_atomic

MAX_NAME = 100
# Names Windows reserves for devices, with any extension: such a file cannot be created there.
RESERVED = {"CON", "PRN", "AUX", "NUL"} | {f"{d}{i}" for d in ("COM", "LPT") for i in range(1, 10)}


@dataclass(frozen=True)
class Exported:
    """What an export wrote: how many files, where, in which format."""

    written: int
    out: str
    fmt: str


def safe_file_stem(record_id: str, fallback: str) -> str:
    """A portable file name from a FASTA id: ``sp|P0A7V8|RS4_ECOLI`` -> ``sp_P0A7V8_RS4_ECOLI``; never a
    Windows device name (``CON`` -> ``CON_``)."""
    stem = safe_name(record_id, MAX_NAME) or fallback
    return f"{stem}_" if stem.split(".")[0].upper() in RESERVED else stem


def export_structures(
    store: str | Path,
    out: str | Path,
    fmt: str = "pdb",
    min_plddt: float | None = None,
    run_id: str | None = None,
    model: str | None = None,
) -> Exported:
    """One file per member record with a structure passing the filters.

    A record id seen twice with different structures (or two ids that clean to the same name, ignoring case,
    as macOS and Windows file systems do) gets its run and record index appended: no file overwrites another.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out}: is a file, not a directory")
    con = open_catalog(store)
    where, params = ["true"], []
    if min_plddt is not None:
        where.append("s.mean_plddt >= ?")
        params.append(min_plddt)
    if run_id:
        where.append("(m.run_id = ? OR s.run_id = ?)")
        params += [run_id, run_id]
    if model:
        where.append("s.model = ?")
        params.append(model)
    column = "s.pdb" if fmt == "pdb" else "s.cif"
    # The same record (id and sequence) ingested by several runs is written once per model.
    rows = con.execute(
        f"SELECT m.seq_id, m.run_id, m.record_index, {column} FROM structures s JOIN members m USING (seq_hash) "
        f"WHERE {' AND '.join(where)} "
        "QUALIFY row_number() OVER (PARTITION BY m.seq_id, s.seq_hash, s.model ORDER BY m.run_id, m.record_index) = 1 "
        "ORDER BY m.run_id, m.record_index",
        params,
    ).fetchall()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"--out {out}: cannot create the directory ({exc.strerror})") from None
    used: set[str] = set()
    for seq_id, member_run, index, text in rows:
        base = safe_file_stem(seq_id, f"record_{index}")
        stem, n = base, 1
        while stem.lower() in used:  # same id from another run or model, or two ids that clean alike
            stem = f"{base}-{member_run}-{index}" + (f"-{n}" if n > 1 else "")
            n += 1
        used.add(stem.lower())
        write_bytes_atomic(out / f"{stem}.{fmt}", text.encode())
    return Exported(len(rows), str(out), fmt)
