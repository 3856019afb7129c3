"""Reading MarDini checkpoints safely: kind checks with clear errors, ``weights_only`` loading."""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch

from mardini.diffusion.anchor import FrameAnchor

KINDS = ("planning", "generation", "joint")
# True while train.py builds the model of a fit that resumes: its starting checkpoints are not read (MarDiniCLI)
RESUMING: ContextVar[bool] = ContextVar("mardini_resuming", default=False)
EMA_PREFIX = "ema.module."  # state-dict keys of the EMA networks (timm ModelEmaV3 in the module's ``ema``)
WHAT_KIND_HOLDS = {"planning": ("planner",), "generation": ("generator",), "joint": ("planner", "generator")}
# (stage kind, checkpoint kind) -> the model argument through which that stage starts from that kind of checkpoint
STARTS_FROM = {("planning", "planning"): "init_from", ("generation", "generation"): "init_from",
               ("joint", "joint"): "init_from", ("joint", "planning"): "planner_ckpt",
               ("joint", "generation"): "generator_ckpt"}
STAGE_CLASSES = {"planning": "mardini.lit.PlanningModule", "generation": "mardini.lit.GenerationModule",
                 "joint": "mardini.lit.MarDiniModule"}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``, memory-mapped, with errors that say what went wrong and what to do."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(directory_message(path))
    if not path.is_file():
        raise FileNotFoundError(missing_message(path))
    try:
        return _load(path)
    except FileNotFoundError:  # deleted since (a fit deletes its older checkpoints): not a file that is unreadable
        raise FileNotFoundError(missing_message(path)) from None
    except pickle.UnpicklingError as e:  # PyTorch's own message advises weights_only=False: unsafe, never relayed
        raise ValueError(_unpickling_message(path, e)) from e
    except Exception as e:  # noqa: BLE001 - re-raised with context
        detail = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise ValueError(
            f"{path} could not be read as a MarDini checkpoint ({detail}). "
            "It may be truncated (an interrupted copy) or not a torch checkpoint (a config or another file?)."
        ) from e


def missing_message(path: Path) -> str:
    """That the checkpoint at ``path`` does not exist, and what to check."""
    return f"checkpoint {path} does not exist; check the path (or the stage that writes it)"


def _load(path: Path) -> dict[str, Any]:
    """Memory-mapped where the format allows (torch's zip format, what Lightning writes): only the tensors a stage
    reads are paged in (not a joint checkpoint's optimiser state), and the ranks of a node share the page cache."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap can only be used" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # torch's legacy format


def directory_message(path: Path) -> str:
    """What to pass instead of a folder: its ``*.ckpt`` files, else those of its ``checkpoints/`` folder (train.py's
    stage folder), ``last.ckpt`` first."""
    where, found = "it", _checkpoint_files(path)
    if not found and _checkpoint_files(path / "checkpoints"):
        where, found = "its checkpoints/ folder", _checkpoint_files(path / "checkpoints")
    example = found[0] if found else path / "last.ckpt"
    held = ", ".join(p.name for p in found[:5]) + (" ..." if len(found) > 5 else "") if found else "no *.ckpt file"
    return f"checkpoint {path} is a directory; pass the checkpoint file inside it, e.g. {example} ({where} holds {held})"


def _checkpoint_files(folder: Path) -> list[Path]:
    """The ``*.ckpt`` files of ``folder`` (none when it is no folder), ``last.ckpt`` first."""
    return sorted(folder.glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", p.name))


def _unpickling_message(path: Path, err: pickle.UnpicklingError) -> str:
    """A file that is no torch checkpoint, or one holding objects a weights-only load refuses (named)."""
    refused = re.search(r"Unsupported global: GLOBAL (\S+)|(\S+) was not an allowed global", str(err))
    if refused:
        return (f"{path} holds a Python object ({refused.group(1) or refused.group(2)}) that a weights-only load "
                "refuses: it was not written by train.py; use a checkpoint train.py wrote")
    return f"{path} is not a torch checkpoint (a config or another file?); pass the .ckpt file train.py wrote"


def check_metadata(
    checkpoint: dict[str, Any], kinds: tuple[str, ...], path: str | Path, size: str | None = None,
    exact_size: bool = True, networks: tuple[str, ...] = ("planner", "generator"),
    starts: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Return ``checkpoint['mardini']`` if its kind is one of ``kinds`` (and its size ``size``); raise otherwise.

    ``exact_size=False`` (a stage starting from another stage's networks) also accepts a size with the same weights
    of ``networks``, the ones it takes (:func:`mardini.models.registry.same_weights`: the ST and T variants of a
    paper size; MarDini-S's generator for MarDini-L's, one shape). ``starts``: ``(stage kind, the setting that
    named the file)``, e.g. ``("joint", "init_from")``; a checkpoint of another kind is then refused naming the
    setting that takes it (:func:`start_fix`)."""
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"{path} is not a MarDini checkpoint (it holds a {type(checkpoint).__name__}, not the dict of weights and "
            f"'mardini' metadata train.py writes); expected a {' or '.join(kinds)} checkpoint written by train.py"
        )
    meta = checkpoint.get("mardini")
    if not isinstance(meta, dict) or "kind" not in meta:
        raise ValueError(
            f"{path} is not a MarDini checkpoint (no 'mardini' metadata); expected a {' or '.join(kinds)} "
            "checkpoint written by train.py"
        )
    from mardini.lit.base import CHECKPOINT_FORMAT

    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(format_message(meta, path))
    if meta["kind"] not in kinds:
        fix = f"; {start_fix(meta['kind'], *starts)}" if starts is not None else ""
        raise ValueError(
            f"{path} is a '{meta['kind']}' checkpoint (size {meta.get('size')}, networks {meta.get('networks')}), "
            f"but a {' or '.join(repr(k) for k in kinds)} checkpoint is expected here{fix}"
        )
    from mardini.models.registry import same_weights

    if size is not None and meta.get("size") != size and (
            exact_size or not same_weights(meta.get("size"), size, networks)):
        raise ValueError(
            f"{path} is a '{meta['kind']}' checkpoint of model size {meta.get('size')!r}, this model is size "
            f"{size!r}; set model.size={meta.get('size')!r} or use a checkpoint of size {size!r}"
        )
    return meta


