"""Target energy through OpenMM: u(x) in kT on batched torch tensors, with gradients."""

from __future__ import annotations

import logging
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import openmm
import torch
from torch import Tensor, nn

from bg.energy import _worker
from bg.systems.simulate import choose_platform
from bg.systems.system import kT_kJ_per_mol

log = logging.getLogger(__name__)


class _OpenMMEnergyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bridge: "OpenMMEnergy") -> Tensor:  # type: ignore[override]
        u, grad = bridge._evaluate(x.detach(), forces=x.requires_grad)
        ctx.save_for_backward(grad if grad is not None else x.new_empty(0))
        return u

    @staticmethod
    def backward(ctx, grad_u: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad_u[:, None, None] * grad, None


class OpenMMEnergy(nn.Module):
    """Reduced potential energy u(x) = E(x) / (k_B T) of an OpenMM System.

    Call on positions ``(B, N, 3)`` in nm (any float dtype, any device; evaluated in float64 on
    the CPU) → ``(B,)`` in kT, same dtype/device as the input. Differentiable: the gradient is
    −F(x)/kT from OpenMM's forces (a custom autograd function, no finite differences).

    Frames OpenMM cannot evaluate (NaN positions) get u = NaN, and positions so close that the
    energy overflows get +inf; they are counted in ``last_n_nonfinite`` and logged, never set to
    zero, and their gradient is zero so that a masked loss stays finite.

    Args:
        system: the OpenMM System (e.g. ``MolecularSystem.create_openmm_system()``).
        temperature: K, defines kT.
        n_workers: worker processes, each owning a Context, over which a batch is split;
            0 evaluates in this process (best for small molecules and small batches).
        platform: OpenMM platform name or ``"auto"`` (Reference below 200 atoms, else CPU).
        threads: threads of the CPU platform per worker (default: this process's torch threads /
            workers; under DDP Lightning gives each rank cores / ranks threads, so the workers of all
            ranks together use the cores once).
        max_restarts: a worker that dies (segfault, out of memory, killed) breaks the pool; the pool
            is restarted and the batch evaluated again up to this many times in the object's life,
            then a ``RuntimeError`` says what happened.
    """

    def __init__(self, system: openmm.System, temperature: float, n_workers: int = 0, platform: str = "auto",
                 threads: int | None = None, max_restarts: int = 3):
        super().__init__()
        if not isinstance(system, openmm.System):
            raise TypeError(f"OpenMMEnergy needs an openmm.System, got {type(system).__name__}")
        self.n_atoms = system.getNumParticles()
        self.temperature = float(temperature)
        self.kT = kT_kJ_per_mol(temperature)
        self.n_workers = int(n_workers)
        if threads is None and self.n_workers > 0:
            threads = max(1, torch.get_num_threads() // self.n_workers)
        plat, props = choose_platform(self.n_atoms, platform, threads)
        self.platform_name = plat.getName()
        self._properties = props
        self._system_xml = openmm.XmlSerializer.serialize(system)
        self._context = None
        self._pool = None
        self.max_restarts = max_restarts
        self.restarts = 0
        self.last_n_nonfinite = 0

    # ------------------------------------------------------------------ evaluation
    def forward(self, x: Tensor) -> Tensor:
        """u(x) in kT, ``(B,)``."""
        if x.ndim != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"expected positions of shape (batch, {self.n_atoms}, 3) in nm, got {tuple(x.shape)}")
        return _OpenMMEnergyFunction.apply(x, self)

    def energy_and_forces(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(u in kT ``(B,)``, forces in kT/nm ``(B, N, 3)``), float64, without autograd."""
        u, grad = self._evaluate(x.detach(), forces=True)
        return u.double(), -grad.double()

    def _evaluate(self, x: Tensor, forces: bool) -> tuple[Tensor, Tensor | None]:
        pos = x.to("cpu", torch.float64).numpy()
        if self.n_workers > 0 and len(pos) > 1:
            results = self._map_workers(np.array_split(pos, min(self.n_workers, len(pos))), forces)
            energies = np.concatenate([r[0] for r in results])
            f = np.concatenate([r[1] for r in results]) if forces else None
        else:
            if self._context is None:
                self._context = _worker.make_context(self._system_xml, self.platform_name, self._properties)
            energies, f, _ = _worker.evaluate(self._context, pos, forces)
        u = energies / self.kT
        bad = ~np.isfinite(u)
        self.last_n_nonfinite = int(bad.sum())
        if self.last_n_nonfinite:
            log.warning("OpenMMEnergy: %d of %d frames have non-finite energy", self.last_n_nonfinite, len(u))
        u_t = torch.as_tensor(u).to(x.device, x.dtype)
        if not forces:
            return u_t, None
        grad = -f / self.kT
        grad[bad] = 0.0
        # Finite energy but overflowing forces (near-overlapping atoms) would poison a whole batch.
        grad[~np.isfinite(grad)] = 0.0
        return u_t, torch.as_tensor(grad).to(x.device, x.dtype)

    # ------------------------------------------------------------------ workers
    def _get_pool(self) -> ProcessPoolExecutor:
        # concurrent.futures, not multiprocessing.Pool: when a worker dies, Pool silently loses its
        # task and waits forever; the executor fails the pending futures (BrokenProcessPool).
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.n_workers, mp_context=mp.get_context("spawn"), initializer=_worker.init_worker,
                initargs=(self._system_xml, self.platform_name, self._properties),
            )
        return self._pool

    def _map_workers(self, parts: list[np.ndarray], forces: bool) -> list[tuple]:
        while True:
            pool = self._get_pool()
            try:
                return list(pool.map(_worker.evaluate_in_worker, parts, [forces] * len(parts)))
            except BrokenProcessPool as exc:
                self.close()
                if self.restarts >= self.max_restarts:
                    raise RuntimeError(
                        f"OpenMMEnergy: an OpenMM worker process died ({self.restarts} restart(s) already, "
                        f"max_restarts={self.max_restarts}); giving up. A worker dies on a segfault in OpenMM or "
                        "when the machine runs out of memory: check `dmesg`/the job's memory limit, lower "
                        "n_workers or the batch size, or set energy_workers: 0 to evaluate in-process"
                    ) from exc
                self.restarts += 1
                log.warning("OpenMMEnergy: a worker process died; restarting the pool and evaluating the batch "
                            "again (restart %d of at most %d)", self.restarts, self.max_restarts)

    def worker_pids(self) -> list[int]:
        """Process ids of the running workers (empty before the first batch)."""
        return [] if self._pool is None else list(self._pool._processes)

    def close(self) -> None:
        """Stop the worker processes (they also stop when the object is garbage-collected)."""
        if self._pool is not None:
            for process in list((self._pool._processes or {}).values()):
                process.terminate()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):
        # Contexts and pools do not pickle (DDP spawn, checkpoints): rebuild them lazily.
        state = self.__dict__.copy()
        state["_context"] = None
        state["_pool"] = None
        return state

    def extra_repr(self) -> str:
        return f"n_atoms={self.n_atoms}, T={self.temperature} K, platform={self.platform_name}, n_workers={self.n_workers}"
