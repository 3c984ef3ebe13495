"""The GPU check: the GPU-only code paths and the headline figures, in one budgeted run.

    python -m titok_bench.gpu_check OUT_DIR                  # on a CUDA GPU (about 8 minutes)
    python -m titok_bench.gpu_check OUT_DIR --dry-run        # on CPU, tiny sizes, well under a minute
    python -m titok_bench.gpu_check OUT_DIR --only p6_gfid,sbs_official --budget-s 300   # a rerun
    python -m titok_bench.gpu_check OUT_DIR --list           # the steps, their limits, nothing run

A sequence of steps, cheapest and most important first, so that a run cut short still leaves the
figures that matter most. Each step is a subprocess with its own time limit (a hang or a CUDA
crash in one cannot take the rest down); it writes OUT_DIR/<step>.json and appends its output to
OUT_DIR/gpu_check.log. A step that fails or times out is recorded and the run goes on; when the
budget (``--budget-s``) no longer covers a step's minimum it is skipped with the reason. After
every step OUT_DIR/summary.json is rewritten (``finished`` false until the end) and, with
``--bundle FILE``, a tar of OUT_DIR, so that even a killed run leaves its results. At the end a
short table is printed.

Steps (random weights at full size on CUDA; the benchmarks of titok_bench do the measuring):

    env            facts: GPU, driver, versions, missing packages, nvJPEG, a bf16 matmul
    p1_l32         P1: L-32 labels -> uint8 images, 8 steps + guidance, eager and fast paths
                   (StaticSampler in CUDA graphs, FastDecoder channels_last, streams); >= 800 /s;
                   the fast path's agreement with the eager one (ids, pixels)
    gpu_tests      pytest -m gpu
    p3_train       P3: maskgit_l32 training steps (compiled, fused AdamW + clipping, bf16) from a
                   token cache held on the device, inside Trainer.fit; >= 10,000 samples/s
    p4_cache       P4: token cache from JPEGs, nvJPEG decode on the device; >= 1,200 images/s;
                   agreement of tokens and pixels with the PIL path
    sbs_official   P1 against the official generate + decode_tokens, when given the official
                   code (--official) and a script that times it (--sbs-tool); >= 3x
    p6_gfid        P6: eval.gfid mode=inception, 50,000 L-32 samples; <= 120 s
    p1b_b64        P1b: B-64, as P1 (report)
    p1b_s128       P1b: S-128, as P1 (report)
    profile_<step> a torch.profiler table of the top kernels, for each figure short of its target
    probe_<step>   the largest batch that fits (P1: eager path; P6: eager sampling + decoding)

``--dry-run`` runs every step on CPU with tiny official-format configs (written to a temporary
folder), a few samples and batches, the compile modes off; steps that need CUDA-only code (the
gpu tests, the largest-batch probes, which measure running out of CUDA memory) are skipped with
the reason, and so is the official side by side unless --sbs-tool and --official are given. In
the dry run's P6 the FID's 2048x2048 matrix square root (half a minute of CPU) is replaced by a
diagonal stand-in: the figure is the sampling loop's time, not the FID.
"""
from __future__ import annotations

# One concern a module: steps (what each step runs and how its result is read, in their order),
# supervisor (each step a subprocess under its limit and the budget; the records, log, summary
# and bundle), child (a step's process when it is not a benchmark's own command), environment
# (the env step's facts), tiny (the dry run's configs), command (the options and the run order).
from titok_bench.gpu_check.command import main, parse_args
from titok_bench.gpu_check.steps import ALL_STEPS, PROBE_STEPS, PROFILE_STEPS, STEPS, Plan, Step
from titok_bench.gpu_check.steps import _replace as _replace  # helpers the tests check
from titok_bench.gpu_check.supervisor import Run
from titok_bench.gpu_check.supervisor import _junit as _junit

__all__ = ["ALL_STEPS", "PROBE_STEPS", "PROFILE_STEPS", "STEPS", "Plan", "Run", "Step", "main", "parse_args"]
