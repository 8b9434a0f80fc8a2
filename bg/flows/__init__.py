"""Normalizing flows in plain torch (no Lightning): the ``Flow`` interface and the ``CartesianDensity`` that
composes a flow with a representation; splines, conditioners, couplings, NSFs, TarFlow, EGNN CNF."""

from bg.flows.base import CartesianDensity, Flow
from bg.flows.cnf import ContinuousFlow, ODESolver
from bg.flows.conditioners import GAUConditioner, GatedAttentionUnit, MLPConditioner
from bg.flows.coupling import SplineCoupling, SplitChannelFlow
from bg.flows.distributions import CoordinateBase
from bg.flows.egnn import EGNN, EGNNLayer
from bg.flows.mixture import MixtureDensity
from bg.flows.nsf import InternalFlow, neural_spline_flow
from bg.flows.splines import circular_rq_spline, out_of_bounds, rq_spline
from bg.flows.tarflow import CartesianTarFlow, FrameTarFlow, TarFlow, TarFlowBlock

__all__ = ["CartesianDensity", "CartesianTarFlow", "FrameTarFlow", "ContinuousFlow", "Flow", "CoordinateBase", "EGNN", "EGNNLayer", "ODESolver", "GAUConditioner", "GatedAttentionUnit", "InternalFlow", "MLPConditioner", "MixtureDensity",
           "SplineCoupling", "SplitChannelFlow", "TarFlow", "TarFlowBlock", "circular_rq_spline", "neural_spline_flow", "out_of_bounds",
           "rq_spline"]
