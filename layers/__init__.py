"""Transformer building blocks and CUDA shape buckets shared by the VITA LLM (`vita/`) and the TTS (`tts/`).

The bottom floor of the import graph: nothing here imports `vita`, `tts` or `server`.
"""
