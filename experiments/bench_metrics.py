"""Retrieval metrics at ICFG-PEDES test size: tipr's retrieval_ranks vs the plain full-argsort approach.

19,848 text queries x 19,848 gallery images of 1,000 identities (one caption per
image, as in ICFG-PEDES test), 512-d features. By default the features are
identity centres plus noise, so that Rank-1 lands near the published ICFG-PEDES
figures (about 60 %; mAP and mINP come out lower than published ones);
``--features random`` gives unstructured features.

Two references, both the algorithm of the public IRRA/SEN evaluation (cosine
similarity of the whole query x gallery matrix, a full ``argsort`` of every row,
gathered identity matches, cumulative sums, a Python loop over queries for
mINP):

- ``irra``: as that code does it (it keeps the argsort indices, and builds AP
  from a Python list of 19,848 columns that it stacks);
- ``argsort``: the same algorithm without those two avoidable costs (indices
  freed once used, AP vectorised), a stronger baseline.

Every measurement runs in a fresh subprocess. Peak memory is the process's
resident-set high-water mark during the call minus its resident set just before
the call (the features, the interpreter and torch): the high-water mark is reset
through /proc/self/clear_refs after the features are made.

All methods compute the same 19,848 x 19,848 x 512 matrix product (about 0.4
TFLOP); its time, printed last, is a floor for any exact method, so on a CPU it
bounds the end-to-end speed-up. ``--mode similarity`` times the ranking alone,
every method being handed the same precomputed similarity matrix (which then
counts as input, not as peak).

    python experiments/bench_metrics.py [--mode features|similarity] [--features clustered|random]
                                        [--threads N] [--repeats R] [--methods irra argsort tipr]
    python experiments/bench_metrics.py --methods tipr --device cuda     # on a GPU: peak is GPU memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

METRICS = ("R1", "R5", "R10", "mAP", "mINP")


def make_eval_set(args: argparse.Namespace):
    """Query/gallery features and identities; built in place so that no large temporaries raise the baseline."""
    generator = torch.Generator().manual_seed(0)
    gallery_pids = (torch.arange(args.gallery) % args.identities)[torch.randperm(args.gallery, generator=generator)]
    query_pids = gallery_pids[torch.randperm(args.gallery, generator=generator)][: args.queries]
    features = []
    centres = torch.randn(args.identities, args.dim, generator=generator)
    for pids in (query_pids, gallery_pids):
        x = torch.randn(pids.numel(), args.dim, generator=generator)
        if args.features == "clustered":
            for block in range(0, pids.numel(), 4096):
                x[block : block + 4096].mul_(args.noise).add_(centres[pids[block : block + 4096]])
        features.append(x)
    return features[0], query_pids, features[1], gallery_pids


def irra_metrics(similarity: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor, max_rank=10):
    """The public reference's rank(): full argsort, Python loop per query for INP, AP from a list of columns."""
    indices = torch.argsort(similarity, dim=1, descending=True)  # (Q, G), kept (the reference returns it)
    matches = gallery_pids[indices].eq(query_pids.view(-1, 1))  # (Q, G)
    cmc = matches[:, :max_rank].cumsum(1)
    cmc[cmc > 1] = 1
    cmc = cmc.float().mean(0) * 100
    num_relevant = matches.sum(1)
    hits_so_far = matches.cumsum(1)  # (Q, G)
    inp = [hits_so_far[i][row.nonzero()[-1]] / (row.nonzero()[-1] + 1.0) for i, row in enumerate(matches)]
    precision = [hits_so_far[:, i] / (i + 1.0) for i in range(hits_so_far.shape[1])]
    average_precision = (torch.stack(precision, 1) * matches).sum(1) / num_relevant
    result = {"R1": cmc[0], "R5": cmc[4], "R10": cmc[9], "mAP": average_precision.mean() * 100}
    result["mINP"] = torch.cat(inp).mean() * 100
    return result, indices


