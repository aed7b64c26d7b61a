"""The command layer: the `stepcast` command, the embedded launcher and the console.

It sits above the server and the worker (``server``, ``gpu_worker``), which sit above the shared
core (the rest of ``stepcast``); tests/test_layers.py checks the arrows (docs/design.md, "Layers").
"""
