"""Sharing artifacts (issue 5): push features and models once, and a fresh clone recomputes nothing.

Real `git` (clones of a bare repository), real `dvc`, a local directory remote, and a real
S3-compatible server (moto in server mode on 127.0.0.1) used through DVC's own S3 support.
"""

import hashlib
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import STAGES, copy_project, dvc, tool_env
from tlpipe.tools.scaffold import GIT_IDENTITY

pytestmark = pytest.mark.slow  # a cold repro, pushes and fresh clones

UP_TO_DATE = "Data and pipelines are up to date"
BUCKET = "tlpipe-share"
S3_KEYS = {"access_key_id": "testing", "secret_access_key": "testing"}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *GIT_IDENTITY, *args], cwd=cwd, env=tool_env(), check=True,
                          capture_output=True, text=True).stdout


def digests(repo: Path) -> dict[str, str]:
    """sha256 of every file DVC pushes: data/prepared, data/stats.json, data/features, models (not the
    ONNX files: `push: false`, re-exported on the teammate's machine)."""
    files = [repo / "data" / "stats.json",
             *(p for d in ("data/prepared", "data/features", "models")
               for p in (repo / d).rglob("*") if p.is_file() and p.suffix != ".onnx")]
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, cold_project):
    """The owner: a copy of the cold tiny project (conftest), local remote set, git push to a bare
    repo, `dvc push`."""
    root = tmp_path_factory.mktemp("sharing")
    assert cold_project.executed == STAGES
    owner = copy_project(cold_project.path, root / "owner")
    assert git(owner, "status", "--porcelain") == ""  # outputs are DVC's or ignored; results committed
    assert {"dvc.lock", "metrics/test.json", "data/.gitignore"} <= set(git(owner, "ls-files").split())
    origin = root / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    dvc(owner, "remote", "add", "-d", "storage", str(root / "storage"))
    git(owner, "commit", "-qam", "local remote")
    git(owner, "remote", "add", "origin", str(origin))
    git(owner, "push", "-q", "-u", "origin", "main")
    dvc(owner, "push", "--run-cache")
    return SimpleNamespace(owner=owner, origin=origin, storage=root / "storage",
                           digests=digests(owner))


def clone(shared, dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(shared.origin), str(dest)], check=True,
                   env=tool_env(), capture_output=True)
    return dest


# --- local directory remote ----------------------------------------------------------------------

def test_teammate_pulls_and_recomputes_nothing(shared, tmp_path):
    mate = clone(shared, tmp_path / "mate")
    assert not (mate / "data" / "features").exists()
    # A plain `dvc pull` exits 1 on outputs never pushed (the ONNX files, push: false) after pulling
    # the rest; --allow-missing is the documented way (docs/sharing.md).
    assert dvc(mate, "pull", check=False).returncode == 1
    dvc(mate, "pull", "--allow-missing")
    assert digests(mate) == shared.digests
    assert not (mate / "models" / "head.onnx").exists()
    assert dvc(mate, "repro").executed == ["export_head", "export_finetuned"]  # seconds, not 27 MB
    assert (mate / "models" / "head.onnx").read_bytes() == (shared.owner / "models" / "head.onnx").read_bytes()
    assert UP_TO_DATE in dvc(mate, "status").stdout

    # A head change reruns head, its export and evaluate only; the pulled features and fine-tuned
    # model (and its ONNX file) are used as they are, in a clone that never computed them.
    result = dvc(mate, "exp", "run", "-S", "head.l2_steps=3")
    assert result.executed == ["head", "export_head", "evaluate"]
    assert "Stage 'features' didn't change, skipping" in result.stdout


def test_repro_pull_allow_missing_in_a_fresh_clone_runs_nothing(shared, tmp_path):
    mate = clone(shared, tmp_path / "mate")
    result = dvc(mate, "repro", "--pull", "--allow-missing")
    assert result.executed == []
    assert UP_TO_DATE in result.stdout
    # DVC's semantics: with --allow-missing, stages that are unchanged but whose outputs are
    # missing are skipped *without* pulling; it checks that nothing is stale, it downloads nothing.
    assert not (mate / "models" / "finetuned.safetensors").exists()
    dvc(mate, "pull", "--allow-missing")
    assert digests(mate) == shared.digests


def test_run_cache_restores_features_in_a_fresh_clone(shared, tmp_path):
    # Owner: an experiment that changes the features, run aside (--temp leaves the workspace
    # alone), shared with its outputs and the run-cache. Only up to `head`: that is enough to show
    # the expensive stage (features) restored from the run-cache.
    exp = ["-S", "backbone.normalize=dataset", "-S", "head.l2_steps=3", "head"]
    ran = dvc(shared.owner, "exp", "run", "--temp", "-n", "owner-exp", *exp)
    assert ran.executed == ["features", "head"]
    dvc(shared.owner, "exp", "push", "origin", "owner-exp", "--run-cache")
    runs = [p.read_text().partition("\n")[0] for p in (shared.storage / "runs").rglob("*")
            if p.is_file()]
    assert sorted(runs) == sorted(f"cmd: python -m stages.{s}" for s in
                                  ("data", "decode", "stats", "features", "head", "finetune", "infer",
                                   "export_head", "export_finetuned", "evaluate", "scratch", "features", "head"))

    # Teammate: fresh clone, run-cache pulled, the same params combination run again.
    mate = clone(shared, tmp_path / "mate")
    dvc(mate, "pull", "--run-cache", "--allow-missing")  # the ONNX files are push: false
    result = dvc(mate, "exp", "run", "--pull", *exp)
    assert "Stage 'features' is cached - skipping run, checking out outputs" in result.stdout
    assert "features" not in result.executed
    meta = (mate / "data" / "features" / "meta.json").read_text()
    assert '"normalize": "dataset"' in meta  # the experiment's features, not the baseline's

    # `head` is NOT restored although its run-cache entry was pulled: the entry lists its metrics
    # (metrics/head.json, metrics/head_grid.csv), which are `cache: false` (kept in git), and
    # DVC never pushes `cache: false` files, so the entry cannot be completed on another machine.
    assert result.executed == ["head"]
    assert "metrics/head.json" in result.stderr


