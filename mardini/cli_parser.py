"""``train.py``'s argument parser: parse errors as one message, int-first batch limits, the help of the options whose
meaning this CLI changes, and the errors it reports without a traceback."""

from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Union

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from mardini.user_errors import TRACEBACK_ENV, USER_ERRORS


UNION_NOISE = re.compile(r"^\s*(-\s*)?(Does not validate against any of the Union subtypes|Subtypes: |Errors:|"
                         r"Given value( type)?: |Expected a <class 'NoneType'>)")


def library_error(err: BaseException) -> BaseException:
    """The error to report for ``err``: under jsonargparse's wrapping (a Union or class that did not validate, raised
    ``from`` the error of the class it instantiated) the library's own error; a jsonargparse error without one keeps
    only its meaningful lines (not the subtypes, the ``NoneType`` alternative or the dump of the given value)."""
    while _raised_in_jsonargparse(err) and isinstance(err.__cause__, USER_ERRORS):
        err = err.__cause__
    if not _raised_in_jsonargparse(err):
        return err
    return type(err)(meaningful_lines(str(err))).with_traceback(err.__traceback__)


def meaningful_lines(message: str) -> str:
    """A jsonargparse message without the Union noise (subtypes, the ``NoneType`` alternative, the given value's
    dump) on one line: a line ending in ``:`` runs on into the next, others are joined by ``; `` (``message`` itself
    if nothing remains)."""
    lines = [line.strip().removeprefix("- ") for line in message.splitlines() if not UNION_NOISE.match(line)]
    meaningful = list(dict.fromkeys(line for line in lines if line))  # nested unions repeat their sub-errors
    joined = "".join(line + (" " if line.endswith(":") else "; ") for line in meaningful).removesuffix("; ").strip()
    return joined or message


def _jsonargparse_debug() -> bool:
    """jsonargparse's debug mode (``JSONARGPARSE_DEBUG``), in which its parse errors raise."""
    try:
        from jsonargparse._common import debug_mode_active
    except ImportError:  # a jsonargparse without it
        return bool(os.environ.get("JSONARGPARSE_DEBUG"))
    return debug_mode_active()


NO_TEST_SPLIT = re.compile(r"invalid choice: '(test|predict)'")


BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")
# int before float, built from the classes: `Optional[Union[int, float]]` can come out of typing's cache as the
# float-first Union[float, int, None] (the Trainer's annotation), under which jsonargparse read 1 as 1.0
INT_OR_FRACTION = Union[int, float, None]


class ShortErrorParser(LightningArgumentParser):
    """Lightning's parser, whose parse errors (a value of the wrong type, an unknown option) print one message and a
    pointer to ``--help`` instead of the usage of every option (over a hundred lines) and the Union noise.
    ``MARDINI_TRACEBACK=1``, ``JSONARGPARSE_DEBUG`` or ``exit_on_error=False`` keep jsonargparse's own behaviour.

    The Trainer's ``limit_*_batches`` keep an int an int, as Lightning reads them: ``1`` one batch, ``1.0`` all of
    them (the Trainer's float-first annotation made jsonargparse turn ``limit_val_batches: 1`` into 100 %)."""

    def add_lightning_class_args(self, lightning_class, nested_key: str, subclass_mode: bool = False,
                                 required: bool = True) -> list[str]:
        if not (isinstance(lightning_class, type) and issubclass(lightning_class, Trainer)):
            return super().add_lightning_class_args(lightning_class, nested_key, subclass_mode, required)
        added = self.add_class_arguments(lightning_class, nested_key, fail_untyped=False, instantiate=False,
                                         sub_configs=True, skip=set(BATCH_LIMITS))  # as Lightning's, less those
        for name in BATCH_LIMITS:
            self.add_argument(f"--{nested_key}.{name}", type=INT_OR_FRACTION, default=None,
                              help=f"Trainer's {name}: an int counts batches (1: one batch), a float is a fraction "
                                   "of them (1.0: all); default all")
        return [*added, *(f"{nested_key}.{name}" for name in BATCH_LIMITS)]

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get(TRACEBACK_ENV, "") not in ("", "0") or _jsonargparse_debug():
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        message = meaningful_lines(message)
        if NO_TEST_SPLIT.search(message):
            message += (": the stage modules have no test split (nor predict step); `validate` scores the validation "
                        "split, `python evaluate.py` the benchmark protocols")
        sys.stderr.write(f"{prog}: error: {message}\n  ({prog} --help lists the options)\n")
        sys.exit(2)


# what train.py reports as one message and exit status 2: the library's user errors and Lightning's refusals of a
# trainer setting (`--trainer.accelerator gpu` without a GPU, a negative max_steps), which were a traceback
CLI_ERRORS = (*USER_ERRORS, MisconfigurationException)


def _raised_in_jsonargparse(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and f"{os.sep}jsonargparse{os.sep}" in frames[-1].filename


RESUME_HELP = {  # --help of the options whose meaning MarDiniCLI changes (Lightning's text described its own)
    ("fit", "ckpt_path"): "last (the default): resume from the newest checkpoint in the stage's folder "
                          "(<save_dir>/<name>/<version>/checkpoints: last.ckpt, hpc_ckpt_N.ckpt or stepN.ckpt, the one "
                          "of the highest step), or start afresh where there is none; PATH: resume from that file into "
                          "the configured model; null: start over in the same folder, the earlier run's checkpoints "
                          "and logs moved to checkpoints/earlier.N/; hpc: the newest preemption checkpoint",
    ("validate", "ckpt_path"): "last (the default): score the stage's newest checkpoint (the one fit resumes from; an "
                               "error where there is none); PATH: score that file; null: score the weights the stage "
                               "starts from (init_from, planner_ckpt / generator_ckpt, else freshly initialised)",
    ("fit", "weights_only"): "read the checkpoint with torch.load(weights_only=True) (the default: never unpickles "
                             "code); false only for a trusted checkpoint that holds other objects",
}
RESUME_HELP[("validate", "weights_only")] = RESUME_HELP[("fit", "weights_only")]


SEED_HELP = ("the run's seed: an int seeds Lightning's seed_everything (the networks' initialisation) and is the "
             "seed of the training draws that model.init_args.seed and data.init_args.seed left unset take (masks, "
             "noise, the clips' order); true (the default): PL_GLOBAL_SEED from the environment, else 0 (no random "
             "seed; config.yaml records the one used); false: no seeding, and those draws take 0")


def describe_resume_options(parser, subcommand: str) -> None:
    """Give ``--ckpt_path`` and ``--weights_only`` of ``subcommand``'s parser the help of what they do here (a
    stage's folder resumes by default), in place of Lightning's ("last: the last model checkpoint from the previous
    trainer.fit call", "Defaults to None")."""
    set_help(parser, {dest: text for (sub, dest), text in RESUME_HELP.items() if sub == subcommand})


def describe_seed_option(parser) -> None:
    """Give ``--seed_everything`` the help of what it does here (:data:`SEED_HELP`: ``true`` takes
    ``PL_GLOBAL_SEED``, else 0), in place of Lightning's ("Set to True to use a random seed")."""
    set_help(parser, {"seed_everything": SEED_HELP})


def set_help(parser, texts: dict[str, str]) -> None:
    """Replace the help of ``parser``'s options named (by ``dest``) in ``texts``."""
    for action in parser._actions:  # argparse's list of the options (jsonargparse has no setter for a help text)
        text = texts.get(action.dest)
        if text is not None:
            action.help = text