def argsort_metrics(similarity: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor, max_rank=10):
    """The same algorithm without keeping the indices and with AP vectorised."""
    indices = torch.argsort(similarity, dim=1, descending=True)  # (Q, G)
    matches = gallery_pids[indices].eq(query_pids.view(-1, 1))  # (Q, G)
    del indices
    cmc = matches[:, :max_rank].cumsum(1).clamp_(max=1).float().mean(0) * 100
    num_relevant = matches.sum(1)
    hits_so_far = matches.cumsum(1)  # (Q, G)
    inp = [hits_so_far[i][row.nonzero()[-1]] / (row.nonzero()[-1] + 1.0) for i, row in enumerate(matches)]
    ranks = torch.arange(1, matches.shape[1] + 1, dtype=torch.float32)
    average_precision = (hits_so_far / ranks * matches).sum(1) / num_relevant
    return {
        "R1": cmc[0],
        "R5": cmc[4],
        "R10": cmc[9],
        "mAP": average_precision.mean() * 100,
        "mINP": torch.cat(inp).mean() * 100,
    }


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args: argparse.Namespace) -> None:
    from tipr.metrics import retrieval_ranks

    torch.set_num_threads(args.threads)
    queries, query_pids, gallery, gallery_pids = make_eval_set(args)
    if args.mode == "similarity":
        similarity = F.normalize(queries, dim=1) @ F.normalize(gallery, dim=1).t()
        del queries, gallery
    device = torch.device(args.device)
    if device.type != "cpu":
        if args.worker != "tipr" or args.mode != "features":
            raise SystemExit("--device other than cpu times tipr from features only (--methods tipr --mode features)")
        queries, gallery = queries.to(device), gallery.to(device)
        query_pids, gallery_pids = query_pids.to(device), gallery_pids.to(device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before_gpu = torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the resident-set high-water mark to the current resident set
    before = _memory_kib("VmRSS")
    start = time.perf_counter()
    matmul_seconds = None
    if args.worker in ("irra", "argsort"):
        if args.mode == "features":  # the reference evaluation normalises and multiplies everything at once
            similarity = F.normalize(queries, dim=1) @ F.normalize(gallery, dim=1).t()
            matmul_seconds = time.perf_counter() - start
        if args.worker == "irra":
            result, _indices = irra_metrics(similarity, query_pids, gallery_pids)
        else:
            result = argsort_metrics(similarity, query_pids, gallery_pids)
    elif args.mode == "features":
        result = retrieval_ranks(
            query_pids=query_pids, gallery_pids=gallery_pids, query_features=queries, gallery_features=gallery
        )
    else:
        result = retrieval_ranks(similarity, query_pids, gallery_pids)
    result = {name: float(result[name]) for name in METRICS}  # on the host: waits for the device
    seconds = time.perf_counter() - start
    peak_mib = (_memory_kib("VmHWM") - before) / 1024
    if device.type != "cpu":
        peak_mib = (torch.cuda.max_memory_allocated(device) - before_gpu) / 2**20
    print(json.dumps({
        "seconds": seconds,
        "peak_mib": peak_mib,
        "matmul_seconds": matmul_seconds,
        "metrics": result,
    }))


def run(method: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", method]
    for name in ("mode", "features", "threads", "queries", "gallery", "identities", "dim", "noise", "device"):
        command += [f"--{name}", str(getattr(args, name))]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("features", "similarity"), default="features")
    parser.add_argument("--features", choices=("clustered", "random"), default="clustered")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2, help="runs per method; the fastest is reported")
    parser.add_argument("--queries", type=int, default=19_848)
    parser.add_argument("--gallery", type=int, default=19_848)
    parser.add_argument("--identities", type=int, default=1_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--noise", type=float, default=2.9, help="noise / centre scale of clustered features")
    parser.add_argument("--device", default="cpu", help="where tipr's metric runs (cuda: --methods tipr only)")
    parser.add_argument("--methods", nargs="+", choices=("irra", "argsort", "tipr"), default=["irra", "argsort", "tipr"])
    parser.add_argument("--worker", choices=("irra", "argsort", "tipr"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    print(
        f"{args.queries} queries x {args.gallery} gallery, {args.identities} identities, {args.dim}-d "
        f"{args.features} features, mode={args.mode}, torch {torch.__version__}, {args.threads} thread(s), "
        f"{platform.processor() or platform.machine()} with {os.cpu_count()} CPUs, "
        f"load average before: {os.getloadavg()[0]:.2f}"
    )
    labels = {
        "irra": "IRRA rank() as published",
        "argsort": "argsort + loop, leaner",
        "tipr": "tipr retrieval_ranks",
    }
    all_runs = {method: [] for method in args.methods}
    for _ in range(args.repeats):  # interleaved, so that all see the same machine load
        for method, runs in all_runs.items():
            runs.append(run(method, args))
    best = {}
    print(f"{'method':26s} {'wall s (each run)':>24s} {'peak MiB':>9s}  " + " ".join(f"{m:>7s}" for m in METRICS))
    for method, runs in all_runs.items():
        best[method] = dict(min(runs, key=lambda r: r["seconds"]), peak_mib=max(r["peak_mib"] for r in runs))
        times = ", ".join(f"{r['seconds']:.2f}" for r in runs)
        print(
            f"{labels[method]:26s} {times:>24s} {best[method]['peak_mib']:9.0f}  "
            + " ".join(f"{best[method]['metrics'][m]:7.3f}" for m in METRICS)
        )
    if "tipr" in best:
        ours = best["tipr"]
        for method in [m for m in best if m != "tipr"]:
            reference = best[method]
            difference = max(abs(reference["metrics"][m] - ours["metrics"][m]) for m in METRICS)
            print(
                f"vs {labels[method]}: {reference['seconds'] / ours['seconds']:.1f}x faster (fastest runs), "
                f"peak memory 1/{reference['peak_mib'] / ours['peak_mib']:.0f} of it, "
                f"largest metric difference {difference:.1e} points"
            )
    matmul = [r["matmul_seconds"] for runs in all_runs.values() for r in runs if r.get("matmul_seconds")]
    if matmul:
        print(f"of which the shared normalise + full matrix product alone: {min(matmul):.2f} s")
    print(f"load average after: {os.getloadavg()[0]:.2f}")

if __name__ == "__main__":
    main()
