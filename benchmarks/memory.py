#!/usr/bin/env python
"""Peak memory of one ODE-AM update as K, the batch and the micro-batch grow; and the klein-4B estimate.

Each measured point runs in a fresh subprocess (``--point``): load the base, add a LoRA, run one warm-up
update, then measure the second update (sampling the whole batch, the lean adjoint and the loss in
micro-batches, an AdamW step). The peak is CUDA's ``max_memory_allocated`` on a GPU; on CPU it is the
process's peak RSS (``VmHWM`` in /proc, reset with /proc/self/clear_refs before the update; large
allocations are mmap-backed so freed memory leaves the RSS). "update MiB" is that peak minus the memory
in use when the update started. Points: K in {1, 4, N} x batch {4, 16} at a fixed micro-batch, and the
micro-batch swept at batch 16, on the embedded digits base and on a tiny FLUX.2-klein written with
``save_pretrained`` and loaded back.

The second part is an estimate for the real FLUX.2-klein-4B geometry (config numbers below, from the
released checkpoint, as in ../shared/bench/README.md): weights, LoRA + AdamW state, the text encoder
resident or cached, and activations per micro-batch with and without gradient checkpointing (per-sample
slopes of the peaks measured by ../shared/bench/floor-h100.json at batch 16), and the 24 GiB recipe.

The quantized base (``--bases klein-wide``): one point per ``--quantize_base`` (none, int8, nf4) on a wider
tiny klein (a ~100 M-parameter transformer), loaded the trainer's way; then the recipes for klein-4B and
klein-9B at 256 and 512 px on 12 / 16 / 24 / 48 GiB cards (estimates from the published configs).

    python benchmarks/memory.py --output benchmarks/MEMORY.md
    python benchmarks/memory.py --quick          # the test's small setting
    python benchmarks/memory.py --bases klein-wide   # the quantized base only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GIB = 2**30

# -- measured points ----------------------------------------------------------------------------------


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class Meter:
    """Peak bytes during a block: CUDA allocator peak, or the process's peak RSS on CPU."""

    def __init__(self, device):
        self.device = device

    def start(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back before the baseline
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        return _proc_kib("VmRSS") * 1024

    def peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _proc_kib("VmHWM") * 1024


def transformer_bytes(module) -> int:
    """Bytes the transformer holds: parameters and buffers (packed 4-bit / int8 for a quantized base) plus
    bitsandbytes' quantization state (NF4 absmax per block of 64, int8 row scales)."""
    tensors = list(module.parameters()) + list(module.buffers())
    total = sum(t.numel() * t.element_size() for t in tensors)
    for layer in module.modules():
        weight = getattr(layer, "weight", None)
        state = getattr(weight, "quant_state", None)
        extra = [getattr(state, "absmax", None), getattr(weight, "SCB", None)]
        total += sum(t.numel() * t.element_size() for t in extra if t is not None)
    return total


def measure_point(base: str, path: str, k: int, batch: int, micro: int, n: int, quantize: str = "none") -> dict:
    """Peak memory of one ODE-AM update (after a warm-up update) at this point; ``quantize``: the
    ``--quantize_base`` of the transformer and text encoder (none, int8, nf4)."""
    import torch

    from diffusers_am.models import LoraSettings, load_model_adapter
    from diffusers_am.objectives import ode_am_step
    from diffusers_am.rewards import load_reward
    from diffusers_am.training.update import BatchReward

    torch.manual_seed(0)
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    options = {"max_sequence_length": WIDE_SEQUENCE_LENGTH} if base == "klein-wide" else {}
    if quantize != "none":
        options.update(quantize_base=quantize, device=device)
    adapter = load_model_adapter(path, **options).to(device)
    params = adapter.add_lora(LoraSettings(rank=4, init_lora_weights="gaussian"))
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if base == "digits":
        reward, conditions = load_reward("digits", device=device), [i % 10 for i in range(batch)]
    else:
        def reward(images, prompts):  # mean brightness: differentiable, no model
            return images.mean(dim=(1, 2, 3))
        conditions = [f"prompt {i % 5}" for i in range(batch)]
    resolution = adapter.default_resolution if base == "digits" else RESOLUTION_KLEIN
    times = adapter.time_grid(n, resolution)
    encoded = adapter.encode_conditions(conditions)
    meter = Meter(device)

    def update(seed: int) -> None:
        noise = adapter.initial_noise(batch, resolution, torch.Generator(device=device).manual_seed(seed))
        flow = adapter.flow(encoded)
        ode_am_step(flow, noise, times, BatchReward(reward, adapter.decode, conditions), truncate_steps=k,
                    reward_scale=1.0, micro_batch_size=micro)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    update(0)
    start = meter.start()
    update(1)
    peak = meter.peak()
    return {"base": base, "K": k, "N": n, "batch": batch, "micro": micro, "device": device.type,
            "peak_bytes": peak, "start_bytes": start, "update_bytes": max(peak - start, 0),
            "quantize": quantize, "transformer_bytes": transformer_bytes(adapter.transformer)}


RESOLUTION_KLEIN = 128  # tiny klein: 16x16 latent tokens
WIDE_KLEIN = dict(  # a wider tiny klein for the quantized base: 2 double + 4 single blocks of width 1024
    patch_size=1, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=16,
    joint_attention_dim=48, timestep_guidance_channels=256, axes_dims_rope=(16, 16, 16, 16), guidance_embeds=False,
)
WIDE_SEQUENCE_LENGTH = 16  # text tokens of the wide klein (CPU time); 128 px: 64 image tokens
QUANTIZE_MODES = ("none", "int8", "nf4")


def save_wide_klein(directory: Path) -> Path:
    """The tiny klein pipeline with the :data:`WIDE_KLEIN` transformer (~100 M parameters), saved."""
    import torch
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    sys.path.insert(0, str(REPO / "tests"))
    from _tiny_pipelines import build_tiny_flux2_klein

    tiny = build_tiny_flux2_klein()
    torch.manual_seed(1)
    components = dict(tiny.components, transformer=Flux2Transformer2DModel(**WIDE_KLEIN))
    Flux2KleinPipeline(**components, is_distilled=True).save_pretrained(directory)
    return directory


def run_point(base: str, path: str, k: int, batch: int, micro: int, n: int, quantize: str = "none") -> dict:
    """:func:`measure_point` in a fresh Python process (its own peak)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    cmd = [sys.executable, __file__, "--point", json.dumps([base, path, k, batch, micro, n, quantize])]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory point {base} K={k} B={batch} m={micro} {quantize} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sweep(bases: list[str], n: int, micro: int, micros: list[int], batches: list[int], workdir: Path) -> list[dict]:
    from diffusers_am.models import EMBEDDED_DIGITS_BASE

    paths = {"digits": str(EMBEDDED_DIGITS_BASE)}
    if "klein" in bases:
        sys.path.insert(0, str(REPO / "tests"))
        from _tiny_pipelines import save_tiny_flux2_klein

        paths["klein"] = str(save_tiny_flux2_klein(workdir / "tiny-klein"))
    if "klein-wide" in bases:
        paths["klein-wide"] = str(save_wide_klein(workdir / "wide-klein"))
    rows = []
    for base in bases:
        if base == "klein-wide":  # the quantized base: one point per --quantize_base
            for q in QUANTIZE_MODES:
                rows.append(dict(run_point(base, paths[base], 2, 2, 2, 4, q), sweep="quantize"))
            continue
        for batch in batches:
            for k in sorted({1, 4, n}):
                rows.append(dict(run_point(base, paths[base], k, batch, micro, n), sweep="K"))
        for m in micros:
            rows.append(dict(run_point(base, paths[base], 4, max(batches), m, n), sweep="micro"))
    return rows


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def claims(rows: list[dict]) -> list[str]:
    """'flat in K' per (base, batch) and 'linear in micro-batch' per base, as lines of text."""
    lines = []
    for base in dict.fromkeys(r["base"] for r in rows):
        for batch in dict.fromkeys(r["batch"] for r in rows if r["base"] == base and r["sweep"] == "K"):
            pts = [r for r in rows if r["base"] == base and r["batch"] == batch and r["sweep"] == "K"]
            peaks = [r["peak_bytes"] for r in pts]
            spread = max(peaks) / min(peaks) - 1
            ups = [r["update_bytes"] for r in pts]
            lines.append(
                f"- {base}, batch {batch}: peak over K = {[r['K'] for r in pts]} varies by {100 * spread:.1f}% "
                f"({'flat in K within 10%' if spread <= 0.10 else 'NOT flat within 10%'}); update MiB "
                f"{', '.join(_mib(u) for u in ups)}"
            )
        pts = sorted((r for r in rows if r["base"] == base and r["sweep"] == "micro"), key=lambda r: r["micro"])
        if len(pts) >= 2:
            xs, ys = [r["micro"] for r in pts], [r["update_bytes"] for r in pts]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            sxx = sum((x - mx) ** 2 for x in xs)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
            fit = [my + slope * (x - mx) for x in xs]
            ss_res, ss_tot = sum((y - f) ** 2 for y, f in zip(ys, fit)), sum((y - my) ** 2 for y in ys)
            r2 = 1 - ss_res / ss_tot if ss_tot > 0 else 0.0
            verdict = "linear in micro-batch" if r2 >= 0.95 and slope > 0 else "NOT clearly linear in micro-batch"
            if len(pts) == 2:
                verdict = "two points: the slope only"
            lines.append(
                f"- {base}, batch {pts[0]['batch']}, K 4: update MiB over micro-batch {xs} = "
                f"{', '.join(_mib(y) for y in ys)}; least squares {_mib(slope)} MiB per trajectory, "
                f"R^2 = {r2:.3f} ({verdict})"
            )
    return lines


def table(rows: list[dict]) -> str:
    out = ["| base | sweep | K | N | batch | micro | peak MiB | update MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["sweep"] != "quantize"):
        out.append(f"| {r['base']} | {r['sweep']} | {r['K']} | {r['N']} | {r['batch']} | {r['micro']} | "
                   f"{_mib(r['peak_bytes'])} | {_mib(r['update_bytes'])} |")
    return "\n".join(out)


# -- the klein-4B estimate ------------------------------------------------------------------------------

# FLUX.2-klein-4B transformer/config.json (as quoted in ../shared/bench/README.md): 5 double + 20 single blocks,
# 24 heads x 128, joint_attention_dim 7680, mlp_ratio 3; 3.8755 B parameters (counted by gpu_floor.py).
KLEIN_4B_TRANSFORMER_PARAMS = 3_875_544_576
# LoRA rank 32 on the attention and MLP projections: 37.36 M parameters (gpu_floor.py); linear in the rank.
KLEIN_4B_LORA_PARAMS_PER_RANK = 37_355_520 / 32
# Qwen3-4B text encoder: hidden 2560, 36 layers, 32 heads x 128, 8 KV heads, MLP 9728, vocab 151936 (tied).
QWEN3_4B = dict(hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, mlp=9728, vocab=151936)
# FLUX.2 VAE (decoder + encoder): ~84 M parameters.
VAE_PARAMS = 84_000_000
# Peaks measured at batch 16, bf16, 256 px, 512 text tokens on one H100 (../shared/bench/floor-h100.json).
FLOOR_BATCH = 16
FLOOR_PEAKS_GIB = {"vjp": 37.02684783935547, "loss": 48.168541431427, "loss_ckpt": 12.340332984924316,
                   "vae_bwd": 19.593127727508545}


def qwen3_params(c: dict) -> int:
    attn = c["hidden"] * c["heads"] * c["head_dim"] * 2 + c["hidden"] * c["kv_heads"] * c["head_dim"] * 2
    mlp = 3 * c["hidden"] * c["mlp"]
    return c["layers"] * (attn + mlp + 2 * c["hidden"]) + c["vocab"] * c["hidden"]


def klein_estimate(rank: int = 32, budget_gib: float = 24.0) -> tuple[str, str]:
    """(markdown table of GiB per micro-batch, the recipe line) for klein-4B in bf16."""
    floor_path = REPO.parent / "shared" / "bench" / "floor-h100.json"
    peaks = dict(FLOOR_PEAKS_GIB)
    if floor_path.is_file():
        data = json.loads(floor_path.read_text())
        peaks = {"vjp": data["mem_vjp_GiB"], "loss": data["mem_loss_step_GiB"],
                 "loss_ckpt": data["mem_loss_step_ckpt_GiB"], "vae_bwd": data["mem_vae_decode_bwd_GiB"]}
    weights = KLEIN_4B_TRANSFORMER_PARAMS * 2 / GIB
    lora = KLEIN_4B_LORA_PARAMS_PER_RANK * rank * (4 + 4 + 8) / GIB  # fp32 weight + grad + Adam m, v
    floor_lora = KLEIN_4B_LORA_PARAMS_PER_RANK * 32 * (4 + 4) / GIB  # the floor's LoRA: weights + grads
    text = qwen3_params(QWEN3_4B) * 2 / GIB
    vae = VAE_PARAMS * 2 / GIB
    # per-trajectory activations: (floor peak - resident weights) / floor batch
    per = {name: max(peaks[name] - weights - floor_lora, 0.0) / FLOOR_BATCH for name in ("vjp", "loss", "loss_ckpt")}
    per["vae"] = max(peaks["vae_bwd"] - vae, 0.0) / FLOOR_BATCH
    # with checkpointing the base VJP recomputes its blocks too: take the checkpointed loss step's slope for both
    rows = ["| micro-batch | checkpointing | text encoder | weights + LoRA/Adam | activations | total GiB |",
            "|---|---|---|---|---|---|"]
    best = None
    for ckpt in (False, True):
        act = max(per["loss_ckpt"] if ckpt else max(per["vjp"], per["loss"]), per["vae"])
        for cached in (False, True):
            for m in (1, 2, 4, 8, 16):
                fixed = weights + lora + vae + (0.0 if cached else text)
                total = fixed + m * act
                rows.append(f"| {m} | {'on' if ckpt else 'off'} | {'cached' if cached else 'resident'} | "
                            f"{fixed:.1f} | {m * act:.1f} | {total:.1f} |")
                if total <= 0.9 * budget_gib and (best is None or (m, ckpt is False) > (best[0], best[1] is False)):
                    best = (m, ckpt, cached, total)
    header = (f"transformer {KLEIN_4B_TRANSFORMER_PARAMS / 1e9:.2f} B params = {weights:.2f} GiB bf16; LoRA rank "
              f"{rank} + grads + AdamW = {lora:.2f} GiB; Qwen3-4B text encoder {qwen3_params(QWEN3_4B) / 1e9:.2f} B "
              f"= {text:.2f} GiB bf16; VAE {vae:.2f} GiB. Activations per trajectory: base VJP {per['vjp']:.2f}, "
              f"loss step {per['loss']:.2f}, loss step with checkpointing {per['loss_ckpt']:.2f}, VAE decode + "
              f"backward {per['vae']:.2f} GiB (256 px, 512 text tokens).")
    if best is None:
        recipe = f"no setting fits {budget_gib} GiB with 10% headroom."
    else:
        m, ckpt, cached, total = best
        recipe = (f"24 GiB recipe (10% headroom): batch 16 sampled at once, `--micro_batch_size {m}`"
                  f"{' --gradient_checkpointing' if ckpt else ''}{' --cache_prompt_embeddings' if cached else ''}"
                  f" --mixed_precision bf16 -> about {total:.1f} GiB peak (estimate; pending a GPU measurement).")
    return header + "\n\n" + "\n".join(rows), recipe


# -- the quantized base: measured table and the klein-4B / klein-9B recipes (estimates) -----------------------------

def quantize_table(rows: list[dict]) -> str:
    out = ["| base | --quantize_base | transformer MiB | peak MiB | update MiB | peak saved vs none MiB |",
           "|---|---|---|---|---|---|"]
    none = {r["base"]: r["peak_bytes"] for r in rows if r.get("quantize", "none") == "none"}
    for r in rows:
        saved = none.get(r["base"], r["peak_bytes"]) - r["peak_bytes"]
        out.append(f"| {r['base']} | {r.get('quantize', 'none')} | {_mib(r['transformer_bytes'])} | "
                   f"{_mib(r['peak_bytes'])} | {_mib(r['update_bytes'])} | {_mib(saved)} |")
    return "\n".join(out)


# Qwen3-8B text encoder of klein-9B: hidden 4096, 36 layers, 32 heads x 128, 8 KV heads, MLP 12288, untied head.
QWEN3_8B = dict(hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, mlp=12288, vocab=151936, untied=True)
CARDS_GIB = (12, 16, 24, 48)
HEADROOM = 0.9  # a recipe must fit in 90% of the card (allocator fragmentation, CUDA context)


def _stored_bytes(params: int, linear: int, mode: str) -> float:
    """Bytes of a component with ``params`` parameters of which ``linear`` sit in nn.Linear layers, in bf16 or
    with those layers bitsandbytes-quantized: int8 (1 byte + fp32 row scales, counted as 1 byte) or NF4
    (half a byte + one fp32 absmax per 64 weights)."""
    rest = 2 * (params - linear)
    if mode == "nf4":
        return rest + linear * (0.5 + 4 / 64)
    if mode == "int8":
        return rest + linear * 1.0
    return 2.0 * params


def _klein_counts(config: dict, targets_per_single) -> dict:
    """Parameters of a klein transformer config, counted on the meta device: total, in nn.Linear, the largest
    linear, and LoRA parameters per rank on the floor's targets."""
    import torch
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**config)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    targets = targets_per_single(len(model.single_transformer_blocks))
    targeted = [m for n, m in linears if any(n == t or n.endswith("." + t) for t in targets)]
    lora = sum(m.in_features + m.out_features for m in targeted)
    return {"params": sum(p.numel() for p in model.parameters()), "linear": sum(m.weight.numel() for _, m in linears),
            "largest_linear": max(m.weight.numel() for _, m in linears), "lora_per_rank": lora,
            "width": config["num_attention_heads"] * config["attention_head_dim"],
            "blocks": config["num_layers"] + config["num_single_layers"]}


