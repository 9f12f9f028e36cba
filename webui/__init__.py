"""Gradio-free services the app and the benchmarks share (see ARCHITECTURE.md): request parsing and
limits (request.py), the public-mode policy (policy.py), per-session bookkeeping and the model cache
(session.py), the measurement protocol (measure.py) and the live measurement of vanilla and up to
three drafters with progress and Stop (live.py)."""
