"""The settings file a ``train.py`` run saves in its log folder (``config.yaml`` for a fit, ``validate.yaml`` for a
validate), the earlier ``config.yaml`` kept where the settings changed."""

from __future__ import annotations

import operator
import os
from pathlib import Path

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerFn
from lightning_utilities.core.imports import compare_version

from mardini.lit.checkpoint_io import local_path
from mardini.lit.clean_up_record import KeptForCleanUp, note


# ``dump`` keeping the None values, as config.yaml holds them: jsonargparse 4.49 renamed ``skip_none`` to
# ``skip_unset`` (the old name warns JsonargparseDeprecationWarning, and goes in 5.0); the floor, 4.39, has only it
KEEP_NONE = {("skip_unset" if compare_version("jsonargparse", operator.ge, "4.49.0") else "skip_none"): False}


class KeepEarlierConfig(SaveConfigCallback, KeptForCleanUp):
    """Lightning's ``config.yaml`` in the log folder, overwritten by each run of the stage; where the one there
    differs from the new one (a rerun with other settings, which resumes the run) it is first kept as
    ``config.N.yaml`` (N = 1, 2, ...: the highest is the newest), so the settings each part of the run was trained
    with stay on record. A run that fails before training (a failing sanity check; a resume refused for settings
    that do not fit the checkpoint, which ``MarDiniCLI.check_resume`` refuses before this runs) puts the earlier one
    back: ``config.yaml`` keeps naming the settings the checkpoint was trained with. Only a fit writes it:
    ``validate`` writes ``validate.yaml`` in its own log folder, its ``validate/version_N`` of the stage folder
    (:func:`validation_logger`)."""

    _kept: Path | None = None  # config.N.yaml, the earlier config.yaml, until the training starts
    _rotated: Path | None = None  # the same, from then on (for put_back)
    _before: tuple[Path, bytes | None] | None = None  # config.yaml and its bytes before this fit (None: none)

    clean_up_state = ("_kept", "_rotated", "_before", "config_filename")  # what on_exception and put_back read

    _written: Path | None = None  # the file this setup writes (config.yaml, validate.yaml)
    scored: str | None = None  # a validate's checkpoint, "FILE (global step N)", for its header (MarDiniCLI.validate)

    def __init__(self, *args, command: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.command = command  # the command line that made the run, written atop the file (save_config)

    def setup(self, trainer, pl_module, stage: str) -> None:
        saving = not self.already_saved and self.save_to_log_dir
        log_dir = trainer.log_dir if saving else None  # a broadcast: every rank asks
        if stage != TrainerFn.FITTING:  # not what the run was trained with: before, each validate rotated config.yaml
            self.config_filename = f"{TrainerFn(stage).value}.yaml"
        elif trainer.is_global_zero and log_dir is not None:
            path = Path(log_dir) / self.config_filename
            self._before = (path, path.read_bytes() if path.is_file() else None)
            self._kept = keep_earlier_config(path, self.parser.dump(self.config, **KEEP_NONE))
            note(trainer)  # for the main process of a ddp_spawn fit (mardini.lit.clean_up_record)
        self._written = Path(log_dir) / self.config_filename if log_dir is not None else None
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        """The file just saved begins with the command that made it, as a YAML comment (it still loads as the
        config): a sweep's runs say which overrides made each. A validate's ``validate.yaml`` also names the checkpoint
        file it scored and its global step (:attr:`scored`), where its ``ckpt_path`` says ``last``. Before, only the
        resolved settings were there."""
        path, self._written = self._written, None
        header = self._header()
        if not header or path is None or local_path(str(path)) is None or not path.is_file():
            return
        path.write_bytes(header.encode("ascii") + path.read_bytes())

    def _header(self) -> str:
        """The comment lines atop the saved file, in ASCII (non-ASCII escaped: it decodes in whatever locale encoding
        Lightning wrote the rest in); "" for none."""
        lines = []
        if self.command is not None:
            lines += [self.command.replace("\n", "\\n"),
                      "(the command that wrote this file; below, every setting it resolved to)"]
        if self.scored is not None:
            lines.append(f"scored: {self.scored}, the checkpoint file ckpt_path resolved to")
        return "".join(f"# {line}\n".encode("ascii", "backslashreplace").decode("ascii") for line in lines)

    def on_train_start(self, trainer, pl_module) -> None:
        self._rotated, self._kept = self._kept, None  # the new settings train: the earlier ones stay kept
        note(trainer)

    def put_back(self) -> None:
        """``config.yaml`` as this fit found it, byte for byte (the earlier one back from ``config.N.yaml``, or its
        bytes; none where there was none): after a fit that failed once training started, whose earlier run
        ``StepCheckpoint.put_back_earlier_run`` put back."""
        if self._before is None:
            return
        (path, before), rotated = self._before, self._rotated
        self._before = self._rotated = None
        if rotated is not None and rotated.is_file():
            os.replace(rotated, path)
        elif before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(before)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._kept is not None and self._kept.is_file():
            os.replace(self._kept, self._kept.with_name(self.config_filename))
        self._kept = None


def keep_earlier_config(path: Path, new: str) -> Path | None:
    """Rename the config at ``path`` to ``<stem>.N<suffix>`` (the first free N from 1) if its settings differ
    from the YAML text ``new``; the kept path, or None (no config there, or the same settings)."""
    import yaml

    if not path.is_file():
        return None
    try:
        same = yaml.safe_load(path.read_text()) == yaml.safe_load(new)  # Lightning wrote it in the locale's encoding
    except yaml.YAMLError:  # not ours to judge: keep it
        same = False
    if same:
        return None
    n = 1
    while (kept := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    os.replace(path, kept)
    return kept
