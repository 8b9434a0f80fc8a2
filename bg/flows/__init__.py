"""Normalizing flows in plain torch (no Lightning): splines, conditioners, couplings."""

from bg.flows.conditioners import GAUConditioner, GatedAttentionUnit, MLPConditioner
from bg.flows.coupling import SplineCoupling, SplitChannelFlow
from bg.flows.splines import circular_rq_spline, out_of_bounds, rq_spline

__all__ = ["GAUConditioner", "GatedAttentionUnit", "MLPConditioner", "SplineCoupling", "SplitChannelFlow",
           "circular_rq_spline", "out_of_bounds", "rq_spline"]
