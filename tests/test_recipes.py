"""The SEN recipes: ``sen_base.yaml`` + one short file per dataset, merged by LightningCLI in ``--config`` order.

The merged configs are what ``tipr fit --print_config`` prints for the command
the README gives, so these tests check what a run gets, not what a file says.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from unittest import mock
from pathlib import Path

import pytest
import yaml

from tipr.cli import main
from tipr.data.synthetic import SyntheticConfig

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
BASE = EXPERIMENTS / "sen_base.yaml"

#: recipe file -> (dataset, backbone, image size): what the paper's recipe changes per benchmark.
RECIPES = {
    "sen_cuhk_pedes.yaml": ("CUHK-PEDES", "openai/clip-vit-base-patch16", [384, 128]),
    "sen_icfg_pedes.yaml": ("ICFG-PEDES", "openai/clip-vit-base-patch16", [384, 128]),
    "sen_rstpreid.yaml": ("RSTPReid", "openai/clip-vit-base-patch16", [384, 128]),
    "sen_xl_cuhk_pedes.yaml": ("CUHK-PEDES", "openai/clip-vit-large-patch14", [378, 126]),  # patch 14: the 27 x 9 grid
}

#: The SEN paper's training recipe (Liu et al., Neural Networks 2025), the same for every benchmark.
REFERENCE = {
    "seed_everything": 0,
    "trainer.precision": "bf16-mixed",
    "trainer.max_epochs": 60,
    "trainer.check_val_every_n_epoch": 1,
    "trainer.logger.class_path": "lightning.pytorch.loggers.CSVLogger",
    "model.sdm_weight": 1.0,
    "model.id_weight": 1.0,
    "model.triplet_weight": 10.0,
    "model.restoration_weight": 10.0,
    "model.itc_weight": 0.0,
    "model.temperature": 0.02,
    "model.margin": 0.05,
    "model.mask_ratio": 0.7,
    "model.restoration_depth": 4,
    "model.restoration_residual": False,
    "model.restoration_text_padding_mask": False,
    "model.position_interpolation": "bilinear",
    "model.lr": 1.0e-05,
    "model.lr_factor": 5.0,
    "model.bias_lr_factor": 2.0,
    "model.weight_decay": 4.0e-05,
    "model.adam_eps": 0.001,
    "model.warmup_epochs": 5.0,
    "model.warmup_factor": 0.1,
    "model.boosted_modules": ["classifier", "restoration.cross_attn", "restoration.transformer"],
    "model.boosted_bias_modules": ["classifier"],
    "data.batch_size": 128,
    "data.text_length": 77,
    "data.prune_prob": 0.2,
    "data.sampler": "identity",
    "data.num_instance": 2,
    "test_after_fit": True,
}

#: The keys a per-dataset file may change: the benchmark, where the run writes, and the backbone with its input size.
DATASET_KEYS = {"data.dataset", "trainer.default_root_dir", "trainer.logger.init_args.save_dir"}
BACKBONE_KEYS = {"model.backbone", "model.gradient_checkpointing", "data.image_size"}


def flat(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are values)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def printed_config(*configs: Path) -> dict:
    """What ``tipr fit --config ... --print_config`` prints, flattened."""
    args = ["fit", *(a for c in configs for a in ("--config", str(c))), "--print_config"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info, \
            mock.patch.object(sys, "argv", ["tipr"]):  # args only: no LightningCLI warning about pytest's own argv
        main(args)
    assert exit_info.value.code in (0, None), err.getvalue()[-2000:]
    return flat(yaml.safe_load(out.getvalue()))


@pytest.fixture(scope="module")
def recipes() -> dict[str, dict]:
    """``{recipe file: flattened config of sen_base.yaml + that file}``."""
    return {name: printed_config(BASE, EXPERIMENTS / name) for name in RECIPES}


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_recipe_is_the_reference_recipe_on_its_benchmark(recipes, name):
    config = recipes[name]
    dataset, backbone, image_size = RECIPES[name]
    assert {key: config[key] for key in REFERENCE} == REFERENCE
    assert config["data.dataset"] == dataset and config["model.backbone"] == backbone
    assert config["data.image_size"] == image_size
    assert config["model.gradient_checkpointing"] is (name == "sen_xl_cuhk_pedes.yaml")
    out = f"outputs/{name.removesuffix('.yaml')}"  # each recipe writes to its own folder
    assert config["trainer.default_root_dir"] == config["trainer.logger.init_args.save_dir"] == out


def test_recipes_differ_only_in_the_dataset_specific_keys(recipes):
    expected = {  # keys whose value differs from the CUHK-PEDES recipe's
        "sen_cuhk_pedes.yaml": set(),
        "sen_icfg_pedes.yaml": DATASET_KEYS,
        "sen_rstpreid.yaml": DATASET_KEYS,
        "sen_xl_cuhk_pedes.yaml": (DATASET_KEYS - {"data.dataset"}) | BACKBONE_KEYS,
    }
    reference = recipes["sen_cuhk_pedes.yaml"]
    for name, config in recipes.items():
        assert config.keys() == reference.keys()
        assert {key for key in config if config[key] != reference[key]} == expected[name], name


def test_dataset_files_hold_only_what_differs_from_the_base():
    base = flat(yaml.safe_load(BASE.read_text()))
    assert "data.dataset" not in base  # the base names no benchmark
    for name in RECIPES:
        own = flat(yaml.safe_load((EXPERIMENTS / name).read_text()))
        assert set(own) <= DATASET_KEYS | BACKBONE_KEYS, name
        restated = {key for key, value in own.items() if base.get(key) == value}
        assert not restated, f"{name} repeats what sen_base.yaml says: {sorted(restated)}"


def test_a_dataset_file_alone_is_refused_not_run_with_defaults(capsys):
    """Without the base, the logger override has no logger class: the parser stops (exit 2) before any work,
    instead of training with the library defaults under the recipe's name."""
    with pytest.raises(SystemExit) as exit_info, mock.patch.object(sys, "argv", ["tipr"]):
        main(["fit", "--config", str(EXPERIMENTS / "sen_rstpreid.yaml"), "--print_config"])
    assert exit_info.value.code == 2
    assert "trainer.logger" in capsys.readouterr().err


COMMAND = re.compile(r"--config\s+experiments/(sen_\w+\.yaml)")


@pytest.mark.parametrize("path", ["README.md", "src/tipr/cli.py", "experiments/bench_training.py", "experiments/gpu_check.sh",
                                  *(f"experiments/{name}" for name in ["sen_base.yaml", *RECIPES])])
def test_every_command_names_the_base_before_a_dataset_recipe(path):
    for number, line in enumerate((ROOT / path).read_text().splitlines(), 1):
        named = COMMAND.findall(line)
        if any(name in RECIPES for name in named):
            assert named[0] == "sen_base.yaml" and named[1] in RECIPES, f"{path}:{number}: {line.strip()}"


def test_the_sweep_command_gives_the_base_first():
    command = yaml.safe_load((EXPERIMENTS / "sweep.yaml").read_text())["command"]
    configs = [command[i + 1] for i, arg in enumerate(command) if arg == "--config"]
    assert configs[:2] == ["experiments/sen_base.yaml", "experiments/sen_cuhk_pedes.yaml"]


def test_the_synthetic_job_uses_the_default_benchmark():
    """synthetic.yaml spells the benchmark out (the README's 500 / 100 / 100 identities): the generator's defaults."""
    config = printed_config(EXPERIMENTS / "synthetic.yaml")
    synthetic = {key.removeprefix("data.synthetic."): value for key, value in config.items() if key.startswith("data.synthetic.")}
    assert SyntheticConfig(**synthetic) == SyntheticConfig()
    assert config["data.dataset"] == "synthetic"
