"""Gradio-free services the app and the benchmarks share (measurement protocol, request handling)."""
