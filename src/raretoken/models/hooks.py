"""Forward hooks, always scoped to a context manager that removes them (``try``/``finally``).

* :func:`capture_input` records ``input[0]`` of a module on every call.
* :func:`replace_input` rewrites ``input[0]`` before the module runs.
* :func:`ablate_heads` zero-ablates attention heads: their slices of the attention output
  projection's input (the concatenated head outputs) are set to zero, so the heads contribute
  nothing but the projection's bias, if any.
* :func:`attention_patterns` records attention probabilities ``(batch, n_heads, q, k)``.
* :func:`attention_visibility` records which keys each query may attend to, from the mask the
  model passes to each attention module (causal, sliding-window, ...).

``input[0]`` is the first positional argument; a module called with its first argument as the
keyword ``hidden_states`` (some decoder layers) is handled too.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedArchitectureError
from .adapters import ModelAdapter

__all__ = [
    "ablate_heads",
    "attention_patterns",
    "attention_visibility",
    "capture_input",
    "replace_input",
]

log = logging.getLogger(__name__)

_KW_INPUT = "hidden_states"


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    x = args[0] if args else kwargs.get(_KW_INPUT)
    if not isinstance(x, torch.Tensor):
        raise TypeError("hooked module was called without a tensor as its first input")
    return x


@contextmanager
def capture_input(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Append ``input[0].detach()`` of ``module`` to the yielded list on every forward call."""
    captured: list[torch.Tensor] = []

    def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(_first_input(args, kwargs).detach())

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def replace_input(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace ``input[0]`` of ``module`` with ``fn(input[0])`` on every forward call.

    ``fn`` must not modify its argument in place (clone first): the tensor may be used elsewhere.
    """

    def hook(
        _mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        x = _first_input(args, kwargs)
        y = fn(x)
        if args:
            return (y, *args[1:]), kwargs
        return args, {**kwargs, _KW_INPUT: y}

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def ablate_heads(adapter: ModelAdapter, layer: int, heads: Sequence[int]) -> Iterator[None]:
    """Zero-ablate ``heads`` of ``layer`` (the paper's "zeroing the output of head h").

    The slice ``[h * head_dim, (h + 1) * head_dim)`` of the attention output projection's input
    is set to zero for every listed head, at every position.
    """
    dims = adapter.dims
    idx = sorted({int(h) for h in heads})
    bad = [h for h in idx if not 0 <= h < dims.n_heads]
    if bad:
        raise ConfigError(f"head index {bad[0]} is out of range for {dims.n_heads} heads")
    proj = adapter.attn_out_proj(layer)
    hd = dims.head_dim

    def zero(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != dims.n_heads * hd:
            raise UnsupportedArchitectureError(
                f"attention output has width {x.shape[-1]}, expected n_heads*head_dim="
                f"{dims.n_heads * hd}"
            )
        y = x.clone()
        view = y.view(*y.shape[:-1], dims.n_heads, hd)
        view[..., idx, :] = 0
        return y

    with replace_input(proj, zero):
        yield


def _attn_implementation(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    return None if impl is None else str(impl)


@contextmanager
def attention_patterns(
    adapter: ModelAdapter, layers: Sequence[int]
) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record the attention probabilities of ``layers`` on every forward pass.

    Yields a dict ``{layer: [tensor (batch, n_heads, q, k), ...]}`` keyed by the normalised
    (non-negative) layer index, one tensor per forward call. Under grouped-query attention the
    probabilities are per *query* head (``n_heads``), as computed after repeating keys.

    Method: the model is switched to the ``eager`` attention implementation for the duration
    (fused kernels such as SDPA never materialise the probabilities), and a forward hook on each
    attention module reads ``output[1]``, the probabilities in transformers 5. The previous
    implementation is restored on exit. Eager and SDPA attention agree to rounding error only;
    Hugging Face's eager attention computes the softmax in float32 for NeoX and Llama-family
    models, so rows sum to one within ~1e-7 even for float64 models.
    """
    model = adapter.model
    idx = sorted({adapter.layer_index(layer) for layer in layers})
    previous = _attn_implementation(model)
    switched = previous != "eager"
    if switched:
        model.set_attn_implementation("eager")
        if _attn_implementation(model) != "eager":
            model.set_attn_implementation(previous or "sdpa")
            raise UnsupportedArchitectureError(
                f"cannot switch {type(model).__name__} to eager attention to read its patterns"
            )
        log.debug("attention implementation switched from %s to eager", previous)
    out: dict[int, list[torch.Tensor]] = {i: [] for i in idx}
    handles = []
    try:
        for i in idx:

            def hook(_mod: nn.Module, _args: Any, output: Any, i: int = i) -> None:
                probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                if not isinstance(probs, torch.Tensor):
                    raise UnsupportedArchitectureError(
                        "the attention module did not return its probabilities"
                    )
                out[i].append(probs.detach())

            handles.append(adapter.attention(i).register_forward_hook(hook))
        yield out
    finally:
        for handle in handles:
            handle.remove()
        if switched and previous is not None:
            model.set_attn_implementation(previous)


_MASK_ARG = "attention_mask"


def _mask_argument(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The ``attention_mask`` argument of a call of ``module`` (keyword or positional)."""
    if _MASK_ARG in kwargs:
        return kwargs[_MASK_ARG]
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    except TypeError:
        return None
    return bound.arguments.get(_MASK_ARG)


def _visible(mask: torch.Tensor) -> torch.Tensor:
    """Boolean "may attend" of a boolean (``True`` = attend) or additive float mask (a key is
    masked by a large negative value: ``-inf`` or about the dtype's minimum)."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise UnsupportedArchitectureError(f"unexpected attention mask dtype {mask.dtype}")
    return torch.isfinite(mask) & (mask > torch.finfo(mask.dtype).min / 2)


@contextmanager
def attention_visibility(
    adapter: ModelAdapter, layers: Sequence[int]
) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record which keys each query of ``layers`` may attend to, on every forward pass.

    Yields ``{layer: [bool tensor (batch or 1, 1 or n_heads, q, k), ...]}`` (``True``: the
    query may attend to the key), one per forward call, read from the ``attention_mask`` the
    model passes to each attention module: the mask the model really applies, with its causal
    and sliding-window parts (Mistral, Qwen 2/3 and Phi-3 windows, Gemma 2/3 sliding layers),
    whatever family it is. Use it inside :func:`attention_patterns`, under whose eager
    attention every family materialises its mask; a module called without a mask tensor (a
    fused kernel that applies causality itself) is refused with
    :class:`~raretoken.errors.UnsupportedArchitectureError`.
    """
    idx = sorted({adapter.layer_index(layer) for layer in layers})
    out: dict[int, list[torch.Tensor]] = {i: [] for i in idx}
    handles = []
    try:
        for i in idx:
            module = adapter.attention(i)

            def hook(
                mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], i: int = i
            ) -> None:
                mask = _mask_argument(mod, args, kwargs)
                if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
                    raise UnsupportedArchitectureError(
                        f"the attention module of layer {i} received no 4-D attention mask "
                        f"({type(mask).__name__}); read its visibility under eager attention "
                        "(inside attention_patterns)"
                    )
                out[i].append(_visible(mask.detach()))

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield out
    finally:
        for handle in handles:
            handle.remove()
