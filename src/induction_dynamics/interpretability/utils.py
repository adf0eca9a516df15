"""Hooks and activation caches over the model's HookPoints (TransformerLens-style).

    hm = HookManager(model)
    logits, cache = hm.run_with_cache(tokens, names_filter="attn.hook_pattern")
    patterns = cache.stack("attn.hook_pattern")          # (n_layer, B, n_head, T, T)
    with hm.hooks([("transformer.h.0.hook_resid_post", lambda act, hook: act * 0)]):
        logits, _ = model(tokens)                         # hooks removed on exit, even on error
    _, cache = hm.run_with_cache(tokens, names_filter="attn.hook_pattern",
                                 stop_early=True)         # the forward ends at the last pattern

Names are module names (``transformer.h.0.attn.hook_pattern``); TransformerLens
spellings (``blocks.0.attn.hook_pattern``, ``hook_embed``, ``ln_final.hook_normalized``)
are accepted too. A hook function is ``fn(activation, hook) -> new activation or None``,
where ``hook`` is the HookPoint (``hook.name`` is its name).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from induction_dynamics.model import HookPoint

_TL_ALIASES = {
    "hook_embed": "transformer.hook_embed",
    "hook_pos_embed": "transformer.hook_pos_embed",
    "ln_final.hook_normalized": "transformer.hook_ln_final",
    "hook_ln_final": "transformer.hook_ln_final",
}

NamesFilter = str | Iterable[str] | Callable[[str], bool] | None


def normalize_name(name: str) -> str:
    """Map a TransformerLens hook name onto this model's module name."""
    if name in _TL_ALIASES:
        return _TL_ALIASES[name]
    return re.sub(r"^blocks\.(\d+)\.", r"transformer.h.\1.", name)


def _matcher(names_filter: NamesFilter) -> Callable[[str], bool]:
    """names_filter as in TransformerLens: None (all), a name, a list of names, or a predicate.

    A plain string also matches as a suffix, so ``"attn.hook_pattern"`` selects every layer's.
    """
    if names_filter is None:
        return lambda name: True
    if callable(names_filter):
        return names_filter
    wanted = [names_filter] if isinstance(names_filter, str) else list(names_filter)
    wanted = [normalize_name(w) for w in wanted]
    return lambda name: any(name == w or name.endswith("." + w) for w in wanted)