# --- S3 (moto server) ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 in server mode, a real HTTP endpoint on 127.0.0.1, with one bucket."""
    pytest.importorskip("moto", reason="moto[server] not installed (pip install -e '.[test]')")
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.skip(f"the moto S3 server did not start on {endpoint}: {log.read_text()[-500:]}")
            time.sleep(0.2)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=S3_KEYS["access_key_id"],
                          aws_secret_access_key=S3_KEYS["secret_access_key"])
    client.create_bucket(Bucket=BUCKET)
    yield SimpleNamespace(endpoint=endpoint, port=port, client=client)
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def configure_s3(repo: Path, endpoint: str) -> None:
    """Machine-specific remote settings go to .dvc/config.local, never into git."""
    dvc(repo, "remote", "modify", "--local", "s3", "endpointurl", endpoint)
    for key, value in S3_KEYS.items():
        dvc(repo, "remote", "modify", "--local", "s3", key, value)


@pytest.fixture(scope="module")
def s3_shared(shared, s3_server):
    """The owner adds the S3 remote (its URL in git, endpoint and keys local) and pushes to it."""
    dvc(shared.owner, "remote", "add", "s3", f"s3://{BUCKET}/tlpipe")
    configure_s3(shared.owner, s3_server.endpoint)
    assert "testing" not in (shared.owner / ".dvc" / "config").read_text()
    git(shared.owner, "add", ".dvc/config")
    git(shared.owner, "commit", "-qm", "S3 remote")
    git(shared.owner, "push", "-q", "origin", "main")
    dvc(shared.owner, "push", "-r", "s3", "--run-cache")  # the outputs and the run-cache
    return shared


def test_s3_remote_push_and_pull_recomputes_nothing(s3_shared, s3_server, tmp_path):
    keys = [o["Key"] for page in s3_server.client.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix="tlpipe/") for o in page.get("Contents", [])]
    assert any(k.startswith("tlpipe/files/md5/") for k in keys)
    assert any(k.startswith("tlpipe/runs/") for k in keys)

    mate = clone(s3_shared, tmp_path / "mate")
    configure_s3(mate, s3_server.endpoint)
    dvc(mate, "pull", "-r", "s3", "--run-cache", "--allow-missing")
    assert digests(mate) == s3_shared.digests
    assert dvc(mate, "repro").executed == ["export_head", "export_finetuned"]  # the ONNX files: push: false
    assert UP_TO_DATE in dvc(mate, "status").stdout


class Link:
    """A TCP relay between DVC and the S3 server that can be cut like a network outage.

    With a byte budget, it forwards the server's responses until that many bytes have gone
    through, then closes every open connection mid-stream and refuses new ones until `restore()`.
    The S3 server and its data are untouched; only the network path is interrupted.
    """

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.budget, self.forwarded, self.cut = None, 0, False
        self.sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src, dst, from_server):
        try:
            while data := src.recv(65536):
                if from_server:
                    with self.lock:
                        self.forwarded += len(data)
                        over = self.budget is not None and self.forwarded > self.budget
                    if over:
                        self.cut_now()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut_now(self):
        with self.lock:
            self.cut, sockets = True, list(self.sockets)
            self.sockets.clear()
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self):
        with self.lock:
            self.budget, self.cut = None, False

    def close(self):
        self.listener.close()
        self.cut_now()


def test_interrupted_s3_pull_completes_on_the_next_pull(s3_shared, s3_server, tmp_path):
    objects = [o["Key"] for page in s3_server.client.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix="tlpipe/files/") for o in page.get("Contents", [])]
    largest = max(p.stat().st_size for p in (s3_shared.owner / "models").iterdir() if p.suffix != ".onnx")
    link = Link(s3_server.port)
    try:
        mate = clone(s3_shared, tmp_path / "mate")
        configure_s3(mate, f"http://127.0.0.1:{link.port}")
        # What is interrupted: the network between DVC and S3, in the middle of the download,
        # once a third of the largest file's size (the fine-tuned model) has come through: every
        # open connection is closed mid-response and new ones are refused. AWS_MAX_ATTEMPTS=1
        # only spares the test botocore's retries against the dead link (~20 s of backoff).
        link.budget = largest // 3
        failed = dvc(mate, "pull", "-r", "s3", check=False, AWS_MAX_ATTEMPTS="1")
        assert link.cut and link.forwarded > link.budget
        assert failed.returncode != 0
        assert "failed to pull data from the cloud" in failed.stderr
        assert not (mate / "models" / "finetuned.safetensors").exists()
        assert UP_TO_DATE not in dvc(mate, "status").stdout

        link.restore()
        resumed = dvc(mate, "pull", "-r", "s3", "--allow-missing")
        # What the first pull completed stays in the cache: only the rest is downloaded again.
        fetched = re.search(r"(\d+) files? fetched", resumed.stdout)
        assert fetched and 0 < int(fetched.group(1)) < len(objects)
        assert digests(mate) == s3_shared.digests
        assert dvc(mate, "repro").executed == ["export_head", "export_finetuned"]
        assert UP_TO_DATE in dvc(mate, "status").stdout
    finally:
        link.close()
