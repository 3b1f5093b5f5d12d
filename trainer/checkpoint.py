"""Checkpoints written atomically, the last K kept, loaded with ``weights_only=True``.

Layout: ``<dir>/step-000000100/`` holding ``state.pt`` (everything ``torch.load`` needs:
tensors and plain containers only) and ``manifest.json`` (what a person or a tool reads:
step, offsets, the batches behind the checkpoint, the hash chain, the state file's
SHA-256). A checkpoint is written into a hidden temporary folder, each file flushed and
fsynced, then the folder is renamed into place — the rename is the commit, so a crash in
the middle leaves either the old set of checkpoints or the new one, never a half-written
one under a final name. Loading verifies the SHA-256 before unpickling and falls back to an
older checkpoint if the newest cannot be read.

Lineage: ``chain`` is a SHA-256 hash chain over every batch ever trained, in order
(``chain = sha256(chain || batch_id || content_digest)``), so two checkpoints with the
same chain at the same step were trained on exactly the same batches; ``batches`` lists the
ids trained since the previous checkpoint.

Beside the checkpoints, ``start-rank<N>.json`` (``StartRecord``) holds where the run began
reading each partition, written before its first batch: what a restart before the first
checkpoint resumes from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.errors import CheckpointError

log = logging.getLogger("sluice.trainer.checkpoint")

FORMAT = 1
GENESIS = "0" * 64
_NAME = re.compile(r"^step-(\d{9,})$")


def chain_hash(previous: str, batch_id: str, content_digest: str) -> str:
    """The next link of the lineage chain."""
    return hashlib.sha256(f"{previous}\n{batch_id}\n{content_digest}".encode()).hexdigest()


class Lineage:
    """The batches trained so far: a running hash chain and the ids since the last save."""

    def __init__(self, chain: str = GENESIS, count: int = 0) -> None:
        self.chain, self.count = chain, count
        self.since_save: list[str] = []

    def add(self, batch_id: str, content_digest: str) -> None:
        """Record one trained batch."""
        self.chain = chain_hash(self.chain, batch_id, content_digest)
        self.count += 1
        self.since_save.append(batch_id)

    def extend(self, batches: Iterable[tuple[str, str]]) -> None:
        """Record several, in order."""
        for batch_id, digest in batches:
            self.add(batch_id, digest)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (``batches``: ids since the previous checkpoint)."""
        return {"chain": self.chain, "count": self.count, "batches": list(self.since_save)}

    def saved(self) -> None:
        """A checkpoint now names ``since_save``: start a new list."""
        self.since_save = []


@dataclass(frozen=True, slots=True)
class Loaded:
    """A checkpoint read back: its folder, manifest and state."""

    path: Path
    manifest: dict[str, Any]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        """The optimizer steps done when it was written."""
        return int(self.state["step"])


class CheckpointStore:
    """The checkpoints of one run in ``directory``; only one process writes to it."""

    def __init__(self, directory: Path, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def checkpoints(self) -> list[Path]:
        """Committed checkpoint folders, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and _NAME.match(p.name)]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def save(self, step: int, state: dict[str, Any], manifest: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically, then drop all but the newest ``keep``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        final = self.directory / f"step-{step:09d}"
        tmp = self.directory / f".tmp-{final.name}-{os.getpid()}"
        try:
            tmp.mkdir()
            state_path = tmp / "state.pt"
            with state_path.open("wb") as fh:
                torch.save({**state, "format": FORMAT}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            manifest = {
                **manifest, "format": FORMAT, "step": step, "sha256": _sha256(state_path),
            }
            with (tmp / "manifest.json").open("w") as fh:
                json.dump(manifest, fh, indent=2, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
            if final.exists():
                # Retrained up to a step saved before a crash: replace it. The old one is
                # renamed away first so the final name never holds a mix of both.
                old = self.directory / f".old-{final.name}-{os.getpid()}"
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
            _fsync_dir(self.directory)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"cannot write checkpoint {final}: {exc}") from exc
        self._prune()
        return final

    def load_latest(self, map_location: str | torch.device = "cpu") -> Loaded | None:
        """The newest checkpoint that verifies and loads; ``None`` when there is none.

        A checkpoint that fails (bad hash, unreadable) is logged and skipped; if every one
        fails, ``CheckpointError`` — starting over silently would retrain from scratch.
        """
        found = self.checkpoints()
        for path in reversed(found):
            try:
                return self.load(path, map_location)
            except CheckpointError as exc:
                log.warning("skipping checkpoint %s: %s", path, exc)
        if found:
            raise CheckpointError(f"none of the {len(found)} checkpoints in {self.directory} loads")
        return None

    @staticmethod
    def load(path: Path, map_location: str | torch.device = "cpu") -> Loaded:
        """Read and verify one checkpoint folder."""
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            digest = _sha256(path / "state.pt")
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
        if digest != manifest.get("sha256"):
            raise CheckpointError(f"{path}: state.pt does not match its manifest's SHA-256")
        try:
            state = torch.load(path / "state.pt", map_location=map_location, weights_only=True)
        except Exception as exc:  # any unpickling failure means a bad checkpoint
            raise CheckpointError(f"{path}: cannot load state.pt: {exc}") from exc
        if state.get("format") != FORMAT:
            raise CheckpointError(f"{path}: format {state.get('format')}, expected {FORMAT}")
        return Loaded(path, manifest, state)

    def _prune(self) -> None:
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        # Temporary folders of a writer that crashed: never committed, never loaded.
        for p in self.directory.iterdir():
            if p.name.startswith((".tmp-step-", ".old-step-")):
                shutil.rmtree(p, ignore_errors=True)


class StartRecord:
    """Where a run began reading each partition, kept beside its checkpoints.

    Before the first checkpoint nothing else says where the run started, and resolving
    "earliest" or "latest" again after a crash gives another answer (the log is trimmed
    and written meanwhile): a restart would skip batches, or re-read ones the broker has
    since dropped. So the source records a partition's start the moment it resolves it,
    before reading from it. Each rank writes its own file (``start-rank<N>.json``); every
    rank's are read, so a restart with another number of ranks still finds them all.
    """

    def __init__(self, directory: Path, rank: int = 0) -> None:
        self.directory = Path(directory)
        self.path = self.directory / f"start-rank{rank}.json"

    def load(self, topic: str) -> dict[int, int]:
        """The recorded start offset of each partition of ``topic`` (every rank's)."""
        offsets: dict[int, int] = {}
        paths = sorted(self.directory.glob("start-rank*.json")) if self.directory.is_dir() else []
        for path in paths:
            try:
                record = json.loads(path.read_text())
                if record.get("topic") != topic:
                    continue
                found = {int(p): int(o) for p, o in record["offsets"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                # Ignoring it would re-resolve the start: refuse rather than skip data.
                raise CheckpointError(f"cannot read the start record {path}: {exc}") from exc
            for partition, offset in found.items():
                offsets[partition] = min(offset, offsets.get(partition, offset))
        return offsets

    def add(self, topic: str, offsets: dict[int, int]) -> None:
        """Record ``offsets`` in this rank's file (atomically, durably)."""
        try:
            record = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read the start record {self.path}: {exc}") from exc
        kept = record.get("offsets", {}) if record.get("topic") == topic else {}
        merged = {**kept, **{str(p): o for p, o in offsets.items()}}
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tmp.open("w") as fh:
                json.dump({"topic": topic, "offsets": merged}, fh, indent=2, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.rename(self.path)
            _fsync_dir(self.directory)
        except OSError as exc:
            raise CheckpointError(f"cannot write the start record {self.path}: {exc}") from exc


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
