"""The bundled tasks, made by the project because nothing can be downloaded in CI or a classroom, and the presets.

- testbed.py: a character tokenizer, a tiny Llama warm-started on reversed-digit sums, the train and
  held-out prompts, and the difficulty regimes of the scheduling study;
- exact.py: the testbed's exact per-prompt accuracy by teacher forcing (no sampling): a noise-free
  held-out accuracy, a calibration target for p̂ and the oracle selector of the research harness;
- smollm2.py: a real pretrained chat model (SmolLM2-135M-Instruct, from a wheel on the package index)
  and a natural-language arithmetic task with graded difficulty.

The testbed is shipped in the repository (testbed/, and testbed/small for the tests), each build with a
MANIFEST.json of its files' sha256. `check_for` runs before training: it checks any testbed the run reads
from, and converts the SmolLM2 model from its wheel on first use.
"""

import os

from tasks import smollm2

# The paper's settings (docs/DESIGN.md, "The paper's experiments"); hub ids are downloaded on first use. B, the
# pool and the micro-batch sizes are ours (the paper does not give them); docs/REFERENCE.md has the hardware.
_PAPER_MATH = dict(
    train_data="agentica-org/DeepScaleR-Preview-Dataset", eval_data="HuggingFaceH4/MATH-500:test",
    prompt_field="problem", answer_field="answer", verifier="math",
    prompt_suffix=" Let's think step by step and output the final answer within \\boxed{}.",
    group_size=8, temperature=1.0, max_prompt_tokens=1024, max_new_tokens=3072, beta=0.05, tau=0.5,
    lr=1e-6, weight_decay=0.1, max_steps=150, prompts_per_step=128, pool_size=512, eval_every=10,
    eval_samples=4, eval_batch=64, ckpt_every=10, dtype="bfloat16", shared_prefix=True, logz_hidden=1024,
    verifier_workers=8, out_dir="runs/paper_math")
_SMOL = "testbed/" + smollm2.SUBDIR
PRESETS = {
    # SmolLM2-135M-Instruct on natural-language arithmetic (tasks/smollm2.py), sized for a 2-core CPU
    "smollm2_arith": dict(model=_SMOL + "/model", train_data=_SMOL + "/train.jsonl", eval_data=_SMOL + "/heldout.jsonl",
                          verifier="math_boxed", prompt_suffix=smollm2.SUFFIX, shot_prompt=smollm2.SHOT[0],
                          shot_response=smollm2.SHOT[1], temperature=0.7, max_new_tokens=48, prompts_per_step=8,
                          group_size=8, pool_size=32, rollout_batch=0, micro_batch=16, logit_chunk=16, lr=1e-5,
                          max_steps=16, eval_every=8, eval_samples=2, eval_greedy=True, eval_batch=40, ckpt_every=8,
                          shared_prefix=True, dtype="auto", kl_every=4, out_dir="runs/smollm2"),
    "paper_math_1.5b": {**_PAPER_MATH, "model": "Qwen/Qwen2.5-Math-1.5B", "micro_batch": 16, "rollout_batch": 64,
                        "logit_chunk": 512},
    "paper_math_7b": {**_PAPER_MATH, "model": "Qwen/Qwen2.5-Math-7B", "micro_batch": 4, "rollout_batch": 32,
                      "grad_ckpt": True, "fsdp": True},
}


def check_for(cfg, log=print):
    """Before training: the SmolLM2 task converted from its wheel on first use, where cfg reads from it; the
    testbed checked against its manifest and the shipped builds (tasks/testbed.py) where cfg reads from
    cfg.testbed_dir ("" = no testbed, nothing checked)."""
    from tasks import testbed

    if not cfg.testbed_dir:
        return
    tb = os.path.normpath(cfg.testbed_dir)
    inside = lambda d: [p for p in (cfg.model, cfg.train_data, cfg.eval_data) if os.path.normpath(p).startswith(d + os.sep)]  # noqa: E731
    smol = os.path.join(tb, smollm2.SUBDIR)
    if inside(smol):  # the smollm2_arith preset: the model converted from the installed wheel, and its task
        smollm2.ensure(cfg.testbed_dir, log=log)
    if len(inside(smol)) < len(inside(tb)):  # the testbed: shipped, never rebuilt behind the user's back
        testbed.check(cfg.testbed_dir)
