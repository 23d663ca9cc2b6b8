"""Stress check, outside the suite: many short 2-rank torchrun runs, each of which must exit in time
with every rank.

    python tests/stress_torchrun_exit.py --runs=40 --modes=ddp,fsdp --timeout=120

Each run trains a tiny model for a few updates on data/shakespeare (python prepare.py makes it),
under DDP or FSDP.
A run that has not exited after --timeout seconds counts as hung: its ranks' stacks are dumped with
py-spy (when it is installed) next to the run's checkpoints, then every process it started is
killed. A rank still alive after torchrun returned counts as an orphan. One line per run, then a
summary; the exit status is 1 if any run hung or left an orphan.
"""
import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from helpers import alive, descendants, kill_tree

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n_layers=1", "--n_embd=32", "--n_heads=2", "--n_kv_heads=2", "--batch_size=2",
        "--max_seq_len=32",
        "--tokens_per_update=128", "--warmup_iterations=2", "--eval_interval=4",
        "--eval_tokens=256",
        "--model_gen_multiplier=0", "--device=cpu", "--dtype=float32", "--training_tokens=768",
        "--token_ckpt=384"]
MODES = {"ddp": [], "fsdp": ["--fsdp=True", "--optimizer=adamw"]}


def one_run(mode: str, ckpt_dir: Path, timeout: float) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "train.py", *TINY,
               *MODES[mode], f"--dataset_dir={ROOT / 'data' / 'shakespeare'}",
               f"--ckpt_dir={ckpt_dir}"]
    start = time.time()
    # a file, not a pipe: a full pipe would block the run
    with open(ckpt_dir / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)
    # every process torchrun started, collected while they run: an orphan no longer has it as parent
    seen = set()
    while proc.poll() is None and time.time() - start < timeout:
        seen.update(descendants(proc.pid))
        time.sleep(0.1)
    hung = proc.poll() is None
    if hung:
        spy = shutil.which("py-spy") or shutil.which("py-spy",
                                                     path=str(Path(sys.executable).parent))
        for pid in descendants(proc.pid):
            if spy:
                dump = subprocess.run([spy, "dump", "--native", "--pid", str(pid)],
                                      capture_output=True, text=True)
                (ckpt_dir / f"stack_{pid}.txt").write_text(dump.stdout + dump.stderr)
        kill_tree(proc.pid)
    proc.wait()
    seconds = time.time() - start
    time.sleep(1.0)  # a rank that is exiting gets a moment to finish
    orphans = [pid for pid in seen if alive(pid)]
    for pid in orphans:
        kill_tree(pid)
    return {"mode": mode, "seconds": seconds, "status": proc.returncode, "hung": hung,
            "orphans": len(orphans),
            "error": "" if proc.returncode == 0 or hung
            else (ckpt_dir / "stderr.txt").read_text().splitlines()[-1:]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--modes", default="ddp,fsdp")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--keep", action="store_true",
                        help="keep the runs' directories (stacks of hung runs)")
    args = parser.parse_args()
    modes = args.modes.split(",")
    work = Path(tempfile.mkdtemp(prefix="stress_torchrun_"))
    results = []
    for i in range(args.runs):
        mode = modes[i % len(modes)]
        ckpt_dir = work / f"run_{i:03d}_{mode}"
        ckpt_dir.mkdir()
        result = one_run(mode, ckpt_dir, args.timeout)
        results.append(result)
        print(f"run {i + 1}/{args.runs} {mode}: {result['seconds']:.1f} s, exit {result['status']}"
              + (" HUNG" if result["hung"] else "")
              + (f", {result['orphans']} orphan(s)" if result["orphans"] else "")
              + (f" {result['error']}" if result["error"] else ""), flush=True)
        if not args.keep and not result["hung"]:
            shutil.rmtree(ckpt_dir)
    for mode in modes:
        mine = [r for r in results if r["mode"] == mode]
        finished = [r["seconds"] for r in mine if not r["hung"]]
        print(f"{mode}: {len(mine)} runs, {sum(r['hung'] for r in mine)} hung, "
              f"{sum(r['orphans'] for r in mine)} orphans, "
              f"{sum(r['status'] not in (0, None) for r in mine)} failed; "
              + (f"median {statistics.median(finished):.1f} s, max {max(finished):.1f} s"
                 if finished else ""))
    if any(r["hung"] for r in results):
        print(f"stacks of the hung runs: {work}")
    sys.exit(1 if any(r["hung"] or r["orphans"] for r in results) else 0)


if __name__ == "__main__":
    main()
