import mdtraj as md
import numpy as np
import openmm
import pytest

from bg.systems import FORCEFIELDS, MolecularSystem, build_capped_peptide, get_system, load_pdb
from bg.systems.peptide import ONE_TO_THREE
from tests.conftest import shared_file


def test_aldp_is_the_literature_system(aldp_system):
    assert aldp_system.n_atoms == 22
    assert [r.name for r in aldp_system.topology.residues] == ["ACE", "ALA", "NME"]
    assert aldp_system.forcefield == FORCEFIELDS["amber99sbildn-obc"]
    assert aldp_system.temperature == 300.0
    omm = aldp_system.create_openmm_system()
    assert omm.getNumConstraints() == 0
    forces = {type(f).__name__: f for f in omm.getForces()}
    assert "GBSAOBCForce" in forces
    assert forces["NonbondedForce"].getNonbondedMethod() == openmm.NonbondedForce.NoCutoff
    assert "CMMotionRemover" not in forces


@pytest.mark.parametrize("code", sorted(ONE_TO_THREE))
def test_every_standard_residue_builds_and_parametrises(code):
    pep = build_capped_peptide(f"G{code}G", minimize=False)
    pep.create_openmm_system()  # fails if any atom or hydrogen is missing
    top = pep.topology
    assert [r.name for r in top.residues][0] == "ACE" and [r.name for r in top.residues][-1] == "NME"
    res = list(top.residues)[2]
    assert res.name == ONE_TO_THREE[code] or (code == "H" and res.name in {"HIS", "HIE", "HID", "HIP"})
    if code != "G":  # L-chirality: dihedral N–C–CA–CB ≈ +122°
        idx = [[res.atom("N").index, res.atom("C").index, res.atom("CA").index, res.atom("CB").index]]
        assert 90 < np.degrees(md.compute_dihedrals(pep.trajectory(), idx)[0, 0]) < 150


def test_builder_minimises_to_a_sane_energy():
    pep = build_capped_peptide("KW")
    omm = pep.create_openmm_system()
    ctx = openmm.Context(omm, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(pep.positions)
    e = ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
    assert e < 0  # no clashes left


def test_branch_chirality_thr_ile():
    # (2S,3R)-threonine and (2S,3S)-isoleucine: CG2 sits at χ1 − 120° (as in PDB structures).
    pep = build_capped_peptide("TI", minimize=False)
    traj = pep.trajectory()
    for res, g1 in [(list(pep.topology.residues)[1], "OG1"), (list(pep.topology.residues)[2], "CG1")]:
        q = lambda name: [res.atom("N").index, res.atom("CA").index, res.atom("CB").index, res.atom(name).index]  # noqa: E731
        chi_1, chi_2 = np.degrees(md.compute_dihedrals(traj, [q(g1), q("CG2")])[0])
        assert abs(((chi_2 - chi_1 + 180) % 360) - 180 + 120) < 5


def test_bad_sequence_and_forcefield():
    with pytest.raises(ValueError, match=r"unknown one-letter residue code\(s\) \['X'\]"):
        build_capped_peptide("AXA")
    with pytest.raises(ValueError, match="unknown force field 'amber42'"):
        build_capped_peptide("A", forcefield="amber42")
    with pytest.raises(ValueError, match="unknown system 'hp99'"):
        get_system("hp99")


def test_save_load_round_trip(tmp_path, aldp_system):
    aldp_system.save(tmp_path)
    back = MolecularSystem.load(tmp_path)
    assert back.n_atoms == aldp_system.n_atoms and back.forcefield == aldp_system.forcefield
    np.testing.assert_array_equal(back.positions, aldp_system.positions)
    assert [a.name for a in back.topology.atoms] == [a.name for a in aldp_system.topology.atoms]


def test_dict_round_trip(aldp_system):
    back = MolecularSystem.from_dict(aldp_system.to_dict())
    assert back.temperature == aldp_system.temperature and back.forcefield == aldp_system.forcefield
    np.testing.assert_array_equal(back.positions, aldp_system.positions)
    assert back.topology.n_bonds == aldp_system.topology.n_bonds


def _write_pdb(system, path):
    from openmm import app, unit

    with open(path, "w") as fh:
        app.PDBFile.writeFile(system.omm_topology, system.positions * unit.nanometer, fh)


def test_load_pdb_unknown_residue_names_residue_file_and_fix(tmp_path):
    pep = build_capped_peptide("AKA", minimize=False)
    path = tmp_path / "nle.pdb"
    _write_pdb(pep, path)
    path.write_text(path.read_text().replace("LYS", "NLE"))
    with pytest.raises(ValueError, match=r"nle\.pdb: residue NLE3 .* not a residue the force field .* replace it"):
        load_pdb(path)


def test_load_pdb_strips_water_and_adds_hydrogens(tmp_path):
    from openmm import app, unit

    pep = build_capped_peptide("AG", minimize=False)
    heavy = app.Modeller(pep.omm_topology, pep.positions * unit.nanometer)
    heavy.addSolvent(app.ForceField("amber14-all.xml", "amber14/tip3p.xml"), padding=0.3 * unit.nanometer)
    heavy.delete([a for a in heavy.topology.atoms() if a.element.symbol == "H" and a.residue.name != "HOH"])
    ions = app.Topology()
    for name, element in [("NA", app.element.sodium), ("CL", app.element.chlorine)]:
        ions.addAtom(name, element, ions.addResidue(name, ions.addChain("I")))
    heavy.add(ions, [[2.0, 2.0, 2.0], [2.5, 2.5, 2.5]] * unit.nanometer)
    path = tmp_path / "solvated.pdb"
    with open(path, "w") as fh:
        app.PDBFile.writeFile(heavy.topology, heavy.positions, fh)
    loaded = load_pdb(path, minimize=False)
    assert loaded.n_atoms == pep.n_atoms
    assert {r.name for r in loaded.topology.residues} == {"ACE", "ALA", "GLY", "NME"}


def test_load_pdb_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pdb: no such structure file"):
        load_pdb(tmp_path / "missing.pdb")
    (tmp_path / "empty.pdb").write_text("")
    with pytest.raises(ValueError, match="empty.pdb: the file is empty"):
        load_pdb(tmp_path / "empty.pdb")


@pytest.mark.parametrize("name,n_atoms", [("villin_1vii.pdb", 596), ("protein_g_1pga.pdb", 855)])
def test_real_proteins_load(name, n_atoms):
    system = load_pdb(shared_file(name), minimize=False)
    assert system.n_atoms == n_atoms
    assert system.forcefield == FORCEFIELDS["amber14-obc2"]
    system.create_openmm_system()
