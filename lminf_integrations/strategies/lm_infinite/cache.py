"""The LM-Infinite KV cache: a transformers ``Cache`` whose layers keep only what Λ-attention can look at.

* ``window`` mode keeps the global tokens (rotated to position 0) and a ring buffer of the last ``n_local`` keys:
  memory is constant however long the input or the generation, and a decoding step writes one slot in place
  instead of re-concatenating the cache.
* ``full`` mode keeps every key in a buffer that grows by doubling (amortised O(1) appends), plus, for top-k
  layers, every key rotated to position 0 so that middle keys can be scored at the distance limit.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ...ops import decode_kernel
from ...ops.rope import rotate, rotation, shift_positions
from .attention import LayerSettings, PreparedKeys, hand_over


@functools.lru_cache(maxsize=4)
def _rotation_to(position: int, inv_freq: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin on ``device`` (the layer's: a split model's rotary embedding may sit on another GPU) moving
    position-0 keys to ``position``: computed once per eager decoding step, for all layers on that device.
    ``torch.full`` rather than ``torch.tensor``: a copy from host memory to a GPU waits for the queued kernels."""
    return rotation(torch.full((1,), position, device=device), inv_freq, torch.float32)


@functools.lru_cache(maxsize=4)
def _leading_slots(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device)


class LambdaLayer(CacheLayerMixin):
    """One layer's keys and values; ``update`` hands the attention function exactly the keys it needs."""

    is_sliding = False
    is_croppable = False

    def __init__(self, settings: LayerSettings) -> None:
        super().__init__()
        self.settings = settings
        # Tokens written so far (absolute position of the next token); while steady with compiled steps allowed, the
        # position lives in ``_position`` alone.
        self._seen = 0
        # Window mode from ``_steady_from`` on: a decoding step is then the same computation with the same shapes
        # at every position, so it reads its position from a tensor (no Python int that a compiled step would have
        # to specialise on), and ``steady`` is the only flag it checks. Eager steps also count on the host: reading
        # the tensor there would wait for every kernel queued on a GPU, once per layer.
        self.steady = False
        self._position = torch.zeros((), dtype=torch.long)  # the next token's position, while steady
        self.compiled_steps = False  # opt-in: see LambdaCache.allow_compiled_steps
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
        self.middle_keys: torch.Tensor | None = None  # full mode, top-k layers: keys at position 0
        self.top_k_from_position: int | None = None

    @property
    def seen(self) -> int:
        """Tokens written so far: the absolute position of the next token."""
        return int(self._position) if self.steady and self.compiled_steps else self._seen

    @property
    def is_compileable(self) -> bool:  # type: ignore[override]
        """transformers compiles decoding steps for caches whose steps keep their shapes (here: steady ones), when
        they were allowed to (on GPUs it would otherwise compile them unasked)."""
        return self.steady and self.compiled_steps

    @property
    def wants_middle(self) -> bool:
        cfg = self.settings.config
        return cfg.top_k > 0 and self.settings.layer_idx >= cfg.top_k_from_layer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, dim = key_states.shape
        self.batch_size = batch
        cfg = self.settings.config
        # Window mode: n_global leading slots (distance-limited global keys, rewritten each decoding step) and a
        # ring of n_local slots, in one buffer, so a decoding step is one attention call over one tensor.
        capacity = cfg.n_global + cfg.n_local if cfg.cache_mode == "window" else 256
        self.keys = key_states.new_zeros(batch, heads, capacity, dim)
        self.values = value_states.new_zeros(batch, heads, capacity, dim)
        self.sink_keys = key_states.new_zeros(batch, heads, 0, dim)
        self.sink_values = value_states.new_zeros(batch, heads, 0, dim)
        if self.wants_middle:
            self.middle_keys = key_states.new_zeros(batch, heads, capacity, dim)
        self._position = self._position.to(key_states.device)
        self.is_initialized = True
        self._build_decode_kernel_if_needed()

    def _build_decode_kernel_if_needed(self) -> None:
        # A compiled step uses the CPU's C++ kernel only if it exists when the step is traced; build it now, before
        # any step. Not for a cache on a GPU (or before the cache knows its device).
        if self.compiled_steps and self.is_initialized and self.device.type == "cpu" and decode_kernel.enabled():
            decode_kernel.decode_attention_op()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        count = key_states.shape[-2]
        if self.steady:
            if count == 1:
                return self._steady_decode_step(key_states, value_states)
            self._seen, self.steady = self.seen, False  # a chunk: back to the general path
        first = self._seen
        self._keep_sinks(key_states, value_states, first)
        if self.settings.config.cache_mode == "window":
            local_k, local_v, local_start = self._window_update(key_states, value_states, first)
        else:
            local_k, local_v, local_start = self._full_update(key_states, value_states, first)
        self._seen = first + count
        self._become_steady_when_ready()
        middle_k = middle_v = None
        if self.middle_keys is not None and self.values is not None:
            middle_k, middle_v = self.middle_keys[:, :, : self.seen], self.values[:, :, : self.seen]
        if self.top_k_from_position is None:
            # Used without the engine (plain ``generate``): the first forward is the whole prompt.
            self.top_k_from_position = self.seen - 1
        hand_over(
            PreparedKeys(
                local_k,
                local_v,
                local_start,
                self.sink_keys,
                self.sink_values,
                middle_k,
                middle_v,
                self.top_k_from_position,
            )
        )
        return local_k, local_v

    def _keep_sinks(self, key_states: torch.Tensor, value_states: torch.Tensor, first: int) -> None:
        n_global = self.settings.config.n_global
        if first >= n_global:
            return
        take = min(n_global - first, key_states.shape[-2])
        positions = torch.arange(first, first + take, device=key_states.device)
        sink_k = shift_positions(key_states[:, :, :take], -positions, self.settings.inv_freq)
        assert self.sink_keys is not None and self.sink_values is not None
        self.sink_keys = torch.cat([self.sink_keys, sink_k], dim=-2)
        self.sink_values = torch.cat([self.sink_values, value_states[:, :, :take]], dim=-2)

    @property
    def _all_sinks_far_from(self) -> int:
        """First query position for which every global token lies beyond the window."""
        cfg = self.settings.config
        return cfg.n_local + cfg.n_global - 1

    def _ring_ranges(self, start: int, end: int) -> list[slice]:
        """Buffer slots of positions ``[start, end)`` (at most ``n_local`` of them), in position order: one or two
        contiguous ranges of the ring, so they are read and written by slicing (no index tensors)."""
        cfg = self.settings.config
        if end <= start:
            return []
        first_slot = start % cfg.n_local
        length = end - start
        head = min(length, cfg.n_local - first_slot)
        ranges = [slice(cfg.n_global + first_slot, cfg.n_global + first_slot + head)]
        if head < length:
            ranges.append(slice(cfg.n_global, cfg.n_global + length - head))
        return ranges

    @property
    def _steady_from(self) -> int:
        """First position whose decoding step takes the fixed-shape path. Eagerly: once every global token is out of
        the query's window, when the step needs no mask (on a window not yet full the general path reads fewer
        keys). With compiled steps allowed: as soon as every global token is kept, a mask hiding what the query
        must not see yet (the kernel's single-query cost is the same with it), so prompts of any length compile."""
        return self.settings.config.n_global if self.compiled_steps else self._all_sinks_far_from

    def _become_steady_when_ready(self) -> None:
        """Enter the steady state (window mode) from :attr:`_steady_from` on."""
        if not self.is_initialized or self.settings.config.cache_mode != "window" or self._seen < self._steady_from:
            return
        assert self.values is not None and self.sink_values is not None
        # Also called outside the inference mode the tensors were made in (allow_compiled_steps, restore).
        with torch.inference_mode() if self.values.is_inference() else contextlib.nullcontext():
            # The global keys' values never change; their keys are re-rotated at every step.
            self.values[:, :, : self.settings.config.n_global] = self.sink_values
            self._position = torch.full_like(self._position, self._seen)
        self.steady = True
        if self.compiled_steps and self.values.device.type == "cuda":
            # CUDA graphs replay a step on fixed memory: buffers a step writes in place must be static inputs, or
            # inductor runs the step without graphs ("mutated inputs"). Unguarded: another cache of the same shape
            # (the next question's) has the graphs recorded again on its buffers instead of a new compile. Not on a
            # CPU: its compile freezes (compiled.INDUCTOR_SETTINGS), which folds static inputs into constants, so the
            # next question decoded with the first one's buffers (tested on a CPU: logits off by ~0.9).
            for tensor in (self.keys, self.values, self.sink_keys, self._position):
                torch._dynamo.mark_static_address(tensor, guard=False)

    def _set_compiled_steps(self, allowed: bool) -> None:
        if allowed == self.compiled_steps:  # the engine sets it before every generation
            return
        if self.steady:  # the point where steadiness starts moves: leave, and enter again if past it
            self._seen, self.steady = int(self._position), False
        self.compiled_steps = allowed
        self._build_decode_kernel_if_needed()
        self._become_steady_when_ready()

    def _steady_decode_step(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One query over the whole buffer (global slots and ring) in one attention call.

        Global keys rotated to position ``position - distance_limit`` sit at relative distance ``distance_limit``
        from the query, so the query needs no rotation and all keys share one softmax in a single kernel call.
        With compiled steps allowed, a mask hides global slots still inside the window and ring slots not yet
        written (all visible once the window is full). Only tensor operations on fixed shapes, so
        ``torch.compile`` traces it once for every position.
        """
        cfg = self.settings.config
        assert self.keys is not None and self.values is not None and self.sink_keys is not None
        position = self._position
        slot = (cfg.n_global + position % cfg.n_local).view(1)
        new_keys = key_states
        if cfg.n_global:
            target, inv_freq = position - cfg.effective_distance_limit, self.settings.inv_freq
            if torch.compiler.is_compiling():
                cos, sin = rotation(target.view(1), inv_freq, torch.float32)
                sink_slots = torch.arange(cfg.n_global, device=slot.device)
            else:  # eager: one rotation per step, shared by all layers
                at = int(position) if self.compiled_steps else self._seen  # compiled steps count on the device only
                cos, sin = _rotation_to(at - cfg.effective_distance_limit, inv_freq, key_states.device)
                sink_slots = _leading_slots(cfg.n_global, slot.device)
            sinks = rotate(self.sink_keys, cos, sin).to(key_states.dtype)
            new_keys = torch.cat([sinks, key_states], dim=-2)
            slot = torch.cat([sink_slots, slot])
        # One index_copy_ per buffer: a compiled step then updates the buffer in place (a second write, e.g. a slice
        # assignment, made the compiler copy the whole buffer first).
        self.keys.index_copy_(2, slot, new_keys)
        self.values.index_copy_(2, slot[-1:], value_states)
        mask = self._visibility_mask(position) if self.compiled_steps else None
        position.add_(1)
        if not self.compiled_steps:
            self._seen += 1
        hand_over(PreparedKeys(self.keys, self.values, local_start=-1, single_softmax=True, mask=mask))
        return self.keys, self.values

    def _visibility_mask(self, position: torch.Tensor) -> torch.Tensor:
        """Additive ``(1, 1, 1, n_global + n_local)`` mask for the query at ``position``: global slot ``g`` is seen
        (at the distance limit) once ``position - g >= n_local``, before that it is a ring slot like any key; ring
        slot ``s`` holds a key once ``s <= position``."""
        cfg = self.settings.config
        assert self.keys is not None
        slots = torch.arange(cfg.n_global + cfg.n_local, device=position.device)
        visible = torch.where(slots < cfg.n_global, slots <= position - cfg.n_local, slots - cfg.n_global <= position)
        mask = torch.zeros(visible.shape, dtype=self.keys.dtype, device=position.device)
        return mask.masked_fill(~visible, float("-inf")).view(1, 1, 1, -1)

    def _window_update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, first: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        cfg = self.settings.config
        window, count = cfg.n_local, key_states.shape[-2]
        assert self.keys is not None and self.values is not None
        if count == 1:
            slot = cfg.n_global + first % window
            self.keys[:, :, slot] = key_states[:, :, 0]
            self.values[:, :, slot] = value_states[:, :, 0]
            filled = min(first + 1, window)
            # Ring order is irrelevant for a single query that sees its whole window.
            ring = slice(cfg.n_global, cfg.n_global + filled)
            return self.keys[:, :, ring], self.values[:, :, ring], max(0, first + 1 - window)
        keep = min(first, window - 1)  # earlier keys the first query of this chunk can see
        previous = self._ring_ranges(first - keep, first)
        local_k = torch.cat([*(self.keys[:, :, r] for r in previous), key_states], dim=-2)
        local_v = torch.cat([*(self.values[:, :, r] for r in previous), value_states], dim=-2)
        tail = min(count, window)
        source = count - tail  # the chunk's last `tail` keys fill the ring in position order
        for r in self._ring_ranges(first + count - tail, first + count):
            length = r.stop - r.start
            self.keys[:, :, r] = key_states[:, :, source : source + length]
            self.values[:, :, r] = value_states[:, :, source : source + length]
            source += length
        return local_k, local_v, first - keep

    def _full_update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, first: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        end = first + key_states.shape[-2]
        self._reserve(end)
        assert self.keys is not None and self.values is not None
        self.keys[:, :, first:end] = key_states
        self.values[:, :, first:end] = value_states
        if self.middle_keys is not None:
            positions = torch.arange(first, end, device=key_states.device)
            self.middle_keys[:, :, first:end] = shift_positions(key_states, -positions, self.settings.inv_freq)
        local_start = max(0, first - self.settings.config.n_local + 1)
        return self.keys[:, :, local_start:end], self.values[:, :, local_start:end], local_start

    def _reserve(self, length: int) -> None:
        assert self.keys is not None and self.values is not None
        capacity = self.keys.shape[-2]
        if length <= capacity:
            return
        # Grow by a quarter (at least 1024 slots): amortised O(1) appends, but at most 25% unused memory on
        # caches of hundreds of MB (doubling left up to half of a multi-GB cache empty).
        new_capacity = max(length, capacity + max(capacity // 4, 1024))

        def grown(x: torch.Tensor) -> torch.Tensor:
            bigger = x.new_zeros(*x.shape[:-2], new_capacity, x.shape[-1])
            bigger[:, :, : self.seen] = x[:, :, : self.seen]
            return bigger

        self.keys, self.values = grown(self.keys), grown(self.values)
        if self.middle_keys is not None:
            self.middle_keys = grown(self.middle_keys)

    _TENSOR_NAMES = ("keys", "values", "sink_keys", "sink_values", "middle_keys")
    GROWING = ("keys", "values", "middle_keys")  # full mode: buffers indexed by position

    def tensors(self) -> dict[str, torch.Tensor]:
        """The layer's state, cut to the slots written (for saving and cloning): full-mode buffers to the tokens
        seen; window buffers, which hold ``n_global + n_local`` slots from the first token, to the global slots and
        the part of the ring filled so far (a document shorter than the window saves its own size, not the
        window's). :meth:`restore` gives window buffers their whole size back."""
        cfg = self.settings.config
        filled = self.seen if cfg.cache_mode == "full" else cfg.n_global + min(self.seen, cfg.n_local)
        out = {}
        for name in self._TENSOR_NAMES:
            tensor = getattr(self, name)
            if tensor is None:
                continue
            if name in self.GROWING:
                tensor = tensor[:, :, :filled]
            out[name] = tensor
        return out

    def restore(self, tensors: dict[str, torch.Tensor], seen: int, top_k_from_position: int | None) -> None:
        """Take over ``tensors`` (as returned by :meth:`tensors`, copied by the caller if shared)."""
        cfg = self.settings.config
        tensors = dict(tensors)
        if cfg.cache_mode == "window":  # back to the whole window: steps write any slot in place
            for name in ("keys", "values"):
                tensors[name] = _with_slots(tensors[name], cfg.n_global + cfg.n_local)
        for name in self._TENSOR_NAMES:
            setattr(self, name, tensors.get(name))
        keys = tensors["keys"]
        self.dtype, self.device, self.batch_size = keys.dtype, keys.device, keys.shape[0]
        self._seen, self.top_k_from_position = seen, top_k_from_position
        self.steady, self._position = False, torch.zeros((), dtype=torch.long, device=keys.device)
        self.is_initialized = True
        self._build_decode_kernel_if_needed()
        self._become_steady_when_ready()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.steady:  # the attention builds no mask from it; a fixed size keeps compiled steps position-free
            assert self.keys is not None
            return self.keys.shape[-2] + query_length, 0
        return self._seen + query_length, 0

    def get_seq_length(self) -> int:
        if self.steady and torch.compiler.is_compiling():
            # Inside a compiled step, a tensor (as transformers' StaticLayer does) rather than an int to specialise on.
            return self._position  # type: ignore[return-value]
        return self.seen

    def get_max_length(self) -> int:  # abstract in transformers' CacheLayerMixin; -1: no fixed maximum
        return -1

    def nbytes(self) -> int:
        tensors = [self.keys, self.values, self.sink_keys, self.sink_values, self.middle_keys]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def reset(self) -> None:
        """Empty the layer in place, as transformers' cache layers do: the same buffers, zeroed, at position 0
        (a compiled step or a caller holding them keeps valid tensors)."""
        if not self.is_initialized:
            return
        for tensor in (self.keys, self.values, self.middle_keys):
            if tensor is not None:
                tensor.zero_()
        if self.sink_keys is not None and self.sink_values is not None:
            self.sink_keys, self.sink_values = self.sink_keys[:, :, :0], self.sink_values[:, :, :0]
        self._position.zero_()
        self._seen, self.steady, self.top_k_from_position = 0, False, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported with the LM-Infinite cache")


class LambdaCache(Cache):
    """KV cache for a model patched by :func:`~lminf_integrations.patch_model`.

    Create it with :func:`new_cache` (it reads the settings the patch attached to the model) and pass it to the
    model's forward or ``generate`` as ``cache`` (``past_key_values`` before transformers 5.24).
    """

    def __init__(self, settings: list[LayerSettings]) -> None:
        super().__init__(layers=[LambdaLayer(s) for s in settings])

    @property
    def lambda_layers(self) -> list[LambdaLayer]:
        return self.layers  # type: ignore[return-value]

    def nbytes(self) -> int:
        """Bytes held by keys and values (allocated capacity, not just the filled part)."""
        return sum(layer.nbytes() for layer in self.lambda_layers)

    def allow_compiled_steps(self, allowed: bool = True) -> None:
        """Let ``generate`` compile decoding steps once the cache is steady (``is_compileable``); off by default.

        With this allowed, steady means window mode with every global token seen (``n_global`` tokens): each step
        then has the same shapes. Pass ``compile_config`` (and, on a CPU, its ``_compile_all_devices``) to
        ``generate``, as :mod:`lminf_integrations.compiled` does.
        """
        for layer in self.lambda_layers:
            layer._set_compiled_steps(allowed)

    def set_prompt_length(self, prompt_length: int) -> None:
        """Top-k middle attention applies to queries from ``prompt_length - 1`` on (last prompt token onwards)."""
        for layer in self.lambda_layers:
            layer.top_k_from_position = prompt_length - 1

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], list[dict[str, int | None]]]:
        """What the cache holds, for saving: its tensors, named ``layer.{index}.{name}``, and each layer's positions
        (``{"seen": tokens written, "top_k_from_position": ...}``); :meth:`load_state_tensors` takes them back.

        The tensors are the cache's own memory (views; full-mode buffers cut to their filled length), not copies.
        """
        tensors: dict[str, torch.Tensor] = {}
        layers: list[dict[str, int | None]] = []
        for index, layer in enumerate(self.lambda_layers):
            layers.append({"seen": layer.seen, "top_k_from_position": layer.top_k_from_position})
            for name, tensor in layer.tensors().items():
                tensors[f"layer.{index}.{name}"] = tensor
        return tensors, layers

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], layers: Sequence[Mapping[str, int | None]]) -> None:
        """Fill this empty cache with what :meth:`state_tensors` returned (of a cache with the same settings).

        The tensors are taken over, not copied: pass copies of tensors that another cache still uses.
        """
        if len(layers) != len(self.lambda_layers):
            raise ValueError(f"the state has {len(layers)} layers; this cache has {len(self.lambda_layers)}")
        if any(layer.is_initialized for layer in self.lambda_layers):
            raise ValueError("load_state_tensors fills an empty cache; this one already holds keys")
        for index, (layer, info) in enumerate(zip(self.lambda_layers, layers, strict=True)):
            prefix = f"layer.{index}."
            own = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
            seen, top_k_from_position = info["seen"], info["top_k_from_position"]
            if not own and not seen:  # a layer that never saw a token: it stays empty
                layer.top_k_from_position = top_k_from_position
                continue
            if not isinstance(seen, int) or "keys" not in own:
                raise ValueError(f"the state's layer {index} is incomplete: it has no keys or no length")
            layer.restore(own, seen, top_k_from_position)

    def clone(self) -> LambdaCache:
        """An independent copy (a generation writes into the cache; the copy keeps the original untouched)."""
        twin = LambdaCache([layer.settings for layer in self.lambda_layers])
        for mine, theirs in zip(self.lambda_layers, twin.lambda_layers, strict=True):
            theirs.compiled_steps = mine.compiled_steps
            if mine.is_initialized:
                full = mine.settings.config.cache_mode == "full"
                copied = {
                    name: _copy(t, mine.seen, full and name in LambdaLayer.GROWING)
                    for name, t in mine.tensors().items()
                }
                theirs.restore(copied, mine.seen, mine.top_k_from_position)
        return twin


# A clone usually continues with a question and an answer: leave room for them in full-mode buffers, so the first
# new token does not reallocate (and transiently double) a cache that may be gigabytes.
_CLONE_ROOM = 1024


def _with_slots(tensor: torch.Tensor, slots: int) -> torch.Tensor:
    """``tensor`` with ``slots`` positions, the ones it lacks zero (itself when it has them all)."""
    if tensor.shape[-2] == slots:
        return tensor
    whole = tensor.new_zeros(*tensor.shape[:-2], slots, tensor.shape[-1])
    whole[:, :, : tensor.shape[-2]] = tensor
    return whole


def _copy(tensor: torch.Tensor, seen: int, with_room: bool) -> torch.Tensor:
    if not with_room:
        return tensor.clone()
    bigger = tensor.new_empty(*tensor.shape[:-2], seen + _CLONE_ROOM, tensor.shape[-1])
    bigger[:, :, :seen] = tensor
    return bigger
