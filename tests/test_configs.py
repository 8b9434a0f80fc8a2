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
