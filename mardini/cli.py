"""The LightningCLI used by ``train.py``: stage YAMLs with ``class_path``/``init_args``, safe defaults."""

from __future__ import annotations

from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI

from mardini.lit.base import MarDiniBase
from mardini.lit.checkpoint_io import AtomicCheckpointIO
from mardini.lit.step_checkpoint import StepCheckpoint


class MarDiniCLI(LightningCLI):
    """``fit``/``validate``/``test`` over any MarDini stage module and any LightningDataModule."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--checkpoint_every", type=int, default=500,
            help="write last.ckpt (atomically) every this many training steps, and at the end of the fit",
        )

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "fit":
            # The same command resumes: fit starts from <log dir>/checkpoints/last.ckpt when one exists
            # (Lightning's ckpt_path="last"); pass --ckpt_path null to start over.
            parser.set_defaults({"ckpt_path": "last", "weights_only": True})  # resume never unpickles code
        return parser

    def before_instantiate_classes(self) -> None:
        sub = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        every = sub.get("checkpoint_every", 500)
        if every is None or every < 1:
            raise ValueError(f"checkpoint_every={every} is impossible: it must be >= 1")
        self._checkpoint_every = every
        if self.subcommand == "fit" and sub.get("ckpt_path") == "last" and resume_checkpoint(sub) is not None:
            # the fit resumes: every weight comes from last.ckpt, so the stage's starting checkpoints are not
            # loaded again (they may be gone by now)
            init = (sub.get("model") or {}).get("init_args") or {}
            for key in STARTING_CHECKPOINTS:
                if init.get(key):
                    init[key] = None

    def instantiate_trainer(self, **kwargs):
        extra = [
            StepCheckpoint(filename="step{step:08d}", auto_insert_metric_name=False, save_last=True,
                           every_n_train_steps=self._checkpoint_every, save_top_k=1),
            LearningRateMonitor(logging_interval="step"),
        ]
        # kwargs["callbacks"] replaces trainer.callbacks of the config in LightningCLI: keep the config's ones
        configured = (self._get(self.config_init, "trainer", default={}) or {}).get("callbacks") or []
        configured = configured if isinstance(configured, (list, tuple)) else [configured]
        kwargs["callbacks"] = list(configured) + list(kwargs.get("callbacks") or []) + extra
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # atomic local saves unless the user chose one
        return trainer


STARTING_CHECKPOINTS = ("init_from", "planner_ckpt", "generator_ckpt")


def resume_checkpoint(config) -> str | None:
    """The ``last.ckpt`` a ``fit`` with ``--ckpt_path last`` resumes from, or None: ``<log dir>/checkpoints/last.ckpt``
    of a TensorBoard or CSV logger's ``save_dir/name/version`` (an empty or unset version: no version folder)."""
    import os

    logger = ((config.get("trainer") or {}).get("logger")) or None  # dicts or jsonargparse Namespaces
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    args = logger.get("init_args") if hasattr(logger, "get") else None
    if not args or not args.get("save_dir") or args.get("version") not in (None, ""):
        return None
    path = os.path.join(str(args["save_dir"]), str(args.get("name") or "lightning_logs"), "checkpoints", "last.ckpt")
    return path if os.path.exists(path) else None


def trainer_defaults() -> dict:
    return {"log_every_n_steps": 10}


def main(args: list[str] | None = None, run: bool = True) -> MarDiniCLI:
    from mardini.data.datamodule import VideoDataModule

    return MarDiniCLI(
        model_class=MarDiniBase,
        subclass_mode_model=True,
        datamodule_class=VideoDataModule,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )
