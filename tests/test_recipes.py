"""The reference recipes: ``<method>_base.yaml`` + one short file per dataset, merged by LightningCLI in ``--config`` order.

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
BASES = {"sen": EXPERIMENTS / "sen_base.yaml", "irra": EXPERIMENTS / "irra_base.yaml"}

#: recipe file -> (method, dataset, backbone, image size): what each paper's recipe changes per benchmark.
RECIPES = {
    "sen_cuhk_pedes.yaml": ("sen", "CUHK-PEDES", "openai/clip-vit-base-patch16", [384, 128]),
    "sen_icfg_pedes.yaml": ("sen", "ICFG-PEDES", "openai/clip-vit-base-patch16", [384, 128]),
    "sen_rstpreid.yaml": ("sen", "RSTPReid", "openai/clip-vit-base-patch16", [384, 128]),
    "sen_xl_cuhk_pedes.yaml": ("sen", "CUHK-PEDES", "openai/clip-vit-large-patch14", [378, 126]),  # patch 14: 27 x 9
    "irra_cuhk_pedes.yaml": ("irra", "CUHK-PEDES", "openai/clip-vit-base-patch16", [384, 128]),
    "irra_icfg_pedes.yaml": ("irra", "ICFG-PEDES", "openai/clip-vit-base-patch16", [384, 128]),
    "irra_rstpreid.yaml": ("irra", "RSTPReid", "openai/clip-vit-base-patch16", [384, 128]),
}

#: What both reference recipes share (METHOD.md, "Training recipe" and IRRA's "Recipe").
SHARED = {
    "seed_everything": 0,
    "trainer.precision": "bf16-mixed",
    "trainer.max_epochs": 60,
    "trainer.check_val_every_n_epoch": 1,
    "trainer.logger.class_path": "lightning.pytorch.loggers.CSVLogger",
    "model.position_interpolation": "bilinear",
    "model.lr": 1.0e-05,
    "model.lr_factor": 5.0,
    "model.bias_lr_factor": 2.0,
    "model.weight_decay": 4.0e-05,
    "model.adam_eps": 0.001,
    "model.warmup_epochs": 5.0,
    "model.warmup_factor": 0.1,
    "model.reference_fp16_weights": False,  # bf16-mixed is tipr's default; fp16 weights is the named option
    "data.text_length": 77,
    "data.flip": True,
    "data.pad_crop": True,
    "data.random_erasing": True,
    "test_after_fit": True,
}
METHOD = "model.method.init_args."
#: Each paper's own recipe, the same for every benchmark.
REFERENCE = {
    "sen": {  # SEN (Liu et al., Neural Networks 2025)
        **SHARED,
        "model.method.class_path": "tipr.methods.sen.SENConfig",
        METHOD + "sdm_weight": 1.0,
        METHOD + "id_weight": 1.0,
        METHOD + "triplet_weight": 10.0,
        METHOD + "restoration_weight": 10.0,
        METHOD + "itc_weight": 0.0,
        METHOD + "temperature": 0.02,
        METHOD + "margin": 0.05,
        METHOD + "mask_ratio": 0.7,
        METHOD + "restoration_depth": 4,
        METHOD + "restoration_residual": False,
        METHOD + "restoration_text_padding_mask": False,
        METHOD + "boosted_modules": ["classifier", "restoration.cross_attn", "restoration.transformer"],
        METHOD + "boosted_bias_modules": ["classifier"],
        "data.batch_size": 128,
        "data.prune_prob": 0.2,
        "data.sampler": "identity",
        "data.num_instance": 2,
    },
    "irra": {  # IRRA (Jiang and Ye, CVPR 2023), as its authors' run script and option defaults run it
        **SHARED,
        "model.method.class_path": "tipr.methods.irra.IRRAConfig",
        METHOD + "sdm_weight": 1.0,
        METHOD + "id_weight": 1.0,
        METHOD + "mlm_weight": 1.0,
        METHOD + "itc_weight": 0.0,
        METHOD + "temperature": 0.02,
        METHOD + "cross_modal_depth": 4,
        METHOD + "mlm_probability": 0.15,
        METHOD + "unmasked_retrieval_captions": False,  # the reference's SDM and ID read the masked caption
        # "cross" 5x; then every bias 2x, no decay; then classifier and mlm_head 5x (biases without decay)
        METHOD + "boosted_modules": ["cross_attn", "cross_modal_transformer", "classifier", "mlm_head"],
        METHOD + "boosted_bias_modules": ["classifier", "mlm_head"],
        "data.batch_size": 64,
        "data.prune_prob": 0.0,
        "data.sampler": "random",
    },
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
    """``{recipe file: flattened config of <method>_base.yaml + that file}``."""
    return {name: printed_config(BASES[method], EXPERIMENTS / name) for name, (method, *_) in RECIPES.items()}


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_recipe_is_the_reference_recipe_on_its_benchmark(recipes, name):
    config = recipes[name]
    method, dataset, backbone, image_size = RECIPES[name]
    reference = REFERENCE[method]
    assert {key: config[key] for key in reference} == reference
    assert config[METHOD + "mask_token_id"] is None if method == "irra" else True  # vocab_size - 3 = 49405
    assert config["data.dataset"] == dataset and config["model.backbone"] == backbone
    assert config["data.image_size"] == image_size
    assert config["model.gradient_checkpointing"] is (name == "sen_xl_cuhk_pedes.yaml")
    out = f"outputs/{name.removesuffix('.yaml')}"  # each recipe writes to its own folder
    assert config["trainer.default_root_dir"] == config["trainer.logger.init_args.save_dir"] == out


def test_recipes_differ_only_in_the_dataset_specific_keys(recipes):
    expected = {  # keys whose value differs from the method's CUHK-PEDES recipe's
        "sen_cuhk_pedes.yaml": set(),
        "sen_icfg_pedes.yaml": DATASET_KEYS,
        "sen_rstpreid.yaml": DATASET_KEYS,
        "sen_xl_cuhk_pedes.yaml": (DATASET_KEYS - {"data.dataset"}) | BACKBONE_KEYS,
        "irra_cuhk_pedes.yaml": set(),
        "irra_icfg_pedes.yaml": DATASET_KEYS,
        "irra_rstpreid.yaml": DATASET_KEYS,
    }
    for name, config in recipes.items():
        reference = recipes[f"{RECIPES[name][0]}_cuhk_pedes.yaml"]
        assert config.keys() == reference.keys()
        assert {key for key in config if config[key] != reference[key]} == expected[name], name


def test_the_two_methods_share_every_key_outside_their_own_recipe(recipes):
    """The same data, training and evaluation stack: SEN and IRRA differ only in the method and its data recipe."""
    sen, irra = recipes["sen_cuhk_pedes.yaml"], recipes["irra_cuhk_pedes.yaml"]
    differ = {key for key in sen.keys() | irra.keys() if sen.get(key) != irra.get(key)}
    own = {key for key in differ if key.startswith("model.method.")}
    assert differ - own == {"data.batch_size", "data.prune_prob", "data.sampler", *DATASET_KEYS - {"data.dataset"}}


def test_dataset_files_hold_only_what_differs_from_the_base():
    for method, path in BASES.items():
        base = flat(yaml.safe_load(path.read_text()))
        assert "data.dataset" not in base  # the base names no benchmark
        for name in (name for name, spec in RECIPES.items() if spec[0] == method):
            own = flat(yaml.safe_load((EXPERIMENTS / name).read_text()))
            assert set(own) <= DATASET_KEYS | BACKBONE_KEYS, name
            restated = {key for key, value in own.items() if base.get(key) == value}
            assert not restated, f"{name} repeats what {path.name} says: {sorted(restated)}"


def test_a_dataset_file_alone_is_refused_not_run_with_defaults(capsys):
    """Without the base, the logger override has no logger class: the parser stops (exit 2) before any work,
    instead of training with the library defaults under the recipe's name."""
    with pytest.raises(SystemExit) as exit_info, mock.patch.object(sys, "argv", ["tipr"]):
        main(["fit", "--config", str(EXPERIMENTS / "sen_rstpreid.yaml"), "--print_config"])
    assert exit_info.value.code == 2
    assert "trainer.logger" in capsys.readouterr().err


