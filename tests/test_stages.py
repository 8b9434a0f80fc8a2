"""LossStages: transitions by epochs, steps and a monitored metric; logged; restored on resume."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from bg.models import SplitChannelNSF
from callbacks import LossStages
from datamodules import MDDataModule


class WeightsPerEpoch(Callback):
    def __init__(self):
        self.seen = {}

    def on_train_epoch_start(self, trainer, pl_module):
        # Runs after LossStages (callbacks run in order): the weights this epoch trains with.
        self.seen[trainer.current_epoch] = dict(pl_module.loss_weights)


def fit(tmp_path, data_args, model_kwargs, stages, max_epochs, ckpt_path=None, batches=3):
    torch.manual_seed(0)
    probe = WeightsPerEpoch()
    trainer = L.Trainer(max_epochs=max_epochs, limit_train_batches=batches, limit_val_batches=1, num_sanity_val_steps=0,
                        logger=CSVLogger(tmp_path, name="", version="run"), log_every_n_steps=1,
                        callbacks=[LossStages(stages), probe, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    model = SplitChannelNSF(**model_kwargs)
    trainer.fit(model, MDDataModule(**data_args, batch_size=32), ckpt_path=ckpt_path)
    return trainer, model, probe


def read_metric(tmp_path, key):
    with open(tmp_path / "run" / "metrics.csv") as fh:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(fh) if r.get(key)]


def test_stages_switch_by_epochs_and_steps_and_are_logged(tmp_path, aldp_data_args, tiny_nsf_kwargs):
    stages = [dict(name="ml", weights={"nll": 1.0}, epochs=1),
              dict(name="w2", weights={"nll": 1.0, "w2": 10.0}, steps=2, lr=5e-4),
              dict(name="kl", weights={"kl": 1.0, "nll": 0.1})]
    trainer, model, probe = fit(tmp_path, aldp_data_args, tiny_nsf_kwargs, stages, max_epochs=3)
    assert probe.seen[0] == {"nll": 1.0} and probe.seen[1] == {"nll": 1.0, "w2": 10.0}
    assert model.loss_weights == {"kl": 1.0, "nll": 0.1}
    # steps 0-2 stage 0, steps 3-4 stage 1 (two steps), then stage 2 from step 5 on
    logged = dict(read_metric(tmp_path, "train/stage"))
    assert [logged[s] for s in range(9)] == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert read_metric(tmp_path, "train/w2") and read_metric(tmp_path, "train/kl")
    assert trainer.optimizers[0].param_groups[0]["lr"] == 5e-4  # set by stage w2, kept by stage kl


def test_monitored_stage_ends_when_metric_stops_improving(tmp_path, aldp_data_args, tiny_nsf_kwargs):
    # min_delta so large that nothing after the first validation counts as an improvement.
    stages = [dict(name="ml", weights={"nll": 1.0}, monitor="val/nll", patience=1, min_delta=1e9),
              dict(name="ml_w2", weights={"nll": 1.0, "w2": 1.0})]
    _, _, probe = fit(tmp_path, aldp_data_args, tiny_nsf_kwargs, stages, max_epochs=3, batches=1)
    assert probe.seen[0] == probe.seen[1] == {"nll": 1.0}
    assert probe.seen[2] == {"nll": 1.0, "w2": 1.0}


def test_resumed_run_continues_in_its_stage(tmp_path, aldp_data_args, tiny_nsf_kwargs):
    stages = [dict(name="a", weights={"nll": 1.0}, epochs=1),
              dict(name="b", weights={"nll": 1.0, "w2": 1.0}, epochs=2),
              dict(name="c", weights={"nll": 1.0, "kl": 0.1})]
    fit(tmp_path, aldp_data_args, tiny_nsf_kwargs, stages, max_epochs=2, batches=1)
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)["callbacks"]["LossStages"]
    assert state["index"] == 1 and state["start_epoch"] == 1
    _, model, probe = fit(tmp_path, aldp_data_args, tiny_nsf_kwargs, stages, max_epochs=4, ckpt_path=ckpt, batches=1)
    assert probe.seen == {2: {"nll": 1.0, "w2": 1.0}, 3: {"nll": 1.0, "kl": 0.1}}
    # A stage appended to the checkpoint's (a finished run extended) is entered once the last one is over.
    extended = stages[:2] + [dict(stages[2], epochs=1), dict(name="d", weights={"nll": 0.5})]
    _, _, probe = fit(tmp_path, aldp_data_args, tiny_nsf_kwargs, extended, max_epochs=5, ckpt_path=ckpt, batches=1)
    assert probe.seen == {4: {"nll": 0.5}}
    # Resuming with different stages is refused with the reason.
    other = [dict(name="x", weights={"nll": 1.0})]
    with pytest.raises(ValueError, match="resume with the same stages"):
        fit(tmp_path, aldp_data_args, tiny_nsf_kwargs, other, max_epochs=5, ckpt_path=ckpt, batches=1)


def test_bad_stage_configs_are_clear():
    with pytest.raises(ValueError, match="lr_end needs lr and a length"):
        LossStages([dict(name="s", weights={"nll": 1.0}, lr_end=1e-5)])
    with pytest.raises(TypeError):
        LossStages([dict(name="s", weights={"nll": 1.0}, epoch=3)])  # misspelt key
    with pytest.raises(ValueError, match="at least one stage"):
        LossStages([])
    inert = LossStages(None)  # the CLI's default when the config has no loss.stages
    assert not inert.active and inert.state_dict() == {}
    named = LossStages({"a": {"weights": {"nll": 1.0}, "epochs": 2}, "b": {"weights": {"kl": 1.0}}})
    assert [s.name for s in named.stages] == ["a", "b"] and named.stages[0].epochs == 2


@pytest.mark.parametrize("length", [{"epochs": 1}, {"steps": 2}])
def test_a_length_on_the_last_stage_ends_training(tmp_path, aldp_data_args, tiny_nsf_kwargs, length):
    stages = [dict(name="a", weights={"nll": 1.0}, epochs=1), dict(name="b", weights={"nll": 1.0}, **length)]
    trainer, _, probe = fit(tmp_path, aldp_data_args, tiny_nsf_kwargs, stages, max_epochs=6, batches=3)
    assert trainer.global_step == 3 + (3 if "epochs" in length else 2)
    assert sorted(probe.seen) == [0, 1]
