"""TransferableNSF: one set of atom-token conditioners for many peptides over internal coordinates, spline
intervals and base from each molecule's harmonic geometry (checked against MD); `bg fit` on two peptides,
`bg predict --data.sequence` of a third, sampling a fourth the set never held."""

import csv
import dataclasses
import math
from pathlib import Path

import mdtraj as md
import numpy as np
import pytest
import torch

import bg
from bg.coordinates import InternalCoordinates
from bg.coordinates.harmonic import harmonic_geometry, rotatable_torsions
from bg.energy import target_energy
from bg.flows import CartesianDensity
from bg.flows.transferable_nsf import CHEMISTRY_ELEMENTS, DROPPABLE, FIELD_VOCAB, AtomTokenConditioner, TransferableSplineFlow, atom_token_layout
from bg.models import TransferableNSF
from datamodules import PeptideSetDataModule
from tests.conftest import peptide_fit_overrides, predicted_folder
from tests.test_nsf_cli import run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "peptides_nsf.yaml"


@pytest.fixture(scope="module")
def aldp_geometry(aldp_system):
    rep = InternalCoordinates(aldp_system.topology)
    energy = target_energy(aldp_system, backend="torch", compile=False)
    return rep, harmonic_geometry(rep, energy, aldp_system.positions)


def test_harmonic_geometry_agrees_with_md_and_finds_the_rotatable_torsions(aldp_geometry, aldp_frames):
    rep, geometry = aldp_geometry
    table = rep.coordinate_table()
    rotatable = {tuple(n.split(":")[1] for n in table[i]["atoms"][1:3]) for i in torch.nonzero(geometry.rotatable).flatten()}
    # φ (N–CA), ψ (CA–C) and the three methyl rotors (ACE CH3–C, ALA CB–CA, NME C–N); not the amide bonds
    assert rotatable == {("N", "CA"), ("C", "CA"), ("CH3", "C"), ("CB", "CA"), ("C", "N")}
    assert int(geometry.rotatable.sum()) == 5
    z, _ = rep(torch.as_tensor(aldp_frames))
    stiff = ~geometry.rotatable
    deviation = z - geometry.centre
    deviation = torch.where(rep.is_torsion, torch.remainder(deviation + math.pi, 2 * math.pi) - math.pi, deviation)
    ratio = deviation[:, stiff].std(0) / geometry.sigma[stiff]
    # 200 frames of 50 ps MD: the harmonic σ of bonds, angles and fixed torsions is the MD's spread
    assert 0.85 < float(ratio.median()) < 1.2 and float(ratio.min()) > 0.5 and float(ratio.max()) < 2.0
    assert float((deviation[:, stiff].abs() / geometry.sigma[stiff]).max()) < 8.0  # inside the spline intervals
    # rigid scans: a methyl rotor (ALA CB–CA) has three equal wells 120° apart; φ's lowest well holds the MD's φ
    scan = geometry.torsion_energy
    rows = torch.nonzero(geometry.rotatable).flatten().tolist()
    methyl = scan[[i for i, r in enumerate(rows) if table[r]["atoms"][1:3] == ["ALA2:CB", "ALA2:CA"]][0]]
    assert scan.shape == (5, 360) and float(scan.min()) == 0.0
    torch.testing.assert_close(methyl, methyl.roll(120), rtol=0, atol=0.3)
    assert float(methyl.max()) > 3.0  # a barrier of a few kT (about 3 kcal/mol for a methyl rotor)
    phi_index = rep.phi_psi_indices()[0][0]
    phi_scan = scan[rows.index(int(phi_index))]
    grid = -math.pi + (torch.arange(360, dtype=torch.float64) + 0.5) * math.pi / 180
    md_phi = z[:, phi_index].median()
    assert float(phi_scan[(grid - md_phi).abs().argmin()]) < 3.0


