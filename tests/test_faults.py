"""Training that survives faults: non-finite steps skipped and counted, exact mid-epoch resume (model,
optimizer, EMA, loss stage, data position, random stream), SIGKILL and SIGTERM through the CLI,
atomic checkpoint writes."""

import csv
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

import bg
from bg.models import SplitChannelNSF
from callbacks import LossStages
from datamodules import MDDataModule

ROOT = Path(__file__).resolve().parents[1]


class InjectNaN(Callback):
    """Poison the data of the given (epoch, batch) pairs, optionally on one rank only."""

    def __init__(self, at, rank=None):
        self.at, self.rank = set(at), rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) in self.at and self.rank in (None, trainer.global_rank):
            batch[0][0, 0, 0] = float("nan")


class WeightProbe(Callback):
    def __init__(self):
        self.before, self.after, self.batches = {}, {}, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[(trainer.current_epoch, batch_idx)] = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        self.batches.append(float(batch[0].double().sum()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[(trainer.current_epoch, batch_idx)] = torch.cat([p.detach().flatten() for p in pl_module.parameters()])


def _trainer(tmp_path, callbacks, **kw):
    defaults = dict(accelerator="cpu", max_epochs=1, num_sanity_val_steps=0, limit_val_batches=1,
                    logger=CSVLogger(tmp_path, name="", version="run"), log_every_n_steps=1, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    defaults.update(kw)
    return L.Trainer(callbacks=callbacks, **defaults)


def test_a_non_finite_loss_skips_the_step_and_is_counted(tmp_path, aldp_data_args, tiny_nsf_kwargs):
    torch.manual_seed(0)
    probe = WeightProbe()
    trainer = _trainer(tmp_path, [InjectNaN({(0, 1)}), probe], limit_train_batches=3)
    model = SplitChannelNSF(**tiny_nsf_kwargs)
    trainer.fit(model, MDDataModule(**aldp_data_args, batch_size=32))
    assert torch.equal(probe.before[(0, 1)], probe.after[(0, 1)]), "the poisoned step must not touch the weights"
    assert not torch.equal(probe.before[(0, 2)], probe.after[(0, 2)]), "training goes on after it"
    assert torch.isfinite(probe.after[(0, 2)]).all()
    assert model.guard.skipped == 1 and trainer.global_step == 3  # a skipped step still counts as a step
    with open(tmp_path / "run" / "metrics.csv") as fh:
        logged = [float(r["train/skipped_steps"]) for r in csv.DictReader(fh) if r.get("train/skipped_steps")]
    assert logged[0] == 0 and logged[-1] == 1


def test_too_many_skipped_steps_in_a_row_stop_the_run(tmp_path, aldp_data_args, tiny_nsf_kwargs):
    trainer = _trainer(tmp_path, [InjectNaN({(0, i) for i in range(4)})], limit_train_batches=4)
    model = SplitChannelNSF(**tiny_nsf_kwargs, max_skipped_in_a_row=2)
    with pytest.raises(FloatingPointError, match="2 training steps in a row"):
        trainer.fit(model, MDDataModule(**aldp_data_args, batch_size=32))


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path, aldp_data_args, tiny_nsf_kwargs, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, [InjectNaN({(0, 1)}, rank=1)], limit_train_batches=3, devices=2, strategy="ddp_fork",
                       logger=False)
    model = SplitChannelNSF(**tiny_nsf_kwargs)
    trainer.fit(model, MDDataModule(**aldp_data_args, batch_size=16))
    # rank 0 (whose metrics come back) had finite data and still skipped: the NaN reached it through the all-reduce
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- resume
STAGES = {"ml": {"weights": {"nll": 1.0}, "epochs": 1},
          "ml_kl": {"weights": {"nll": 1.0, "kl": 0.1}, "lr": 5e-4}}


def _resumable_fit(tmp_path, data_args, kwargs, max_steps, ckpt_path=None):
    torch.manual_seed(0)
    probe = WeightProbe()
    ema = EMAWeightAveraging(decay=0.9)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = _trainer(tmp_path, [LossStages(STAGES), probe, ema, ckpt], max_epochs=4, max_steps=max_steps,
                       limit_train_batches=3, enable_checkpointing=True, logger=False)
    model = SplitChannelNSF(**kwargs)
    trainer.fit(model, MDDataModule(**data_args, batch_size=32), ckpt_path=ckpt_path)
    return trainer, model, probe, ema


def test_mid_epoch_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, aldp_data_args, tiny_nsf_kwargs):
    # 3 batches per epoch; stop after step 5 (epoch 1, batch 1; stage ml_kl with flow samples), resume to 8.
    full, full_model, full_probe, full_ema = _resumable_fit(tmp_path / "full", aldp_data_args, tiny_nsf_kwargs, 8)
    _resumable_fit(tmp_path / "cut", aldp_data_args, tiny_nsf_kwargs, 5)
    ckpt = torch.load(tmp_path / "cut" / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 5 and ckpt["MDDataModule"] == {"epoch": 1, "batches": 2}
    resumed, model, probe, ema = _resumable_fit(tmp_path / "cut", aldp_data_args, tiny_nsf_kwargs, 8,
                                                ckpt_path=tmp_path / "cut" / "ckpt" / "last.ckpt")
    assert resumed.global_step == 8
    # the same batches, in the same order, as steps 6-8 of the uninterrupted run
    assert probe.batches == full_probe.batches[5:]
    # model, optimizer, EMA, stage and random stream restored: the same weights (EMA copied in at the end)
    for (name, a), b in zip(full_model.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(full_ema._average_model.parameters(), ema._average_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert model.loss_weights == full_model.loss_weights == STAGES["ml_kl"]["weights"]
    # the checkpoint holds both weights; bg.load_generator gives the averaged ones unless asked for the others
    last = tmp_path / "cut" / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    averaged, training = bg.load_generator(last), bg.load_generator(last, weights="training")
    for name, value in averaged.state_dict().items():
        torch.testing.assert_close(value, saved["state_dict"][name], msg=name)
        torch.testing.assert_close(training.state_dict()[name], saved["current_model_state"][name], msg=name)
    assert any(not torch.equal(saved["state_dict"][k], saved["current_model_state"][k]) for k in saved["state_dict"])
    with pytest.raises(ValueError, match="averaged"):
        bg.load_generator(last, weights="ema")
    # bg analyze judges either set: the same draw as the loaded training weights, not the averaged ones
    report = bg.evaluate(last, n=64, weights="training", n_boot=10, seed=3)
    for other, same in ((training, True), (averaged, False)):
        mine = bg.evaluate(other, n=64, n_boot=10, seed=3)
        assert (report.sampling["ess"]["value"] == mine.sampling["ess"]["value"]) is same
    with pytest.raises(ValueError, match="checkpoint file"):
        bg.evaluate(training, n=64, weights="training")


# ---------------------------------------------------------------------------------------------- CLI
def _cli_config(tmp_path, data_args, tiny_kwargs, every_n_train_steps):
    config = dict(
        seed_everything=1,
        trainer=dict(accelerator="cpu", max_epochs=200, limit_val_batches=1, num_sanity_val_steps=0, log_every_n_steps=1,
                     check_val_every_n_epoch=100, enable_progress_bar=False,
                     logger=dict(class_path="lightning.pytorch.loggers.CSVLogger",
                                 init_args=dict(save_dir=str(tmp_path / "logs"), name="bg")),
                     callbacks=[dict(class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                                     init_args=dict(save_last=True, every_n_train_steps=every_n_train_steps))]),
        model=dict(class_path="bg.models.SplitChannelNSF", init_args=tiny_kwargs),
        data=dict(class_path="datamodules.MDDataModule",
                  init_args=dict(data_args, batch_size=16, split=list(data_args["split"]))),
        loss=dict(stages={"a": {"weights": {"nll": 1.0}, "epochs": 1}, "b": {"weights": {"nll": 1.0}, "epochs": 150},
                          "c": {"weights": {"nll": 1.0}}}),
    )
    path = tmp_path / "fault.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _start(tmp_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return subprocess.Popen([sys.executable, "-m", "bg", "fit", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(proc, predicate, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early (rc {proc.returncode}): {proc.stdout.read()[-3000:]}")
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("timed out waiting for the run")


def _last_checkpoint_in_stage(tmp_path, stage_index, min_step):
    for path in (tmp_path / "logs" / "bg").glob("*/checkpoints/last.ckpt"):
        ckpt = torch.load(path, weights_only=False)  # always complete: checkpoints are written atomically
        stages = next(v for k, v in ckpt["callbacks"].items() if k.startswith("LossStages"))
        if stages["index"] == stage_index and ckpt["global_step"] >= min_step:
            return path, ckpt["global_step"]
    return None


def _rows(metrics_csv):
    with open(metrics_csv) as fh:
        return [r for r in csv.DictReader(fh)]


def test_sigkill_then_resume_with_ckpt_path_last_continues_in_stage_2(tmp_path, aldp_data_args, tiny_nsf_kwargs):
    config = _cli_config(tmp_path, aldp_data_args, tiny_nsf_kwargs, every_n_train_steps=1)
    proc = _start(tmp_path, "--config", str(config))
    # 140 training frames / 16 = 8 steps per epoch: stage b starts at step 8
    _wait_for(proc, lambda: _last_checkpoint_in_stage(tmp_path, 1, 11))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (path, step), = [_last_checkpoint_in_stage(tmp_path, 1, 0)]  # loads: not left half-written by the kill
    first_run = path.parents[1]

    proc = _start(tmp_path, "--config", str(config), "--ckpt_path", "last", f"--trainer.max_steps={step + 3}")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert f"--ckpt_path last: resuming {path}" in out
    resumed = [d for d in (tmp_path / "logs" / "bg").iterdir() if d != first_run]
    rows = [r for r in _rows(resumed[0] / "metrics.csv") if r.get("train/stage")]
    steps = [int(r["step"]) for r in rows]
    assert steps[0] == step, "the resumed run starts at the next step, neither repeating nor skipping one"
    assert float(rows[0]["train/stage"]) == 1.0, "and in stage 2 (b)"
    assert steps[-1] == step + 2


@pytest.mark.parametrize("devices", [1, 2], ids=["one_process", "ddp_two_processes"])
def test_sigterm_saves_a_checkpoint_before_exiting(tmp_path, aldp_data_args, tiny_nsf_kwargs, devices, monkeypatch):
    # checkpoints every 1000 steps only: the one found after SIGTERM was written because of it
    config = _cli_config(tmp_path, aldp_data_args, tiny_nsf_kwargs, every_n_train_steps=1000)
    ddp = []
    if devices > 1:  # SIGTERM to rank 0 (the launcher) reaches rank 1 too; both save, then exit
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            monkeypatch.setenv("MASTER_PORT", str(sock.getsockname()[1]))
        ddp = ["--trainer.strategy=ddp", "--trainer.devices=2"]
    proc = _start(tmp_path, "--config", str(config), *ddp)
    _wait_for(proc, lambda: list((tmp_path / "logs" / "bg").glob("*/metrics.csv")))
    time.sleep(3)
    os.kill(proc.pid, signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "preempted (SIGTERM): checkpoint" in out, out[-3000:]
    (path,) = (tmp_path / "logs" / "bg").glob("*/checkpoints/last.ckpt")
    step = int(out.split("preempted (SIGTERM): checkpoint")[1].split("at step")[1].split()[0])
    assert torch.load(path, weights_only=False)["global_step"] == step > 0


SAVER = textwrap.dedent("""
    import sys, torch
    from bg.checkpointing import AtomicCheckpointIO
    io, i = AtomicCheckpointIO(), 0
    state = {"weights": torch.randn(40_000_000)}  # 160 MB: a save takes a while
    print("ready", flush=True)
    while True:
        i += 1
        state["i"] = i
        io.save_checkpoint(state, sys.argv[1])
""")


def test_a_kill_during_a_save_never_leaves_a_broken_checkpoint(tmp_path):
    target = tmp_path / "last.ckpt"
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    seen = []
    for delay in (1.3, 2.6):
        proc = subprocess.Popen([sys.executable, str(script), str(target)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        if target.exists():
            seen.append(torch.load(target, weights_only=False)["i"])  # complete, whatever the moment of the kill
    assert seen, "at least one save should have completed"
    # a later save removes the temporaries the killed processes left behind
    from bg.checkpointing import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint({"i": -1}, target)
    assert not list(tmp_path.glob(".last.ckpt.tmp-*")) and torch.load(target, weights_only=False)["i"] == -1


def test_ckpt_path_last_picks_the_newest_checkpoint_of_the_same_generator(tmp_path):
    from bg.checkpointing import find_last_checkpoint

    def save(run, step, hparams, molecule="aldp", cls="bg.models.nsf.SplitChannelNSF"):
        path = tmp_path / run / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        torch.save({"bg_class": cls, "bg_system": {"name": molecule}, "global_step": step, "epoch": 0,
                    "hyper_parameters": hparams}, path)
        time.sleep(0.05)  # distinct modification times
        return str(path)

    split = {"split_channels": True, "width": 128, "lr": 1e-3}
    older = save("a", 10, split)
    save("b", 20, dict(split, split_channels=False))  # the baseline: another architecture
    save("c", 30, split, molecule="chignolin")
    save("d", 40, split, cls="bg.models.other.Other")
    (tmp_path / "e" / "checkpoints").mkdir(parents=True)
    (tmp_path / "e" / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    found = find_last_checkpoint([tmp_path], "bg.models.nsf.SplitChannelNSF", "aldp", dict(split, lr=5e-4))
    assert found["path"] == older and found["global_step"] == 10  # a changed lr may resume
    assert find_last_checkpoint([tmp_path], "bg.models.nsf.SplitChannelNSF", "aldp", dict(split, width=64)) is None
    assert find_last_checkpoint([tmp_path / "missing"]) is None


def test_inside_a_sweep_agent_the_wandb_logger_goes_online(tmp_path, monkeypatch):
    from bg.lightning_cli import run

    args = ["--config", str(ROOT / "configs" / "aldp_nsf.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}"]
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert not run(args, run_subcommand=False).trainer.logger._offline  # the experiment itself is not created
    monkeypatch.setenv("WANDB_MODE", "offline")  # an explicit offline agent stays offline
    assert run(args, run_subcommand=False).trainer.logger._offline
    monkeypatch.delenv("WANDB_SWEEP_ID")
    monkeypatch.delenv("WANDB_MODE")
    assert run(args, run_subcommand=False).trainer.logger._offline  # outside a sweep: the offline default