def format_message(meta: dict[str, Any], path: str | Path) -> str:
    """Why a checkpoint of another ``mardini.format`` than :data:`CHECKPOINT_FORMAT` is refused: which format, the
    code that wrote it (recorded since 2026-12-07) and whether that code is newer or older than this one."""
    from mardini import __version__
    from mardini.lit.base import CHECKPOINT_FORMAT
    from mardini.lit.code_record import describe

    theirs, code = meta.get("format"), meta.get("code") or {}
    newer = isinstance(theirs, int) and theirs > CHECKPOINT_FORMAT
    writer = f"mardini {code.get('mardini') or '(version unrecorded)'}, {describe(code)}"
    if newer:
        fix = "update this checkout (git pull) to the code that wrote it"
    elif code.get("git_commit"):
        fix = f"read it with the code that wrote it (git checkout {code['git_commit']}, or a worktree of it)"
    else:  # nothing says which commit: the history of the format constant does
        fix = ("read it with a commit of this repository from before the checkpoint format became "
               f"{CHECKPOINT_FORMAT} (`git log -S CHECKPOINT_FORMAT -- mardini/lit/base.py` lists when it changed), "
               "or a worktree of it")
    return (f"{path} has checkpoint format {theirs}, this code (mardini {__version__}) reads format "
            f"{CHECKPOINT_FORMAT}: {'newer' if newer else 'other'} code wrote it ({writer}); {fix}")


def start_fix(found: str, stage: str, setting: str) -> str:
    """How a ``stage`` (kind) that was given a ``found`` checkpoint through ``setting`` (``init_from``,
    ``planner_ckpt``, ``generator_ckpt`` or ``--ckpt_path``) starts from it instead: the stage's argument that takes
    that kind (:data:`STARTS_FROM`), else the stage class that does."""
    arg = STARTS_FROM.get((stage, found))
    if arg is None:
        takers = " or ".join(f"a '{s}' stage (model.class_path {STAGE_CLASSES[s]}, model.init_args.{a})"
                             for (s, k), a in STARTS_FROM.items() if k == found)
        takes = " or ".join(f"a '{k}' checkpoint ({a})" for (s, k), a in STARTS_FROM.items() if s == stage)
        return f"a '{found}' checkpoint starts {takers}; this '{stage}' stage starts from {takes}"
    if setting == "--ckpt_path":
        return (f"--ckpt_path resumes a run of this stage (its optimiser, LR schedule and step); to start this stage "
                f"from the checkpoint's weights, pass it as --model.init_args.{arg} with --ckpt_path null")
    if arg == "init_from":
        return "pass it as model.init_args.init_from (with planner_ckpt and generator_ckpt null)"
    pair = {"planner_ckpt": "a generator warm-up as generator_ckpt",
            "generator_ckpt": "a planner warm-up as planner_ckpt"}
    unset = " and set model.init_args.init_from null" if setting == "init_from" else ""
    return f"pass it as model.init_args.{arg} ({pair[arg]}){unset}"


