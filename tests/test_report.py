"""bg.evaluate / `bg analyze`: the report's ESS and basin populations are the training-time metrics' values,
its reference side carries MD error bars, it writes JSON, Markdown and figures, and SMC particles are
reported as what they are."""

import json
import math

import lightning as L
import mdtraj as md
import numpy as np
import pytest
import torch

import bg
from bg.cli import main as cli_main
from bg.evaluation import Reference, evaluate
from bg.models import SplitChannelNSF
from bg.report import basin_states


@pytest.fixture(scope="module")
def model(aldp_system, aldp_frames, tiny_nsf_kwargs):
    torch.manual_seed(0)
    m = SplitChannelNSF(**tiny_nsf_kwargs)
    m.build(aldp_system, torch.as_tensor(aldp_frames[:150], dtype=torch.float32))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    x = torch.as_tensor(aldp_frames[:150], dtype=torch.float32)
    for _ in range(30):  # a little maximum likelihood, so that the weights are not all on one sample
        opt.zero_grad()
        m.term_nll(x).backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def reference(aldp_system, aldp_frames):
    return md.Trajectory(aldp_frames.astype(np.float32), aldp_system.topology)


def test_report_numbers_are_the_training_metrics(model, aldp_frames):
    report = bg.evaluate(model, n=400, seed=3, n_boot=100, bins=12)
    ref = Reference.from_frames(torch.as_tensor(aldp_frames), model.topology, model.energy)
    metrics = evaluate(model.proposal, model.energy, ref, n=400, seed=3)  # what SampleEvaluation logs
    assert report.sampling["ess"]["value"] == metrics["ess"]
    e = report.sampling["ess"]
    assert e["low"] <= e["value"] <= e["high"]
    for name, est in zip(report.states, report.populations["generator"]):
        assert est.value == metrics[f"basin_{name}_reweighted"], name
    assert report.states == ["beta_C7eq", "alpha_R", "alpha_L", "C7ax"]
    assert report.free_energies["generator"][0].value == 0.0


def test_report_against_md_writes_json_markdown_and_figures(model, reference, tmp_path):
    report = bg.evaluate(model, n=300, reference=[reference[:100], reference[100:]], n_boot=50, bins=12)
    assert report.reference_frames == 200
    pops = report.populations["reference"]
    # MD populations are the plain frame fractions; their errors account for correlation (g ≥ 1)
    names, label = basin_states(reference.topology)
    fractions = np.bincount(label(reference), minlength=4) / 200
    for est, f in zip(pops, fractions):
        assert est.value == pytest.approx(f)
        if 0 < f < 1:
            assert est.error >= 0.99 * math.sqrt(f * (1 - f) / 200)
    comp = report.comparisons()
    assert "population beta_C7eq" in comp and "ΔF alpha_R" in comp
    paths = report.save(tmp_path / "out")
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["populations"]["reference"][0]["value"] == pytest.approx(fractions[0])
    assert data["surfaces"][0]["shape"] == [12, 12]
    text = (tmp_path / "out" / "report.md").read_text()
    assert "population (reference)" in text and "ΔF kcal/mol" in text and ".png" in text
    assert any(p.suffix == ".png" and p.stat().st_size > 1000 for p in paths)


def test_bg_analyze_on_a_checkpoint(model, reference, tmp_path, capsys):
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": L.__version__}
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "m.ckpt")
    reference.save_dcd(str(tmp_path / "ref.dcd"))
    reference[0].save_pdb(str(tmp_path / "top.pdb"))
    code = cli_main(["analyze", str(tmp_path / "m.ckpt"), "--samples", "200", "--reference", str(tmp_path / "ref.dcd"),
                     "--topology", str(tmp_path / "top.pdb"), "--bootstrap", "50", "--bins", "12",
                     "--out", str(tmp_path / "an")])
    assert code == 0
    out = capsys.readouterr().out
    assert "Kish ESS/n" in out and f"report written to {tmp_path / 'an'}" in out
    assert (tmp_path / "an" / "report.json").exists()
    assert cli_main(["analyze", str(tmp_path / "missing.ckpt")]) == 2
    assert "bg analyze: error" in capsys.readouterr().err


