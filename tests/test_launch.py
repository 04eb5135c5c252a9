"""The launch scripts' dry runs print the commands they would run: the same `dpo-jax train` on every worker."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "launch.py"
TRAIN = ["--model_name_or_path", "Qwen/Qwen2.5-0.5B-Instruct", "--dataset_name", "builtin:sample"]


def dry_run(*argv):
    out = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, check=True).stdout
    return out, [line[2:] for line in out.splitlines() if line.startswith("+ ")]


def test_tpu_single_host_v5e_8():
    out, commands = dry_run("tpu", "--name", "dpo-v5e", "--zone", "us-west4-a", "--accelerator_type", "v5litepod-8",
                            "--dry_run", "--", *TRAIN, "--output_dir", "runs/qwen")
    create, archive, copy, setup, train, fetch = commands
    assert create.startswith("gcloud compute tpus tpu-vm create dpo-v5e --zone us-west4-a")
    assert "--accelerator-type v5litepod-8 --version v2-alpha-tpuv5-lite" in create
    assert archive.startswith("git -C ") and "archive" in archive
    assert copy.startswith("gcloud compute tpus tpu-vm scp /tmp/dpo-jax.tar.gz dpo-v5e:dpo-jax.tar.gz")
    assert "--worker=all" in copy and "--worker=all" in setup and "--worker=all" in train
    assert "uv venv -q -p 3.11" in setup and "uv pip install -q -e \"./dpo-jax[tpu]\"" in setup
    assert train.endswith("'. venv/bin/activate && dpo-jax train --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct "
                          "--dataset_name builtin:sample --output_dir runs/qwen --distributed true'")
    assert fetch.startswith("gcloud compute tpus tpu-vm scp --recurse dpo-v5e:runs/qwen runs") and "--worker=0" in fetch
    assert "describe dpo-v5e" in out and "PREEMPTED" in out  # an existing slice is reused


def test_tpu_multi_host_v5p_32_writes_to_a_shared_bucket():
    _, commands = dry_run("tpu", "--name", "dpo-v5p", "--zone", "us-east5-a", "--accelerator_type", "v5p-32",
                          "--version", "v2-alpha-tpuv5", "--bucket", "my-runs", "--spot", "--dry_run", "--", *TRAIN,
                          "--output_dir", "/mnt/my-runs/llama", "--resume_from_checkpoint", "true")
    create, _, _, setup, train = commands  # nothing to fetch: the run is in the bucket
    assert "--accelerator-type v5p-32 --version v2-alpha-tpuv5 --spot" in create
    assert "gcsfuse --implicit-dirs --rename-dir-limit=1000000 my-runs /mnt/my-runs" in setup
    assert "apt-get install -y -q gcsfuse" in setup
    assert "--worker=all" in train and "--output_dir /mnt/my-runs/llama --resume_from_checkpoint true" in train


def test_gpu_node_and_slurm():
    _, (install, train) = dry_run("gpu", "--gpus", "4", "--dry_run", "--", *TRAIN, "--output_dir", "o")
    assert install.endswith("[cuda]'") and "pip install" in install
    assert train.startswith("env CUDA_VISIBLE_DEVICES=0,1,2,3 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 dpo-jax train")
    out, (submit,) = dry_run("slurm", "--nodes", "4", "--gpus_per_node", "8", "--partition", "gpu", "--venv",
                             "/shared/venv", "--dry_run", "--", *TRAIN, "--output_dir", "/shared/runs/x")
    assert submit == "sbatch dpo-jax.sbatch"
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", ". /shared/venv/bin/activate",
                 "srun dpo-jax train --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name builtin:sample "
                 "--output_dir /shared/runs/x"):
        assert line in out.splitlines(), line


def test_tpu_copies_a_local_dataset_to_every_worker(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    _, commands = dry_run("tpu", "--name", "t", "--zone", "z", "--dry_run", "--", "--dataset_name", str(data),
                          "--output_dir", "o")
    assert any(c.startswith(f"gcloud compute tpus tpu-vm scp --recurse {data} t:data/prefs.jsonl") for c in commands)
    assert "--dataset_name data/prefs.jsonl" in commands[-2]  # the train command, before the fetch