def test_a_bound_flow_starts_as_the_harmonic_approximation_and_inverts_for_any_peptide(aldp_system, aldp_geometry,
                                                                                      aldp_frames):
    rep, geometry = aldp_geometry
    z, _ = rep(torch.as_tensor(aldp_frames[:16]))
    stiff = ~geometry.rotatable
    deviation = torch.remainder(z[:, stiff] - geometry.centre[stiff] + math.pi, 2 * math.pi) - math.pi
    uniform = int(geometry.rotatable.sum()) * math.log(2 * math.pi)
    # zero-initialised outputs: every coupling is the identity and q is where the flow starts, uniform on the
    # rotatable torsions and on the stiff coordinates either
    # - correlated: the multivariate normal of the harmonic centre and covariance (truncation at ± 8 whitened σ:
    #   a mass of 1 − 1e-14), or
    # - independent: normals of the harmonic centre and σ truncated to ± 8 σ (torsions recentred)
    correlated = torch.distributions.MultivariateNormal(torch.zeros(int(stiff.sum()), dtype=torch.float64),
                                                        geometry.covariance).log_prob(deviation) - uniform
    normal = torch.distributions.Normal(0.0, geometry.sigma[stiff])
    mass = normal.cdf(8 * geometry.sigma[stiff]) - normal.cdf(-8 * geometry.sigma[stiff])
    independent = (normal.log_prob(deviation) - mass.log()).sum(-1) - uniform
    assert float((correlated - independent).mean()) > 1.0  # the correlations are worth nats on MD frames
    # torsion_prior scan: the rotatable torsions start from their rigid scans, exp(−u/2) with a 20 % uniform share
    table = torch.softmax(-geometry.torsion_energy / 2.0, -1) * 0.8 + 0.2 / geometry.torsion_energy.shape[1]
    width = 2 * math.pi / table.shape[1]
    bins = ((z[:, geometry.rotatable] + math.pi) / width).long()
    scanned = table.gather(1, bins.T).T.div(width).log().sum(-1) + uniform
    for harmonic, prior, expected in (("independent", "uniform", independent), ("correlated", "scan", correlated + scanned),
                                      ("correlated", "uniform", correlated)):
        torch.manual_seed(0)
        shared = TransferableSplineFlow(backbone_layers=2, sidechain_layers=2, bins=4, width=8, depth=1,
                                        attention_dim=8, harmonic=harmonic, torsion_prior=prior).double()
        torch.testing.assert_close(shared.bind(rep, geometry).log_prob(z), expected, rtol=1e-9, atol=1e-8)
    unscanned = dataclasses.replace(geometry, torsion_energy=geometry.torsion_energy[:, :0])  # scan_points=0
    with pytest.raises(ValueError, match="scan_points > 0"):
        TransferableSplineFlow(torsion_prior="scan").bind(rep, unscanned)

    with torch.no_grad():  # away from the identity: sample, then evaluate, for two molecules with one set of weights
        for p in shared.parameters():
            p.add_(0.1 * torch.randn_like(p))
    from bg.systems import build_capped_peptide

    for system in (aldp_system, build_capped_peptide("W", forcefield="amber99sbildn-obc")):
        rep = InternalCoordinates(system.topology)
        geometry = harmonic_geometry(rep, target_energy(system, backend="torch", compile=False), system.positions)
        density = CartesianDensity(rep, shared.bind(rep, geometry))
        x, log_q = density.sample(32)
        assert x.shape == (32, system.n_atoms, 3)
        torch.testing.assert_close(density.log_prob(x), log_q, rtol=1e-8, atol=1e-8)
        assert set(density.parameters()) == set(shared.parameters())  # the bound flow adds no weights


def test_chemistry_tokens_tell_rings_and_bond_counts_and_token_dropout_hides_names_behind_the_known_mean():
    from bg.systems import build_capped_peptide

    for sequence in ("L", "F", "P"):
        topology = build_capped_peptide(sequence, forcefield="amber99sbildn-obc").topology
        rep = InternalCoordinates(topology)
        layout = atom_token_layout(rep, rotatable_torsions(rep))
        c0 = len(FIELD_VOCAB)
        # reference: networkx's cycle basis of mdtraj's bond graph, and the atoms' bond counts
        graph = topology.to_bondgraph()
        ring = {atom.index for cycle in __import__("networkx").cycle_basis(graph) for atom in cycle}
        atoms = list(topology.atoms)
        for row in rep.coordinate_table():
            a, *refs = row["atom_indices"]
            t = int(layout.cell[row["index"]]) // 3
            for k, i in enumerate([a, *refs]):
                atom = atoms[i]
                element = CHEMISTRY_ELEMENTS.index(atom.element.atomic_number) + 1
                expected = 1 + element * 16 + graph.degree(atom) * 2 + (i in ring)
                assert int(layout.identity[t, c0 + k]) == expected
        cd1 = [int(layout.cell[r["index"]]) // 3 for r in rep.coordinate_table() if r["atoms"][0].endswith(":CD1")]
        if sequence != "P":  # leucine's CD1 (sp³, 4 bonds, no ring) and phenylalanine's (aromatic) differ
            carbon = 1 + 2 * 16  # carbon is the second chemistry element
            assert int(layout.identity[cd1[0], c0]) == (carbon + 8 if sequence == "L" else carbon + 6 + 1)
    assert ring and all(atoms[i].residue.name == "PRO" for i in ring)  # the proline ring: N, CA, CB, CG, CD

    torch.manual_seed(0)
    conditioner = AtomTokenConditioner(5, width=16, depth=1, attention_dim=8, chemistry_tokens=True,
                                       token_dropout=0.5).double()
    with torch.no_grad():
        conditioner.out.weight.normal_()
    features = torch.randn(1, len(layout.cell), 3, dtype=torch.float64).expand(64, -1, -1)
    args = (layout.cell, layout.identity, layout.positions)
    conditioner.eval()
    evaluated = conditioner(features, *args)
    assert torch.equal(evaluated, evaluated[:1].expand_as(evaluated))  # no dropout outside training
    conditioner.train()
    trained = conditioner(features, *args)
    assert not torch.allclose(trained[0], trained[1])  # per-sample dropout
    with torch.no_grad():  # every row of the droppable fields equal to their mean: hiding them changes nothing
        for k in DROPPABLE:
            conditioner.identity[k].weight.copy_(conditioner.identity[k].weight.mean(0))
    conditioner.eval()
    evaluated = conditioner(features, *args)
    conditioner.train()
    torch.testing.assert_close(conditioner(features, *args), evaluated)
    with pytest.raises(ValueError, match="token_dropout"):
        AtomTokenConditioner(5, token_dropout=1.0)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_peptide_set):
    """`bg fit --config configs/peptides_nsf.yaml` shrunk: 4 steps on G and A (chemistry tokens, token dropout)."""
    tmp_path = tmp_path_factory.mktemp("transfer_nsf")
    loss = dict(stages=dict(ml=dict(weights={"nll": 1.0}, epochs=1, lr=1e-3, lr_end=1e-4),
                            kl=dict(weights={"nll": 1.0, "logvar": 0.5, "alpha2": 0.5}, epochs=1, lr=1e-4)))
    model = dict(init_args=dict(backbone_layers=2, sidechain_layers=2, bins=4, width=8, depth=1, attention_dim=8,
                                kl_batch_size=8, sample_batch_size=8, predict_samples=16, chemistry_tokens=True,
                                token_dropout=0.25))
    small = peptide_fit_overrides(tmp_path, tiny_peptide_set, loss, model, n_samples=16, check_val_every_n_epoch=1)
    run(["fit", "--config", str(CONFIG), "--config", str(small)], tmp_path)
    return tmp_path, small


