"""The Gradio demo (`python -m demo`, `make demo`): thin, on the public `sample/` API.

`demo.app.build_demo(mm)` returns the Blocks; this package imports nothing heavy itself.
"""
