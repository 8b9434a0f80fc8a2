"""The README's own-molecule recipe, end to end through the real command line, as a user runs it: their
topology and trajectories (no bg record beside them, so the force field is named) → `bg data` → `bg fit`
→ `bg predict` → `bg analyze` with RMSD, Q and Rg to the native structure. Villin from ../shared/data
when it is there, else a capped tripeptide (ACE-AAA-NME)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import predicted_folder
from tests.test_bad_input import bg

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "hp35_nsf.yaml"


@pytest.fixture()
def user_md(tmp_path, protein_md_dir):
    """A user's folder: protein.pdb and traj.dcd (12 frames of short local MD), nothing else."""
    _, made_by_bg = protein_md_dir
    user = tmp_path / "user"
    user.mkdir()
    shutil.copy(made_by_bg / "topology.pdb", user / "protein.pdb")
    shutil.copy(next((made_by_bg / "chunks").glob("chunk_*.dcd")), user / "traj.dcd")
    return user


def test_readme_recipe_end_to_end(user_md):
    data = ["--data.init_args.topology=protein.pdb", "--data.init_args.trajectories=[traj*.dcd]",
            "--data.init_args.forcefield=amber14-obc2", "--data.init_args.constraints=none"]
    out = bg("data", "--topology", "protein.pdb", "--trajectories", "traj*.dcd", "--forcefield", "amber14-obc2",
             cwd=user_md)
    assert out.returncode == 0 and "frames: train" in out.stdout, out.stderr

    quick = user_md / "quick.yaml"  # what a user shrinks for a first try: a tiny flow, one epoch, a CSV log
    quick.write_text(yaml.safe_dump(dict(
        trainer=dict(max_epochs=1, check_val_every_n_epoch=1, enable_progress_bar=False, num_sanity_val_steps=0,
                     logger=dict(class_path="lightning.pytorch.loggers.CSVLogger", init_args=dict(save_dir="logs")),
                     callbacks=[dict(class_path="callbacks.SampleEvaluation", init_args=dict(n_samples=32)),
                                dict(class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                                     init_args=dict(save_last=True)),
                                dict(class_path="callbacks.SampleWriter", init_args=dict(output_dir="samples"))]),
        loss=dict(stages=dict(ml=dict(weights={"nll": 1.0}, epochs=1))),
        model=dict(init_args=dict(backbone_layers=2, sidechain_layers=2, width=16, depth=1, attention_dim=8,
                                  compile_splines=False, energy_compile=False,
                                  w2_batch_size=8, kl_batch_size=8, sample_batch_size=32, predict_samples=40)),
        data=dict(init_args=dict(batch_size=8)))))
    out = bg("fit", "--config", CONFIG, "--config", quick, *data, cwd=user_md)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    ckpt = re.search(r"last checkpoint: (\S+)", out.stdout).group(1)

    out = bg("predict", "--config", CONFIG, "--config", quick, *data, "--ckpt_path", ckpt, cwd=user_md)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    samples = user_md / predicted_folder(out.stdout)
    assert (samples / "samples.npz").exists() and not (user_md / "bg_config.yaml").exists()  # nothing else written

    out = bg("analyze", samples, "--reference", "traj.dcd", "--topology", "protein.pdb", "--native", "protein.pdb",
             "--bootstrap", "20", "--bins", "8", "--out", "report", cwd=user_md)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads((user_md / "report" / "report.json").read_text())
    assert {"RMSD to native (nm)", "Q (native contacts)", "Rg (nm)"} <= set(report["observables"])
    rmsd = report["observables"]["RMSD to native (nm)"]["reference"]
    assert 0 <= rmsd["value"] < 0.2  # short local MD stays near its start
