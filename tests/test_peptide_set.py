"""Multi-peptide data (bg.systems.peptide_set): the spec, the split by sequence, MD of every peptide with a
manifest, resuming, and `bg data --peptide-set`."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import yaml

from bg.systems import MDSettings, load_md
from bg.systems.peptide_set import (AMINO_ACIDS, PeptideSet, effective_stride, load_manifest, make_peptide_set,
                                    manifest_path, peptide_name)

from tests.conftest import TINY_PEPTIDE_MD

TINY_MD = MDSettings(**TINY_PEPTIDE_MD)
TINY = PeptideSet(name="tiny", kind="list", sequences=("G", "A", "S"), n_test=1, test=("S",))


def test_kinds_expand_to_the_expected_sequences():
    single = PeptideSet(kind="capped_single").expand()
    assert single == sorted(AMINO_ACIDS) and len(single) == 20
    a = PeptideSet(kind="random_dipeptides", n_random=30, seed=4).expand()
    assert len(a) == len(set(a)) == 30 and all(len(s) == 2 and set(s) <= set(AMINO_ACIDS) for s in a)
    assert a == PeptideSet(kind="random_dipeptides", n_random=30, seed=4).expand()  # reproducible
    assert a != PeptideSet(kind="random_dipeptides", n_random=30, seed=5).expand()
    assert PeptideSet(sequences=("aw", "AW", "gg")).expand() == ["AW", "GG"]  # upper case, duplicates dropped


def test_split_is_by_sequence_disjoint_and_covering():
    spec = PeptideSet(kind="random_dipeptides", n_random=40, n_val=3, n_test=6, test=("AW",), seed=2)
    split = spec.split()
    train, val, test = (set(split[k]) for k in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(spec.expand())
    assert len(val) == 3 and len(test) == 6 and "AW" in test
    assert split == spec.split()  # the same spec, the same split
    assert split != replace(spec, seed=3).split()


@pytest.mark.parametrize("spec, message", [
    (dict(sequences=("AXB",)), "not a one-letter amino-acid sequence"),
    (dict(sequences=("A", "G"), n_test=2), "none to train on"),
    (dict(kind="random_dipeptides"), "n_random"),
    (dict(kind="capped_single", sequences=("AG",)), "single letters"),
    (dict(kind="tripeptides"), "kind"),
])
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        PeptideSet(**spec).split()


def test_unknown_keys_name_the_known_ones():
    with pytest.raises(ValueError, match="unknown key.*sequence.*known:.*sequences"):
        PeptideSet.from_dict({"sequence": ["A"]})


@pytest.fixture(scope="module")
def tiny_set(tiny_peptide_set):
    cache, _, manifest = tiny_peptide_set
    return cache, manifest


def test_every_peptide_has_its_md_and_a_manifest_entry(tiny_set):
    cache, manifest = tiny_set
    assert manifest == load_manifest(cache, "tiny")
    assert manifest["splits"] == {"train": ["G", "A"], "val": [], "test": ["S"]}
    for seq, entry in manifest["peptides"].items():
        traj = load_md(cache / entry["md_dir"])
        assert entry["name"] == peptide_name(seq) and entry["md_dir"] == f"{peptide_name(seq)}/md"
        assert entry["frames"] == traj.n_frames == TINY_MD.n_frames
        assert entry["n_atoms"] == traj.n_atoms and traj.topology.residue(1).name == {"G": "GLY", "A": "ALA", "S": "SER"}[seq]
        assert entry["split"] == ("test" if seq == "S" else "train")
        assert entry["statistical_inefficiency"] >= 1.0
        assert entry["effective_frames"] == pytest.approx(entry["frames"] / entry["statistical_inefficiency"])
        assert np.isfinite(traj.xyz).all()
    assert effective_stride(manifest) == int(np.ceil(max(manifest["peptides"][s]["statistical_inefficiency"]
                                                         for s in ("G", "A"))))


def test_a_peptide_of_the_set_loads_as_a_single_molecule_dataset(tiny_set):
    from datamodules import MDDataModule

    cache, manifest = tiny_set
    chunks = sorted((cache / manifest["peptides"]["A"]["md_dir"] / "chunks").glob("chunk_*.dcd"))
    stamps = [c.stat().st_mtime_ns for c in chunks]
    dm = MDDataModule(system="peptide:A", cache_dir=str(cache), md=TINY_MD, batch_size=4)
    assert dm.md_dir == cache / manifest["peptides"]["A"]["md_dir"]
    dm.prepare_data()  # finds the set's MD complete: nothing is simulated again
    dm.setup("fit")
    assert [c.stat().st_mtime_ns for c in chunks] == stamps
    frames = load_md(dm.md_dir).xyz
    train = dm.positions["train"].numpy()
    assert 0 < len(train) < len(frames)
    assert np.allclose(train[0], frames[0], atol=1e-6)


def test_the_cli_resumes_a_set_without_simulating_again(tiny_set, tmp_path, capsys):
    from bg.cli import main

    cache, manifest = tiny_set
    spec = tmp_path / "tiny.yaml"
    md = {k: v for k, v in TINY_PEPTIDE_MD.items() if k != "seed"}
    spec.write_text(yaml.safe_dump({"name": "tiny", "kind": "list", "sequences": ["G", "A", "S"], "n_test": 1,
                                    "test": ["S"], "md": md}))
    before = manifest_path(cache, "tiny").read_text()
    # the seed comes from the command line (over the spec's md: section)
    assert main(["data", "--peptide-set", str(spec), "--seed", "3", "--cache-dir", str(cache), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "peptide set tiny: 3 peptides (train 2, val 0, test 1: S)" in out
    for seq in "GAS":
        assert peptide_name(seq) in out
    assert json.loads(manifest_path(cache, "tiny").read_text()) == json.loads(before)


def test_other_md_settings_in_the_same_set_are_refused(tiny_set):
    cache, _ = tiny_set
    with pytest.raises(ValueError, match="other MD settings"):
        make_peptide_set(TINY, cache, replace(TINY_MD, n_frames=24), workers=1, progress=False)


def test_a_set_made_before_a_new_md_setting_existed_is_still_read(tiny_set, tmp_path):
    """A manifest without a setting that MDSettings gained later (hydrogen_mass) ran with its default: accepted."""
    import shutil

    cache, manifest = tiny_set
    old = tmp_path / "cache"
    shutil.copytree(cache, old)
    path = manifest_path(old, "tiny")
    written = json.loads(path.read_text())
    del written["md"]["hydrogen_mass"]
    path.write_text(json.dumps(written))
    again = make_peptide_set(TINY, old, TINY_MD, workers=1, progress=False)
    assert again["peptides"].keys() == manifest["peptides"].keys()
    with pytest.raises(ValueError, match="other MD settings"):  # a setting that differs still does not pass
        make_peptide_set(TINY, old, replace(TINY_MD, hydrogen_mass=4.0), workers=1, progress=False)


def test_the_cli_names_a_bad_spec(tmp_path, capsys):
    from bg.cli import main

    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\nkind: list\nsequences: [A, G]\nmd: {n_frame: 10}\n")
    assert main(["data", "--peptide-set", str(spec)]) == 2
    assert "unknown md setting(s) n_frame" in capsys.readouterr().err


def test_an_unknown_force_field_fails_before_any_md(tmp_path):
    with pytest.raises(ValueError, match="amber99"):
        make_peptide_set(replace(TINY, forcefield="amber99"), tmp_path, TINY_MD, workers=1, progress=False)
    assert not manifest_path(tmp_path, "tiny").exists()
