"""The ``tipr`` command line: configs, links, errors, sweep arguments, and real end-to-end runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tipr.cli import TIPRCLI, format_results_table, main
from tipr.training import TIPRDataModule
from tipr.training import TIPRModule

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
TIPR = str(Path(sys.executable).parent / "tipr")

# A small synthetic benchmark and a short schedule: seconds, not minutes.
SMALL_DATA = [
    "--data.synthetic.num_train_ids=96",
    "--data.synthetic.num_val_ids=20",
    "--data.synthetic.num_test_ids=20",
    "--data.synthetic.images_per_id=2",
    "--data.num_workers=0",
    "--data.batch_size=32",
]


def small_run(tmp_path: Path) -> list[str]:
    return [
        "--config", str(EXPERIMENTS / "synthetic.yaml"),
        "--data.root", str(tmp_path / "data"),
        "--trainer.default_root_dir", str(tmp_path / "out"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "out"),
        "--trainer.enable_progress_bar=false",
        *SMALL_DATA,
    ]


def test_wrong_dataset_root_fails_at_once_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-root"
    with pytest.raises(Exception) as err:
        main(["fit", "--config", str(EXPERIMENTS / "sen_base.yaml"), "--config", str(EXPERIMENTS / "sen_cuhk_pedes.yaml"),
              "--data.root", str(missing),
              "--model.backbone=tiny"])
    assert str(missing) in str(err.value)


def test_misspelt_option_is_a_short_cli_error_with_did_you_mean(capsys):
    """Not the 110-line usage: one usage line, the error, the closest options (a method's nested ones too)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(EXPERIMENTS / "synthetic.yaml"), "--model.mask_ratoi=0.5", "--data.batchsize=3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--model.mask_ratoi: did you mean --model.method.mask_ratio?" in err
    assert "--data.batchsize: did you mean --data.batch_size?" in err
    assert len(err.splitlines()) <= 6, err
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(EXPERIMENTS / "synthetic.yaml"), "--model.method.restoration_wieght=5"])
    err = capsys.readouterr().err
    assert "--model.method.restoration_wieght: did you mean --model.method.restoration_weight" in err
    from tipr.commands import main as tipr  # the model commands' parsers too

    with pytest.raises(SystemExit) as exit_info:
        tipr(["search", "--model", "m", "--gallry", "g", "--query", "a man"])
    assert exit_info.value.code == 2
    assert "--gallry: did you mean --gallery?" in capsys.readouterr().err


