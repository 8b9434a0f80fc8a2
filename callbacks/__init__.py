"""Lightning callbacks (loss-stage schedule, evaluation and logging, EMA, sample writers).

They arrive with the generator families; by design a callback never builds a flow.
"""
