"""SampleEvaluation's schedule: a run that ends between evaluation epochs (max_steps inside an epoch, a last
epoch without validation) is still evaluated once at its final weights, and never twice."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from bg.models import SplitChannelNSF
from callbacks import SampleEvaluation
from datamodules import MDDataModule


def fit(tmp_path, data_args, model_kwargs, **trainer_kwargs):
    torch.manual_seed(0)
    evaluation = SampleEvaluation(every_n_epochs=4, n_samples=64, figures=False)
    trainer = L.Trainer(limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0, check_val_every_n_epoch=4,
                        logger=CSVLogger(tmp_path, name="", version="run"), log_every_n_steps=1,
                        callbacks=[evaluation], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", **trainer_kwargs)
    trainer.fit(SplitChannelNSF(**model_kwargs), MDDataModule(**data_args, batch_size=32))
    with open(tmp_path / "run" / "metrics.csv") as fh:
        logged = [(int(r["step"]), float(r["val/ess"])) for r in csv.DictReader(fh) if r.get("val/ess")]
    return trainer, evaluation, logged


@pytest.mark.parametrize("stop", [dict(max_steps=2), dict(max_epochs=2)], ids=["max_steps", "max_epochs"])
def test_a_run_that_stops_between_evaluations_is_evaluated_at_its_end(tmp_path, aldp_data_args, tiny_nsf_kwargs, stop):
    trainer, evaluation, logged = fit(tmp_path, aldp_data_args, tiny_nsf_kwargs, **stop)
    assert evaluation.evaluations == 1
    assert [step for step, _ in logged] == [trainer.global_step]
    assert 0 < logged[0][1] <= 1 and float(trainer.callback_metrics["val/ess"]) == pytest.approx(logged[0][1])


def test_the_last_validation_epoch_is_not_evaluated_twice(tmp_path, aldp_data_args, tiny_nsf_kwargs):
    trainer, evaluation, logged = fit(tmp_path, aldp_data_args, tiny_nsf_kwargs, max_epochs=4)
    assert trainer.global_step == 12 and evaluation.evaluations == 1 and len(logged) == 1


def test_evaluation_judges_the_float32_flow_whatever_mode_the_module_is_in(tmp_path, aldp_data_args, tiny_nsf_kwargs):
    # bfloat16 conditioners are a training-step option: the evaluation's samples and weights come from the
    # float32 flow even outside a validation epoch (the final evaluation), and the module's mode is restored
    trainer, evaluation, _ = fit(tmp_path, aldp_data_args, dict(tiny_nsf_kwargs, conditioner_precision="bfloat16"),
                                 max_steps=2)
    module = trainer.lightning_module
    module.train()
    in_training = evaluation.draw(trainer, module)
    assert module.training
    module.eval()
    in_eval = evaluation.draw(trainer, module)
    assert not module.training
    torch.testing.assert_close(in_training["log_w"], in_eval["log_w"], atol=0, rtol=0)
    with torch.no_grad():  # and bfloat16 training steps do compute something else
        x = in_eval["x"][:16]
        module.train()
        trained = module.density.log_prob(x)
        module.eval()
        assert not torch.equal(trained, module.density.log_prob(x))