def test_fit_on_two_peptides_then_sample_held_out_and_unseen_ones(fitted, tiny_peptide_set):
    tmp_path, small = fitted
    cache, spec, _ = tiny_peptide_set
    rows = list(csv.DictReader(open(tmp_path / "logs" / "run" / "metrics.csv")))
    logged = [r for r in rows if r.get("test/ess/S")]
    assert len(logged) == 1 and 0 < float(logged[0]["test/ess"]) <= 1
    assert all(any(r.get(f"train/{term}") for r in rows) for term in ("nll", "logvar", "alpha2"))
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    stored = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert stored["bg_system"] is None and stored["bg_peptides"]["train"] == ["G", "A"]
    assert all(k.startswith("shared.") for k in stored["state_dict"])  # the shared weights only

    # a defensive proposal: a quarter of the samples from the flow's untrained start, log q that of the mixture; the
    # command line's share wins over the one the checkpoint saved (the config's 0.5)
    out = run(["predict", "--config", str(CONFIG), "--config", str(small), "--ckpt_path", str(ckpt),
               "--data.sequence", "S", "--model.init_args.defensive", "0.25"], tmp_path)
    folder = predicted_folder(out)
    npz = np.load(folder / "samples.npz")
    assert len(npz["log_w"]) == 16 and np.isfinite(npz["log_q"]).all() and np.isfinite(npz["log_w"]).any()

    model = bg.load_generator(ckpt)
    assert isinstance(model, TransferableNSF) and len(model.shared.conditioners[0].identity) == 12  # + chemistry
    dm = PeptideSetDataModule(str(spec), cache_dir=str(cache), batch_size=4)
    dm.setup("fit")
    assert model.defensive == 0.5  # the config's share, saved with the weights
    model.bind(dm.system("S"))  # the set's own system of S, as bg predict binds it
    frames = torch.as_tensor(md.load(str(folder / "samples.dcd"), top=str(folder / "topology.pdb")).xyz).double()
    with torch.no_grad():
        mixture = torch.logsumexp(torch.stack([model.log_prob(frames) + math.log(0.75),
                                               model._bound.start.log_prob(frames) + math.log(0.25)]), 0)
    torch.testing.assert_close(mixture, torch.as_tensor(npz["log_q"]), rtol=1e-3, atol=1e-2)
    x = dm.positions["train"][0][:4].double()
    model.bind(dm.system("G"))
    before = model.log_prob(x)
    # the training set's token values are known (residue types ACE, NME, GLY, ALA); a residue type never seen (K)
    # is embedded as the mean of the known ones, not as its untrained random row
    conditioner = model.shared.conditioners[0]
    assert int(conditioner.known0.sum()) == 4
    unknown = int(torch.nonzero(~conditioner.known0)[0])
    table = conditioner.identity[0].weight
    assert not conditioner.training  # loaded for sampling: no token dropout
    torch.testing.assert_close(conditioner._embed(0, torch.tensor([unknown])),
                               table[conditioner.known0].mean(0, True))
    known = int(torch.nonzero(conditioner.known0)[0])
    torch.testing.assert_close(conditioner._embed(0, torch.tensor([known])), table[[known]])
    model.bind("K")  # a residue the set never held: bound from its sequence alone
    torch.manual_seed(0)
    xs, log_q = model.sample(8)
    assert xs.shape[1] == model.system.n_atoms and torch.isfinite(model.energy(xs)).all()
    torch.testing.assert_close(model.log_prob(xs), log_q, rtol=1e-3, atol=1e-3)
    model.bind(dm.system("G"))  # bindings are cached: the same density again
    torch.testing.assert_close(model.log_prob(x), before)
