"""Equivariant CNF: the EGNN's symmetries, the integrated divergence against a brute-force change of
variables, OT pairing, atom encodings and the chirality/topology checks."""

import math

import numpy as np
import pytest
import torch

from bg.flows import EGNN, ContinuousFlow, ODESolver
from bg.coordinates import centred
from bg.flows.cnf import exact_divergence, hutchinson_divergence
from bg.flows.pairing import align, equivariant_ot_pairs, kabsch_rotations
from bg.systems import build_capped_peptide
from bg.systems.encodings import ENCODING_VOCAB, atom_tokens, identical_atom_groups
from bg.systems.hygiene import FrameChecks, chiral_centres


def orthogonal(seed: int, reflect: bool = False) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q @ torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)) if reflect else q


def busy_field(tokens, vocab, hidden=16, layers=3, seed=0) -> EGNN:
    """A float64 EGNN with weights large enough that the field is far from zero and strongly non-linear."""
    torch.manual_seed(seed)
    field = EGNN(tokens, vocab, hidden, layers, coord_hidden=True).double()
    with torch.no_grad():
        for layer in field.layers:
            layer.coord[-1].weight.normal_(0, 0.5)
    return field


@pytest.fixture(scope="module")
def aldp_field(aldp_system):
    tokens = atom_tokens(aldp_system.topology, "full")
    return busy_field(tokens, ENCODING_VOCAB["full"]), tokens


@torch.no_grad()
def test_egnn_is_equivariant_to_rotations_reflections_translations_and_identical_atom_permutations(aldp_field,
                                                                                                    aldp_frames):
    field, tokens = aldp_field
    x = torch.as_tensor(aldp_frames[:4]) / 0.16
    t = torch.tensor([0.1, 0.4, 0.7, 0.9], dtype=torch.float64)
    v = field(t, x).detach()
    assert v.abs().mean() > 1e-2  # a field far from zero: the checks below are not vacuous
    np.testing.assert_allclose(v.sum(1).numpy(), 0.0, atol=1e-12)  # mean-free
    for seed, reflect in ((0, False), (1, True)):
        q = orthogonal(seed, reflect)
        torch.testing.assert_close(field(t, x @ q.T), v @ q.T, atol=1e-10, rtol=1e-5)
    torch.testing.assert_close(field(t, x + torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)), v, atol=1e-10, rtol=1e-5)
    groups = identical_atom_groups(tokens)
    perm = torch.arange(22)
    for g in groups:  # a cyclic shift within every methyl group
        perm[g] = g.roll(1)
    torch.testing.assert_close(field(t, x[:, perm]), v[:, perm], atol=1e-10, rtol=1e-5)
    # atoms with different tokens are not interchangeable: swapping CA and CB changes the field
    swap = torch.arange(22)
    swap[[8, 12]] = swap[[12, 8]]
    assert (field(t, x[:, swap]) - v[:, swap]).abs().max() > 1e-3


def test_exact_divergence_is_the_trace_of_the_autograd_jacobian_and_hutchinson_is_unbiased(aldp_field, aldp_frames):
    field, _ = aldp_field
    x = (torch.as_tensor(aldp_frames[:2]) / 0.16).requires_grad_(True)
    t = torch.tensor(0.3, dtype=torch.float64)
    div = exact_divergence(field(t, x), x)
    for b in range(2):
        jac = torch.autograd.functional.jacobian(lambda y: field(t, y[None])[0], x[b].detach(), vectorize=True)
        assert float(div[b]) == pytest.approx(float(jac.reshape(66, 66).trace()), abs=1e-9)
    gen = torch.Generator().manual_seed(0)
    eps = torch.randint(0, 2, (1000, 22, 3), generator=gen).double() * 2 - 1
    xs = x[:1].detach().expand(1000, 22, 3).clone().requires_grad_(True)
    est = hutchinson_divergence(field(t, xs), xs, eps)
    assert abs(float(est.mean() - div[0])) < 4 * float(est.std()) / math.sqrt(1000)


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_integrated_divergence_matches_a_brute_force_change_of_variables(method):
    """log q(x₁) = log p₀(x₀) − ∫ div v dt equals log p₀(x₀) − log|det ∂x₁/∂x₀| with the Jacobian of the
    solved map itself (autograd through the solver), on a 4-atom system in float64."""
    tokens = torch.tensor([[6], [1], [1], [8]])
    field = busy_field(tokens, ENCODING_VOCAB["element"], hidden=12, layers=2, seed=3)
    solver = ODESolver(method, rtol=1e-10, atol=1e-10, steps=40)
    flow = ContinuousFlow(field, 4, solver)
    x0 = flow.prior_sample(2, torch.float64, generator=torch.Generator().manual_seed(1))
    x1, div = flow.integrate(x0, 0.0, 1.0, "exact")
    log_q = flow.prior_log_prob(x0) - div
    from torchdiffeq import odeint

    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for b in range(2):
        def solve(y):
            return odeint(lambda t, z: field(t, z[None])[0], y, ts, **solver.kwargs(1.0))[-1]

        torch.testing.assert_close(solve(x0[b]), x1[b], atol=1e-8, rtol=1e-8)
        jac = torch.autograd.functional.jacobian(solve, x0[b]).reshape(12, 12)
        brute = flow.prior_log_prob(x0[b:b + 1])[0] - torch.linalg.slogdet(jac)[1]
        assert float(brute - log_q[b]) == pytest.approx(0.0, abs=1e-4)
        # and the map moved the points: the check is not the identity's
        assert float(torch.linalg.slogdet(jac)[1]).__abs__() > 0.05
    # solving back gives the same density (log_prob of the samples)
    torch.testing.assert_close(flow.log_prob(x1), log_q, atol=1e-6, rtol=1e-6)


