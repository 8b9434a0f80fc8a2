"""Normalizing flows in plain torch (no Lightning): spline transforms so far."""

from bg.flows.splines import circular_rq_spline, out_of_bounds, rq_spline

__all__ = ["circular_rq_spline", "out_of_bounds", "rq_spline"]
