"""PyTorch peer baseline for ``bench/sample.py``: diffusers' FluxPipeline denoising loop, eager, seconds per image.

Builds ``FluxPipeline`` from a random full-size ``FluxTransformer2DModel`` (Flux.1-dev shapes, the config of
``shared/bench/torch_peer_lora_step.py``), FLUX.1's ``FlowMatchEulerDiscreteScheduler`` (dynamic shifting) and, with
``--decode``, a random FLUX.1 ``AutoencoderKL``; no text encoders: random T5 / CLIP states go in as
``prompt_embeds`` / ``pooled_prompt_embeds``, as ``bench/sample.py`` feeds random states to the JAX sampler. Times
the pipeline call (the transformer loop, then the VAE decode with ``--decode``; ``output_type="latent"`` without),
bf16, on CUDA when available. True CFG (``--cfg`` > 1) runs diffusers' way: a second transformer call per step.
Useful FLOPs per image use the same formula as ``bench/sample.py``.

  python bench/torch_peer_sample.py                      # GPU: 1024 px, 28 steps, bf16
  python bench/torch_peer_sample.py --tiny               # CPU smoke run: tiny transformer, 64 px, 2 steps

One JSON line per batch size, then ``RESULTS [...]``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny transformer and VAE at 64 px, 2 steps (CPU smoke run)")
    p.add_argument("--double", type=int, default=None, help="double blocks (default 19; tiny 2)")
    p.add_argument("--single", type=int, default=None, help="single blocks (default 38; tiny 2)")
    p.add_argument("--width", type=int, default=None, help="pixels (default 1024; tiny 64)")
    p.add_argument("--height", type=int, default=None, help="pixels (default 1024; tiny 64)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 28; tiny 2)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="images per call (one JSON line each)")
    p.add_argument("--cfg", type=float, default=1.0, help="true_cfg_scale; > 1 adds the negative branch")
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--txt-len", type=int, default=None, help="T5 tokens (default 512; tiny 16)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--decode", action="store_true", help="also decode with a random FLUX.1 VAE (timed with it)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    p.add_argument("--attn", default="", help="diffusers attention backend (e.g. flash, _native_cudnn)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls (after one untimed warm call)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (default: H100 bf16)")
    args = p.parse_args(argv)
    defaults = dict(double=2, single=2, width=64, height=64, steps=2, txt_len=16) if args.tiny else dict(
        double=19, single=38, width=1024, height=1024, steps=28, txt_len=512)  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def forward_flops(hidden: int, blocks: int, img_tokens: int, txt_tokens: int) -> float:
    """Matmul + attention FLOPs of one transformer forward per row (``bench/sample.py``'s formula)."""
    length = img_tokens + txt_tokens
    return 2 * 12 * hidden * hidden * length * blocks + 4 * length * length * hidden * blocks


def build_pipeline(args, device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    hidden, heads = (64, 2) if args.tiny else (3072, 24)
    cfg = dict(patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single,
               attention_head_dim=hidden // heads, num_attention_heads=heads,
               joint_attention_dim=64 if args.tiny else 4096, pooled_projection_dim=32 if args.tiny else 768,
               guidance_embeds=True, axes_dims_rope=(8, 12, 12) if args.tiny else (16, 56, 56))  # fmt: skip
    with torch.device(device):
        transformer = FluxTransformer2DModel(**cfg).to(dtype).eval()
        vae = None
        if args.decode:
            blocks = (32, 32, 64, 64) if args.tiny else (128, 256, 512, 512)
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=blocks,
                                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                                layers_per_block=2, norm_num_groups=8 if args.tiny else 32, scaling_factor=0.3611,
                                shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)  # fmt: skip
            vae = vae.to(dtype).eval()
    if args.attn:
        transformer.set_attention_backend(args.attn)
    if args.compile:
        transformer = torch.compile(transformer)
    # FLUX.1-dev's scheduler_config.json.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)  # fmt: skip
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe, cfg, hidden


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    t0 = time.perf_counter()
    pipe, cfg, hidden = build_pipeline(args, device, dtype)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"device {device}; {args.double}+{args.single} blocks, hidden {hidden}; {params / 1e9:.3f}B params "
          f"({args.dtype}); {args.width}x{args.height}, {args.steps} steps, cfg {args.cfg:g}; "
          f"built in {time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
    img_tokens = (args.height // 16) * (args.width // 16)
    results = []
    for batch in args.batch:
        g = torch.Generator("cpu").manual_seed(1)
        embeds = dict(
            prompt_embeds=torch.randn(batch, args.txt_len, cfg["joint_attention_dim"], generator=g).to(device, dtype),
            pooled_prompt_embeds=torch.randn(batch, cfg["pooled_projection_dim"], generator=g).to(device, dtype),
        )
        if args.cfg > 1:
            embeds.update(negative_prompt_embeds=torch.randn_like(embeds["prompt_embeds"]),
                          negative_pooled_prompt_embeds=torch.randn_like(embeds["pooled_prompt_embeds"]))  # fmt: skip

        def call(embeds=embeds):
            out = pipe(height=args.height, width=args.width, num_inference_steps=args.steps,
                       guidance_scale=args.guidance, true_cfg_scale=args.cfg, max_sequence_length=args.txt_len,
                       generator=torch.Generator("cpu").manual_seed(0),
                       output_type="pt" if args.decode else "latent", return_dict=False, **embeds)[0]  # fmt: skip
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        common = dict(width=args.width, height=args.height, steps=args.steps, batch=batch, cfg=args.cfg,
                      dtype=args.dtype, decode=args.decode, compile=args.compile, device=device)  # fmt: skip
        try:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                t0 = time.perf_counter()
                call()
                first = time.perf_counter() - t0
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - t0)
            dt = sorted(times)[len(times) // 2]
            rows = batch * (2 if args.cfg > 1 else 1)
            useful = args.steps * rows * forward_flops(hidden, args.double + args.single, img_tokens, args.txt_len)
            cuda = device == "cuda"
            r = dict(common, s_per_image=round(dt / batch, 4), s_per_step=round(dt / args.steps, 4),
                     first_call_s=round(first, 2), useful_tflop_per_image=round(useful / batch / 1e12, 3),
                     mfu=round(useful / dt / (args.peak_tflops * 1e12), 4) if cuda else None,
                     peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)  # fmt: skip
        except torch.OutOfMemoryError:
            r = dict(common, error="OOM")
            torch.cuda.empty_cache()
        print(json.dumps(r), flush=True)
        results.append(r)
    print("RESULTS " + json.dumps(results))
    return results


if __name__ == "__main__":
    main()
