"""Launching the MoE layer's Triton kernels without Triton's per-call argument binding.

``kernel[grid](*args, **kwargs)`` (``JITFunction.run``) binds every argument, computes each
one's specialization (dtype, 16-byte alignment of pointers, divisibility by 16 and ``== 1`` of
integers), builds the cache key from them and the options, looks the compiled kernel up, then
calls its launcher. At the layer's 30-argument GEMMs that is tens of microseconds per launch,
all of it repeated work when the layer runs the same shapes step after step.

A ``KernelPlan`` does that work once per layer shape. The caller (``ep_comm.moe.gemm``,
``ep_comm.moe.layer``) builds it on a shape's first call, after its full checks, with the
complete argument list and the positions (``slots``) of the arguments that change per call
(tensor pointers, and counts where the shape allows them to vary). A later call passes only
those values; the plan checks that each one specialises as before (tensor dtype and 16-byte
alignment, integer class) and calls the compiled kernel's launcher directly, with the argument
list ``JITFunction.run`` would have built. A value that specialises differently (a tensor at
another alignment, say) is launched the ordinary way, which compiles or finds its variant, and
that variant is kept beside the first: the same kernels run as before, never a variant compiled
for other arguments.

The ordinary launch is used, every call, where:

* the kernel is not a ``JITFunction`` (``TRITON_INTERPRET=1``: ``InterpretedFunction``; the
  CPU tests run this path, and ``tests/test_moe_launch.py`` drives the direct path on CPU with a
  stand-in Triton driver);
* launch hooks are registered (``triton.knobs.runtime.launch_enter_hook`` / ``exit_hook``, e.g.
  a profiler that wants each launch's metadata);
* ``EP_COMM_DEBUG=1`` or ``EP_COMM_TRITON_DIRECT=0`` is set (read when the module is imported).
"""
from __future__ import annotations

import os

import torch
import triton
from triton.runtime.jit import JITFunction

#: Direct launches on (``EP_COMM_TRITON_DIRECT=0`` or ``EP_COMM_DEBUG=1``: every launch through
#: ``kernel[grid]``, with Triton's own binding and checks).
DIRECT = (os.environ.get("EP_COMM_TRITON_DIRECT", "1") != "0"
          and os.environ.get("EP_COMM_DEBUG", "0") in ("", "0"))

_I32 = 1 << 31
_I64 = 1 << 63


def spec_of(value):
    """What Triton specialises a runtime argument on, as a comparable value.

    Tensors: dtype and whether the address is 16-byte aligned. Integers: the type Triton gives
    them (i32 / i64 / u64 by range), divisibility by 16 and ``== 1`` (then a constant). Other
    values (floats, bools, None, descriptors) are compared by type: the plan's caller fixes
    them per plan. ``tests/test_moe_launch.py`` checks this against Triton's own
    ``native_specialize_impl``.
    """
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if type(value) is int:
        rng = 0 if -_I32 <= value < _I32 else (1 if -_I64 <= value < _I64 else 2)
        return rng, value % 16 == 0, value == 1
    return type(value)


def full_args(kernel, args: tuple, kwargs: dict) -> tuple[list, dict]:
    """(every parameter's value in signature order, the launch options) of ``kernel(*args,
    **kwargs)``: positional values, then keyword values (constexprs), then defaults; what is
    not a parameter (``num_warps``, ``num_stages``, ``maxnreg``) is an option."""
    names = kernel.arg_names
    values = list(args)
    for p in kernel.params[len(args):]:
        name = p.name
        if name in kwargs:
            values.append(kwargs[name])
        elif p.has_default:
            values.append(p.default)
        else:
            raise TypeError(f"{kernel.__name__}: missing argument {name!r}")
    options = {k: v for k, v in kwargs.items() if k not in names}
    return values, options


class _Variant:
    """One compiled specialization of a plan: the launcher and its two fixed handles."""

    __slots__ = ("run", "function", "metadata")

    def __init__(self, compiled):
        self.run = compiled.run  # loads the module on first access (as JITFunction.run does)
        self.function = compiled.function
        self.metadata = compiled.packed_metadata


