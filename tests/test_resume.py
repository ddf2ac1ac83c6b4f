"""A `tipr fit` killed with SIGKILL in the middle of an epoch resumes (`--ckpt_path last`) to the numbers
of an uninterrupted run, in the same run folder, keeping its best-so-far."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import Tiny

ROOT = Path(__file__).resolve().parents[1]
TIPR = str(Path(sys.executable).parent / "tipr")
#: recipe -> (kill after this step, the newest save before it): mid-epoch, away from an epoch end. last.ckpt
#: is written every 4 steps and at epoch ends; an epoch is about 11 steps of identity batches (SEN) or 12 of
#: random ones (IRRA).
KILLS = {"synthetic.yaml": (13, 12), "synthetic_irra.yaml": (17, 16)}


def fit(data: Path, out: Path, *extra: str, recipe: str = "synthetic.yaml") -> subprocess.CompletedProcess:
    args = [
        "fit", "--config", str(ROOT / "experiments" / recipe),
        "--data.root", str(data), "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out), "--trainer.enable_progress_bar=false",
        "--data.synthetic.num_train_ids=96", "--data.synthetic.num_val_ids=20", "--data.synthetic.num_test_ids=20", "--data.synthetic.images_per_id=2",
        "--data.num_workers=1", "--data.batch_size=32",
        "--trainer.max_epochs=3", "--trainer.check_val_every_n_epoch=1", "--last_checkpoint.every_n_train_steps=4",
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    return subprocess.run([TIPR, *args], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["synthetic.yaml", "synthetic_irra.yaml"], ids=["SEN", "IRRA"])
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_test_metrics(tmp_path, recipe):
    """For each method: its per-sample draws (SEN's masking noise, IRRA's masked captions) come from
    each sample's seed, so the resumed epoch sees the batches the uninterrupted one saw."""
    data = tmp_path / "data"
    whole = ok(fit(data, tmp_path / "whole", recipe=recipe))
    expected = json.loads(next((tmp_path / "whole").rglob("test_results.json")).read_text())

    killer = tmp_path / "kill.yaml"
    killer.write_text(
        "trainer:\n  callbacks:\n    - class_path: fault_injection.KillAfterStep\n"
        f"      init_args:\n        step: {KILLS[recipe][0]}\n"
    )
    killed = fit(data, tmp_path / "run", "--config", str(killer), recipe=recipe)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_dir = tmp_path / "run" / "lightning_logs" / "version_0"
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == KILLS[recipe][1]  # the newest save before the kill: mid-epoch, not an epoch end
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches_done"] > 0
    best_before = sorted(p.name for p in (run_dir / "checkpoints").glob("best-*.ckpt"))
    assert best_before  # epoch 0 was validated before the kill

    resumed = ok(fit(data, tmp_path / "run", "--ckpt_path", "last", recipe=recipe))
    assert "test results" in resumed.stdout
    # Same run folder, no version_1; the best of the first part was remembered (one best file left).
    assert [p.name for p in (tmp_path / "run" / "lightning_logs").iterdir()] == ["version_0"]
    assert len(list((run_dir / "checkpoints").glob("best-*.ckpt"))) == 1
    assert (run_dir / "metrics.part1.csv").is_file() and (run_dir / "metrics.csv").is_file()  # both parts' logs
    got = json.loads((run_dir / "test_results.json").read_text())
    whole_best = sorted(p.name for p in (tmp_path / "whole").rglob("best-*.ckpt"))
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("best-*.ckpt")) == whole_best
    # Exactly: both runs do the same arithmetic on the same machine (rounding could flip at an edge).
    assert got == expected
    assert "test results" in whole.stdout
    method = "IRRA" if "irra" in recipe else "SEN"
    assert f"| {method} (text-to-image) |" in resumed.stdout


def test_resume_version_finds_the_run_folder_and_prefers_a_newer_slurm_checkpoint(tmp_path):
    from tipr.training.checkpointing import resume_version

    logs = tmp_path / "lightning_logs"
    for version in (0, 3):
        (logs / f"version_{version}" / "checkpoints").mkdir(parents=True)
        (logs / f"version_{version}" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (logs / "version_7").mkdir()  # a run that never saved
    last = logs / "version_3" / "checkpoints" / "last.ckpt"
    assert resume_version("last", logs) == (str(last), 3)
    best = logs / "version_0" / "checkpoints" / "best-epoch01.ckpt"
    best.write_bytes(b"x")
    assert resume_version(str(best), logs) == (str(best.resolve()), 0)
    assert resume_version(str(tmp_path / "elsewhere.ckpt"), logs) is None
    assert resume_version("last", tmp_path / "nothing") is None
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"x")
    os.utime(last, (1, 1))  # the SLURM checkpoint is newer than last.ckpt
    assert resume_version("last", logs, hpc_dir=tmp_path) == (str(hpc), 3)


def test_resume_version_of_wandb_run_folders_named_by_run_id(tmp_path):
    """W&B runs live in <save_dir>/<project>/<run id>/: "last" is the newest last.ckpt, a path gives its run id."""
    from tipr.training.checkpointing import resume_version

    project = tmp_path / "tipr"
    for run_id, mtime in (("zzz111", 100), ("aaa222", 200)):
        (project / run_id / "checkpoints").mkdir(parents=True)
        (project / run_id / "checkpoints" / "last.ckpt").write_bytes(b"x")
        os.utime(project / run_id / "checkpoints" / "last.ckpt", (mtime, mtime))
    (project / "not-a-run").mkdir()
    newest = project / "aaa222" / "checkpoints" / "last.ckpt"
    assert resume_version("last", project, numbered=False) == (str(newest), "aaa222")
    assert resume_version(str(project / "zzz111" / "checkpoints" / "last.ckpt"), project, numbered=False)[1] == "zzz111"
    assert resume_version(str(project / "not-a-run" / "x.ckpt"), project, numbered=False) is None