def layer_of(name: str) -> int | None:
    """Layer index of a hook or module name (``transformer.h.3.attn.hook_z`` -> 3), else None."""
    m = re.search(r"(?:^|\.)h\.(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


class ActivationCache(Mapping):
    """A read-only dict of activations by hook name, with TransformerLens conveniences."""

    def __init__(self, cache: dict[str, torch.Tensor]):
        self._cache = dict(cache)

    def __getitem__(self, name):
        if isinstance(name, tuple):  # TL shorthand: cache["pattern", 0] / cache["resid_post", 1]
            short, layer = name
            short = short if short.startswith("hook_") or "." in short else "hook_" + short
            candidates = [k for k in self._cache if layer_of(k) == layer and k.endswith(short)]
            if len(candidates) != 1:
                raise KeyError(f"{name!r} matches {candidates or 'no cached activation'}")
            return self._cache[candidates[0]]
        return self._cache[normalize_name(name)]

    def __iter__(self):
        return iter(self._cache)

    def __len__(self):
        return len(self._cache)

    def __repr__(self):
        return f"ActivationCache({list(self._cache)})"

    def stack(self, suffix: str) -> torch.Tensor:
        """Stack one activation across layers: ``stack("attn.hook_pattern")`` -> (n_layer, ...)."""
        found = sorted(
            ((layer_of(k), v) for k, v in self._cache.items() if k.endswith(suffix) and layer_of(k) is not None),
            key=lambda kv: kv[0],
        )
        if not found:
            raise KeyError(f"no cached activation ends with {suffix!r}; have {list(self._cache)}")
        return torch.stack([v for _, v in found])

    def to(self, device) -> ActivationCache:
        return ActivationCache({k: v.to(device) for k, v in self._cache.items()})


def has_hooks(model: nn.Module) -> bool:
    """Whether any module of ``model`` carries a forward hook (a user's, when called before adding one's own)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class _StopForward(Exception):
    """Raised by ``run_with_cache(stop_early=True)`` once its last hook point has fired."""


class HookManager:
    """Register temporary forward hooks on a model's HookPoints and always remove them."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.hook_points: dict[str, HookPoint] = {
            name: m for name, m in model.named_modules() if isinstance(m, HookPoint)
        }
        self._handles: list = []

    def names(self, names_filter: NamesFilter = None) -> list[str]:
        match = _matcher(names_filter)
        return [n for n in self.hook_points if match(n)]

    def add_hook(self, name: str | Callable[[str], bool], fn: Callable) -> None:
        """Add ``fn(activation, hook)`` on every hook point ``name`` selects (until reset_hooks)."""
        selected = [name] if isinstance(name, str) and name in self.hook_points else self.names(name)
        if not selected:
            raise KeyError(f"no hook point matches {name!r}; see HookManager(model).names()")
        for n in selected:
            hp = self.hook_points[n]
            self._handles.append(hp.register_forward_hook(
                lambda module, inputs, output, fn=fn: fn(output, module)))

    def reset_hooks(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    @contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple] = ()):
        """Context manager: hooks [(name or predicate, fn), ...] live only inside the block."""
        try:
            for name, fn in fwd_hooks:
                self.add_hook(name, fn)
            yield self
        finally:
            self.reset_hooks()

    def run_with_hooks(self, *args, fwd_hooks: Iterable[tuple] = (), **kwargs):
        with self.hooks(fwd_hooks):
            return self.model(*args, **kwargs)

    def run_with_cache(self, *args, names_filter: NamesFilter = None, detach: bool = True,
                       device=None, stop_early: bool = False, **kwargs):
        """Run the model and return ``(output, ActivationCache)`` of the selected hook points.

        ``stop_early``: the forward stops once every selected hook point has fired and the
        output is None, so what only follows them (the rest of the last block they are in,
        the unembedding) is never computed; nnsight's ``.stop()``, TransformerLens's
        ``stop_at_layer`` at the granularity of a hook point. Ignored while a hook of someone
        else's is on the model: it is owed the whole forward.
        """
        names = self.names(names_filter)
        stop_early = stop_early and not has_hooks(self.model)
        store: dict[str, torch.Tensor] = {}

        def save(act, hook):
            t = act.detach() if detach else act
            store[hook.name] = t.to(device) if device is not None else t
            if stop_early and len(store) == len(names):
                raise _StopForward

        with self.hooks([(n, save) for n in names]):
            try:
                out = self.model(*args, **kwargs)
            except _StopForward:
                out = None
        return out, ActivationCache(store)


def run_with_cache(model, *args, names_filter: NamesFilter = None, **kwargs):
    """Shortcut: ``HookManager(model).run_with_cache(...)``."""
    return HookManager(model).run_with_cache(*args, names_filter=names_filter, **kwargs)


@torch.no_grad()
def attention_patterns(model, tokens: torch.Tensor, layers: Iterable[int] | None = None, *,
                       with_logits: bool = False):
    """(n_layers, B, n_head, T, T) attention patterns (rows: query, columns: key) of ``layers``
    (default: all), the one way the project reads patterns off the model.

    The forward stops at the last pattern asked for (what follows it is not needed); with
    ``with_logits`` it runs to the end and returns ``(patterns, logits (B, T, vocab))``, for a
    caller that needs both from one forward. ``tokens``: (B, T), or (T,) for one sequence.
    """
    if tokens.dim() == 1:
        tokens = tokens[None]
    layers = range(model.config.n_layer) if layers is None else layers
    names = [f"transformer.h.{l}.attn.hook_pattern" for l in layers]
    out, cache = HookManager(model).run_with_cache(tokens, names_filter=names, stop_early=not with_logits)
    patterns = torch.stack([cache[n] for n in names])
    return (patterns, out[0]) if with_logits else patterns
