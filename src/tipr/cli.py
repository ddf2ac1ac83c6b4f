"""The ``tipr`` command: LightningCLI over ``TIPRModule`` and ``TIPRDataModule``.

    tipr fit --config experiments/synthetic.yaml
    tipr fit --config experiments/synthetic_irra.yaml
    tipr fit --config experiments/sen_base.yaml --config experiments/sen_cuhk_pedes.yaml --data.root /data --model.method.restoration_weight=5
    tipr fit --config experiments/irra_base.yaml --config experiments/irra_cuhk_pedes.yaml --data.root /data
    tipr test --config experiments/sen_base.yaml --config experiments/sen_cuhk_pedes.yaml --ckpt_path path/to/best.ckpt

Every constructor argument of the two classes is an option (``--model.*``,
``--data.*``), as is every ``Trainer`` argument (``--trainer.*``). The method
is one nested option: ``--model.method=irra`` (a registered name, see
:data:`tipr.methods.METHODS`, or a config class path) and its fields
``--model.method.mlm_weight=0.5``. On top of LightningCLI this adds:

- links: the data module's ``num_classes`` (training identities), ``image_size``
  and ``text_length`` feed the model, and the model's ``backbone`` picks the
  tokenizer, so they are never given twice;
- a checkpoint callback keeping the best ``val/R1`` (``--checkpoint.*``), and
  ``last.ckpt`` refreshed at every epoch end and every 30 minutes of training
  (``--last_checkpoint.*``), every checkpoint written atomically;
- resuming: ``tipr fit ... --ckpt_path last`` (or a checkpoint path inside a
  run folder) continues in that run's ``version_N`` folder, so logs, the
  best-so-far and ``--test_after_fit`` carry on where the run stopped;
- retrieval and TIR image panels after each validation, for loggers that show
  images such as ``WandbLogger`` (``--panels.*``, see ``tipr.training.panels``);
- ``--test_after_fit``: evaluate the best checkpoint on the test split when
  ``fit`` ends;
- after ``validate`` / ``test``: a results table in the layout of the paper's
  (R1 / R5 / R10 / mAP / mINP, text-to-image), also written to
  ``<run folder>/<stage>_results.json``; ``tipr test --ckpt_path`` of a
  checkpoint inside a run folder logs into ``<run folder>/test-<checkpoint name>/``
  instead of starting another ``version_N``;
- every run's files in its own folder (:func:`tipr.training.checkpointing.run_folder`):
  ``version_N`` for the CSV logger, ``<project>/<run id>`` for W&B, whose
  ``trainer.log_dir`` is the ``save_dir`` all runs share;
- errors for people: a misspelt option gets one usage line and "did you mean"
  (:mod:`tipr.usage`), and a batch the processes cannot split is refused before
  any process is started.

The optimiser and schedule are the methods' recipe, owned by ``TIPRModule`` (its
``lr``, ``warmup_epochs``... arguments, the method's parameter groups), so
LightningCLI's generic ``--optimizer`` / ``--lr_scheduler`` options are not offered.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path

from collections.abc import Sequence

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from tipr.data.samplers import local_batch_size
from tipr.methods import METHODS, config_class_path, method_spec
from tipr.model.config import MethodConfig
from tipr.training.checkpointing import AtomicCheckpointIO, LastCheckpoint, resume_version, run_folder
from tipr.training.datamodule import TIPRDataModule
from tipr.training.module import TIPRModule
from tipr.training.panels import RetrievalPanels
from tipr.usage import ShortErrors

METRIC_NAMES = ("R1", "R5", "R10", "mAP", "mINP")


def method_by_name(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--model.method=<name>`` (or ``--model.method <name>``) of a registered
    method written as its config's class path, which LightningCLI takes."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--model.method="):
            flag, value = arg.split("=", 1)
            if value in METHODS:
                out[i] = f"{flag}={config_class_path(value)}"
        elif arg == "--model.method" and i + 1 < len(out) and out[i + 1] in METHODS:
            out[i + 1] = config_class_path(out[i + 1])
    return out


def format_results_table(results: dict[str, float], dataset: str, method: str) -> str:
    """A Markdown table in the layout of the paper's: R1 / R5 / R10 / mAP / mINP in percent.

    ``results`` maps ``"<stage>/R1"``-style or bare ``"R1"`` keys to values;
    image-to-text values (``i2t_R1``...) get a row of their own when present.
    """
    plain = {key.split("/", 1)[-1]: float(value) for key, value in results.items()}
    rows = []
    for label, prefix in (("text-to-image", ""), ("image-to-text", "i2t_")):
        if all(prefix + name in plain for name in METRIC_NAMES):
            cell = " / ".join(f"{plain[prefix + name]:.2f}" for name in METRIC_NAMES)
            rows.append(f"| {method} ({label}) | {cell} |")
    if not rows:
        raise KeyError(f"no complete set of {METRIC_NAMES} in the results {sorted(results)}")
    header = f"| method | {dataset} (R1 / R5 / R10 / mAP / mINP) |\n| --- | --- |"
    return "\n".join([header, *rows])


class TIPRArgumentParser(ShortErrors, LightningArgumentParser):
    """LightningCLI's parser with short usage errors; every method's ``--model.method.<field>`` is a known name."""

    @property
    def extra_options(self) -> tuple[str, ...]:
        return tuple(sorted({f"--model.method.{field.name}" for name in METHODS
                             for field in dataclasses.fields(method_spec(name).config_class)}))


class RunConfig(SaveConfigCallback):
    """Writes the run's config to ``<run folder>/config.yaml`` (LightningCLI's own callback writes to
    ``trainer.log_dir``, which for W&B is the ``save_dir`` every run shares)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        folder = run_folder(trainer)  # a collective under DDP
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(folder / self.config_filename), skip_none=False,
                             overwrite=self.overwrite, multifile=self.multifile)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class _DropLines(logging.Filter):
    """Drops Lightning's advertisement for another logging service from every run's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning() -> None:
    """Silence lines every run printed that say nothing about it: the litlogger tip and torch's deprecation of
    ``LeafSpec`` inside Lightning's own code. (The model summary is off by default: ``tipr fit`` prints the
    method and its parameter count; ``--trainer.enable_model_summary=true`` brings it back.)"""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLines) for f in rank_zero.filters):
        rank_zero.addFilter(_DropLines())


class TIPRCLI(LightningCLI):
    """LightningCLI with the links, checkpointing, run folders and result tables of ``tipr``."""

    def __init__(self, *args, **kwargs):
        set_parsing_settings(subclasses_enabled=[MethodConfig])  # --model.method takes any method's config
        quiet_lightning()
        kwargs.setdefault("parser_class", TIPRArgumentParser)
        kwargs.setdefault("save_config_callback", RunConfig)
        super().__init__(*args, **kwargs)

    def setup_parser(self, add_subcommands, main_kwargs, subparser_kwargs) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        # tipr prints its own results table: Lightning's repeats every metric once per eval loader.
        for subcommand in ("validate", "test"):
            parser = getattr(self, "_subcommand_parsers", {}).get(subcommand)
            if parser is not None:
                parser.set_defaults(verbose=False)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # No ``predict``: features come from ``TIPRModel.encode_*`` (``tipr index`` for a folder of images).
        commands = LightningCLI.subcommands()
        commands.pop("predict", None)
        return commands

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.image_size")
        parser.link_arguments("data.text_length", "model.text_length")
        # A pretrained SEN folder (init_from) or a backbone folder with tokenizer files brings its
        # own tokenizer; presets, hub ids and config dicts use the shipped CLIP BPE.
        parser.link_arguments(
            ("model.backbone", "model.init_from"), "data.tokenizer",
            compute_fn=lambda backbone, init_from: init_from or (backbone if isinstance(backbone, str) else None),
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "trainer.enable_model_summary": False,  # tipr: training <method>, <N> parameters says it
                "checkpoint.monitor": "val/R1",
                "checkpoint.mode": "max",
                "checkpoint.save_last": False,  # last.ckpt is LastCheckpoint's (epoch ends and every N minutes)
                # Save the best when validation ends, before the epoch-end hooks: Lightning runs checkpoint
                # callbacks after all others, so a best saved at the epoch end would miss the epoch-end
                # last.ckpt, and a run resumed from it would forget that best.
                "checkpoint.save_on_train_epoch_end": False,
                "checkpoint.filename": "best-epoch{epoch:02d}-valR1_{val/R1:.2f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        # Image panels for loggers that show images (W&B); a no-op for CSV.
        parser.add_lightning_class_args(RetrievalPanels, "panels")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, evaluate the best checkpoint (val/R1) on the test split and print the table.",
        )

    def before_instantiate_classes(self) -> None:
        """Log into the run folder ``--ckpt_path`` belongs to (``last``: the newest one): ``fit`` resumes
        there; ``validate`` / ``test`` write ``<run folder>/<stage>-<checkpoint name>/``."""
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is None or not config.get("ckpt_path"):
            return
        ckpt_path = str(config.ckpt_path)
        named = ckpt_path in ("last", "best", "hpc") or ckpt_path.startswith("registry") or "://" in ckpt_path
        if not named and not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file; expected a .ckpt file or 'last'")
        logger = config.trainer.get("logger")
        init_args = getattr(logger, "init_args", None)
        if init_args is None or "version" not in init_args or init_args.get("version") is not None:
            return  # no logger with run folders configured, or a version chosen by the user
        wandb = str(logger.class_path).endswith("WandbLogger")
        if wandb and (self.subcommand != "fit" or init_args.get("id") is not None):
            return  # an evaluation is a W&B run of its own; a given id is the user's choice
        save_dir = init_args.get("save_dir") or config.trainer.get("default_root_dir") or "."
        name = init_args.get("project" if wandb else "name")
        name = "lightning_logs" if name is None else name
        found = resume_version(config.ckpt_path, Path(save_dir) / name, config.trainer.get("default_root_dir") or ".",
                               numbered=not wandb)
        if found is None:
            return
        config.ckpt_path, version = found
        if self.subcommand != "fit":
            init_args.version = f"version_{version}/{self.subcommand}-{Path(config.ckpt_path).stem}"
            config.checkpoint.dirpath = config.checkpoint.get("dirpath") or str(Path(config.ckpt_path).parent)
            return
        init_args.version = version
        if wandb:
            return
        # The CSV logger starts metrics.csv afresh in an existing folder: keep the first part's beside it.
        metrics = Path(save_dir) / name / f"version_{version}" / "metrics.csv"
        if metrics.is_file() and os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0":
            part = 1
            while metrics.with_name(f"metrics.part{part}.csv").exists():
                part += 1
            os.replace(metrics, metrics.with_name(f"metrics.part{part}.csv"))

    def before_fit(self) -> None:
        """Refuse a global batch the processes cannot split before any process is started (each would say so)."""
        local_batch_size(self.datamodule.batch_size, self.trainer.num_devices * self.trainer.num_nodes)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":  # not a user's own plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        checkpoint = self.trainer.checkpoint_callback
        ckpt_path = "best" if checkpoint is not None and checkpoint.best_model_path else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=False)
        self._report("test")

    def after_validate(self) -> None:
        self._report("val")

    def after_test(self) -> None:
        self._report("test")

    def _report(self, stage: str) -> None:
        results = {
            key: float(value)
            for key, value in self.trainer.callback_metrics.items()
            if key.startswith(f"{stage}/") and key.split("/", 1)[1].removeprefix("i2t_") in METRIC_NAMES
        }
        log_dir = run_folder(self.trainer)  # a broadcast under DDP: every rank must ask for it
        if not self.trainer.is_global_zero or not results:
            return
        table = format_results_table(results, dataset=self.datamodule.dataset, method=self.model.method_name)
        print(f"\n{stage} results\n{table}\n", flush=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"{stage}_results.json").write_text(json.dumps(results, indent=2, sort_keys=True))


def main(args: list[str] | None = None) -> None:
    """LightningCLI over :class:`TIPRModule` and :class:`TIPRDataModule` (``tipr fit``, ``tipr test``, ...).

    The ``tipr`` console script is :func:`tipr.commands.main`, which sends the model
    commands (``index``, ``search``, ``convert``) elsewhere.
    """
    import sys

    if args is None:  # LightningCLI reads sys.argv itself (and DDP's launcher re-runs it)
        sys.argv[1:] = method_by_name(sys.argv[1:])
    else:
        args = method_by_name(args)
    try:
        TIPRCLI(
            TIPRModule,
            TIPRDataModule,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    finally:
        # Lightning leaves the process group of a DDP run to the interpreter's exit, where tearing down
        # gloo's threads can abort the process ("terminate called without an active exception", once in CI).
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