def test_last_checkpoint_is_written_at_epoch_ends_and_by_time_and_atomically(tmp_path, monkeypatch):
    """A time interval shorter than a step: saved at every clock check (every TIME_CHECK_STEPS steps) and at
    each epoch end; written through a same-folder temporary file renamed into place."""
    import lightning.pytorch as pl

    from tipr.training.checkpointing import AtomicCheckpointIO, LastCheckpoint

    data = Tiny.data(tmp_path / "data", batch_size=4, sampler="random",  # 12 steps an epoch
                     synthetic={**Tiny.synthetic, "num_train_ids": 12, "num_val_ids": 0, "num_test_ids": 2})
    last = LastCheckpoint(every_n_minutes=1e-9)
    saved_at = []
    original = last.save
    monkeypatch.setattr(last, "save", lambda trainer: (saved_at.append(trainer.global_step), original(trainer)))
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((Path(a).name, Path(b).name)), real_replace(a, b)))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[last],
                         enable_checkpointing=False, default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()])
    module = Tiny.module(num_classes=data.num_classes)
    trainer.fit(module, datamodule=data)
    assert saved_at == [10, 12, 20, 24]  # clock checks at steps 10 and 20, epoch ends at 12 and 24
    assert renamed[-1][1] == "last.ckpt" and renamed[-1][0].startswith(".last.ckpt.")  # a same-folder partial
    assert renamed[-1][0].endswith(".partial") and last.path.is_file()
    assert torch.load(last.path, map_location="cpu", weights_only=False)["global_step"] == 24


#: The scenario of a killed run resumed by hand, small: validation every epoch, tested after fit.
MOMENT_RUN = ("--data.synthetic.num_train_ids=60", "--data.synthetic.num_val_ids=20",
              "--data.synthetic.num_test_ids=20", "--trainer.max_epochs=3", "--trainer.check_val_every_n_epoch=1",
              "--test_after_fit=true")


def kill_config(path: Path, event: int, log_file: Path | None = None) -> Path:
    log = f"\n        log_file: {log_file}" if log_file else ""
    path.write_text("trainer:\n  callbacks:\n    - class_path: fault_injection.KillAtEvent\n"
                    f"      init_args:\n        event: {event}{log}\n")
    return path


def run_outcome(out: Path) -> tuple[dict, dict, dict]:
    """The test table, the best checkpoint's weights and the final weights (``last.ckpt``, written at the
    last epoch's end) of the newest run folder under ``out``. The final weights catch a resumed run that
    went astray after its best epoch, which the first two would not show."""
    run = max((out / "lightning_logs").iterdir(), key=lambda p: int(p.name.split("_")[1]))
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    weights = [torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
               for path in (best, run / "checkpoints" / "last.ckpt")]
    return json.loads((run / "test_results.json").read_text()), *weights


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One whole run, listing every moment it passes (``KillAtEvent`` with no kill)."""
    root = tmp_path_factory.mktemp("moments")
    log = root / "moments.txt"
    ok(fit(root / "data", root / "whole", *MOMENT_RUN, "--config", str(kill_config(root / "log.yaml", 0, log)),
           "--last_checkpoint.every_n_train_steps=0"))
    moments = [line.split() for line in log.read_text().splitlines()]  # [count, kind, epoch, step]
    return root, moments, run_outcome(root / "whole")


def kill_then_resume(root: Path, event: int) -> tuple[dict, dict]:
    out = root / f"killed-{event}"
    extra = ("--last_checkpoint.every_n_train_steps=0",)
    killed = fit(root / "data", out, *MOMENT_RUN, *extra, "--config", str(kill_config(root / f"{event}.yaml", event)))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ok(fit(root / "data", out, *MOMENT_RUN, *extra, "--ckpt_path", "last"))
    return run_outcome(out)


def same_outcome(got: tuple, expected: tuple) -> bool:
    """Same machine, same arithmetic: the table and every weight exactly."""
    same_weights = all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
                       for a, b in zip(got[1:], expected[1:]))
    return got[0] == expected[0] and same_weights


@pytest.mark.slow
def test_killed_right_after_an_epoch_end_checkpoint_resumes_to_the_uninterrupted_run(uninterrupted):
    """The first optimiser step after epoch 0's last.ckpt: the resumed run starts from a checkpoint
    written at an epoch's end, which Lightning does not treat as a restart (it used to replay epoch 0's
    batches in epoch 1 with loader workers). The test table, the best and the final weights equal the
    whole run's."""
    root, moments, expected = uninterrupted
    first_last = next(i for i, m in enumerate(moments) if m[1] == "epoch_end")
    event = next(int(m[0]) for m in moments[first_last:] if m[1] == "batch")
    assert same_outcome(kill_then_resume(root, event), expected), moments[event - 1]


@pytest.mark.exhaustive
def test_killed_at_every_moment_of_a_run_resumes_to_the_uninterrupted_run(uninterrupted):
    """Every moment (each step, inside and after validation, before each checkpoint's rename, at each
    epoch's end, around the pretrained export): kill there, resume with --ckpt_path last, and get
    the whole run's test table, best and final weights. 35 moments, 12.5 minutes here: ``pytest -m exhaustive``."""
    root, moments, expected = uninterrupted
    failed = []
    for count, kind, epoch, step in moments:
        if not same_outcome(kill_then_resume(root, int(count)), expected):
            failed.append(f"{count} {kind} (epoch {epoch}, step {step})")
    assert failed == [], failed
