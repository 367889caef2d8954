"""A local, Toss-compatible server for tests, demos and chaos runs (like stripe-mock for Stripe).

Follows ``reference/toss-api.md``; see ``app.build_app`` for options, ``merchants`` for keys,
isolated merchant data and the test-mode rate limit, ``control`` for the ``/_sandbox`` control
API, ``faults`` for fault injection and ``cards`` for the test cards.
"""

from service.sandbox.app import build_app, serve
from service.sandbox.clock import Clock

__all__ = ["Clock", "build_app", "serve"]
