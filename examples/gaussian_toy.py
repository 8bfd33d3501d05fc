"""The Gaussian toy of method.md section 6: the adjoint-matching core against closed forms.

(a) integrates the lean adjoint with ``diffusers_am.adjoint.lean_adjoint`` on a fine Euler grid and
    compares its peak time with t* = 1 / (1 + s^2) and the normalized control profiles
    (|a~(t)| / |a~(t*)|)^(1/(p-1)) for p = 2, 4, 6 with their closed form;
(b) trains a small MLP control with ``diffusers_am.objectives.ode_am_step`` (p = 2 and 4, K = N and a
    small K) and measures the relative L2 error of u_theta against u*(t) on the trained window and
    the relative error of the terminal mean shift (simulated vs closed form);
(c) prints a table (``--json``: one JSON object), writes a PNG of the control-intensity profiles.

Exit status 1 if an acceptance check fails. Run: ``python examples/gaussian_toy.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from diffusers_am.adjoint import lean_adjoint
from diffusers_am.control import optimal_control, per_sample_norm
from diffusers_am.flow import sample_euler
from diffusers_am.jsonio import dumps
from diffusers_am.toy.gaussian import GaussianToy
from diffusers_am.toy.gaussian_fit import control_error, simulated_mean_shift, train_toy_control, uniform_grid

PROFILE_ORDERS = (2.0, 4.0, 6.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", default="docs/images/gaussian_toy_profiles.png", help="PNG path ('' to skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mean", type=float, default=1.0, help="data mean m")
    p.add_argument("--std", type=float, default=0.5, help="data std s (< 1: late peak)")
    p.add_argument("--reward-slope", type=float, default=1.0, help="c in r(x) = c x")
    p.add_argument("--reward-scale", type=float, default=1.0, help="lambda")
    p.add_argument("--fine-steps", type=int, default=1000, help="Euler steps of part (a)")
    p.add_argument("--num-steps", type=int, default=50, help="N, Euler steps of part (b)")
    p.add_argument(
        "--truncate-steps", type=int, nargs="+", default=None, help="K values of part (b) (default: N and 10)"
    )
    p.add_argument("--train-orders", type=float, nargs="+", default=[2.0, 4.0], help="orders p trained in part (b)")
    p.add_argument("--iterations", type=int, default=100, help="ODE-AM updates per run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--peak-tol", type=float, default=0.01, help="max relative error of the peak time")
    p.add_argument("--profile-tol", type=float, default=0.01, help="max abs error of normalized profiles")
    p.add_argument("--control-tol", type=float, default=0.05, help="max relative L2 error of trained controls")
    p.add_argument("--shift-tol", type=float, default=0.05, help="max relative error of the terminal mean shift")
    args = p.parse_args(argv)
    if args.truncate_steps is None:
        args.truncate_steps = [args.num_steps, min(10, args.num_steps)]
    args.truncate_steps = list(dict.fromkeys(args.truncate_steps))  # drop repeats, keep order
    return args


def profile_check(toy: GaussianToy, fine_steps: int, batch_size: int = 8) -> dict:
    """Part (a): lean adjoint on the base trajectory vs closed forms."""
    times = uniform_grid(fine_steps)
    states = sample_euler(toy.base_velocity, torch.randn(batch_size, 1), times, record_last=fine_steps + 1)
    terminal = torch.full_like(states[-1], toy.terminal_adjoint)
    adj = lean_adjoint(toy.base_velocity, states, times, terminal)  # [N+1, B, 1]
    intensity = per_sample_norm(adj.reshape(-1, 1)).reshape(adj.shape[:2]).mean(1)  # [N+1]
    peak = float(times[int(intensity.argmax())])
    profiles, errors = {}, {}
    for p in PROFILE_ORDERS:
        u = optimal_control(adj.reshape(-1, 1), p).reshape(adj.shape[:2]).abs().mean(1)
        numeric = u / u.max()
        closed = toy.normalized_profile(times.double(), p)
        profiles[p] = numeric
        errors[p] = float((numeric.double() - closed).abs().max())
    return {
        "times": times,
        "profiles": profiles,
        "peak_time": peak,
        "peak_time_closed_form": toy.peak_time,
        "peak_rel_error": abs(peak - toy.peak_time) / toy.peak_time,
        "profile_max_abs_error": errors,
    }


def training_check(toy: GaussianToy, args: argparse.Namespace) -> list[dict]:
    """Part (b): ODE-AM runs; errors against u*(t) and the closed-form terminal mean shift."""
    rows = []
    times = uniform_grid(args.num_steps)
    for p in args.train_orders:
        for k in args.truncate_steps:
            start = time.perf_counter()
            flow, losses = train_toy_control(
                toy, order=p, num_steps=args.num_steps, truncate_steps=k, iterations=args.iterations,
                batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            )
            seconds = time.perf_counter() - start
            gen = torch.Generator().manual_seed(args.seed + 1)
            err = control_error(flow, times, k, p, generator=gen)
            shift = simulated_mean_shift(flow, generator=gen)
            shift_cf = toy.terminal_mean_shift(order=p, window_start=flow.control_start)
            rows.append({
                "order": p, "num_steps": args.num_steps, "truncate_steps": k, "window_start": flow.control_start,
                "control_rel_l2": err.continuous, "control_rel_l2_vs_euler_optimum": err.discrete,
                "mean_shift": shift, "mean_shift_closed_form": shift_cf,
                "mean_shift_rel_error": abs(shift - shift_cf) / abs(shift_cf),
                "final_loss": losses[-1], "train_seconds": seconds,
                "window_times": err.times.tolist(), "learned_control_mean": err.learned_mean.tolist(),
            })
    return rows


def write_plot(path: str, toy: GaussianToy, part_a: dict, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fine = torch.linspace(0, 1, 401, dtype=torch.float64)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    stride = max(1, len(part_a["times"]) // 40)
    for p, color in zip(PROFILE_ORDERS, ("C0", "C1", "C2")):
        ax1.plot(fine, toy.normalized_profile(fine, p), color=color, label=f"closed form, p={p:g}")
        ax1.plot(part_a["times"][::stride], part_a["profiles"][p][::stride], "o", ms=3, color=color,
                 label=f"lean_adjoint, p={p:g}")
    ax1.axvline(toy.peak_time, color="gray", ls="--", lw=1, label=f"t* = {toy.peak_time:.3f}")
    ax1.set(xlabel="paper time t (0 noise, 1 data)", ylabel="|u*(t)| / |u*(t*)|",
            title="normalized control intensity")
    ax1.legend(fontsize=7)
    for j, p in enumerate(sorted({row["order"] for row in rows})):
        ax2.plot(fine, toy.optimal_control(fine, p), color="black", lw=1, ls=("-", "--", ":", "-.")[j % 4],
                 label=f"u*(t), p={p:g}")
    markers = ("o", "s", "^", "v", "D", "x")
    for i, row in enumerate(rows):
        ax2.plot(row["window_times"], row["learned_control_mean"], markers[i % len(markers)], ms=3, color=f"C{i}",
                 label=f"ODE-AM p={row['order']:g}, K={row['truncate_steps']}")
    ax2.set(xlabel="paper time t", ylabel="u(t)", title="trained E u_theta(X_t, t) (marks) vs u*(t) (lines)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    torch.manual_seed(args.seed)
    toy = GaussianToy(mean=args.mean, std=args.std, reward_slope=args.reward_slope, reward_scale=args.reward_scale)
    start = time.perf_counter()
    part_a = profile_check(toy, args.fine_steps)
    rows = training_check(toy, args)
    checks = {
        "peak_time": part_a["peak_rel_error"] <= args.peak_tol,
        "profiles": max(part_a["profile_max_abs_error"].values()) <= args.profile_tol,
        "controls": all(r["control_rel_l2"] <= args.control_tol for r in rows),
        "mean_shifts": all(r["mean_shift_rel_error"] <= args.shift_tol for r in rows),
    }
    if args.plot:
        write_plot(args.plot, toy, part_a, rows)
    result = {
        "toy": {"mean": toy.mean, "std": toy.std, "reward_slope": toy.reward_slope, "reward_scale": toy.reward_scale},
        "lean_adjoint": {
            "fine_steps": args.fine_steps,
            "peak_time": part_a["peak_time"],
            "peak_time_closed_form": part_a["peak_time_closed_form"],
            "peak_rel_error": part_a["peak_rel_error"],
            "profile_max_abs_error": {f"{p:g}": e for p, e in part_a["profile_max_abs_error"].items()},
        },
        "ode_am": [{k: v for k, v in r.items() if k not in ("window_times", "learned_control_mean")} for r in rows],
        "checks": checks,
        "passed": all(checks.values()),
        "plot": args.plot or None,
        "seconds": time.perf_counter() - start,
    }
    print(dumps(result) if args.json else format_table(result, args))
    return 0 if result["passed"] else 1


def format_table(result: dict, args: argparse.Namespace) -> str:
    la = result["lean_adjoint"]
    toy = result["toy"]
    ok = lambda flag: "ok" if flag else "FAIL"  # noqa: E731
    lines = [
        f"Gaussian toy: m={toy['mean']:g}, s={toy['std']:g}, "
        f"r(x)={toy['reward_slope']:g}x, lambda={toy['reward_scale']:g}",
        "",
        f"(a) lean adjoint, Euler N={la['fine_steps']}",
        f"  peak time  {la['peak_time']:.4f}  vs t* = {la['peak_time_closed_form']:.4f}  "
        f"rel. error {la['peak_rel_error']:.2e}  [{ok(result['checks']['peak_time'])}]",
    ]
    for p, e in la["profile_max_abs_error"].items():
        lines.append(f"  normalized profile p={p}: max abs error {e:.2e}")
    lines += [
        f"  profiles [{ok(result['checks']['profiles'])}]",
        "",
        f"(b) ODE-AM, {args.iterations} updates of batch {args.batch_size}",
        "  p   N    K   window     relL2 u vs u*(t)  (vs Euler opt.)  shift sim  shift exact  rel.err   loss      time",
    ]
    for r in result["ode_am"]:
        lines.append(
            f"  {r['order']:<3g} {r['num_steps']:<4d} {r['truncate_steps']:<3d} [{r['window_start']:.2f}, 1]  "
            f"{r['control_rel_l2']:>16.4f}  {r['control_rel_l2_vs_euler_optimum']:>15.4f}  "
            f"{r['mean_shift']:>9.4f}  {r['mean_shift_closed_form']:>11.4f}  {r['mean_shift_rel_error']:>7.4f}  "
            f"{r['final_loss']:.2e}  {r['train_seconds']:5.1f}s"
        )
    lines += [
        f"  controls within {args.control_tol:.0%} [{ok(result['checks']['controls'])}], "
        f"mean shifts within {args.shift_tol:.0%} [{ok(result['checks']['mean_shifts'])}]",
        "",
        f"{'PASSED' if result['passed'] else 'FAILED'} in {result['seconds']:.1f} s"
        + (f"; plot: {result['plot']}" if result["plot"] else ""),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