def test_smc_particles_get_no_headline_ess_and_a_lineage_warning(reference, tmp_path):
    folder = tmp_path / "samples"
    folder.mkdir()
    reference[0].save_pdb(str(folder / "topology.pdb"))
    reference[:50].save_dcd(str(folder / "samples.dcd"))
    np.savez(folder / "samples.npz", log_w=np.zeros(50), energy_kT=np.zeros(50))
    (folder / "samples.json").write_text(json.dumps({"sampler": "smc", "n_ancestors": 3, "ess_history": [0.8, 0.2],
                                                     "log_z": -1.5, "ess": 1.0}))
    report = bg.evaluate(folder, n_boot=20, bins=8)
    assert "ess" not in report.sampling and report.sampling["ess_before_resampling"] == 0.2
    assert any("3 of 50 particles" in w for w in report.warnings)
    assert "distinct proposals" in report.markdown()
    with pytest.raises(FileNotFoundError, match="not a samples folder"):
        bg.evaluate(tmp_path)


def test_protein_observables_against_direct_formulas(villin_md):
    """RMSD, Q and Rg on villin: RMSD and Rg as mdtraj/numpy compute them directly, Q = 1 at the native state
    and ≈ 0 when the protein is blown up, and a native structure with its atoms in another order gives the
    same values (atoms matched by residue and name)."""
    from bg.report import native_contacts, radius_of_gyration, rmsd_to
    from tests.conftest import shared_file

    system, xyz = villin_md
    traj = md.Trajectory(xyz.astype(np.float32), system.topology)
    native = traj[0]
    backbone = native.topology.select("backbone")
    np.testing.assert_allclose(rmsd_to(native)(traj), md.rmsd(traj, native, 0, atom_indices=backbone), atol=1e-6)
    q = native_contacts(native)
    assert q(native)[0] == pytest.approx(1.0, abs=0.02)
    centre = xyz[:1].mean(1, keepdims=True)
    blown = md.Trajectory(((xyz[:1] - centre) * 2.0 + centre).astype(np.float32), system.topology)
    assert q(blown)[0] < 0.05
    # Rg² = Σ_ij m_i m_j |r_i − r_j|² / (2 M²): the pair form, no centre needed
    masses = np.array([a.element.mass for a in system.topology.atoms])
    x = traj.xyz.astype(np.float64)
    pair = ((x[:, :, None] - x[:, None]) ** 2).sum(-1)
    rg = np.sqrt(np.einsum("fij,i,j->f", pair, masses, masses) / (2 * masses.sum() ** 2))
    np.testing.assert_allclose(radius_of_gyration(traj), rg, rtol=1e-9)
    # the same native from another file whose atoms come in another order
    order = np.argsort([f"{a.residue.index:04d}{a.name[::-1]}" for a in native.topology.atoms])
    top = md.Topology()
    chain, residues = top.add_chain(), {}
    for i in order:
        atom = native.topology.atom(int(i))
        if atom.residue.index not in residues:
            residues[atom.residue.index] = top.add_residue(atom.residue.name, chain, atom.residue.resSeq)
        top.add_atom(atom.name, atom.element, residues[atom.residue.index])
    shuffled = md.Trajectory(native.xyz[:, order], top)
    assert [a.name for a in shuffled.topology.atoms] != [a.name for a in native.topology.atoms]
    np.testing.assert_allclose(rmsd_to(shuffled)(traj), rmsd_to(native)(traj), atol=1e-5)
    np.testing.assert_allclose(native_contacts(shuffled)(traj), q(traj), atol=1e-6)
    # the PDB in the shared folder (as `bg analyze --native` loads it) is a valid native for these samples
    assert np.all(np.isfinite(rmsd_to(md.load(str(shared_file("villin_1vii.pdb"))))(traj)))