def _autoencoder_class(class_path: str | None):
    """The class a path names (``mardini.autoencoders.X`` and ``mardini.autoencoders.pixel.X`` are one), else the
    path itself (a class outside ``mardini.autoencoders`` is compared by its path, never imported)."""
    from mardini.autoencoders.base import autoencoder_class

    try:
        return autoencoder_class(str(class_path))
    except (ImportError, AttributeError, ValueError):
        return class_path


# Where an autoencoder's weights are found, not what they are: two specs whose fingerprints agree (the same weights
# and config, FrameAutoencoder.fingerprint) may differ in these.
LOCATION_ARGS = ("path", "subfolder")


def latent_spec_differences(theirs: dict[str, Any], ours: dict[str, Any], same_fingerprint: bool = False) -> list[str]:
    """What makes two autoencoder specs encode other latents: ``["class"]``, or the init arguments both record
    with different values (``chunk_size``, a memory knob, aside, and with ``same_fingerprint``, the weights'
    location :data:`LOCATION_ARGS`); empty when they encode the same latents. A spec
    written before an argument existed is compared on the arguments it has, except a
    :class:`~mardini.autoencoders.diffusers_kl.DiffusersAutoencoder` spec without ``shift`` / ``scale`` (written
    before they were recorded), which used its VAE config's factors: those are compared with the other spec's
    (:func:`_diffusers_factors`)."""
    from mardini.autoencoders.diffusers_kl import DiffusersAutoencoder

    cls = _autoencoder_class(theirs.get("class_path"))
    if cls != _autoencoder_class(ours.get("class_path")):
        return ["class"]
    a, b = theirs.get("init_args") or {}, ours.get("init_args") or {}
    if cls is DiffusersAutoencoder:
        a, b = _diffusers_factors(a, b), _diffusers_factors(b, a)
    aside = {"chunk_size", *(LOCATION_ARGS if same_fingerprint else ())}
    return sorted(k for k in set(a) & set(b) if k not in aside and a[k] != b[k])