def test_tipr_help_lists_every_command_and_a_wrong_one_gets_a_suggestion(capsys):
    from tipr.commands import MODEL_COMMANDS, main as tipr

    assert tipr(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", *MODEL_COMMANDS):
        assert f"\n  {name} " in out, name
    assert tipr([]) == 2 and "index" in capsys.readouterr().err
    assert tipr(["fti"]) == 2
    assert "unknown command 'fti'; did you mean fit?" in capsys.readouterr().err


def run_tipr_failing(args: list[str], env: dict | None = None) -> str:
    """``tipr <args>``, which must fail with exit code 1 and a one-line error: its stderr."""
    proc = subprocess.run([TIPR, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"tipr {args[0]}: error: "), proc.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_configuration_errors_are_one_line_naming_the_option(tmp_path):
    missing = tmp_path / "no-such-root"
    line = run_tipr_failing(["fit", "--config", str(EXPERIMENTS / "sen_base.yaml"), "--config",
                             str(EXPERIMENTS / "sen_cuhk_pedes.yaml"), "--data.root", str(missing), "--model.backbone=tiny"])
    assert str(missing) in line
    line = run_tipr_failing(["fit", *small_run(tmp_path), "--model.method.mask_ratio=1.0"])
    assert "mask_ratio" in line
    # 3 processes cannot split a batch of 32: refused before any process starts, so said once, not 3 times
    line = run_tipr_failing(["fit", *small_run(tmp_path), "--trainer.devices=3"])
    assert "data.batch_size=32" in line and "3 (trainer.devices x trainer.num_nodes)" in line
    assert not (tmp_path / "out" / "lightning_logs").exists()


def test_no_config_names_the_missing_config_and_asks_the_hub_once(tmp_path):
    """``tipr fit --model.method=sen`` (no --config): the default backbone is a hub id. Without a network it is one
    line at once (one probe, not huggingface_hub's 30 s of retries), saying that no --config was given."""
    dead_hub = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    line = run_tipr_failing(["fit", "--model.method=sen"], env=dead_hub)
    assert "model.backbone='openai/clip-vit-base-patch16'" in line and "the hub cannot be reached" in line


def test_a_hub_id_is_looked_up_in_the_cache_then_probed_once(monkeypatch):
    import transformers

    from tipr.model import backbone, hub

    calls = []

    def from_pretrained(name, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        raise OSError("not in the cache")

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", from_pretrained)
    monkeypatch.setattr(hub, "hub_unreachable", lambda: "no route")
    with pytest.raises(OSError, match=r"not in the local Hugging Face cache and the hub cannot be reached \(no route\)"):
        backbone.build_clip("someone/some-clip")
    assert calls == [True]  # the cache only: no download with retries was started
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)
    with pytest.raises(OSError, match="could not load the CLIP backbone"):
        backbone.build_clip("someone/some-clip")
    assert calls == [True, True, False]  # reachable: then the real download


def sweep_arguments(sweep: dict) -> list[str]:
    """The arguments a W&B agent passes for ``${args}``: ``--name=value`` per parameter."""
    args = []
    for name, spec in sweep["parameters"].items():
        value = spec["values"][-1] if "values" in spec else spec["min"]
        args.append(f"--{name}={value}")
    return args


def test_sweep_arguments_are_accepted(tmp_path):
    sweep = yaml.safe_load((EXPERIMENTS / "sweep.yaml").read_text())
    assert sweep["metric"]["name"] == "val/R1"
    assert "${args}" in sweep["command"] and "fit" in sweep["command"]
    args = sweep_arguments(sweep)
    assert "--model.method.mask_ratio=0.8" in args
    cli = TIPRCLI(TIPRModule, TIPRDataModule, auto_configure_optimizers=False, run=False,
                  save_config_callback=None, args=[*small_run(tmp_path), *args])
    hp, config = cli.model.hparams, cli.model.network.config
    assert config.mask_ratio == 0.8 and config.triplet_weight == 10.0 and config.restoration_weight == 20.0
    assert hp.lr == pytest.approx(3.0e-6)
    assert cli.datamodule.prune_prob == 0.3
    # the links: identities, image size and context length come from the data module
    assert hp.num_classes == cli.datamodule.num_classes == 96
    assert tuple(hp.image_size) == tuple(cli.datamodule.image_size)
    assert hp.text_length == cli.datamodule.text_length


def test_results_table_layout():
    results = {"test/R1": 75.0, "test/R5": 89.98, "test/R10": 94.09, "test/mAP": 67.23, "test/mINP": 51.45}
    table = format_results_table(results, dataset="CUHK-PEDES", method="SEN")
    assert table.splitlines()[-1] == "| SEN (text-to-image) | 75.00 / 89.98 / 94.09 / 67.23 / 51.45 |"
    with pytest.raises(KeyError, match="R1"):
        format_results_table({"test/R1": 1.0}, dataset="x", method="IRRA")


def run_tipr(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([TIPR, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"tipr {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def read_results(out_dir: Path, stage: str = "test") -> dict[str, float]:
    files = sorted(out_dir.rglob(f"{stage}_results.json"), key=lambda p: p.stat().st_mtime)
    assert files, f"no {stage}_results.json under {out_dir}"
    return json.loads(files[-1].read_text())


@pytest.mark.slow
def test_end_to_end_fit_then_test_through_the_cli(tmp_path):
    """A short but honest run of the real CLI: generate, train, keep the best, test.

    Learning is asserted by a wide margin, not by the run's last bits: chance
    R1 is 5% (20 test identities; a random ranking of the 80 queries gives
    5% +- 2.4%), the test asks for 12.5%, and the run measured 61.25%
    (ATEN_CPU_CAPABILITY=avx512 and avx2) and 57.5% (default).
    """
    # 256 identities x 2 images x 2 captions = 32 batches of 32 an epoch: 480 steps.
    run = [*small_run(tmp_path), "--data.synthetic.num_train_ids=256"]
    fit = run_tipr(["fit", *run, "--trainer.max_epochs=15", "--trainer.check_val_every_n_epoch=5"], timeout=900)
    assert "test results" in fit.stdout and "| SEN (text-to-image) |" in fit.stdout
    after_fit = read_results(tmp_path / "out")
    chance = 100 / 20  # R1 of a random ranking: 20 test identities
    assert after_fit["test/R1"] >= 2.5 * chance, after_fit

    best = sorted((tmp_path / "out").rglob("best-*.ckpt"))
    assert len(best) == 1
    # fit left the best checkpoint's network as a pretrained folder beside its logs
    from tipr.pretrained import load_pretrained

    folder = best[0].parent.parent / "pretrained"
    exported, from_checkpoint = load_pretrained(folder)[0].state_dict(), load_pretrained(best[0])[0].state_dict()
    assert exported.keys() == from_checkpoint.keys()
    assert all(torch.equal(exported[k], from_checkpoint[k]) for k in exported)
    test = run_tipr(["test", *run, "--ckpt_path", str(best[0])], timeout=300)
    assert "| SEN (text-to-image) |" in test.stdout
    # the checkpoint's run folder keeps the evaluation: no second version_N
    run_folder = best[0].parent.parent
    assert sorted(p.name for p in run_folder.parent.iterdir()) == [run_folder.name]
    assert json.loads((run_folder / f"test-{best[0].stem}" / "test_results.json").read_text()) == pytest.approx(after_fit, abs=1e-6)
    # lines every run used to print that say nothing about it (issue 21)
    for proc in (fit, test):
        output = proc.stdout + proc.stderr
        for noise in ("weights_only", "Total FLOPs", "DataLoader 1", "dirpath has changed", "LeafSpec", "litlogger"):
            assert noise not in output, (noise, output[-3000:])


@pytest.mark.slow
def test_wandb_runs_keep_their_own_folders_and_resume_into_them(tmp_path):
    """With experiments/wandb.yaml (offline) two runs do not overwrite each other: each keeps checkpoints,
    last.ckpt, config, results and pretrained folder in <save_dir>/tipr/<run id>/, and --ckpt_path last
    continues the newest one in its folder."""
    run = [*small_run(tmp_path), "--config", str(EXPERIMENTS / "wandb.yaml"), "--trainer.logger.init_args.save_dir",
           str(tmp_path / "out"), "--trainer.check_val_every_n_epoch=1", "--test_after_fit=false"]
    for _ in range(2):
        run_tipr(["fit", *run, "--trainer.max_epochs=1"], timeout=300)
    runs = sorted((tmp_path / "out" / "tipr").iterdir())
    assert len(runs) == 2
    for folder in runs:
        for name in ("checkpoints/last.ckpt", "config.yaml", "pretrained/model.safetensors"):
            assert (folder / name).is_file(), (folder, name)
    shared = {p.name for p in (tmp_path / "out").iterdir()}
    assert shared == {"tipr", "wandb"}, shared  # nothing of a run in the shared save_dir
    newest = max(runs, key=lambda folder: (folder / "checkpoints" / "last.ckpt").stat().st_mtime)
    resumed = run_tipr(["fit", *run, "--trainer.max_epochs=2", "--ckpt_path", "last"], timeout=300)
    assert f"Restored all states from the checkpoint at {newest / 'checkpoints' / 'last.ckpt'}" in resumed.stdout + resumed.stderr
    assert sorted((tmp_path / "out" / "tipr").iterdir()) == runs
    assert torch.load(newest / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["epoch"] == 1


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_equal_a_single_process_evaluation(tmp_path):
    """`--trainer.devices=2 --trainer.strategy=ddp` works unchanged, and its test metrics
    (gathered over ranks, padded duplicates dropped) equal a one-process `tipr test`."""
    run = [*small_run(tmp_path), "--data.synthetic.num_train_ids=48", "--data.synthetic.num_test_ids=21", "--data.synthetic.num_val_ids=11",
           "--data.synthetic.images_per_id=3", "--data.eval_batch_size=16", "--trainer.max_epochs=2",
           "--trainer.check_val_every_n_epoch=1"]
    run_tipr(["fit", *run, "--trainer.devices=2", "--trainer.strategy=ddp"], timeout=600)
    ddp = read_results(tmp_path / "out")
    best = sorted((tmp_path / "out").rglob("best-*.ckpt"))
    assert len(best) == 1
    assert (best[0].parent.parent / "pretrained" / "model.safetensors").is_file()  # rank 0 exported, no hang
    run_tipr(["test", *run, "--ckpt_path", str(best[0]), "--trainer.devices=1"], timeout=300)
    single = read_results(tmp_path / "out")
    assert set(ddp) == set(single) and "test/R1" in ddp
    # 21 test ids x 3 images = 63 gallery images: odd, so the DistributedSampler
    # pads a duplicate into one rank, which the metric must drop.
    assert ddp == pytest.approx(single, abs=1e-4)
