"""overtrain: measure, explain and help avoid catastrophic overtraining."""

__version__ = "0.1.0"

__all__ = ["load_results", "load_spec", "parse_spec", "report", "run", "status", "__version__"]
# For other people's training loops: `overtrain.monitor.measure`, `overtrain.callbacks.AdaptabilityCallback`.
SUBMODULES = ("callbacks", "monitor")


def __getattr__(name: str):
    # The API pulls in torch and transformers: import it on first use, not on
    # `import overtrain.<module>`.
    if name in __all__:
        from overtrain import api

        return getattr(api, name)
    if name in SUBMODULES:
        import importlib

        return importlib.import_module(f"overtrain.{name}")
    raise AttributeError(f"module 'overtrain' has no attribute {name!r}")