class KernelPlan:
    """One kernel, one layer shape: its arguments as on the first call, with per-call ``slots``.

    Args:
        kernel: the ``@triton.jit`` (or ``@gluon.jit``) kernel.
        args: its positional arguments as on the first call.
        kwargs: its keyword arguments (constexprs by name, launch options such as
            ``num_warps``), the same on every call.
        slots: indices into ``args`` of the values that change from call to call; every other
            value must be the same on every call of this plan (the caller's plan key says so).

    ``plan(grid, values)`` launches with ``values`` in the slots. ``launches`` counts the calls,
    ``direct_launches`` those that skipped ``kernel[grid]``.
    """

    __slots__ = ("kernel", "args", "kwargs", "full", "slots", "variants", "direct", "_device",
                 "_stream", "launches", "direct_launches")

    def __init__(self, kernel, args: tuple, kwargs: dict, slots: tuple[int, ...]):
        self.kernel = kernel
        self.args = list(args)
        self.kwargs = dict(kwargs)
        self.slots = tuple(slots)
        #: direct launches possible for this kernel (a JITFunction, switch on)
        self.direct = DIRECT and isinstance(kernel, JITFunction)
        # every parameter in signature order, as the compiled kernel's launcher takes them;
        # the positional ones come first, so ``slots`` index this list too
        self.full = full_args(kernel, args, kwargs)[0] if self.direct else None
        for i in self.slots:  # per-call values: not kept alive by the plan
            self.args[i] = None
            if self.full is not None:
                self.full[i] = None
        self.variants: dict = {}
        self._device = self._stream = None
        self.launches = 0
        self.direct_launches = 0

    def __call__(self, grid: tuple, values: tuple) -> None:
        """Launches on ``grid`` (1 to 3 ints) with ``values`` in the slots, in their order."""
        self.launches += 1
        if self.direct and self._device is not None:
            hooks = _idle_hooks()
            if hooks is not None:
                device = self._device()
                var = self.variants.get((device, tuple(map(spec_of, values))))
                if var is not None:
                    args = self.full.copy()
                    for i, v in zip(self.slots, values):
                        args[i] = v
                    g = (*grid, 1, 1)
                    var.run(g[0], g[1], g[2], self._stream(device), var.function, var.metadata,
                            None, hooks[0], hooks[1], *args)
                    self.direct_launches += 1
                    return
        self._ordinary(grid, values)

    def _ordinary(self, grid: tuple, values: tuple) -> None:
        """``kernel[grid](...)``; for a direct plan, its compiled kernel is kept for the
        values' specialization (the variant a later call with like values launches)."""
        args = self.args.copy()
        for i, v in zip(self.slots, values):
            args[i] = v
        compiled = self.kernel[tuple(grid)](*args, **self.kwargs)
        if self.direct and hasattr(compiled, "packed_metadata"):
            if self._device is None:
                from triton.runtime import driver
                self._device = driver.active.get_current_device
                self._stream = driver.active.get_current_stream
            self.variants[(self._device(), tuple(map(spec_of, values)))] = _Variant(compiled)


def _idle_hooks():
    """(enter, exit) launch hooks to hand the launcher when none is registered (it then needs
    no launch metadata), else None: the launch must go through ``kernel[grid]``, which builds
    the metadata. Triton >= 3.4 keeps hooks in ``HookChain``s (a ``calls`` list, called with
    the metadata even when empty); older versions use None."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None:
        return None, None
    enter, exit_ = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    for hook in (enter, exit_):
        if hook is not None and getattr(hook, "calls", True):
            return None
    return enter, exit_


#: Layer plans on (``EP_COMM_DEBUG=1``: every call validates everything and builds its launches
#: anew, as before plans existed).
PLANS = os.environ.get("EP_COMM_DEBUG", "0") in ("", "0")


class PlanCache(dict):
    """Plans by key, at most ``size`` of them (the oldest dropped first): shapes that change
    every call (normal mode without ``num_worst_tokens``: the row count) cannot grow it."""

    def __init__(self, size: int = 16):
        super().__init__()
        self.size = size

    def put(self, key, plan):
        if key not in self and len(self) >= self.size:
            del self[next(iter(self))]
        self[key] = plan
        return plan

    def plan(self, key_fn, build):
        """The plan of ``key_fn()``: the kept one, else ``build()`` kept. With plans off
        (``PLANS`` false: ``EP_COMM_DEBUG=1``) ``build()`` every call, kept nowhere."""
        if not PLANS:
            return build()
        key = key_fn()
        plan = self.get(key)
        return plan if plan is not None else self.put(key, build())
