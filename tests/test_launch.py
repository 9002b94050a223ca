"""launch/: each script's --dry-run prints the exact commands it would run, and running it for
real (with fake gcloud / srun / python / tar on PATH, which record what they were given)
runs exactly those commands. The user's config, workdir and overrides reach bigvl.main word
for word, whatever quoting they need."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from tests.helpers import REPO

LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ["local_multiprocess.sh", "slurm_gpu.sbatch", "tpu_vm.sh", "_lib.sh"]
# Words a careless script would split, expand or unquote.
USER_ARGS = ["--config.input.transforms=('resize(32)', \"it's\")", "--config.optim.lr=1e-3",
             "--config.input.data_dir=/data/my dir/$HOME"]
CONFIG, WORKDIR = "configs/siglip_shapes.py:tiny", "/shared/runs/a b"
MAIN = ["-m", "bigvl.main", "--config", CONFIG, "--workdir", WORKDIR, *USER_ARGS]

# Fakes: each appends one JSON record to $FAKE_LOG. `python`/`python3` record their argv and
# the JAX/bigvl environment (`-m pip` succeeds, bigvl.main exits $FAKE_STATUS); `gcloud`
# answers `describe` with the wanted state and runs an ssh --command with bash as a worker
# would, with HOME=$FAKE_HOME; `srun` starts its command once per task with SLURM's per-task
# variables; `tar` and `sleep` do nothing.
_RECORD = """import json, os, sys
ENV = ("BIGVL_MULTIHOST", "JAX_PLATFORMS", "JAX_CPU_COLLECTIVES_IMPLEMENTATION",
       "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
       "CUDA_VISIBLE_DEVICES", "JAX_LOCAL_DEVICE_IDS")
def record(**extra):
  with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"argv": [os.path.basename(sys.argv[0]), *sys.argv[1:]],
                        "env": {k: os.environ[k] for k in ENV if k in os.environ},
                        "cwd": os.getcwd(), **extra}) + "\\n")
"""
FAKES = {
    "python": _RECORD + """record()
sys.exit(0 if sys.argv[1:3] == ["-m", "pip"] else int(os.environ.get("FAKE_STATUS", "0")))
""",
    "gcloud": _RECORD + """import subprocess
record()
args = sys.argv[1:]
if "describe" in args:
  print("ACTIVE" if "queued-resources" in args else "READY")
command = [a.split("=", 1)[1] for a in args if a.startswith("--command=")]
if command:
  env = {**os.environ, "HOME": os.environ["FAKE_HOME"]}
  sys.exit(subprocess.run(["bash", "-c", command[0]], env=env).returncode)
""",
    "srun": _RECORD + """import subprocess
record()
per_node = int(os.environ["SLURM_NTASKS"]) // int(os.environ["SLURM_NNODES"])
cmd = [a for a in sys.argv[1:] if not a.startswith("--kill-on-bad-exit") and a != "--label"]
status = 0
for t in range(int(os.environ["SLURM_NTASKS"])):
  env = {**os.environ, "SLURM_PROCID": str(t), "SLURM_LOCALID": str(t % per_node)}
  status = subprocess.run(cmd, env=env).returncode or status
sys.exit(status)
""",
    "tar": _RECORD + "record()\n",
    "sleep": "",
    "scontrol": """import sys
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
assert sys.argv[3] == "gpu-a[01-02]", sys.argv
print("gpu-a01\\ngpu-a02")
""",
}


@pytest.fixture
def fake_env(tmp_path):
  """An environment whose PATH starts with the fakes; returns ``(env, read_log)``."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, body in FAKES.items():
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
  os.symlink(bin_dir / "python", bin_dir / "python3")
  (tmp_path / "home").mkdir()
  log = tmp_path / "log.jsonl"
  env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(log),
         "FAKE_HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path), "HOME": "/nonexistent"}

  def read_log():
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  return env, read_log


def _script(name, *args, env, dry_run=False):
  """Runs ``launch/<name> [--dry-run] ARGS``; returns the CompletedProcess."""
  flag = ["--dry-run"] if dry_run else []
  return subprocess.run(["bash", os.path.join(LAUNCH, name), *flag, *args],
                        env=env, capture_output=True, text=True, timeout=30)