def _diffusers_factors(args: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """A DiffusersAutoencoder's ``args`` with the ``shift`` / ``scale`` that ``other`` records and ``args`` does not
    filled in from its VAE's ``config.json`` (what it normalised with); None where the config cannot be read, so
    the comparison reports them as differing rather than skipping them."""
    from mardini.autoencoders.diffusers_kl import read_config_factors

    missing = [k for k in ("shift", "scale") if k in other and k not in args]
    if not missing:
        return args
    try:
        shift, scale = read_config_factors(args["path"], args.get("subfolder"))
    except (KeyError, TypeError, OSError, ValueError, ImportError):  # no path recorded, no or a damaged config
        shift = scale = None
    return {**args, **{k: {"shift": shift, "scale": scale}[k] for k in missing}}


LATENTS_FIX = "Set model.autoencoder to the checkpoint's, or start from a checkpoint trained on these latents"
ANCHOR_FIX = ("set model.init_args.anchor and anchor_scale to the checkpoint's values (every stage of a chain shares "
              "them)")


def check_same_latents(meta: dict[str, Any], autoencoder_spec: dict[str, Any], path: str | Path,
                       fix: str = LATENTS_FIX, fingerprint: Callable[[], str] | None = None,
                       fingerprint_before_dtypes: Callable[[], str] | None = None) -> None:
    """Raise if the checkpoint's networks were trained on other latents than ``autoencoder_spec`` describes
    (:func:`latent_spec_differences`); the message ends with ``fix``. ``fingerprint``: returns this model's
    autoencoder's :meth:`~mardini.autoencoders.FrameAutoencoder.fingerprint`, called only where the checkpoint
    records one (checkpoints written before 2026-12-07 do not): another is refused, the same one accepts the VAE at
    another path. ``fingerprint_before_dtypes``: returns its
    :meth:`~mardini.autoencoders.FrameAutoencoder.fingerprint_before_dtypes`; a checkpoint that records it and no
    dtype (a half-precision VAE's, saved before dtypes were recorded) is accepted with a warning
    (:func:`made_before_dtypes`)."""
    theirs = meta.get("autoencoder_spec")
    if not isinstance(theirs, dict):
        return
    recorded = meta.get("autoencoder_fingerprint") if fingerprint is not None else None
    if fingerprint is not None and recorded is None:
        warn_unfingerprinted(str(path), theirs, "a checkpoint this code saves records it (resume, or start the next "
                             "stage from this one, with the VAE it was trained with)")
    old_style = recorded is not None and fingerprint_before_dtypes is not None and made_before_dtypes(
        str(path), recorded, theirs, autoencoder_spec, fingerprint(), fingerprint_before_dtypes, OLD_DTYPE_FIX)
    if recorded is not None and not old_style:
        problem = other_fingerprint(meta, fingerprint(), autoencoder_spec, path)
        if problem:
            raise ValueError(f"{problem}. {fix}")
    a, b = theirs.get("init_args", {}), autoencoder_spec.get("init_args", {})
    differ = latent_spec_differences(theirs, autoencoder_spec, same_fingerprint=recorded is not None)
    if differ:
        raise ValueError(
            f"{path} was trained on latents of {theirs.get('class_path')} {a}, this model encodes with "
            f"{autoencoder_spec.get('class_path')} {b} (differ: {differ}); its networks would see "
            f"other inputs. {fix}"
        )


def other_fingerprint(meta: dict[str, Any], ours: str, our_spec: dict[str, Any], path: str | Path) -> str | None:
    """Where the checkpoint at ``path`` (its ``mardini`` ``meta``) records an autoencoder fingerprint other than
    ``ours`` (of the autoencoder of spec ``our_spec``), the sentence that says so, naming both fingerprints and
    where each autoencoder's weights came from; None where it records the same or none."""
    theirs = meta.get("autoencoder_fingerprint")
    if theirs is None or theirs == ours:
        return None
    return (f"{path} was trained with an autoencoder of other weights or config (fingerprint {theirs}, from "
            f"{weights_at(meta.get('autoencoder_spec') or {})} when it was saved) than this one ({ours}, from "
            f"{weights_at(our_spec)}): its networks would see the latents of another autoencoder")


OLD_DTYPE_FIX = "set the autoencoder's dtype to float32 to go on with the checkpoint's latents"


def made_before_dtypes(what: str, recorded: str, their_spec: dict[str, Any], our_spec: dict[str, Any], ours: str,
                       fingerprint_before_dtypes: Callable[[], str], fix: str) -> bool:
    """Whether ``what`` (a latent cache, a checkpoint) was made with this VAE held in half precision before caches
    and checkpoints recorded the weights' dtype (2026-12-07): its spec ``their_spec`` names no ``dtype`` and its
    ``recorded`` fingerprint, other than this VAE's (``ours``), is this VAE's ``fingerprint_before_dtypes()`` (the
    weights' values alone). Warns where it is, ending with ``fix`` (what to do had a float32 VAE whose weights are
    exact in that dtype made it): such a record is accepted as made in this VAE's dtype."""
    if "dtype" in (their_spec.get("init_args") or {}) or recorded == ours:
        return False
    if recorded != fingerprint_before_dtypes():
        return False
    dtype = (our_spec.get("init_args") or {}).get("dtype", "half precision")
    warnings.warn(
        f"{what} was written before caches and checkpoints recorded the VAE's dtype; its fingerprint {recorded} is "
        f"that of this VAE's {dtype} weights, so its latents are taken as encoded in {dtype} (had a float32 VAE "
        f"whose weights are exact in {dtype} encoded them, {fix})", stacklevel=3)
    return True


COMPARED_BY_PATH = ("it is compared with this model's autoencoder by the VAE's path ({}) and arguments only, so "
                    "other weights behind that path would pass")


def warn_unfingerprinted(what: str, spec: dict[str, Any], fix: str, unchecked: str = COMPARED_BY_PATH) -> None:
    """Warn that ``what`` (a latent cache, a checkpoint), whose autoencoder ``spec`` loads weights from a ``path``,
    was written before autoencoder fingerprints were recorded (2026-12-07), so its weights are not checked:
    ``unchecked`` says what is not (``{}``: the VAE's path), ``fix`` how to get a record with one. Nothing for an
    autoencoder without weights at a path (the pixel one: its class is all there is)."""
    if "path" not in (spec.get("init_args") or {}):
        return
    warnings.warn(f"{what} predates autoencoder fingerprints (recorded since 2026-12-07): "
                  f"{unchecked.format(weights_at(spec))}; {fix}", stacklevel=3)


def weights_at(spec: dict[str, Any]) -> str:
    """Where an autoencoder spec's weights come from: its ``path`` (a diffusers VAE), else its class path."""
    return str((spec.get("init_args") or {}).get("path", spec.get("class_path")))


def check_same_anchor(hparams: dict[str, Any], anchor: FrameAnchor, path: str | Path, fix: str = ANCHOR_FIX) -> None:
    """Refuse a generator trained on another diffused target (``model.anchor`` / ``anchor_scale``)."""
    (theirs, their_scale), (ours, our_scale) = FrameAnchor.from_hparams(hparams).setting, anchor.setting
    if (theirs, their_scale) != (ours, our_scale):
        raise ValueError(
            f"{path}: its generator was trained with anchor={theirs!r}, anchor_scale={their_scale}, this stage has "
            f"anchor={ours!r}, anchor_scale={our_scale}; {fix}")


def cross_rope_grid_of(meta: dict[str, Any]) -> str:
    """Where the checkpoint's generator placed plan tokens in cross-attention RoPE
    (:class:`mardini.models.registry.GeneratorConfig` ``cross_rope_grid``); checkpoints written before the setting
    existed used ``corner``."""
    return str(meta.get("cross_rope_grid", "corner"))


def check_same_cross_rope_grid(checkpoint: dict[str, Any], ours: str | None, path: str | Path) -> None:
    """Refuse a checkpoint whose generator read the plan with another RoPE placement of the plan tokens than this
    model's ``ours`` (None: this model puts no RoPE on plan tokens). Only where the placement matters: a joint
    checkpoint (a generator warm-up reads one null-plan token per frame) with RoPE on its plan tokens."""
    meta = checkpoint["mardini"]
    trained_with_rope = ((checkpoint.get("hyper_parameters") or {}).get("generator") or {}).get("cross_rope", True)
    if ours is None or meta.get("kind") != "joint" or not trained_with_rope:
        return
    theirs = cross_rope_grid_of(meta)
    if theirs != ours:
        raise ValueError(
            f"{path}: its generator read the plan with cross_rope_grid={theirs!r} (where a plan token sits among the "
            f"generator tokens it covers), this model has {ours!r}; add cross_rope_grid: {theirs} to "
            "model.init_args.generator to go on with its placement, or start from a checkpoint trained with the new one")


# Hyper-parameters that say where a stage starts or how it runs, not what it trains: a resume may change them freely
OPERATIONAL_HPARAMS = frozenset({"init_from", "planner_ckpt", "generator_ckpt", "compile", "nonfinite"})
OPERATIONAL_NETWORK_FIELDS = frozenset({"checkpointing"})  # activation checkpointing: memory, not the result
# The network fields that change which weights a network has or their shapes (the others change what it computes
# with the same weights): a checkpoint that does not fit differs in at least one of these.
WEIGHT_SHAPE_FIELDS = frozenset({"dim", "depth", "heads", "mlp_hidden", "plan_dim", "patch_size", "in_channels",
                                 "qk_norm", "freq_dim", "self_cond"})


def _plain(v: Any) -> Any:
    """Tuples and lists alike (a YAML list, a tuple in the checkpoint)."""
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def changed_settings(theirs: dict[str, Any], ours: dict[str, Any], meta: dict[str, Any] | None = None) -> list[str]:
    """``key old -> new`` for each hyper-parameter that changes what is trained (the mask and task mix, the LR and
    its schedule, frames, EMA, seed, loss settings, the networks' fields ...; not :data:`OPERATIONAL_HPARAMS`)
    whose value in a checkpoint's ``theirs`` differs from this model's ``ours``. Keys only one side records (a
    checkpoint written before a setting existed) are not compared; a network's fields (``planner``,
    ``generator``) are compared one by one as each side builds them (:func:`_network_fields`: its size's config
    with its overrides), so a field one side sets to the value the other gets by default is no change. ``meta``:
    the checkpoint's ``mardini`` metadata, for what it records of its networks (the generator's
    ``cross_rope_grid``, the latent channels)."""
    meta = meta or {}
    # the grid the checkpoint's generator was built with: recorded, or "corner" for a joint checkpoint from before the
    # setting (check_same_cross_rope_grid); a generator warm-up's (one null-plan token per frame: inert) as configured
    grid = cross_rope_grid_of(meta) if "cross_rope_grid" in meta or meta.get("kind") == "joint" else None
    changed = []
    for key in sorted(k for k in set(theirs) & set(ours) - OPERATIONAL_HPARAMS if not k.startswith("_")):  # not _class_path, _instantiator
        old, new = theirs[key], ours[key]
        if key in ("planner", "generator") and isinstance(old or {}, dict) and isinstance(new or {}, dict):
            old = _network_fields(theirs, key, meta.get("latent_channels"), grid)
            new = _network_fields(ours, key, meta.get("latent_channels"))
            for field in sorted((set(old) | set(new)) - OPERATIONAL_NETWORK_FIELDS):
                a, b = _plain(old.get(field, "(not set)")), _plain(new.get(field, "(not set)"))
                if a != b:
                    changed.append(f"{key}.{field} {a!r} -> {b!r}")
        elif _plain(old) != _plain(new):
            changed.append(f"{key} {_plain(old)!r} -> {_plain(new)!r}")
    return changed


def _network_fields(hparams: dict[str, Any], key: str, latent_channels: int | None = None,
                    cross_rope_grid: str | None = None) -> dict[str, Any]:
    """Every field of the ``key`` network (``planner`` / ``generator``) that ``hparams`` build, as the stages build
    it: the size's config (``size``, the modules' default where unrecorded) with the overrides, ``in_channels``
    defaulting to ``latent_channels`` and the generator's ``plan_dim`` to the planner's width
    (:func:`~mardini.models.registry.generator_overrides`), its ``cross_rope_grid`` to ``cross_rope_grid`` (what a
    checkpoint records it was built with). The overrides alone where the size is not registered."""
    import dataclasses
    import inspect

    from mardini.lit.base import MarDiniBase
    from mardini.models.registry import generator_overrides, get_size

    over = dict(hparams.get(key) or {})
    size = hparams.get("size", inspect.signature(MarDiniBase).parameters["size"].default)
    try:
        defaults = dataclasses.asdict(getattr(get_size(size), key))
    except KeyError:  # unknown size: the run cannot resume anyway (check_metadata); compare what is recorded
        return over
    if latent_channels is not None:
        over.setdefault("in_channels", int(latent_channels))
    if key == "generator":
        if cross_rope_grid is not None:
            over.setdefault("cross_rope_grid", cross_rope_grid)
        try:
            over = generator_overrides(size, hparams.get("planner"), over, with_planner=False)
        except (TypeError, ValueError):  # a plan_dim other than the planner's dim: the recorded one is compared
            pass
    return {**defaults, **over}


def network_config_of(checkpoint: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The fields of the checkpoint's ``name`` network (``planner`` / ``generator``): as recorded
    (``mardini.network_configs``), else as its hyper-parameters build it (:func:`_network_fields`); None where it
    records neither."""
    meta = checkpoint.get("mardini") or {}
    recorded = (meta.get("network_configs") or {}).get(name)
    if isinstance(recorded, dict):
        return dict(recorded)
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict):
        return None
    grid = cross_rope_grid_of(meta) if "cross_rope_grid" in meta or meta.get("kind") == "joint" else None
    return _network_fields(hparams, name, meta.get("latent_channels"), grid)


def network_differences(checkpoint: dict[str, Any], name: str, ours: dict[str, Any]) -> list[str]:
    """``name.field: checkpoint A, this model B`` for each of :data:`WEIGHT_SHAPE_FIELDS` in which the checkpoint's
    ``name`` network (:func:`network_config_of`) differs from this model's ``ours`` (its config's fields): why its
    weights do not fit. The generator's ``plan_dim`` says that it follows the planner's ``dim``. Empty where the
    checkpoint records nothing of it."""
    theirs = network_config_of(checkpoint, name)
    if theirs is None:
        return []
    stage = "warm-up stage" if (checkpoint.get("mardini") or {}).get("kind") == "generation" else "stage that wrote it"
    differ = []
    for field in sorted(set(theirs) & set(ours) & WEIGHT_SHAPE_FIELDS):
        a, b = theirs[field], ours[field]
        if _plain(a) == _plain(b):
            continue
        why = (f" (plan_dim follows the planner's dim: give the {stage} the same planner: {{dim: {b}}})"
               if (name, field) == ("generator", "plan_dim") else "")
        differ.append(f"{name}.{field}: checkpoint {a!r}, this model {b!r}{why}")
    return differ


def network_setting_changes(checkpoint: dict[str, Any], name: str, ours: dict[str, Any]) -> list[str]:
    """``name.field old -> new`` for each field (but :data:`OPERATIONAL_NETWORK_FIELDS`) in which this model's
    ``name`` network (``ours``: its config's fields) differs from the checkpoint's (:func:`network_config_of`):
    settings that keep the weights' shapes but change what they compute (``abs_pos``, RoPE bands, attention ...)."""
    theirs = network_config_of(checkpoint, name) or {}
    return [f"{name}.{field} {_plain(theirs[field])!r} -> {_plain(ours[field])!r}"
            for field in sorted(set(theirs) & set(ours) - OPERATIONAL_NETWORK_FIELDS)
            if _plain(theirs[field]) != _plain(ours[field])]


def warn_changed_settings(theirs: dict[str, Any], ours: dict[str, Any], path: str | Path,
                          meta: dict[str, Any] | None = None, folder: str | None = None) -> None:
    """Warn (rank zero) naming :func:`changed_settings` of a resume: the run goes on from ``path`` under the new
    settings, which may not be what a rerun of the stage with other settings meant. ``meta``: the checkpoint's.
    ``folder``: this fit's checkpoint folder where ``path`` lies outside it (another run's file): the message then
    names the two things such a fit can mean, continuing that run here or a new run from its weights."""
    from lightning.pytorch.utilities import rank_zero_warn

    changed = changed_settings(theirs, ours, meta)
    if not changed:
        return
    said = f"resuming {path} with other settings than it was trained with ({'; '.join(changed)}): "
    if folder is not None:
        rank_zero_warn(
            f"{said}{path} is not in this fit's checkpoint folder {folder}, so this fit continues that run here under "
            "the new settings: its step, optimiser, LR schedule and curriculum go on. To start a new run from its "
            f"weights instead (fine-tuning: step 0, a new optimiser and schedule), pass --ckpt_path null with "
            f"--model.init_args.init_from {path}")
        return
    rank_zero_warn(
        f"{said}the run goes on from its step under the new ones. To train them as a new run instead, pass "
        "--ckpt_path null (starts over in the same log folder: the earlier run's checkpoints are moved to "
        "checkpoints/earlier.N/, its config.yaml kept as config.N.yaml) or another trainer.logger save_dir or name (a "
        "new log folder, this one left as it is)")


START_SETTINGS = ("init_from", "planner_ckpt", "generator_ckpt")  # the checkpoints a stage starts from


def warn_other_start(theirs: dict[str, Any], ours: dict[str, Any], path: str | Path) -> None:
    """Warn (rank zero) where a fit resumes ``path`` although it was given another checkpoint to start from
    (:data:`START_SETTINGS`) than the resumed run started from: a resume takes every weight from ``path``, so that
    file is not loaded; rerunning a stage's command with a new ``init_from`` in the same log folder resumed the
    folder's run and trained nothing of it, silently."""
    from lightning.pytorch.utilities import rank_zero_warn

    other = [f"{key} {ours[key]} (the run started from {theirs.get(key)})" for key in START_SETTINGS
             if ours.get(key) and not _same_file(ours[key], theirs.get(key))]
    if other:
        rank_zero_warn(
            f"resuming {path}, so {'; '.join(other)} is not loaded: a resume takes every weight from the checkpoint "
            "it resumes. To start a new run from it (fine-tuning), pass --ckpt_path null (the earlier run's "
            "checkpoints are moved to checkpoints/earlier.N/) or another trainer.logger name or save_dir")


def _same_file(a: str | Path, b: str | Path | None) -> bool:
    """Whether two checkpoint paths name one file (the same text, or both existing and the same file)."""
    if b is None:
        return False
    try:
        return str(a) == str(b) or Path(a).samefile(b)
    except OSError:  # one of them is gone: the text decides
        return False


def state_differences(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], keys: bool = True) -> list[str]:
    """Entries of a model's state dict ``ours`` that a checkpoint's ``theirs`` does not fit: other shapes and, with
    ``keys``, entries missing on either side (what a strict ``load_state_dict`` refuses), each named."""
    shape = lambda t: tuple(getattr(t, "shape", ()))  # noqa: E731
    differ = [f"{k}: checkpoint {shape(theirs[k])}, this model {shape(v)}"
              for k, v in ours.items() if k in theirs and shape(theirs[k]) != shape(v)]
    if keys:
        differ += [f"{k}: not in the checkpoint" for k in ours if k not in theirs]
        differ += [f"{k}: only in the checkpoint" for k in theirs if k not in ours]
    return differ


def load_network_states(
    path: str | Path, kinds: tuple[str, ...], names: tuple[str, ...], size: str | None = None,
    autoencoder_spec: dict[str, Any] | None = None, anchor: FrameAnchor | None = None,
    cross_rope_grid: str | None = None, autoencoder_fingerprint: Callable[[], str] | None = None,
    starts: tuple[str, str] | None = None, autoencoder_fingerprint_before_dtypes: Callable[[], str] | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, torch.Tensor]]]:
    """Raw and EMA state dicts of the networks ``names`` from a checkpoint of one of ``kinds``.

    From an EMA-only export (``mardini.lit.ema_export``) the raw weights are the EMA ones.

    ``autoencoder_spec``: this model's autoencoder; a checkpoint trained on other latents is refused.
    ``autoencoder_fingerprint``: returns this model's autoencoder's fingerprint; a checkpoint that records another is
    refused, one that records the same accepts the VAE at another path (:func:`check_same_latents`).
    ``autoencoder_fingerprint_before_dtypes``: returns its fingerprint as computed before dtypes were recorded; a
    checkpoint of this VAE in half precision saved then is accepted with a warning (:func:`made_before_dtypes`).
    ``anchor``: this model's target (:class:`FrameAnchor`); a generator trained on another one is refused.
    ``cross_rope_grid``: this model's plan-token placement; a joint checkpoint's generator with another is refused.
    ``starts``: ``(stage kind, setting)`` for :func:`check_metadata`'s message on a checkpoint of another kind."""
    ckpt = read_checkpoint(path)
    meta = check_metadata(ckpt, kinds, path, size, exact_size=False, networks=names or ("planner", "generator"),
                          starts=starts)  # /ST or /T alike; the sizes compared on the networks taken only
    # (MarDini-L's generator warm-up is MarDini-S's)
    if autoencoder_spec is not None:
        check_same_latents(meta, autoencoder_spec, path, fingerprint=autoencoder_fingerprint,
                           fingerprint_before_dtypes=autoencoder_fingerprint_before_dtypes)
    if anchor is not None and "generator" in names:
        check_same_anchor(ckpt.get("hyper_parameters") or {}, anchor, path)
    if "generator" in names:
        check_same_cross_rope_grid(ckpt, cross_rope_grid, path)
    state = ckpt["state_dict"]
    raw: dict[str, dict[str, torch.Tensor]] = {}
    ema: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        if name not in meta["networks"]:
            raise ValueError(f"{path} ({meta['kind']}) holds networks {meta['networks']}, not '{name}'")
        raw[name] = _sub(state, f"networks.{name}.")
        ema[name] = _sub(state, f"{EMA_PREFIX}{name}.")
        if not raw[name] and meta.get("ema_only") and ema[name]:  # python -m mardini.lit.ema_export: start from the EMA
            raw[name] = dict(ema[name])
        elif not raw[name]:
            raise ValueError(
                f"{path} lists network '{name}' but holds no raw weights of it ('networks.{name}.*'); the file is "
                "damaged or was edited: use the checkpoint train.py wrote, or an export of it (mardini.lit.ema_export)"
            )
    return raw, ema


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
