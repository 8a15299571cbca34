"""Measurements the checks read: computed lazily, once per adapter, never scheduled here.

``dynamic_run``: every loading path against the streamed fp32 reference; ``training_audit``: what a training
run changed; ``serving_vllm``: the adapter in a vLLM engine (admission rules, served logprobs), in a process of
its own. The engine schedules checks; the checks read these; these read ``numerics/`` and ``loading/``.
"""
