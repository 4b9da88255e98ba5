"""How much memory a NOLA config's basis, coefficients and factors take, and the budget they must fit in: checked
before any module is replaced (:func:`check_basis_memory`)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..._env import bytes_from_env

from ..lowrank import matrix_shape, resolve_slices
from .config import BASIS_MODES, NolaConfig

BUDGET_ENV = "PEFT_NOLA_BASIS_MEMORY_BUDGET"


def check_basis_memory(config: NolaConfig, targets: list[tuple[str, nn.Module]], loading: bool = False) -> None:
    """Refuse, before any module is replaced, a config whose basis, coefficients and per-layer factors would not
    fit in memory (in every basis mode: the on-the-fly basis stores nothing, but its coefficients and the
    factors it forms in each forward still need room). The refusal suggests what would fit: another basis mode, or
    (for a new adapter) the largest ``num_basis_A = num_basis_B`` that fits in this mode."""
    if not targets:
        return
    needed = needed_bytes(config, targets)
    budget, where = basis_memory_budget(targets[0][1].weight.device)
    if budget is None or needed <= budget:
        return
    raise MemoryError(
        f"NOLA basis_mode={config.basis_mode!r} would need {format_bytes(needed)} of basis, coefficients and factors "
        f"for {len(targets)} adapted modules (k={config.num_basis_A}, l={config.num_basis_B}, r={config.r}), more than "
        f"the {format_bytes(budget)} budget ({where}). {_what_fits(config, targets, budget, loading)}; or raise the "
        f"budget with the environment variable {BUDGET_ENV}=<bytes>."
    )


def needed_bytes(config: NolaConfig, targets: list[tuple[str, nn.Module]], mode: str | None = None,
                 num_basis: int | None = None) -> int:
    """Bytes :func:`check_basis_memory` compares with the budget: basis plus working memory, in ``mode`` (default the
    config's) and with ``num_basis_A = num_basis_B = num_basis`` when given."""
    if num_basis is not None:
        config = copy.copy(config)
        config.num_basis_A = config.num_basis_B = num_basis
    return basis_bytes(config, targets, mode or config.basis_mode) + working_bytes(config, targets)


def _what_fits(config: NolaConfig, targets: list[tuple[str, nn.Module]], budget: int, loading: bool) -> str:
    """Advice naming only settings that fit ``budget`` (each with its bytes), never the mode already chosen."""
    if loading:
        # A trained adapter's basis and sizes are fixed: 'shared' and the per-layer modes are different bases, while
        # 'per_layer_cached' and 'per_layer' generate the same one (kept, or regenerated in each forward).
        if config.basis_mode == "per_layer_cached" and needed_bytes(config, targets, "per_layer") <= budget:
            return (f"Use basis_mode='per_layer' (the same basis, regenerated on the fly instead of kept: "
                    f"{format_bytes(needed_bytes(config, targets, 'per_layer'))} here)")
        return ("This adapter's basis and sizes are fixed by its training (another basis mode or size would be "
                "another model), so free memory or load it on a larger device")
    advice = [f"basis_mode={mode!r} ({format_bytes(needed_bytes(config, targets, mode))} here)"
              for mode in BASIS_MODES if mode != config.basis_mode and needed_bytes(config, targets, mode) <= budget]
    size = largest_fitting_num_basis(config, targets, budget)
    if size is not None:
        advice.append(f"num_basis_A=num_basis_B={size} (the largest that fit in basis_mode={config.basis_mode!r}: "
                      f"{format_bytes(needed_bytes(config, targets, num_basis=size))})")
    if not advice:
        return "Not even num_basis_A=num_basis_B=1 fits in any basis mode: lower r or adapt fewer modules"
    return "Use " + ", or ".join(advice)


def largest_fitting_num_basis(config: NolaConfig, targets: list[tuple[str, nn.Module]], budget: int) -> int | None:
    """The largest ``n <= max(num_basis_A, num_basis_B)`` such that ``num_basis_A = num_basis_B = n`` fits ``budget``
    in the config's basis mode; ``None`` when not even ``n = 1`` does. (The bytes grow with ``n``: bisection.)"""
    low, high = 0, max(config.num_basis_A, config.num_basis_B)
    while low < high:
        middle = (low + high + 1) // 2
        if needed_bytes(config, targets, num_basis=middle) <= budget:
            low = middle
        else:
            high = middle - 1
    return low or None


def basis_bytes(config: NolaConfig, targets: list[tuple[str, nn.Module]], mode: str) -> int:
    """Bytes of float32 basis that ``config`` keeps in memory for the ``(key, base layer)`` pairs it adapts in
    ``mode``: one basis per distinct shape when shared, one per adapted block when cached per layer."""
    if mode == "per_layer":
        return 0
    r, k, l = config.r, config.num_basis_A, config.num_basis_B
    shared, total = set(), 0
    for key, base_layer in targets:
        rows, cols = matrix_shape(base_layer)
        splits, adapt = resolve_slices(config.output_slices, key)
        if mode == "shared":
            shared |= {("A", cols), ("B", rows // splits)}
        else:
            total += len(adapt) * (k * r * cols + l * (rows // splits) * r)
    total += sum((k if factor == "A" else l) * r * size for factor, size in shared)
    return 4 * total


def working_bytes(config: NolaConfig, targets: list[tuple[str, nn.Module]]) -> int:
    """Bytes of float32 coefficients of all adapted blocks, plus the largest layer's factors ``A (r, cols)`` and
    ``B (rows, r)``, which every mode forms in the forward pass."""
    r, k, l = config.r, config.num_basis_A, config.num_basis_B
    coefficients, factors = 0, 0
    for key, base_layer in targets:
        rows, cols = matrix_shape(base_layer)
        splits, adapt = resolve_slices(config.output_slices, key)
        coefficients += len(adapt) * (k + l)
        factors = max(factors, len(adapt) * (r * cols + (rows // splits) * r))
    return 4 * (coefficients + factors)


def basis_memory_budget(device: torch.device) -> tuple[int | None, str]:
    """``(bytes, where it comes from)``: ``$PEFT_NOLA_BASIS_MEMORY_BUDGET`` if set, else the memory available on
    ``device`` now (``None`` where that cannot be known, e.g. the meta device)."""
    budget = bytes_from_env(BUDGET_ENV)
    if budget is not None:
        return budget, BUDGET_ENV
    return available_memory(device)


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """``(bytes, what they are)`` free on ``device`` now: a CUDA device's free memory, the machine's available memory
    for the CPU; ``None`` where that cannot be known (e.g. the meta device)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free memory on {device}"
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024, "available memory on this machine"
        except OSError:
            pass
    return None, ""


def format_bytes(num_bytes: int) -> str:
    """``"1,234,567 bytes (1.2 MiB)"``."""
    size = f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"
    return f"{num_bytes:,} bytes ({size})"
