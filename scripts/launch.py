"""Launch `dpo-jax train` on a Cloud TPU VM slice, a multi-GPU node, or a SLURM cluster.

Everything after `--` is passed to `dpo-jax train` unchanged, and every process runs the same command (JAX
is SPMD: one process per host, each driving its local devices). `--dry_run` prints the commands instead of
running them.

    # a single-host TPU v5e-8 (one process, 8 chips): create or reuse it, install, train, fetch the run
    python scripts/launch.py tpu --name dpo-v5e --zone us-west4-a --accelerator_type v5litepod-8 \\
        --version v2-alpha-tpuv5-lite -- --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name builtin:sample --output_dir runs/qwen --per_device_train_batch_size 4

    # a multi-host TPU v5p-32 (4 hosts x 4 chips): the run directory must be shared, so a GCS bucket is mounted
    # with gcsfuse at /mnt/<bucket> on every worker and the run is written there
    python scripts/launch.py tpu --name dpo-v5p --zone us-east5-a --accelerator_type v5p-32 \\
        --version v2-alpha-tpuv5 --bucket my-dpo-runs -- --model_name_or_path meta-llama/Llama-3.1-8B-Instruct \\
        --dataset_name prefs.jsonl --output_dir /mnt/my-dpo-runs/llama8b --mesh fsdp=-1

    # one GPU node (one process sees all its GPUs)
    python scripts/launch.py gpu --gpus 8 -- --model_name_or_path ... --output_dir runs/x

    # SLURM, several GPU nodes: writes an sbatch script (one task per GPU; JAX detects SLURM) and submits it
    python scripts/launch.py slurm --nodes 4 --gpus_per_node 8 --partition gpu -- --model_name_or_path ... \\
        --output_dir /shared/runs/x
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class Runner:
    """Runs commands, or with `dry_run` prints them (one per line, shell-quoted) and runs nothing."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def __call__(self, argv: list[str], check: bool = True) -> int:
        print("+ " + shlex.join(argv), flush=True)
        if self.dry_run:
            return 0
        return subprocess.run(argv, check=check).returncode


def train_command(train_args: list[str]) -> str:
    return "dpo-jax train " + shlex.join(train_args)


def output_dir(train_args: list[str]) -> str | None:
    for i, arg in enumerate(train_args):
        if arg == "--output_dir" and i + 1 < len(train_args):
            return train_args[i + 1]
        if arg.startswith("--output_dir="):
            return arg.split("=", 1)[1]
    return None


def tpu(args, train_args: list[str]) -> None:
    run = Runner(args.dry_run)
    gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = ["--zone", args.zone] + (["--project", args.project] if args.project else [])
    describe = [*gcloud, "describe", args.name, *where, "--format=value(state)"]
    state = "" if args.dry_run else subprocess.run(describe, capture_output=True, text=True).stdout.strip()
    if args.dry_run:
        print(f"# create the slice unless `{shlex.join(describe)}` says READY (a PREEMPTED one is recreated)")
    if state == "PREEMPTED":  # a spot slice taken back: make it again (the run resumes from its checkpoints)
        run([*gcloud, "delete", args.name, *where, "--quiet"])
    if state != "READY":
        run([*gcloud, "create", args.name, *where, "--accelerator-type", args.accelerator_type,
             "--version", args.version, *(["--spot"] if args.spot else [])])
    ssh = [*gcloud, "ssh", args.name, *where, "--worker=all", "--command"]
    # the same source on every worker: this checkout as a tarball (the package is installed from it)
    archive = "/tmp/dpo-jax.tar.gz"
    run(["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", archive, "HEAD"])
    run([*gcloud, "scp", archive, f"{args.name}:dpo-jax.tar.gz", *where, "--worker=all"])
    # TPU VM images ship an older Python than dpo-jax needs (3.11+): uv brings its own
    setup = ("rm -rf dpo-jax && mkdir dpo-jax && tar -xzf dpo-jax.tar.gz -C dpo-jax && "
             "(command -v uv || curl -LsSf https://astral.sh/uv/install.sh | sh) && export PATH=$HOME/.local/bin:$PATH"
             " && uv venv -q -p 3.11 --allow-existing venv && . venv/bin/activate && uv pip install -q -e \"./dpo-jax[tpu]\"")
    if args.bucket:  # a shared run directory for multi-host runs: every worker writes its checkpoint shards
        mount = f"/mnt/{args.bucket}"
        setup += (" && (command -v gcsfuse || (echo \"deb https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs)"
                  " main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -s "
                  "https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && sudo apt-get update -q "
                  "&& sudo apt-get install -y -q gcsfuse))"
                  f" && sudo mkdir -p {mount} && sudo chown $USER {mount} && (mountpoint -q {mount} || gcsfuse "
                  f"--implicit-dirs --rename-dir-limit=1000000 {args.bucket} {mount})")  # Orbax renames directories
    run([*ssh, setup])
    train_args = copy_local_data(run, gcloud, args, where, train_args)
    # every worker runs the same command; --distributed true: JAX finds the slice's workers from the VM metadata
    run([*ssh, f". venv/bin/activate && {train_command([*train_args, '--distributed', 'true'])}"])
    out = output_dir(train_args)
    if out and not args.bucket:
        run([*gcloud, "scp", "--recurse", f"{args.name}:{out}", str(Path(out).parent), *where, "--worker=0"])
    if args.delete:
        run([*gcloud, "delete", args.name, *where, "--quiet"])


