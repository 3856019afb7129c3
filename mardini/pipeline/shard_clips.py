"""Shard clips as ``sample.py --list`` lines: ``SHARD.tar#KEY`` names one clip of a local shard.

A list of such lines is what ``sample.py --list`` samples at scale (seeded, sliced, resumed, skipped clip by clip:
:mod:`mardini.pipeline.many`); this module writes it from a shard split and reads one clip by its key without
reading the rest of its shard:

    python -m mardini.pipeline.shard_clips data/shards/synthetic/val > clips.txt

lists every clip of the split, the shards sorted (:func:`~mardini.data.sharding.list_shards`) and each shard's clips
in tar order, which is the order ``sample.py --shards DIR --clips N`` reads them in: clip i of the list is the
stream's clip i (while no clip before it is unreadable, which the stream drops and the list keeps, skipped).

A shard's members are grouped into clips as webdataset groups them (``__key__``: the member name up to the first dot
of its base name; consecutive members of one key form a clip). Its member index (names, offsets and sizes, read from
the tar headers alone) is kept for the last few shards read, so memory does not grow with the split.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shlex
import sys
import tarfile
from collections.abc import Iterator

from webdataset.tariterators import group_by_keys, meta_prefix, meta_suffix

CLIP_LINE = re.compile(r"(?P<shard>.+\.tar)#(?P<key>.+)")  # SHARD.tar#KEY
SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these members

# key -> {extension: (offset of the data, size)}
Index = dict[str, dict[str, tuple[int, int]]]


def shard_clip(paths: list[str]) -> tuple[str, str] | None:
    """``(shard, key)`` of a list line that names one shard clip (``SHARD.tar#KEY``), else None."""
    m = CLIP_LINE.fullmatch(paths[0]) if len(paths) == 1 else None
    return (m["shard"], m["key"]) if m else None


def clip_line(shard: str, key: str) -> str:
    """The list line of clip ``key`` of ``shard``, quoted for ``shlex`` only where it has to be (spaces, quotes)."""
    text = f"{shard}#{key}"
    return text if shlex.split(text) == [text] else shlex.quote(text)


def _members(tar: tarfile.TarFile, shard: str) -> Iterator[dict]:
    """The regular members webdataset reads, as ``{"fname", "data": (offset, size), "__url__"}`` (headers only)."""
    for info in tar:
        name = info.name
        if not info.isreg() or ("/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix)):
            continue
        if SKIP_META.match(name):
            continue
        yield {"fname": name, "data": (info.offset_data, info.size), "__url__": shard}


@functools.lru_cache(maxsize=4)
def _index(shard: str, mtime_ns: int, size: int) -> Index:
    """The clips of ``shard`` (its state ``mtime_ns``, ``size``: a rewritten shard is indexed again), in tar order;
    a key met again later keeps its first clip."""
    index: Index = {}
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for sample in group_by_keys(_members(tar, shard)):
                key = sample.pop("__key__")
                sample.pop("__url__")
                index.setdefault(key, sample)
    except (tarfile.TarError, ValueError) as e:  # ValueError: a member name twice in one clip
        raise ValueError(f"shard {shard} could not be read as a tar archive of clips ({e}); rebuild it "
                         "(data/README.md)") from e
    return index


def shard_index(shard: str) -> Index:
    """``{key: {extension: (offset, size)}}`` of a local shard's clips, in tar order; a missing shard is a
    FileNotFoundError, one that is no tar archive a ValueError."""
    if not os.path.isfile(shard):
        raise FileNotFoundError(f"shard {shard} does not exist (a list line SHARD.tar#KEY names a local shard file)")
    stat = os.stat(shard)
    return _index(shard, stat.st_mtime_ns, stat.st_size)


def read_sample(shard: str, key: str) -> dict:
    """The raw sample ``key`` of ``shard`` as the clip stream reads it (``{"__key__", "__url__", ext: bytes}``),
    read from its members' bytes alone; a key the shard does not hold is a ValueError."""
    members = shard_index(shard).get(key)
    if members is None:
        raise ValueError(f"shard {shard} holds no clip {key!r}; list its clips with python -m "
                         "mardini.pipeline.shard_clips SHARDS")
    sample = {"__key__": key, "__url__": shard}
    with open(shard, "rb") as f:
        for ext, (offset, size) in members.items():
            f.seek(offset)
            sample[ext] = f.read(size)
    return sample


def clip_lines(shards: str) -> Iterator[str]:
    """The list lines of every clip of ``shards`` (a directory, pattern or glob: ``--shards``), sorted shards, then
    each shard's clips in tar order."""
    from mardini.data.sharding import list_shards

    for shard in list_shards(shards):
        for key in shard_index(shard):
            yield clip_line(shard, key)


def main(argv: list[str] | None = None, prog: str = "python -m mardini.pipeline.shard_clips") -> int:
    """Write the list of a shard split's clips to stdout (or ``--out``), one ``SHARD.tar#KEY`` line each."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="a shard split: a directory, a brace pattern or a glob of .tar files")
    p.add_argument("--out", help="the list file to write (default: stdout)")
    a = p.parse_args(argv)
    lines = list(clip_lines(a.shards))
    text = "".join(f"{line}\n" for line in lines)
    if a.out:
        from mardini.data.sharding import write_text_atomic

        write_text_atomic(a.out, text)
    else:
        sys.stdout.write(text)
    print(f"[shard_clips] {len(lines)} clip(s) of {a.shards}" + (f" listed in {a.out}" if a.out else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":  # a missing or unreadable shard: one line naming it, no traceback
    from mardini.pipeline.shard_clips import main as _main
    from mardini.user_errors import run_module as _run_module

    raise SystemExit(_run_module("mardini.pipeline.shard_clips", _main))
