"""``torch.compile`` for the quantizer, with the inductor's disk cache kept per CPU kernel path.

PyTorch picks its CPU kernels by the processor, and ``ATEN_CPU_CAPABILITY``
(``default``, ``avx2``, ``avx512``) forces a path; the inductor follows it when
it generates C++. In torch 2.13 the key of the inductor's on-disk FX graph cache
leaves the path out, so code cached under one path is served under another.
Measured here: a run on the native path, then the same run with
``ATEN_CPU_CAPABILITY=avx2``, trained to a NaN loss at step 17; with ``=default``
the served code failed to compile. So when ``ATEN_CPU_CAPABILITY`` is set and the
user has not chosen ``TORCHINDUCTOR_CACHE_DIR``, the cache goes to a directory of
that path's own, beside the default one.
"""

from __future__ import annotations

import getpass
import os
import tempfile

from torch import nn

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def _default_cache_dir() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # older torch: the same place, by the same rule
        return os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    return default_cache_dir()


def inductor_cache_per_kernel_path() -> str | None:
    """Point the inductor's cache at ``<default>/aten-cpu-<path>`` when ``ATEN_CPU_CAPABILITY``
    is set and ``TORCHINDUCTOR_CACHE_DIR`` is unset, or holds the default (the inductor
    writes it there) or another path's directory of this scheme (inherited from a parent
    process). Returns the directory chosen, or None when nothing was changed."""
    path = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if not path:
        return None
    default = os.path.abspath(_default_cache_dir())
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        chosen = os.path.abspath(chosen)
        ours = os.path.dirname(chosen) == default and os.path.basename(chosen).startswith(
            "aten-cpu-"
        )
        if chosen != default and not ours:
            return None  # the user's choice
    directory = os.path.join(default, f"aten-cpu-{path}")
    os.environ[CACHE_ENV] = directory
    return directory


def compile_module(module: nn.Module) -> nn.Module:
    """``module.compile()`` (in place: the module keeps its identity and state dict) with the
    inductor's cache kept apart for a forced CPU kernel path."""
    inductor_cache_per_kernel_path()
    module.compile()
    return module