def quantized_recipes(rank: int = 32) -> tuple[str, list[dict]]:
    """(markdown table, rows): for klein-4B and klein-9B at 256 and 512 px and each card in :data:`CARDS_GIB`,
    the least quantized base and the largest micro-batch (gradient checkpointing on, batch 16 sampled at once)
    whose estimated peak fits, and that peak. Estimates only: weights from the published configs' parameter
    counts; activations per trajectory from the klein-4B floor peaks (256 px, bf16), scaled by width x blocks
    for 9B, by 2 (tokens 768 -> 1536) for the transformer and by 4 (pixels) for the VAE at 512 px."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from flux2_update import KLEIN_4B, KLEIN_9B, LORA_TARGETS

    def targets(singles: int) -> list[str]:
        return LORA_TARGETS + [f"single_transformer_blocks.{i}.attn.to_out" for i in range(singles)]

    per = _per_trajectory_gib()
    base4 = _klein_counts(KLEIN_4B, targets)
    models = {"klein-4B": (base4, QWEN3_4B), "klein-9B": (_klein_counts(KLEIN_9B, targets), QWEN3_8B)}
    rows = []
    for name, (tr, qwen) in models.items():
        te_params = qwen3_params(qwen) + (qwen["vocab"] * qwen["hidden"] if qwen.get("untied") else 0)
        te_linear = qwen["layers"] * (qwen3_params(dict(qwen, layers=1, vocab=0)) - 2 * qwen["hidden"])
        scale = tr["width"] * tr["blocks"] / (base4["width"] * base4["blocks"])
        for px in (256, 512):
            act = max(per["loss_ckpt"] * scale * (1.0 if px == 256 else 2.0), per["vae"] * (px / 256) ** 2)
            for card in CARDS_GIB:
                rows.append(_fit(name, px, card, tr, te_params, te_linear, act, rank))
    lines = ["| model | px | card GiB | flags (batch 16, --mixed_precision bf16 --gradient_checkpointing) | "
             "estimated peak GiB |", "|---|---|---|---|---|"]
    for r in rows:
        peak = "does not fit" if r["peak_gib"] is None else f"{r['peak_gib']:.1f} (estimate)"
        lines.append(f"| {r['model']} | {r['px']} | {r['card']} | {r['flags']} | {peak} |")
    return "\n".join(lines), rows


def _per_trajectory_gib() -> dict:
    """Activations per trajectory (GiB, 256 px, klein-4B, bf16) from the floor's peaks at batch 16."""
    peaks = dict(FLOOR_PEAKS_GIB)
    weights = KLEIN_4B_TRANSFORMER_PARAMS * 2 / GIB
    floor_lora = KLEIN_4B_LORA_PARAMS_PER_RANK * 32 * (4 + 4) / GIB
    return {"loss_ckpt": max(peaks["loss_ckpt"] - weights - floor_lora, 0.0) / FLOOR_BATCH,
            "vae": max(peaks["vae_bwd"] - VAE_PARAMS * 2 / GIB, 0.0) / FLOOR_BATCH}