def test_kabsch_recovers_a_rotation_and_ot_pairs_are_rotated_relabelled_data(aldp_system, aldp_frames):
    x = centred(torch.as_tensor(aldp_frames[:8]))
    q = orthogonal(5)
    r = kabsch_rotations(x @ q.T, x)
    torch.testing.assert_close((x @ q.T) @ r, x, atol=1e-10, rtol=1e-8)
    assert torch.allclose(torch.linalg.det(r), torch.ones(8, dtype=torch.float64))

    groups = identical_atom_groups(atom_tokens(aldp_system.topology, "full"))
    assert sorted(len(g) for g in groups) == [3, 3, 3]  # the three methyl groups
    torch.manual_seed(0)
    x0 = centred(torch.randn(8, 22, 3, dtype=torch.float64)) * 0.16
    p0, p1 = equivariant_ot_pairs(x0, x, groups)
    assert torch.equal(p0, x0)
    # every paired frame is one data frame, rotated and with methyl hydrogens relabelled
    dist = lambda y: torch.cdist(y, y)  # noqa: E731
    used = []
    for b in range(8):
        matches = [k for k in range(8) if torch.allclose(torch.sort(dist(p1[b]).flatten())[0],
                                                          torch.sort(dist(x[k]).flatten())[0], atol=1e-9)]
        assert len(matches) == 1
        used.append(matches[0])
        heavy = [i for i in range(22) if aldp_system.topology.atom(i).element.symbol != "H"]
        torch.testing.assert_close(dist(p1[b])[heavy][:, heavy], dist(x[matches[0]])[heavy][:, heavy])
    assert sorted(used) == list(range(8))  # a permutation of the batch
    # the pairing is no worse than aligning the identity pairing
    assert float((p1 - x0).square().sum()) <= float((align(x, x0, groups) - x0).square().sum()) + 1e-9


def test_atom_encodings_share_vocabularies_across_peptides(aldp_system):
    tri = build_capped_peptide("AGA")
    for kind, vocab in ENCODING_VOCAB.items():
        a, b = atom_tokens(aldp_system.topology, kind), atom_tokens(tri.topology, kind)
        assert a.shape == (22, len(vocab)) and (a.max(0).values < torch.tensor(vocab)).all()
        assert (a >= 0).all() and (b.max(0).values < torch.tensor(vocab)).all()
    full = atom_tokens(aldp_system.topology, "full")
    names = [a.name for a in aldp_system.topology.atoms]
    assert not (full[:, :2] == 0).any()  # every residue and atom name of the capped dipeptide is known
    # the alanine Cα has the same (residue, name) token in both peptides, with its own residue index
    tri_full = atom_tokens(tri.topology, "full")
    ca = [a.index for a in tri.topology.atoms if a.name == "CA"]
    assert tri_full[ca[0], :2].tolist() == full[names.index("CA"), :2].tolist()
    assert tri_full[ca[0], 2] != tri_full[ca[2], 2]
    assert len(identical_atom_groups(atom_tokens(aldp_system.topology, "element"))) == 4  # H, C, N, O


def test_frame_checks_find_mirror_images_and_broken_bond_graphs(aldp_system, aldp_frames):
    top = aldp_system.topology
    assert chiral_centres(top)[:, 0].tolist() == [a.index for a in top.atoms if a.name == "CA" and a.residue.name == "ALA"]
    checks = FrameChecks(top, aldp_system.positions)
    x = torch.as_tensor(aldp_frames[:50])
    clean = checks.apply(x)
    assert not clean["wrong_chirality"].any() and not clean["broken_topology"].any() and clean["valid"].all()
    mirrored = x * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    out = checks.apply(mirrored, "mirror")
    assert out["wrong_chirality"].all() and out["mirrored"].all() and out["valid"].all()
    assert not checks.inverted(out["x"]).any()
    assert torch.allclose(torch.cdist(out["x"], out["x"]), torch.cdist(x, x))  # a mirror image: same distances
    assert not checks.apply(mirrored, "drop")["valid"].any()
    assert checks.apply(mirrored, "keep")["valid"].all()
    # move the amide H of alanine next to the Cβ: its bond graph breaks
    broken = x[:1].clone()
    h = [a.index for a in top.atoms if a.name == "H" and a.residue.name == "ALA"][0]
    cb = [a.index for a in top.atoms if a.name == "CB"][0]
    broken[0, h] = broken[0, cb] + torch.tensor([0.11, 0.0, 0.0], dtype=torch.float64)
    out = checks.apply(broken)
    assert out["broken_topology"].all() and not out["valid"].any()
    assert checks.apply(broken, drop_broken=False)["valid"].all()


