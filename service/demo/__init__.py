"""``saju-billing demo``: months of billing simulated through the real path, then a report.

scenario (who does what, seed-driven), actors (the subscribers, the operator and Toss acting on
the running stack), run (the driver: test clock, ``billing.tick()``, waiting for the service),
report (one named query per figure) and render (HTML with inline charts, and text).
"""
