"""The same numbers on every CPU: the testbed built, and the classroom run trained, under several kernel sets.

    python -m experiments.portability builds [--seeds=0,1,2] [--kernels=default,avx2,mkl_compat] [--out=runs/warmstart]
    python -m experiments.portability runs [--seeds=0,1,2] [--kernels=default,avx2,mkl_compat] [--out=runs/classroom]

`builds`: each build runs `python -m tasks.testbed` in a fresh process with one kernel set forced through the
environment (ATEN_CPU_CAPABILITY picks PyTorch's vectorized kernels; MKL_CBWR=COMPATIBLE sends the matrix
products through MKL's portable code path, as another CPU's would round differently), one thread each, two
builds at a time. On a CPU whose best kernels are AVX2, `native` is `avx2`. Finished builds are kept and skipped,
so the script resumes. It prints one row per build (steps to the target, validation and held-out exact
accuracy, digest) and the spread of the held-out accuracies around their mean.

`runs`: the README's first command (`torchrun --standalone --nproc_per_node=2 train.py`, on the shipped
testbed) with each training seed under each kernel set, one at a time; a finished run is kept and skipped.
It prints each run's held-out accuracy and calibration at the end, and their range.
"""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

KERNELS = {  # name: environment of the build
    "native": {},
    "default": {"ATEN_CPU_CAPABILITY": "default"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "mkl_compat": {"MKL_CBWR": "COMPATIBLE"},
}


def build_one(out: str, seed: int, kernel: str) -> dict:
    path = os.path.join(out, f"s{seed}_{kernel}")
    if not os.path.exists(os.path.join(path, "MANIFEST.json")):
        env = {**os.environ, **KERNELS[kernel], "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "tasks.testbed", f"--out={path}", f"--seed={seed}"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(path, "MANIFEST.json")) as f:
        man = json.load(f)
    return {"seed": seed, "kernel": kernel, **man["warm_start"], "digest": man["digest"][:12]}


def run_one(out: str, seed: int, kernel: str) -> dict:
    path = os.path.join(out, f"s{seed}_{kernel}")
    final = os.path.join(path, "heldout_final.json")
    if not os.path.exists(final):
        shutil.rmtree(path, ignore_errors=True)  # an unfinished run starts over: it takes a minute
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        f"--seed={seed}", f"--out_dir={path}"], env={**os.environ, **KERNELS[kernel]}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(path, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    return {"seed": seed, "kernel": kernel, "acc": last["eval_acc"], "corr": last["eval_acc_est_corr"],
            "exact": last.get("eval_acc_exact")}


def runs(args, jobs):
    rows = [run_one(args.get("out", "runs/classroom"), *j) for j in jobs]
    print("| seed | kernels | held-out accuracy (32 samples) | exact held-out accuracy | calibration corr |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['kernel']} | {r['acc']:.3f} | {r['exact']:.3f} | {r['corr']:.3f} |")
    acc, corr = [r["acc"] for r in rows], [r["corr"] for r in rows]
    print(f"\nheld-out accuracy {min(acc):.3f}–{max(acc):.3f} (median {sorted(acc)[len(acc) // 2]:.3f}), "
          f"calibration corr {min(corr):.3f}–{max(corr):.3f} over {len(rows)} runs")
    return rows


def main(argv):
    if not argv or argv[0] not in ("builds", "runs"):
        raise SystemExit("portability: python -m experiments.portability builds|runs [--seeds=0,1,2] [--kernels=...] [--out=DIR]")
    args = {"seeds": "0,1,2", "kernels": "default,avx2,mkl_compat",
            **dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)}
    jobs = [(int(s), k) for s in args["seeds"].split(",") for k in args["kernels"].split(",")]
    unknown = sorted({k for _, k in jobs} - set(KERNELS))
    if unknown:
        raise SystemExit(f"portability: unknown kernel sets {unknown}; known: {sorted(KERNELS)}")
    if argv[0] == "runs":
        return runs(args, jobs)
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda j: build_one(args.get("out", "runs/warmstart"), *j), jobs))
    print("| seed | kernels | warm-start steps | validation answer prob | held-out exact acc | digest |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['kernel']} | {r['steps']} | {r['val_acc']:.4f} | {r['heldout_acc']:.4f} | {r['digest']} |")
    held = [r["heldout_acc"] for r in rows]
    mean = sum(held) / len(held)
    print(f"\nheld-out exact accuracy: mean {mean:.4f}, range [{min(held):.4f}, {max(held):.4f}], "
          f"largest distance from the mean {max(abs(h - mean) for h in held):.4f} over {len(held)} builds")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