def _commands(stdout):
  """The printed commands as argv lists (shell comments dropped)."""
  return [shlex.split(line, comments=True) for line in stdout.splitlines()
          if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("name", SCRIPTS)
def test_bash_syntax(name):
  out = subprocess.run(["bash", "-n", os.path.join(LAUNCH, name)], capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stderr


def test_local_multiprocess_dry_run_is_what_runs(fake_env, tmp_path):
  env, read_log = fake_env
  workdir = str(tmp_path / "w x")
  args = ["--port", "23456", "3", CONFIG, workdir, *USER_ARGS]
  dry = _script("local_multiprocess.sh", *args, env=env, dry_run=True)
  assert dry.returncode == 0, dry.stderr
  assert read_log() == []  # nothing ran
  lines = dry.stdout.splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    words = shlex.split(line)
    assert words[-4:] == [">", f"{workdir}.host{i}.log", "2>&1", "&"]
    assert words[:7] == ["env", "BIGVL_MULTIHOST=1", "JAX_PLATFORMS=cpu",
                         "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo",
                         "JAX_COORDINATOR_ADDRESS=127.0.0.1:23456", "JAX_NUM_PROCESSES=3",
                         f"JAX_PROCESS_ID={i}"]
    assert words[7:-4] == ["python", "-m", "bigvl.main", "--config", CONFIG, "--workdir",
                           workdir, *USER_ARGS]

  real = _script("local_multiprocess.sh", *args, env={**env, "FAKE_STATUS": "0"})
  assert real.returncode == 0, real.stderr
  runs = sorted(read_log(), key=lambda r: r["env"]["JAX_PROCESS_ID"])
  assert len(runs) == 3
  for i, (r, line) in enumerate(zip(runs, lines, strict=True)):
    words = shlex.split(line)
    assert r["argv"] == words[7:-4]
    assert r["env"] == dict(w.split("=", 1) for w in words[1:7])
    assert os.path.exists(f"{workdir}.host{i}.log")


def test_local_multiprocess_fails_when_one_process_fails(fake_env, tmp_path):
  env, _ = fake_env
  out = _script("local_multiprocess.sh", "2", CONFIG, str(tmp_path / "w"),
                env={**env, "FAKE_STATUS": "3"})
  assert out.returncode == 3


@pytest.mark.parametrize("args, message", [
    ([], "need N, CONFIG and WORKDIR"),
    (["0", CONFIG, "/w"], "N must be a positive integer"),
    (["--port"], "--port needs a value"),
    (["--frob", "2", CONFIG, "/w"], "unknown option --frob"),
])
def test_local_multiprocess_bad_args(fake_env, args, message):
  out = _script("local_multiprocess.sh", *args, env=fake_env[0])
  assert out.returncode == 2 and message in out.stderr and "usage:" in out.stderr


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_NNODES": "2",
         "SLURM_NTASKS": "4", "SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "4,5",
         "SLURM_SUBMIT_DIR": REPO}


def test_slurm_dry_run_is_what_runs(fake_env):
  env, read_log = fake_env
  env = {**env, **SLURM}
  dry = _script("slurm_gpu.sbatch", CONFIG, WORKDIR, *USER_ARGS, env=env, dry_run=True)
  assert dry.returncode == 0, dry.stderr
  assert read_log() == []
  lines = dry.stdout.splitlines()
  srun = shlex.split(lines[0])
  assert srun == ["srun", "--kill-on-bad-exit=1", "--label", "bash",
                  os.path.join(REPO, "launch", "slurm_gpu.sbatch"), "--task",
                  *MAIN[2:]]
  assert len(lines) == 5  # the srun line, then one line per task (2 nodes x 2 GPUs)
  want_env = []
  for t, line in enumerate(lines[1:]):
    head, _, cmd = line.partition(": ")
    assert head == f"# task {t} on gpu-a0{1 + t // 2}"
    words = shlex.split(cmd)
    task_env = dict(w.split("=", 1) for w in words[:6])
    assert task_env == {"BIGVL_MULTIHOST": "1", "JAX_COORDINATOR_ADDRESS": "gpu-a01:24242",
                        "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": str(t),
                        "CUDA_VISIBLE_DEVICES": "45"[t % 2], "JAX_LOCAL_DEVICE_IDS": "0"}
    assert words[6:] == ["python", *MAIN]
    want_env.append(task_env)

  real = _script("slurm_gpu.sbatch", CONFIG, WORKDIR, *USER_ARGS, env=env)
  assert real.returncode == 0, real.stderr
  log = read_log()
  assert log[0]["argv"] == srun
  tasks = log[1:]
  assert [r["argv"] for r in tasks] == [["python", *MAIN]] * 4
  assert [r["env"] for r in tasks] == want_env
  assert {r["cwd"] for r in tasks} == {REPO}  # relative config paths resolve


def test_slurm_one_gpu_bound_per_task(fake_env):
  """With --gpus-per-task SLURM gives each task one GPU: that one is kept."""
  env = {**fake_env[0], **SLURM, "CUDA_VISIBLE_DEVICES": "7"}
  dry = _script("slurm_gpu.sbatch", CONFIG, WORKDIR, env=env, dry_run=True)
  assert dry.returncode == 0, dry.stderr
  assert all("CUDA_VISIBLE_DEVICES=7 " in line for line in dry.stdout.splitlines()[1:])


@pytest.mark.parametrize("change, message", [
    ({"SLURM_JOB_ID": None}, "SLURM_JOB_ID is not set"),
    ({"SLURM_GPUS_ON_NODE": "8"}, "one task per GPU"),
    ({"SLURM_NTASKS": "3"}, "not a multiple of SLURM_NNODES"),
    ({"SLURM_NNODES": "1", "SLURM_NTASKS": "2"}, "has 2 hosts, SLURM_NNODES=1"),
])
def test_slurm_bad_allocation(fake_env, change, message):
  env = {**fake_env[0], **SLURM, **change}
  env = {k: v for k, v in env.items() if v is not None}
  out = _script("slurm_gpu.sbatch", CONFIG, WORKDIR, env=env, dry_run=True)
  assert out.returncode == 2 and message in out.stderr, out.stderr


def _remote(cmd):
  """The ``--command=`` of a gcloud ssh argv."""
  return next(a.split("=", 1)[1] for a in cmd if a.startswith("--command="))


TPU = ["--zone", "us-central2-b", "--accelerator-type", "v4-32", "--project", "p1"]


@pytest.mark.parametrize("queued", [False, True])
def test_tpu_vm_dry_run_is_what_runs(fake_env, queued):
  env, read_log = fake_env
  opts = [*TPU, "--delete", *(["--queued", "--spot"] if queued else [])]
  args = ["run", *opts, "my-tpu", CONFIG, WORKDIR, *USER_ARGS]
  dry = _script("tpu_vm.sh", *args, env=env, dry_run=True)
  assert dry.returncode == 0, dry.stderr
  assert read_log() == []
  cmds = _commands(dry.stdout)
  where = ["--zone=us-central2-b", "--project=p1"]
  tpus = ["gcloud", "compute", "tpus"]
  if queued:
    create = [[*tpus, "queued-resources", "create", "my-tpu", "--node-id=my-tpu", *where,
               "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot"],
              [*tpus, "queued-resources", "describe", "my-tpu", *where,
               "--format=value(state.state)"]]
    delete = [*tpus, "queued-resources", "delete", "my-tpu", *where, "--force", "--quiet"]
  else:
    create = [[*tpus, "tpu-vm", "create", "my-tpu", *where, "--accelerator-type=v4-32",
               "--version=tpu-ubuntu2204-base"]]
    delete = [*tpus, "tpu-vm", "delete", "my-tpu", *where, "--quiet"]
  n = len(create)
  assert cmds[:n] == create
  assert cmds[n] == [*tpus, "tpu-vm", "describe", "my-tpu", *where, "--format=value(state)"]
  assert cmds[n + 1][:2] == ["tar", "-czf"] and cmds[n + 1][-3:] == ["-C", REPO, "."]
  scp, install, start, stream = cmds[n + 2:n + 6]
  assert scp[:5] + scp[-1:] == [*tpus, "tpu-vm", "scp", "--worker=all"]
  for ssh in (install, start):
    assert ssh[:6] == [*tpus, "tpu-vm", "ssh", "my-tpu"] and "--worker=all" in ssh
  assert "pip install -q -e \".[tpu]\"" in _remote(install)
  # The run: BIGVL_MULTIHOST=1 and the user's words, exactly, on every worker.
  remote = _remote(start)
  head, _, tail = remote.partition("BIGVL_MULTIHOST=1 ")
  assert tail, remote
  main_cmd = tail.partition(" > ~/bigvl.log")[0]
  assert shlex.split(main_cmd) == ["python3", *MAIN]
  assert "--worker=0" in stream and "tail" in _remote(stream)
  assert cmds[n + 6:] == [delete]

  # For real: the same commands in the same order; the remote run (as one worker's bash)
  # starts bigvl.main with those words and BIGVL_MULTIHOST=1, and its exit status comes back
  # through the log stream.
  real = _script("tpu_vm.sh", *args, env={**env, "FAKE_STATUS": "3"})
  assert real.returncode == 3, real.stderr
  log = read_log()
  main_runs = [r for r in log if r["argv"][:3] == ["python3", "-m", "bigvl.main"]]
  assert [r["argv"][1:] for r in main_runs] == [MAIN]
  assert main_runs[0]["env"]["BIGVL_MULTIHOST"] == "1"
  assert main_runs[0]["cwd"] == os.path.join(env["FAKE_HOME"], "bigvl")
  ran = [r["argv"] for r in log if r["argv"][0] == "gcloud" or r["argv"][:2] == ["tar", "-czf"]]
  assert ran == cmds
  assert [r["argv"] for r in log if r["argv"][:2] == ["tar", "-xzf"]] == [  # on the worker
      ["tar", "-xzf", "/tmp/bigvl-src.tgz", "-C", os.path.join(env["FAKE_HOME"], "bigvl")]]


def test_tpu_vm_no_create_and_delete_subcommand(fake_env):
  env = fake_env[0]
  dry = _script("tpu_vm.sh", "run", "--zone", "z", "--no-create", "t", CONFIG, WORKDIR,
                env=env, dry_run=True)
  assert dry.returncode == 0, dry.stderr
  cmds = _commands(dry.stdout)
  assert not any("create" in c for c in cmds)
  assert not any("delete" in c for c in cmds)  # only on request
  for args, want in [(["delete", "--zone", "z", "t"], "tpu-vm delete t --zone=z --quiet"),
                     (["delete", "--zone", "z", "--queued", "t"],
                      "queued-resources delete t --zone=z --force --quiet")]:
    out = _script("tpu_vm.sh", *args, env=env, dry_run=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"gcloud compute tpus {want}\n"


@pytest.mark.parametrize("args, message", [
    ([], "need a command"),
    (["frob"], "unknown command 'frob'"),
    (["run", "t", CONFIG, WORKDIR], "--zone is required"),
    (["run", "--zone", "z", "t", CONFIG, WORKDIR], "--accelerator-type is required"),
    (["run", "--zone", "z", "--accelerator-type", "v4-8", "t", CONFIG], "needs NAME, CONFIG"),
    (["run", "--zone", "z", "--no-create", "--spot", "t", CONFIG, WORKDIR], "do not apply"),
    (["run", "--zone"], "--zone needs a value"),
    (["delete", "--zone", "z", "--delete", "t"], "unknown option --delete for 'delete'"),
    (["delete", "--zone", "z", "t", "extra"], "unexpected arguments"),
])
def test_tpu_vm_bad_args(fake_env, args, message):
  out = _script("tpu_vm.sh", *args, env=fake_env[0])
  assert out.returncode == 2 and message in out.stderr and "usage:" in out.stderr, out.stderr
  assert fake_env[1]() == []
