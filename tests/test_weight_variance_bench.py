"""bench/weight_variance.py: held-out R² against known answers, and a transferable generator read on a peptide it
is bound to (the coordinates named are that peptide's, the ESS is that of its weights)."""

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.weight_variance import analyse, held_out_r2, peptides  # noqa: E402
from bg.models import TransferableNSF  # noqa: E402
from datamodules import PeptideSetDataModule  # noqa: E402


def test_held_out_r2_reads_the_share_a_linear_model_explains():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(20_000, 3, generator=g, dtype=torch.float64)
    signal = f @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)  # variance 5.25
    noise = torch.randn(20_000, generator=g, dtype=torch.float64) * math.sqrt(5.25 / 3)  # 1/4 of the total
    assert held_out_r2(f, signal + noise) == pytest.approx(0.75, abs=0.02)
    assert abs(held_out_r2(f, noise)) < 0.01  # features that know nothing explain nothing


def test_a_transferable_generator_is_read_per_bound_peptide(tiny_peptide_set):
    cache, spec, _ = tiny_peptide_set
    dm = PeptideSetDataModule(str(spec), cache_dir=str(cache), batch_size=4)
    dm.setup("fit")
    torch.manual_seed(0)
    model = TransferableNSF(backbone_layers=2, sidechain_layers=2, bins=4, width=8, depth=1, attention_dim=8,
                            sample_batch_size=256)
    model.fit_to_frames(dm.positions["train"])
    model.double()
    with pytest.raises(SystemExit, match="--sequences"):
        peptides(model, None)
    assert peptides(model, "G, S") == ["G", "S"]
    model.bind(dm.system("S"))
    torch.manual_seed(1)
    r = analyse(model, 512, seed=1, top=3)
    names = {"–".join(e["atoms"]) for e in model.representation.coordinate_table()}
    assert any("SER2:OG" in n for n in names)  # the coordinates are serine's...
    assert all(atoms in names for _, _, atoms in r["coordinates"])  # ...and those ranked are among them
    assert 0 < r["ess"] <= 1 and r["kept"] <= 512 and len(r["coordinates"]) == 3
    # the ESS it reports is Kish's of these very weights
    torch.manual_seed(1)
    x, log_q = model.sample(512)
    log_w = -model.energy(x) - log_q
    w = torch.softmax(log_w, 0)
    assert r["ess"] == pytest.approx(float(1 / (w**2).sum() / 512), rel=1e-6)