@pytest.fixture(scope="module")
def glycine_tokens():
    return atom_tokens(build_capped_peptide("G", minimize=False).topology, "full")


def test_a_transferable_field_equals_the_bound_one_and_serves_molecules_of_any_size(aldp_field, aldp_frames,
                                                                                   glycine_tokens):
    field, tokens = aldp_field
    shared = EGNN(None, ENCODING_VOCAB["full"], 16, 3, coord_hidden=True).double()
    shared.load_state_dict(field.state_dict())
    x = torch.as_tensor(aldp_frames[:3]) / 0.16
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    with torch.no_grad():
        v = field(t, x)
        assert torch.equal(shared(t, x, tokens), v) and torch.equal(shared.bind(tokens)(t, x), v)
        # another molecule (Ace-Gly-Nme, 19 atoms) through the same weights: its own equivariant field
        n = len(glycine_tokens)
        y = centred(torch.randn(3, n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
        w = shared(t, y, glycine_tokens)
        assert w.shape == (3, n, 3) and w.abs().mean() > 1e-2
        np.testing.assert_allclose(w.sum(1).numpy(), 0.0, atol=1e-12)
        q = orthogonal(2)
        torch.testing.assert_close(shared(t, y @ q.T, glycine_tokens), w @ q.T, atol=1e-10, rtol=1e-5)
        assert not torch.allclose(shared(t, y, glycine_tokens.flip(0)), w)  # the tokens matter


def test_one_field_samples_two_molecules_with_their_densities(aldp_field, glycine_tokens):
    _, tokens = aldp_field
    field = EGNN(None, ENCODING_VOCAB["full"], 8, 2, coord_hidden=True).double()
    with torch.no_grad():
        for layer in field.layers:
            layer.coord[-1].weight.normal_(0, 0.1)  # a field that moves the prior's samples, not a stiff one
    for toks in (tokens, glycine_tokens):
        flow = ContinuousFlow(field.bind(toks), len(toks), ODESolver("rk4", steps=4)).double()
        x, log_q = flow.sample(2, generator=torch.Generator().manual_seed(0))
        x0 = flow.prior_sample(2, torch.float64, generator=torch.Generator().manual_seed(0))
        assert x.shape == (2, len(toks), 3) and torch.isfinite(log_q).all()
        assert (x - x0).abs().max() > 1e-2 and not torch.allclose(log_q, flow.prior_log_prob(x0))
        if toks is glycine_tokens:  # the ODE back to the prior (one molecule: each solve costs 3N backward passes)
            torch.testing.assert_close(flow.log_prob(x), log_q, atol=1e-3, rtol=0)


def test_transferable_field_errors_name_the_problem(aldp_field, glycine_tokens):
    field, tokens = aldp_field
    shared = EGNN(None, ENCODING_VOCAB["full"], 8, 1)
    x = torch.zeros(1, len(tokens), 3)
    with pytest.raises(ValueError, match="needs the molecule's tokens"):
        shared(0.5, x)
    with pytest.raises(ValueError, match="19 atom tokens for frames of 22 atoms"):
        shared(0.5, x, glycine_tokens)
    bad = tokens.clone()
    bad[0, 0] = 999
    with pytest.raises(ValueError, match="outside the vocabulary"):
        shared.bind(bad)
    with pytest.raises(ValueError, match="no fixed number of atoms"):
        shared.n_atoms


class _TimeRecorder(torch.nn.Module):
    """A zero vector field that records the times it is asked about."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.times: list[torch.Tensor] = []

    def forward(self, t, x):
        self.times.append(t.detach().flatten().clone())
        return torch.zeros_like(x) * self.w


@pytest.mark.parametrize("k", [1.0, 3.0])
def test_flow_matching_times_follow_the_time_exponent_density(k):
    # t = u^(1/k) has CDF t^k: a Kolmogorov–Smirnov distance against that CDF, and Beta(k, 1)'s mean k/(k + 1)
    torch.manual_seed(0)
    field = _TimeRecorder()
    flow = ContinuousFlow(field, 4).double()
    x1 = torch.randn(4000, 4, 3, dtype=torch.float64)
    flow.flow_matching_loss(x1, time_exponent=k)
    t = torch.sort(field.times[0]).values.numpy()
    cdf = np.arange(1, len(t) + 1) / len(t)
    assert np.abs(cdf - t ** k).max() < 1.36 / math.sqrt(len(t)) * 1.5
    assert abs(t.mean() - k / (k + 1)) < 0.02
    with pytest.raises(ValueError, match="time_exponent"):
        flow.flow_matching_loss(x1, time_exponent=0.0)
