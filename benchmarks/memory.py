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

    python benchmarks/memory.py --output benchmarks/MEMORY.md
    python benchmarks/memory.py --quick          # the test's small setting
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


def measure_point(base: str, path: str, k: int, batch: int, micro: int, n: int) -> dict:
    """Peak memory of one ODE-AM update (after a warm-up update) at this point."""
    import torch

    from diffusers_am.models import LoraSettings, load_model_adapter
    from diffusers_am.objectives import ode_am_step
    from diffusers_am.rewards import load_reward
    from diffusers_am.training.update import BatchReward

    torch.manual_seed(0)
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    adapter = load_model_adapter(path).to(device)
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
            "peak_bytes": peak, "start_bytes": start, "update_bytes": max(peak - start, 0)}


RESOLUTION_KLEIN = 128  # tiny klein: 16x16 latent tokens


def run_point(base: str, path: str, k: int, batch: int, micro: int, n: int) -> dict:
    """:func:`measure_point` in a fresh Python process (its own peak)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    cmd = [sys.executable, __file__, "--point", json.dumps([base, path, k, batch, micro, n])]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory point {base} K={k} B={batch} m={micro} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sweep(bases: list[str], n: int, micro: int, micros: list[int], batches: list[int], workdir: Path) -> list[dict]:
    from diffusers_am.models import EMBEDDED_DIGITS_BASE

    paths = {"digits": str(EMBEDDED_DIGITS_BASE)}
    if "klein" in bases:
        sys.path.insert(0, str(REPO / "tests"))
        from _tiny_pipelines import save_tiny_flux2_klein

        paths["klein"] = str(save_tiny_flux2_klein(workdir / "tiny-klein"))
    rows = []
    for base in bases:
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
    for r in rows:
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--point", default=None, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="small setting (the test): N 4, batch 4, micro-batch 1, 2")
    p.add_argument("--bases", default="digits,klein", help="comma-separated: digits, klein")
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
    bad = [b for b in bases if b not in ("digits", "klein")]
    if bad:
        print(f"error: --bases takes digits and/or klein; got {bad}.", file=sys.stderr)
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
        micro = next(r["micro"] for r in rows if r["sweep"] == "K")
        batches = sorted({r["batch"] for r in rows})
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = sweep(bases, n, micro, micros, batches, Path(tmp))
    estimate, recipe = klein_estimate()
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
    ])
    print(report)
    if args.output:
        Path(args.output).write_text(report)
        Path(args.output).with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
