"""Transformer building blocks shared by the VITA LLM (`vita/`) and the TTS decoder (`tts/`).

The bottom floor of the import graph: nothing here imports `vita`, `tts` or `server`.
"""
