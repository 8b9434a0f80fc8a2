"""Normalizing flows in plain torch (no Lightning): splines, conditioners, couplings, NSFs."""

from bg.flows.conditioners import GAUConditioner, GatedAttentionUnit, MLPConditioner
from bg.flows.coupling import SplineCoupling, SplitChannelFlow
from bg.flows.distributions import CoordinateBase
from bg.flows.nsf import InternalFlow, neural_spline_flow
from bg.flows.splines import circular_rq_spline, out_of_bounds, rq_spline

__all__ = ["CoordinateBase", "GAUConditioner", "GatedAttentionUnit", "InternalFlow", "MLPConditioner",
           "SplineCoupling", "SplitChannelFlow", "circular_rq_spline", "neural_spline_flow", "out_of_bounds",
           "rq_spline"]
