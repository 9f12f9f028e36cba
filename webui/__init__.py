"""Gradio-free services the app and the benchmarks share (see ARCHITECTURE.md): request parsing and
limits (request.py), the public-mode policy (policy.py), per-session bookkeeping and the model cache
(session.py), and the measurement protocol (measure.py)."""
