"""Deployable artifacts for a target's runtime (onnxruntime.py: `.onnx`/`.ort` plus the session options to load them with)."""
