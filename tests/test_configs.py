from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from datamodules import MDDataModule

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "data").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_data_configs_instantiate_the_datamodule(path):
    parser = ArgumentParser()
    parser.add_subclass_arguments(MDDataModule, "data")
    cfg = parser.parse_object(yaml.safe_load(path.read_text()))
    dm = parser.instantiate(cfg).data
    assert isinstance(dm, MDDataModule)
    assert dm.batch_size == yaml.safe_load(path.read_text())["data"]["init_args"]["batch_size"]


# single-molecule NSF recipes (the transferable peptides_nsf.yaml is exercised by tests/test_transferable_nsf.py)
MODEL_CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*_nsf*.yaml")
                       if not p.stem.startswith("peptides_"))


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=[p.stem for p in MODEL_CONFIGS])
def test_training_configs_parse_and_build_every_component(path, tmp_path):
    """Each training config goes through the real LightningCLI parser and instantiates model,
    data, callbacks and logger classes (without running or touching data)."""
    from lightning.pytorch.loggers import CSVLogger

    from bg.lightning_cli import BGCLI
    from bg.models import SplitChannelNSF
    from callbacks import LossStages, SampleEvaluation

    configured = yaml.safe_load(path.read_text())["loss"]["stages"]
    first = next(iter(configured))
    scaled = next((n for n, st in configured.items() if "w2" in st["weights"]), None)  # a stage with W2, if any
    scale = ["--loss.weight_scale.w2=7.7"] if scaled is not None else []
    cli = BGCLI(args=["--config", str(path), "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                      f"--trainer.logger.init_args.save_dir={tmp_path}", *scale, f"--loss.stages.{first}.epochs=3"],
                model_class=SplitChannelNSF.__mro__[1], datamodule_class=MDDataModule.__mro__[1],
                subclass_mode_model=True, subclass_mode_data=True, run=False)
    assert isinstance(cli.model, SplitChannelNSF) and isinstance(cli.datamodule, MDDataModule)
    assert isinstance(cli.trainer.logger, CSVLogger)
    kinds = {type(c) for c in cli.trainer.callbacks}
    assert LossStages in kinds and SampleEvaluation in kinds
    stages = next(c for c in cli.trainer.callbacks if isinstance(c, LossStages)).stages
    assert [s.name for s in stages] == list(configured)
    # flat names (as sweeps set them) reach one field of one stage and leave the rest as configured
    assert stages[0].epochs == 3
    for s in stages[1:]:
        assert s.epochs == configured[s.name].get("epochs")
    if scaled is not None:
        st = next(s for s in stages if s.name == scaled)
        assert st.weights["w2"] == pytest.approx(7.7 * configured[scaled]["weights"]["w2"])
        assert st.weights.get("nll") == configured[scaled]["weights"].get("nll")
    epochs = sum(s.epochs or 0 for s in stages)
    assert epochs <= cli.trainer.max_epochs


TARFLOW_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*_tarflow.yaml"))
SAMPLER_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "sampler").glob("*.yaml"))


@pytest.mark.parametrize("path", TARFLOW_CONFIGS, ids=[p.stem for p in TARFLOW_CONFIGS])
@pytest.mark.parametrize("sampler", [None, *SAMPLER_CONFIGS], ids=["no-sampler", *[p.stem for p in SAMPLER_CONFIGS]])
def test_tarflow_configs_parse_with_each_sampler(path, sampler, tmp_path):
    """TarFlow configs, alone and with each sampler config layered on top, through the real parser."""
    from bg.lightning_cli import BGCLI
    from bg.models import TarFlowGenerator
    from bg.sampling import ImportanceSampler, SMCSampler

    args = ["--config", str(path)] + (["--config", str(sampler)] if sampler else [])
    cli = BGCLI(args=args + ["--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                             f"--trainer.logger.init_args.save_dir={tmp_path}"],
                model_class=TarFlowGenerator.__mro__[1], datamodule_class=MDDataModule.__mro__[1],
                subclass_mode_model=True, subclass_mode_data=True, run=False)
    model = cli.model
    assert isinstance(model, TarFlowGenerator) and model.hparams.com_correction == "gaussian" and model.hparams.rotations
    expected = {None: type(None), "importance": ImportanceSampler, "smc": SMCSampler}[sampler.stem if sampler else None]
    assert isinstance(model.sampler, expected)
    stages = yaml.safe_load(path.read_text())["loss"]["stages"]
    assert sum(s["epochs"] for s in stages.values()) <= cli.trainer.max_epochs


def test_cnf_config_parses_with_every_option_and_rejects_smc(tmp_path):
    """configs/aldp_cnf.yaml through the real parser; every model option is in the YAML; SMC is refused clearly."""
    import inspect

    from bg.lightning_cli import BGCLI
    from bg.models import EquivariantCNF

    path = Path(__file__).resolve().parents[1] / "configs" / "aldp_cnf.yaml"
    common = ["--config", str(path), "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
              f"--trainer.logger.init_args.save_dir={tmp_path}"]
    cli = BGCLI(args=common, model_class=EquivariantCNF.__mro__[1], datamodule_class=MDDataModule.__mro__[1],
                subclass_mode_model=True, subclass_mode_data=True, run=False)
    model = cli.model
    assert isinstance(model, EquivariantCNF) and model.hparams.encoding == "full" and model.hparams.pairing == "ot"
    assert model.ode.method == "dopri5" and model.hparams.chirality == "mirror"
    from bg.models import BoltzmannGenerator

    options = {p for cls in (EquivariantCNF, BoltzmannGenerator) for p in inspect.signature(cls).parameters}
    options -= {"kwargs", "loss_weights", "weight_decay", "energy_compile"}
    assert options <= set(yaml.safe_load(path.read_text())["model"]["init_args"])
    stages = yaml.safe_load(path.read_text())["loss"]["stages"]
    assert sum(s["epochs"] for s in stages.values()) <= cli.trainer.max_epochs
    smc = Path(__file__).resolve().parents[1] / "configs" / "sampler" / "smc.yaml"
    with pytest.raises(ValueError, match="does not support SMC"):
        BGCLI(args=common + ["--config", str(smc)], model_class=EquivariantCNF.__mro__[1],
              datamodule_class=MDDataModule.__mro__[1], subclass_mode_model=True, subclass_mode_data=True, run=False)
