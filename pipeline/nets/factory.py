"""The user's own network (`--model module:function`): imported from the Python path and called."""

from __future__ import annotations

import importlib

from torch import nn

from pipeline.errors import PipelineError


def build_factory(spec: str) -> nn.Module:
    """The user's network: `module:function` imported from the Python path, called without arguments."""
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name + ".").startswith(e.name + "."):
            raise PipelineError(
                f"--model {spec}: no module {module_name!r} on the Python path; put its folder on PYTHONPATH"
            ) from None
        raise PipelineError(f"--model {spec}: importing {module_name} failed: {e}") from e
    except Exception as e:  # the user's module failed while it was imported
        raise PipelineError(f"--model {spec}: importing {module_name} failed ({type(e).__name__}: {e})") from e
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise PipelineError(
            f"--model {spec}: module {module_name} ({getattr(module, '__file__', '?')}) has no function {func_name!r}"
        )
    try:
        model = factory()
    except Exception as e:
        raise PipelineError(f"--model {spec}: {func_name}() failed ({type(e).__name__}: {e})") from e
    if not isinstance(model, nn.Module):
        raise PipelineError(
            f"--model {spec}: {func_name}() returned a {type(model).__name__}, not a torch.nn.Module that maps an "
            f"image batch to embeddings"
        )
    return model