def _fit(model: str, px: int, card: int, tr: dict, te_params: int, te_linear: int, act: float, rank: int) -> dict:
    """The first recipe that fits ``card`` GiB, preferring no quantization, then int8, then NF4; the text encoder
    cached (bf16 on the GPU only while encoding at set-up) before quantized and offloaded (not cached)."""
    lora = tr["lora_per_rank"] * rank * (4 + 4 + 8) / GIB  # fp32 weights, grads, AdamW m and v
    vae = VAE_PARAMS * 2 / GIB
    for mode in ("none", "int8", "nf4"):
        transformer = _stored_bytes(tr["params"], tr["linear"], mode) / GIB
        workspace = 0.0 if mode == "none" else tr["largest_linear"] * 2 / GIB  # one layer dequantized to bf16
        for cached in (True, False):
            if not cached and mode == "none":
                continue
            text = (_stored_bytes(te_params, 0, "none") if cached else _stored_bytes(te_params, te_linear, mode)) / GIB
            setup = transformer + vae + text  # encoding: the text encoder on the GPU beside the transformer
            for micro in (16, 8, 4, 2, 1):
                train = transformer + workspace + lora + vae + micro * act
                peak = max(setup, train)
                if peak <= HEADROOM * card:
                    flags = [] if mode == "none" else [f"--quantize_base {mode}"]
                    flags += ["--cache_prompt_embeddings"] if cached else ["--offload_text_encoder"]
                    flags += [f"--micro_batch_size {micro}"]
                    return {"model": model, "px": px, "card": card, "flags": " ".join(f"`{f}`" for f in flags),
                            "peak_gib": peak, "mode": mode, "micro": micro, "cached": cached}
    return {"model": model, "px": px, "card": card, "flags": "-", "peak_gib": None, "mode": None, "micro": None,
            "cached": None}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--point", default=None, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="small setting (the test): N 4, batch 4, micro-batch 1, 2")
    p.add_argument("--bases", default="digits,klein,klein-wide",
                   help="comma-separated: digits, klein (K and micro-batch sweeps), klein-wide (--quantize_base none, "
                   "int8, nf4 on a ~100 M-parameter klein transformer)")
    p.add_argument("--num_inference_steps", type=int, default=20, help="N (K sweeps 1, 4, N)")
    p.add_argument("--micro_batch_size", type=int, default=4, help="fixed micro-batch of the K sweep")
    p.add_argument("--output", default=None, help="write the report (markdown) here and the raw rows as .json")
    p.add_argument("--rows_json", default=None, help="re-render the report from a previous run's .json (no measuring)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.point is not None:
        print(json.dumps(measure_point(*json.loads(args.point))))
        return 0
    bases = [b.strip() for b in args.bases.split(",") if b.strip()]
    bad = [b for b in bases if b not in ("digits", "klein", "klein-wide")]
    if bad:
        print(f"error: --bases takes digits, klein and/or klein-wide; got {bad}.", file=sys.stderr)
        return 2
    if args.quick:
        n, micro, micros, batches = 4, 2, [1, 2], [4]
    else:
        n, micro, micros, batches = args.num_inference_steps, args.micro_batch_size, [1, 2, 4, 8, 16], [4, 16]
    if n < 4:
        print("error: --num_inference_steps must be >= 4 (K sweeps 1, 4, N).", file=sys.stderr)
        return 2
    if args.rows_json:
        rows = json.loads(Path(args.rows_json).read_text())["rows"]
        micro = next((r["micro"] for r in rows if r["sweep"] == "K"), micro)
        batches = sorted({r["batch"] for r in rows})
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = sweep(bases, n, micro, micros, batches, Path(tmp))
    estimate, recipe = klein_estimate()
    recipes, _ = quantized_recipes()
    quantized = [r for r in rows if r["sweep"] == "quantize"]
    measured_q = [
        f"Measured on {rows[0]['device']}: one ODE-AM update (N 4, K 2, batch 2, micro-batch 2, rank 4, 128 px, "
        f"{WIDE_SEQUENCE_LENGTH} text tokens) on a klein transformer of width 1024 (2 double + 4 single blocks) "
        "loaded with each `--quantize_base` (the text encoder, tiny here, quantized alike). \"transformer MiB\" "
        "counts its parameters, buffers and bitsandbytes' quantization state.", "", quantize_table(quantized), "",
    ] if quantized else ["No klein-wide rows in this run (`--bases klein-wide` measures them).", ""]
    device = rows[0]["device"]
    what = "CUDA max_memory_allocated" if device == "cuda" else "peak RSS of a fresh process (VmHWM)"
    report = "\n".join([
        "# Peak memory of one ODE-AM update", "",
        f"Measured on {device} ({what}); `python benchmarks/memory.py{' --quick' if args.quick else ''}`. "
        f"K sweep at micro-batch {micro}; micro-batch sweep at batch {max(batches)}, K 4. Tiny klein at "
        f"{RESOLUTION_KLEIN} px; digits base at its 8 px.", "",
        table(rows), "", *claims(rows), "",
        "\"update MiB\" has a floor that depends on neither K nor the micro-batch (the no-grad sampling of the "
        "whole batch, and buffers not isolated further); small micro-batches sit on it and the least-squares line "
        "is pulled flat by them, so read the largest micro-batches for the slope. \"peak MiB\" on CPU includes "
        "the Python / torch process (~0.5 GiB).", "",
        "## Estimate for FLUX.2-klein-4B (bf16, batch 16, 256 px)", "", estimate, "", recipe, "",
        "## Quantized base (`--quantize_base`)", "", *measured_q,
        "Recipes for klein-4B and klein-9B (estimates from the published configs' parameter counts and the klein-4B "
        "floor's activation peaks, until a GPU measures them; LoRA rank 32 with fp32 AdamW; 10% headroom). A cached "
        "prompt set-up holds the bf16 text encoder beside the transformer while it encodes; otherwise the text "
        "encoder is quantized alike and visits the GPU only to encode each batch (`--offload_text_encoder`).", "",
        recipes, "",
    ])
    print(report)
    if args.output:
        Path(args.output).write_text(report)
        Path(args.output).with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
