"""PyTorch references for the sampling schedules: re-creations of the tools' own code, in torch ops.

BFL and ComfyUI are not installed, so their schedule code is re-created here line for line, in the same torch
operations (the float32 results depend on which torch kernels run, so these are torch code, not numpy); each block
names the file and functions it re-creates. diffusers is installed: its scheduler is used directly, and its
``calculate_shift`` is taken from the installed ``pipeline_flux.py``.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import pathlib
from collections.abc import Callable

import numpy as np
import torch

# --- Re-creation of black-forest-labs/flux src/flux/sampling.py (time_shift, get_lin_function, get_schedule) ---


def bfl_time_shift(mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def bfl_get_lin_function(
    x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15
) -> Callable[[float], float]:
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def bfl_get_schedule(
    num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, shift: bool = True
) -> list[float]:
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = bfl_get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        timesteps = bfl_time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


def bfl_embedded_timesteps(schedule: list[float], dtype: torch.dtype, batch: int = 1) -> np.ndarray:
    """The value BFL's model embeds at each step: ``denoise`` builds ``t_vec = torch.full((B,), t_curr,
    dtype=img.dtype)`` and ``modules/layers.py::timestep_embedding`` starts with ``t = time_factor * t`` (1000.0)
    before the float32 ``t[:, None].float() * freqs``."""
    values = []
    for t_curr in schedule[:-1]:
        t_vec = torch.full((batch,), t_curr, dtype=dtype)
        t = 1000.0 * t_vec
        values.append(t[:, None].float()[0, 0].item())
    return np.asarray(values, np.float32)


# --- Re-creation of Comfy-Org/ComfyUI comfy/model_sampling.py (flux_time_shift, ModelSamplingFlux,
# --- time_snr_shift, ModelSamplingDiscreteFlow) and comfy/samplers.py (simple_scheduler) ---


def comfy_flux_time_shift(mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


class ComfyModelSamplingFlux:
    """``ModelSamplingFlux`` (FLUX.1-dev): ``sampling_settings.get("shift", 1.15)``, a 10,000-entry table."""

    def __init__(self, shift: float = 1.15):
        self.set_parameters(shift=shift)

    def set_parameters(self, shift: float = 1.15, timesteps: int = 10000) -> None:
        self.shift = shift
        self.sigmas = self.sigma(torch.arange(1, timesteps + 1, 1) / timesteps)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return comfy_flux_time_shift(self.shift, 1.0, timestep)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma


def comfy_time_snr_shift(alpha: float, t: torch.Tensor) -> torch.Tensor:
    if alpha == 1.0:
        return t
    return alpha * t / (1 + (alpha - 1) * t)


class ComfyModelSamplingDiscreteFlow:
    """``ModelSamplingDiscreteFlow`` with ``FluxSchnell.sampling_settings = {"multiplier": 1.0, "shift": 1.0}``."""

    def __init__(self, shift: float = 1.0, multiplier: float = 1.0):
        self.set_parameters(shift=shift, multiplier=multiplier)

    def set_parameters(self, shift: float = 1.0, timesteps: int = 1000, multiplier: float = 1000) -> None:
        self.shift = shift
        self.multiplier = multiplier
        self.sigmas = self.sigma((torch.arange(1, timesteps + 1, 1) / timesteps) * multiplier)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return comfy_time_snr_shift(self.shift, timestep / self.multiplier)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.multiplier


def comfy_simple_scheduler(model_sampling, steps: int) -> torch.Tensor:
    s = model_sampling
    sigs = []
    ss = len(s.sigmas) / steps
    for x in range(steps):
        sigs += [float(s.sigmas[-(1 + int(x * ss))])]
    sigs += [0.0]
    return torch.FloatTensor(sigs)


# --- diffusers (installed): FluxPipeline's schedule and timestep handling ---


def diffusers_calculate_shift() -> Callable[..., float]:
    """``calculate_shift`` compiled from the installed diffusers' ``pipelines/flux/pipeline_flux.py``.

    Importing that module pulls in transformers' CLIP and T5 (~15 s here), so only this function's source is run."""
    spec = importlib.util.find_spec("diffusers")
    path = pathlib.Path(spec.origin).parent / "pipelines" / "flux" / "pipeline_flux.py"
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "calculate_shift")
    namespace: dict = {}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["calculate_shift"]


def diffusers_flux_scheduler(schnell: bool = False):
    """``FlowMatchEulerDiscreteScheduler`` as FLUX.1-dev's (dynamic shifting) or FLUX.1-schnell's (shift 1.0)
    ``scheduler_config.json`` builds it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if schnell:
        return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )


def diffusers_set_flux_timesteps(scheduler, num_inference_steps: int, image_seq_len: int) -> None:
    """What ``FluxPipeline.__call__`` does before its loop (step 5): the default sigmas, ``mu`` from the scheduler
    config, then ``retrieve_timesteps(..., sigmas=sigmas, mu=mu)``, i.e. ``set_timesteps(sigmas=..., mu=...)``."""
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    mu = diffusers_calculate_shift()(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    scheduler.set_timesteps(sigmas=sigmas, device="cpu", mu=mu)


def diffusers_embedded_timesteps(timesteps: torch.Tensor, dtype: torch.dtype, batch: int = 1) -> np.ndarray:
    """The value diffusers' Flux transformer embeds at each step: the pipeline passes
    ``t.expand(B).to(latents.dtype) / 1000``, ``FluxTransformer2DModel.forward`` does
    ``timestep.to(hidden_states.dtype) * 1000`` and ``get_timestep_embedding`` takes ``timesteps[:, None].float()``.
    """
    values = []
    for t in timesteps:
        timestep = t.expand(batch).to(dtype)
        model_in = timestep / 1000
        embedded = model_in.to(dtype) * 1000
        values.append(embedded[:, None].float()[0, 0].item())
    return np.asarray(values, np.float32)


def comfy_embedded_timesteps(model_sampling, sigmas: torch.Tensor) -> np.ndarray:
    """The value ComfyUI's Flux embeds: ``model_base._apply_model`` passes ``t = timestep(sigma).float()`` and
    ``comfy/ldm/flux/layers.py::timestep_embedding`` starts with ``t = time_factor * t`` (1000.0), in float32
    whatever the model's dtype (the embedding is cast to it afterwards)."""
    t = model_sampling.timestep(sigmas[:-1]).float()
    return (1000.0 * t)[:, None].float()[:, 0].numpy()
