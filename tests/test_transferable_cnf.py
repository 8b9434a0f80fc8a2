"""TransferableCNF: one EGNN field for many peptides; each bound molecule is exactly the single-molecule CNF
with the same weights; `bg fit` on two peptides, `bg predict --data.sequence` of a third it never saw."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import bg
from bg.models import EquivariantCNF, TransferableCNF
from callbacks import MoleculeEvaluation
from datamodules import PeptideSetDataModule
from tests.conftest import peptide_fit_overrides, predicted_folder
from tests.test_nsf_cli import run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "peptides_cnf.yaml"
TINY = dict(hidden=8, layers=2, solver="dopri5", rtol=1e-7, atol=1e-7, energy_backend="torch")


@pytest.fixture(scope="module")
def data(tiny_peptide_set):
    cache, spec, _ = tiny_peptide_set
    dm = PeptideSetDataModule(str(spec), cache_dir=str(cache), batch_size=4)
    dm.setup("fit")
    return dm


def test_a_bound_molecule_is_the_single_molecule_cnf_with_the_same_weights(data):
    torch.manual_seed(0)
    model = TransferableCNF(**TINY)
    frames = data.positions["train"]
    scale = model.fit_scale(frames)
    centred = torch.cat([(f.double() - f.double().mean(1, keepdim=True)).reshape(-1) for f in frames])
    assert scale == pytest.approx(float(centred.square().mean().sqrt()), rel=1e-12)  # over all peptides' atoms
    for seq in ("G", "S"):  # a training peptide and one the model never saw
        model.bind(data.system(seq))
        single = EquivariantCNF(**TINY, scale=scale)
        single.build(data.system(seq), None)
        single.flow.field.load_state_dict(model.field.state_dict())
        x = data.positions["train" if seq == "G" else "test"][0][:3].double()
        torch.testing.assert_close(model.log_prob(x), single.log_prob(x), rtol=1e-9, atol=1e-9)
        torch.manual_seed(1)
        xs, log_q = model.sample(2)
        assert xs.shape == (2, data.system(seq).n_atoms, 3)
        torch.testing.assert_close(model.log_prob(xs), log_q, rtol=1e-4, atol=1e-4)  # the ODE solved back
    # one set of weights: binding another molecule adds no parameters
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in model.field.parameters())


def test_an_unfitted_model_refuses_to_bind_and_mixed_batches_are_refused(data):
    model = TransferableCNF(**TINY)
    with pytest.raises(RuntimeError, match="scale is not fitted"):
        model.bind(data.system("G"))
    model.fit_scale(data.positions["train"])
    model.bind(data.system("G"))
    with pytest.raises(ValueError, match="batch_mode must be 'molecule'"):
        model.molecule_batch({"x": torch.zeros(2, 5, 3), "mask": torch.ones(2, 5, dtype=torch.bool),
                      "molecule": torch.zeros(2, dtype=torch.long)})


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_peptide_set):
    """`bg fit --config configs/peptides_cnf.yaml` shrunk: 4 steps on G and A."""
    tmp_path = tmp_path_factory.mktemp("transfer")
    loss = dict(stages=dict(fm=dict(weights={"flow_matching": 1.0}, epochs=2, lr=1e-3, lr_end=1e-4)))
    model = dict(init_args=dict(hidden=8, layers=1, solver="rk4", steps=3, sample_batch_size=5, predict_samples=10))
    small = peptide_fit_overrides(tmp_path, tiny_peptide_set, loss, model, n_samples=4)
    run(["fit", "--config", str(CONFIG), "--config", str(small)], tmp_path)
    return tmp_path, small


def test_fit_on_two_peptides_and_predict_a_third_it_never_saw(fitted, data):
    tmp_path, small = fitted
    rows = list(csv.DictReader(open(tmp_path / "logs" / "run" / "metrics.csv")))
    logged = [r for r in rows if r.get("test/ess/S")]  # MoleculeEvaluation at the end of the last epoch only
    assert len(logged) == 1 and 0 <= float(logged[0]["test/ess"]) <= 1
    assert float(logged[0]["test/valid_rate/S"]) >= 0 and any(r.get("train/flow_matching") for r in rows)
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    stored = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert stored["bg_peptides"]["train"] == ["G", "A"] and stored["bg_peptides"]["test"] == ["S"]
    assert stored["bg_system"] is None and math.isfinite(float(stored["state_dict"]["global_scale"]))
    assert not any(k.startswith("density.") for k in stored["state_dict"])  # one field, not one per molecule

    out = run(["predict", "--config", str(CONFIG), "--config", str(small), "--ckpt_path", str(ckpt),
               "--data.sequence", "S"], tmp_path)
    folder = predicted_folder(out)
    npz = np.load(folder / "samples.npz")
    assert len(npz["log_w"]) == 10 and np.isfinite(npz["log_q"]).all()
    import mdtraj as md
    top = md.load_topology(str(folder / "topology.pdb"))
    assert [r.name for r in top.residues] == ["ACE", "SER", "NME"] and top.n_atoms == data.system("S").n_atoms

    with pytest.raises(ValueError, match="needs the molecule: --data.sequence SEQ .* test peptides: S"):
        data.predict_system()  # what `bg predict` without --data.sequence says

    model = bg.load_generator(ckpt)
    assert isinstance(model, TransferableCNF) and model.peptides["forcefield"] == data.spec.forcefield
    model.bind(data.system("S"))
    torch.manual_seed(0)
    x, log_q = model.sample(3)
    assert x.shape == (3, data.system("S").n_atoms, 3) and torch.isfinite(model.energy(x)).all()


def test_molecule_evaluation_reports_every_held_out_peptide_and_their_mean(fitted, data):
    tmp_path, _ = fitted
    model = bg.load_generator(tmp_path / "ckpt" / "last.ckpt")

    class Trainer:  # what the callback reads of a trainer
        datamodule, global_step, global_rank = data, 0, 0

    values = MoleculeEvaluation(n_samples=8, split="test").evaluate(Trainer(), model)
    assert {"test/ess/S", "test/ess", "test/torsion_w2/S", "test/torsion_w2_reweighted/S",
            "test/basin_alpha_R/S"} <= set(values)
    assert 0 <= values["test/ess"] <= 1 and values["test/ess"] == values["test/ess/S"]
    assert model.system.name == data.system("S").name