def copy_local_data(run: Runner, gcloud: list[str], args, where: list[str], train_args: list[str]) -> list[str]:
    """A --dataset_name that is a local file or directory is copied to every worker (as ~/data/<name>)."""
    out = list(train_args)
    for i, arg in enumerate(out[:-1]):
        if arg == "--dataset_name" and Path(out[i + 1]).exists():
            local = Path(out[i + 1])
            run([*gcloud, "ssh", args.name, *where, "--worker=all", "--command", "mkdir -p data"])
            run([*gcloud, "scp", "--recurse", str(local), f"{args.name}:data/{local.name}", *where, "--worker=all"])
            out[i + 1] = f"data/{local.name}"
    return out


def gpu(args, train_args: list[str]) -> None:
    run = Runner(args.dry_run)
    visible = ",".join(str(i) for i in range(args.gpus))
    run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{REPO}[cuda]"])
    # one process drives all the node's GPUs; XLA may take 90% of each GPU's memory
    run(["env", f"CUDA_VISIBLE_DEVICES={visible}", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "dpo-jax", "train",
         *train_args])


SBATCH = """#!/bin/bash
#SBATCH --job-name={job}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={gpus}
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task={cpus}
#SBATCH --time={time}
{partition}#SBATCH --output={job}-%j.out
# One task per GPU: jax.distributed finds the coordinator, the process count, this process's number and its
# GPU (the task's local rank) from SLURM's environment (dpo-jax's --distributed auto sees SLURM_NTASKS > 1).
# The run directory must be on a filesystem all nodes share.
set -euo pipefail
{activate}export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
srun dpo-jax train {train}
"""


def slurm(args, train_args: list[str]) -> None:
    script = SBATCH.format(job=args.job_name, nodes=args.nodes, gpus=args.gpus_per_node, cpus=args.cpus_per_task,
                           time=args.time, partition=f"#SBATCH --partition={args.partition}\n" if args.partition else "",
                           activate=f". {args.venv}/bin/activate\n" if args.venv else "",
                           train=shlex.join(train_args))
    path = Path(args.script)
    if args.dry_run:
        print(f"# {path}:\n{script}")
    else:
        path.write_text(script)
    Runner(args.dry_run)(["sbatch", str(path)])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="where", required=True)
    t = sub.add_parser("tpu", help="a Cloud TPU VM slice (created unless it exists)")
    t.add_argument("--name", required=True)
    t.add_argument("--zone", required=True)
    t.add_argument("--project")
    t.add_argument("--accelerator_type", default="v5litepod-8", help="e.g. v5litepod-8, v5p-32, v6e-8, v4-32")
    t.add_argument("--version", default="v2-alpha-tpuv5-lite", help="the TPU VM software version")
    t.add_argument("--spot", action="store_true", help="a preemptible (spot) slice; pair with "
                   "--resume_from_checkpoint true so a relaunch continues")
    t.add_argument("--bucket", help="a GCS bucket mounted at /mnt/<bucket> on every worker (needed multi-host)")
    t.add_argument("--delete", action="store_true", help="delete the slice afterwards")
    g = sub.add_parser("gpu", help="one node with several GPUs")
    g.add_argument("--gpus", type=int, default=8)
    s = sub.add_parser("slurm", help="several GPU nodes under SLURM")
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--gpus_per_node", type=int, default=8)
    s.add_argument("--cpus_per_task", type=int, default=8)
    s.add_argument("--partition")
    s.add_argument("--time", default="24:00:00")
    s.add_argument("--job_name", default="dpo-jax")
    s.add_argument("--venv", help="a virtual environment with dpo-jax[cuda], the same path on every node")
    s.add_argument("--script", default="dpo-jax.sbatch", help="where to write the sbatch script")
    for p in (t, g, s):
        p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(ours)
    if not train_args:
        parser.error("give the dpo-jax train options after --")
    {"tpu": tpu, "gpu": gpu, "slurm": slurm}[args.where](args, train_args)


if __name__ == "__main__":
    main()
