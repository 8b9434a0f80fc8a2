"""Three-fold rotors (methyl, NH3+): the 120° turns that relabel their hydrogens.

A methyl group's three hydrogens carry the same force-field parameters, so a cyclic permutation of their
labels (H1 → H2 → H3 → H1, which is the group turned by 120° about its axis) leaves u(x) unchanged, and MD
at room temperature visits all three turns (a barrier of ~5 kT). Permuting them at random in training
frames multiplies the distinct frames a flow learns from without changing the target density. Only cyclic
permutations are used: the odd ones (swapping two hydrogens) are mirror images of the group that no MD
reaches without breaking a bond, and learning them would split the flow's mass over a second mode.
"""

from __future__ import annotations

import mdtraj as md
import torch
from torch import Tensor


def rotor_groups(topology: md.Topology) -> Tensor:
    """Hydrogen triples ``(G, 3)`` (atom indices, ascending within a triple) of every heavy atom bonded to exactly
    three hydrogens; ``(0, 3)`` when there is none."""
    hydrogens: dict[int, list[int]] = {}
    for a, b in topology.bonds:
        for heavy, h in ((a, b), (b, a)):
            if h.element is md.element.hydrogen and heavy.element is not md.element.hydrogen:
                hydrogens.setdefault(heavy.index, []).append(h.index)
    groups = [sorted(hs) for _, hs in sorted(hydrogens.items()) if len(hs) == 3]
    return torch.tensor(groups, dtype=torch.long).reshape(-1, 3)


def turn_rotors(x: Tensor, groups: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Frames ``(B, N, 3)`` with the hydrogens of each rotor group cyclically relabelled by an independent random
    turn (0, 1 or 2 steps, uniform) per frame and group; a new tensor, ``x`` untouched."""
    if len(groups) == 0:
        return x.clone()
    b, n = x.shape[:2]
    groups = groups.to(x.device)
    shift = torch.randint(3, (b, len(groups), 1), generator=generator, device=generator.device if generator
                          else x.device).to(x.device)
    source = groups[None].expand(b, -1, -1).gather(2, (torch.arange(3, device=x.device) + shift) % 3)
    index = torch.arange(n, device=x.device).repeat(b, 1)
    index[:, groups.reshape(-1)] = source.reshape(b, -1)
    return x.gather(1, index[..., None].expand(-1, -1, 3))