def test_energy_histogram_of_samples_all_beyond_the_range_warns_nothing():
    """A clashing flow puts every sample far above the MD energies: the figure shows the MD alone, without
    numpy's 'invalid value encountered in divide'."""
    import warnings

    from bg import plots

    u_md = torch.linspace(-30.0, -10.0, 200, dtype=torch.float64)
    u_gen = torch.full((100,), 1e12, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plots.energy_histogram(u_md, u_gen, log_w=-u_gen)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["MD data"]
    plots.close(fig)


def test_contact_map_against_mdtraj_and_weights(villin_md):
    """Cα contact probabilities are mdtraj's Cα residue distances below the cutoff, averaged over frames; weights
    that put everything on one frame give that frame's map; NaN frames count as weight 0."""
    from bg.analysis import contact_map

    system, xyz = villin_md
    traj = md.Trajectory(xyz.astype(np.float32), system.topology)
    d, pairs = md.compute_contacts(traj, contacts="all", scheme="ca")
    assert traj.topology.n_residues == len([a for a in traj.topology.atoms if a.name == "CA"])
    got = contact_map(torch.as_tensor(xyz), system.topology, cutoff=0.6).numpy()
    # mdtraj leaves out pairs of near neighbours (|i − j| < 3): compare the pairs it gives
    np.testing.assert_allclose(got[pairs[:, 0], pairs[:, 1]], np.mean(d < 0.6, axis=0), atol=1e-12)
    np.testing.assert_array_equal(got, got.T)
    assert np.allclose(np.diag(got), 1.0)
    log_w = torch.full((len(xyz),), -math.inf, dtype=torch.float64)
    log_w[2] = 0.0
    one = contact_map(torch.as_tensor(xyz), system.topology, log_w, cutoff=0.6).numpy()
    for k, (i, j) in enumerate(pairs):
        assert one[i, j] == float(d[2, k] < 0.6)
    x_nan = torch.as_tensor(xyz).clone()
    x_nan[0, traj.topology.select("name CA")[5], 0] = math.nan
    np.testing.assert_allclose(contact_map(x_nan, system.topology, cutoff=0.6).numpy(),
                               contact_map(torch.as_tensor(xyz[1:]), system.topology, cutoff=0.6).numpy())


def test_weighted_quantiles_equal_repeated_samples():
    """Weight 3 on a sample is the sample three times; equal weights give numpy's lower median."""
    from bg.report import weighted_quantiles

    rng = np.random.default_rng(0)
    v = rng.normal(size=11)
    assert weighted_quantiles(v, [0.5])[0] == np.median(v)
    counts = rng.integers(1, 4, size=11)
    repeated = np.repeat(v, counts)
    for q in (0.05, 0.5, 0.95):
        assert weighted_quantiles(v, [q], np.log(counts))[0] == np.quantile(repeated, q, method="inverted_cdf")
    assert weighted_quantiles(np.array([1.0, np.inf, 2.0]), [0.5])[0] == 1.0


def test_report_structure_energies_distance_distortion_and_projection(aldp_system, aldp_frames, tiny_nsf_kwargs,
                                                                      reference, tmp_path):
    """The structure section of a reduced-coordinate model: the reference energies are the judge's energies of the MD
    frames; MD frames on the model's coordinates keep every backbone distance (backbone coordinates are free) but
    carry side-chain bonds at their means; ΔD is the direct formula; JSON, Markdown and both figures are written."""
    from bg.analysis import backbone_pairs
    from bg.metrics import pairwise_distances
    from bg.report import PROJECTED, _projected

    torch.manual_seed(0)
    m = SplitChannelNSF(**dict(tiny_nsf_kwargs, reduced=True))
    m.build(aldp_system, torch.as_tensor(aldp_frames[:150], dtype=torch.float32))
    m.eval()
    report = bg.evaluate(m, n=200, reference=reference[:80], n_boot=20, bins=8, seed=1)
    s = report.structure
    assert set(s.energies) == {"generator", "generator (reweighted)", "reference", PROJECTED}
    x = torch.as_tensor(reference[:80].xyz, dtype=torch.float64)
    u_ref = m.energy(x).double().numpy()
    assert s.energies["reference"]["median"] == pytest.approx(np.quantile(u_ref, 0.5, method="inverted_cdf"))
    projected = _projected(m, x, 32)
    pairs = backbone_pairs(aldp_system.topology)
    np.testing.assert_allclose(pairwise_distances(projected, pairs), pairwise_distances(x, pairs), atol=1e-6)
    rep = m.density.representation
    assert not torch.allclose(projected, x, atol=1e-4)  # side chains moved onto the means
    torch.testing.assert_close(rep(projected)[0], rep(x)[0], atol=1e-6, rtol=0)
    assert len(s.energy_values["generator"]) == 200
    d_ref = pairwise_distances(x, pairs).mean(0)
    # ΔD raw from the generator frames the report drew (same seed → same frames)
    torch.manual_seed(1)
    with torch.no_grad():
        xs = m.proposal.weigh(200, m.energy)["x"].double()
    assert s.distance_distortion["raw"] == pytest.approx(float((pairwise_distances(xs, pairs).mean(0) - d_ref)
                                                               .abs().mean()), rel=1e-6)
    report.save(tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "ΔD" in text and PROJECTED in text and "energies.png" in text
    assert (tmp_path / "out" / "energies.png").stat().st_size > 1000
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["structure"]["energies_kT"]["reference"]["median"] == pytest.approx(s.energies["reference"]["median"])
