"""The parts of experiments/gpu_check.sh that are Python: the device checks and the report.

    python -m experiments.gpu_check agree --device=cuda --out=DIR   # checks on the device -> DIR/agree.json
    python -m experiments.gpu_check report --out=DIR                # DIR's results -> DIR/report.md

`agree` runs, on the device, what must not depend on it: the static sampler against lm.generate (fp32: the same
tokens; bf16: nearly; compiled on CUDA), the sampler's log-probs against the training pass's, the chunked output
head against the plain one, the shared-prefix pass against the plain one. Each check is a line of agree.json
with its numbers, its bound and pass / fail.
"""

import json
import os
import platform
import sys
import time

import torch


def tiny_model(device):
    from tasks import testbed

    tok = testbed.make_tokenizer()
    torch.manual_seed(0)
    lm = testbed.make_model(testbed.TestbedConfig(hidden=64, layers=2, heads=4), tok).to(device).eval()
    return lm, tok


def check(name: str, value: float, bound: float, above: bool = False) -> dict:
    ok = value >= bound if above else value <= bound
    return {"check": name, "value": value, "bound": ("≥ " if above else "≤ ") + f"{bound:g}", "pass": bool(ok)}


def agree(device: str) -> list:
    import lm as lm_lib
    import static_decode

    dev = torch.device(device)
    lm, tok = tiny_model(dev)
    texts = ["1+2=", "345+67=", "8+9=", "12+3+45="]
    pid, pm = lm_lib.left_pad([tok(t).input_ids for t in texts], tok.pad_token_id, dev)
    spec = lm_lib.Sampling(4, 8, 1.0, tok.eos_token_id, tok.pad_token_id)
    out = []
    with torch.autocast(device_type=dev.type, enabled=False):
        a = static_decode.agreement(lm, pid, pm, [1, 2, 3, 4], spec)
    out += [check("static sampler, fp32: share of equal tokens", a["tokens_equal"], 1.0, above=True),
            check("static sampler, fp32: max |Δ log π| of equal tokens", a["logprob_max_abs_diff"], 1e-4)]
    with lm_lib.amp(dev, True):
        a = static_decode.agreement(lm, pid, pm, [1, 2, 3, 4], spec)
    out += [check("static sampler, bf16: share of equal tokens", a["tokens_equal"], 0.9, above=True),
            check("static sampler, bf16: max |Δ log π| of equal tokens", a["logprob_max_abs_diff"], 0.1)]
    spec = lm_lib.Sampling(4, 8, 1.0, tok.eos_token_id, tok.pad_token_id, logprobs=True)
    resp, lp = static_decode.generate(lm, pid, pm, lm_lib.make_generators([1, 2, 3, 4], dev), spec)
    rm = lm_lib.response_mask(resp, tok.eos_token_id)
    seqs = lm_lib.Seqs(pid.repeat_interleave(4, 0), pm.repeat_interleave(4, 0), resp, rm)
    with torch.no_grad():
        plain = lm_lib.token_logprobs(lm, seqs)
        chunked = lm_lib.token_logprobs(lm, seqs, chunk=3)
        shared = lm_lib.token_logprobs(lm, seqs, shared_prefix=True)
    out += [check("sampler's log π against the training pass's, max |Δ|", float((plain - lp * rm).abs().max()), 1e-4),
            check("chunked output head against plain, max |Δ log π|", float((plain - chunked).abs().max()), 1e-5),
            check("shared-prefix pass against plain, max |Δ log π|", float((plain - shared).abs().max()), 1e-4)]
    return out


def final_row(run_dir: str) -> dict:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    rows = [json.loads(line) for line in open(path)]
    steps = [r["step_s"] for r in rows if "step_s" in r]
    last = rows[-1] if rows else {}
    return {"step": last.get("step"), "eval_acc": last.get("eval_acc"), "eval_acc_est_corr": last.get("eval_acc_est_corr"),
            "param_checksum": last.get("param_checksum"), "s_per_step": sum(steps) / len(steps) if steps else None}


def fmt(v, spec=".4f"):
    return "–" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def report(out: str) -> str:
    """DIR/report.md from what gpu_check.sh left in DIR: steps.tsv (each step's name, exit status, seconds),
    agree.json, the runs' metrics, bench.json."""
    lines = [f"# gpu_check report ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", ""]
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    import transformers

    lines += [f"- device: {dev}; torch {torch.__version__} (CUDA {torch.version.cuda}); transformers {transformers.__version__}; "
              f"python {platform.python_version()}", ""]
    steps = [line.rstrip("\n").split("\t") for line in open(os.path.join(out, "steps.tsv"))] if os.path.exists(
        os.path.join(out, "steps.tsv")) else []
    lines += ["| step | exit | seconds |", "|---|---|---|"] + [f"| {n} | {rc} | {s} |" for n, rc, s in steps] + [""]
    if os.path.exists(os.path.join(out, "agree.json")):
        lines += ["| device check | value | bound | |", "|---|---|---|---|"]
        lines += [f"| {c['check']} | {c['value']:.3g} | {c['bound']} | {'pass' if c['pass'] else '**FAIL**'} |"
                  for c in json.load(open(os.path.join(out, "agree.json")))] + [""]
    runs = [d for d in ("run_device", "run_cpu", "torchrun_plain", "torchrun_fsdp") if os.path.isdir(os.path.join(out, d))]
    if runs:
        lines += ["| run | last step | held-out acc | calibration r | s / step | parameter checksum |", "|---|---|---|---|---|---|"]
        for d in runs:
            r = final_row(os.path.join(out, d))
            lines.append(f"| {d} | {fmt(r.get('step'))} | {fmt(r.get('eval_acc'))} | {fmt(r.get('eval_acc_est_corr'))} | "
                         f"{fmt(r.get('s_per_step'))} | {fmt(r.get('param_checksum'), '.8g')} |")
        lines.append("")
    if os.path.exists(os.path.join(out, "bench.txt")):
        lines += ["## bench", "", open(os.path.join(out, "bench.txt")).read().strip(), ""]
    text = "\n".join(lines)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text + "\n")
    return text


def main(argv):
    what, opts = (argv[0] if argv else ""), dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)
    if what == "agree":
        res = agree(opts.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
        with open(os.path.join(opts["out"], "agree.json"), "w") as f:
            json.dump(res, f, indent=1)
        for c in res:
            print(f"{'pass' if c['pass'] else 'FAIL'}  {c['check']}: {c['value']:.3g} ({c['bound']})")
        return 0 if all(c["pass"] for c in res) else 1
    if what == "report":
        print(report(opts["out"]))
        return 0
    raise SystemExit(f"gpu_check: expected `agree --device=D --out=DIR` or `report --out=DIR`, got {argv}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