COMMAND = re.compile(r"--config\s+experiments/((?:sen|irra)_\w+\.yaml)")


@pytest.mark.parametrize("path", ["README.md", "src/tipr/cli.py", "experiments/bench_training.py", "experiments/gpu_check.sh",
                                  *(f"experiments/{name}" for name in [*(p.name for p in BASES.values()), *RECIPES])])
def test_every_command_names_the_base_before_a_dataset_recipe(path):
    for number, line in enumerate((ROOT / path).read_text().splitlines(), 1):
        named = COMMAND.findall(line)
        if any(name in RECIPES for name in named):
            method = RECIPES[named[1]][0] if len(named) > 1 and named[1] in RECIPES else None
            assert method and named[0] == BASES[method].name, f"{path}:{number}: {line.strip()}"


def test_the_sweep_command_gives_the_base_first():
    command = yaml.safe_load((EXPERIMENTS / "sweep.yaml").read_text())["command"]
    configs = [command[i + 1] for i, arg in enumerate(command) if arg == "--config"]
    assert configs[:2] == ["experiments/sen_base.yaml", "experiments/sen_cuhk_pedes.yaml"]


@pytest.mark.parametrize("name", ["synthetic.yaml", "synthetic_irra.yaml"])
def test_the_synthetic_jobs_use_the_default_benchmark(name):
    """synthetic.yaml spells the benchmark out (the README's 500 / 100 / 100 identities): the generator's defaults."""
    config = printed_config(EXPERIMENTS / name)
    synthetic = {key.removeprefix("data.synthetic."): value for key, value in config.items() if key.startswith("data.synthetic.")}
    assert SyntheticConfig(**synthetic) == SyntheticConfig()
    assert config["data.dataset"] == "synthetic"
