"""Which checkpoint a run resumes from: the newest one that is complete and whose files are whole.

A checkpoint killed mid-save has no ``trainer_state.json`` (the Trainer writes it last). One whose
files were damaged afterwards (a full disk, a copy cut short) has it, and used to stop the resume
with a traceback naming no file. :func:`checkpoint_problem` checks every file cheaply without
loading anything: JSON files parse, ``.safetensors`` files are as long as their header says, and
``torch.save`` files (``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, DeepSpeed's
``global_step*/*.pt``, ``pytorch_model.bin``) have their zip directory (written at the very end).
:func:`set_aside` renames a damaged checkpoint to ``corrupt-checkpoint-N`` (kept for inspection,
out of the Trainer's ``checkpoint-*`` rotation) so the run resumes from the one before.
"""

from __future__ import annotations

import json
import logging
import struct
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (naming the file), or None when it looks whole."""
    if not (checkpoint / "trainer_state.json").is_file():
        return "trainer_state.json is missing (the process was killed while saving)"
    if (checkpoint / "checkpoint-is-incomplete.txt").exists():
        return "marked incomplete by the Trainer"
    for f in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        why = _file_problem(f)
        if why:
            return f"{f.relative_to(checkpoint)}: {why}"
    return None


def _file_problem(f: Path) -> str | None:
    try:
        if f.suffix == ".json":
            json.loads(f.read_bytes())
        elif f.suffix == ".safetensors":
            with open(f, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    return "truncated (no safetensors header)"
                (n,) = struct.unpack("<Q", head)
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if f.stat().st_size < 8 + n + end:
                return f"truncated ({f.stat().st_size:,} bytes, the header describes {8 + n + end:,})"
        elif f.suffix in _TORCH_SUFFIXES and not zipfile.is_zipfile(f):
            return "truncated or not a torch.save file (its zip directory is missing)"
    except (ValueError, KeyError, TypeError, IndexError, struct.error) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    except OSError as e:
        return f"unreadable ({e})"
    return None


def newest_loadable_checkpoint(checkpoints: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """``(newest checkpoint-N that passes checkpoint_problem, [(newer damaged checkpoint, why), ...])``.

    Checkpoints without ``trainer_state.json`` (killed mid-save) are neither: the caller removes them.
    """
    if not checkpoints.is_dir():
        return None, []
    numbered = []
    for d in checkpoints.glob("checkpoint-*"):
        suffix = d.name.split("-", 1)[1]
        if d.is_dir() and suffix.isdigit() and (d / "trainer_state.json").exists():
            numbered.append((int(suffix), d))
    damaged = []
    for _, d in sorted(numbered, reverse=True):
        why = checkpoint_problem(d)
        if why is None:
            return d, damaged
        damaged.append((d, why))
    return None, damaged


def set_aside(checkpoint: Path, why: str) -> Path:
    """Rename a damaged checkpoint to ``corrupt-checkpoint-N`` (never deleted) and say so."""
    dest = checkpoint.with_name(f"corrupt-{checkpoint.name}")
    k = 1
    while dest.exists():
        k += 1
        dest = checkpoint.with_name(f"corrupt-{checkpoint.name}.{k}")
    checkpoint.rename(dest)
    log.warning("checkpoint %s cannot be resumed from: %s; set aside as %s", checkpoint, why, dest.name)
    return dest
