"""finetune.recipe: auto (tlpipe.train.recipe_search): the budgeted successive-halving search, through real dvc.

The session's cold tiny project has 3 val images per class, below audit.MIN_VAL_PER_CLASS, where the
search must not choose: it is used for the fallback and the rerun rule. The search itself needs a
val of 20 per class, so one more small project (2 digit classes x 60 scans at 32 px, val 40 %) is
built once per session."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import GIT_IDENTITY, built_once, copy_project, dvc, read_json, tiny_params, tool_env
from tlpipe.train import recipe_search
from tlpipe.tools.scaffold import create_project

# 2 x the full run's 3 epochs: four candidates, rounds of 1 and 2 epochs (4 x 1 + 2 x 1 epochs); at
# batch 2 without warmup an epoch of the 60 training scans is 30 steps, above MIN_STEPS_PAST_WARMUP
BUDGET = 2


@pytest.mark.parametrize("n", range(1, 5))
@pytest.mark.parametrize("budget", [0, 1, 2, 3, 5, 6, 7, 12, 13, 40])
def test_plan_spends_at_most_its_budget(n, budget):
    k, rungs, spent = recipe_search.plan(n, budget)
    assert spent <= budget and 1 <= k <= n
    assert (rungs == []) == (k == 1)
    if rungs:  # spent is what the rounds train: each round's survivors, up to its epochs
        alive, done, total = k, 0, 0
        for epochs in rungs:
            total, done, alive = total + alive * (epochs - done), epochs, -(-alive // 2)
        assert total == spent and alive == 1
    assert recipe_search.plan(4, 6) == (4, [1, 2], 6) and recipe_search.plan(4, 12) == (4, [2, 4], 12)


@pytest.mark.parametrize("steps", [1, 9, 44, 200])
@pytest.mark.parametrize("budget", [3, 6, 12, 24])
def test_plan_gives_every_candidate_real_steps_past_the_warmup_within_its_budget(steps, budget):
    """The first round is judged after MIN_STEPS_PAST_WARMUP steps at the full schedule's shape (its
    warmup shrunk to the search's length), or there is no search."""
    share, least = 1 / 12, recipe_search.MIN_STEPS_PAST_WARMUP
    k, rungs, spent = recipe_search.plan(4, budget, steps, share, least)
    assert spent <= budget and (rungs == []) == (k == 1)
    if rungs:
        assert recipe_search.steps_past_warmup(rungs, steps, share) >= least
    # the measured sets, at scaffold's 12 epochs and budget 0.5 (6 epochs): sign-digits' 44 steps an
    # epoch keep the whole family (rounds of 1 and 2 epochs); the 31-per-class cut's 9 steps afford two
    # candidates for 3 epochs (27 steps, 25 past a 2-step warmup) instead of four inside the warmup
    assert recipe_search.plan(4, 6, 44, share, least) == (4, [1, 2], 6)
    assert recipe_search.plan(4, 6, 9, share, least) == (2, [3], 6)


def test_a_signal_within_its_noise_of_the_threshold_is_undecided():
    family = list(recipe_search.BOLDNESS)
    timid, bold = family, family[::-1]
    # hymenoptera's two seeds (206 training photos): both inside the 95 % interval of 0.95
    for acc in (0.942, 0.962):
        order, why = recipe_search.prior(family, {"probe_cv_accuracy": acc, "train_images": 206})
        assert order == timid and "undecided" in why
    assert recipe_search.prior(family, {"probe_cv_accuracy": 0.825, "train_images": 308})[0] == bold
    assert recipe_search.prior(family, {"probe_cv_accuracy": 0.99, "train_images": 5000})[0] == timid
    assert "undecided" not in recipe_search.prior(family, {"probe_cv_accuracy": 0.99, "train_images": 5000})[1]


def test_val_losses_within_a_paired_standard_error_tie_and_the_signals_order_decides():
    import torch

    gen = torch.Generator().manual_seed(0)
    base = torch.rand(310, generator=gen, dtype=torch.float64)
    noise = 0.05 * torch.randn(310, generator=gen, dtype=torch.float64)
    noise -= noise.mean()  # its standard error 0.05 / sqrt(310) = 0.003
    near = {"all": base, "all_decay": base + noise + 0.0004}  # sign-digits' 0.2815 vs 0.2819
    loss = {n: float(t.mean()) for n, t in near.items()}
    order = ["all_decay", "all"]
    ranked, tied, se = recipe_search.rank(["all", "all_decay"], loss, near, order)
    assert loss["all"] < loss["all_decay"] and ranked == order and sorted(tied) == sorted(order) and se > 0
    far = {"all": base, "all_decay": base + noise + 0.05}  # many standard errors apart: the loss decides
    loss = {n: float(t.mean()) for n, t in far.items()}
    ranked, tied, _ = recipe_search.rank(["all", "all_decay"], loss, far, order)
    assert ranked == ["all", "all_decay"] and tied == ["all"]


def write_two_digits(root: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in (3, 8):
        (root / f"class{label}").mkdir(parents=True)
        for i in np.flatnonzero(digits.target == label)[:60]:
            Image.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8), "L").save(
                root / f"class{label}" / f"{i:04d}.png")


@pytest.fixture(scope="session")
def search_project(tmp_path_factory) -> Path:
    """A project whose val can choose (24 images per class), run to finetune with recipe auto."""
    def build(root: Path) -> None:
        write_two_digits(root / "images")
        params = {**tiny_params(root / "images"), "data.val_fraction": 0.4, "data.test_fraction": 0.1,
                  "finetune.recipe": "auto", "finetune.search_budget": BUDGET, "finetune.epochs": 3,
                  "finetune.patience": 3, "finetune.batch_size": 2, "finetune.warmup_epochs": 0}
        project = create_project(root / "project", params)
        cold = dvc(project, "repro", "finetune")
        subprocess.run(["git", *GIT_IDENTITY, "add", "-A"], cwd=project, check=True, capture_output=True)
        subprocess.run(["git", *GIT_IDENTITY, "commit", "-qm", "searched"], cwd=project, check=True,
                       capture_output=True)
        (root / "cold.txt").write_text(cold.stdout)

    return built_once(tmp_path_factory, "search-project", build) / "project"


def result_of(repo: Path) -> dict:
    metrics = read_json(repo / "metrics" / "finetune.json")
    for wall in ("seconds", "final_run_seconds", "signals_seconds", "fraction_of_final_run"):  # wall times
        metrics["search"].pop(wall)
    return {"metrics": metrics, "plot": (repo / "metrics" / "finetune_search.csv").read_text(),
            "model": hashlib.sha256((repo / "models" / "finetuned.safetensors").read_bytes()).hexdigest()}


def search_state(repo: Path) -> dict:
    found = list((repo / "models" / ".resume").glob("*-search/state.json"))
    try:
        return json.loads(found[0].read_text()) if found else {}
    except (OSError, ValueError):  # caught mid-rename
        return {}


@pytest.mark.slow
def test_search_is_reported_within_budget_and_resumes_after_a_kill_with_the_same_result(search_project, tmp_path):
    cold = result_of(search_project)
    search = cold["metrics"]["search"]
    assert search["searched"] and search["budget"] == BUDGET and search["epochs_spent"] <= BUDGET * 3
    assert search["first_round_steps_past_warmup"] >= recipe_search.MIN_STEPS_PAST_WARMUP
    assert search["planned_fraction"] <= BUDGET
    assert read_json(search_project / "metrics" / "finetune.json")["search"]["fraction_of_final_run"] > 0
    # what each round trained adds up to what it spent: 4 candidates x 1 epoch, 2 survivors x 1 more
    assert sorted((r["round"], r["epochs"]) for r in search["rounds"]) == [(1, 1)] * 4 + [(2, 2)] * 2
    assert search["chosen"] in {r["candidate"] for r in search["rounds"] if r["round"] == 2}
    assert cold["metrics"]["beats_probe_on_val"] in (True, False)
    assert cold["plot"].splitlines()[0] == "epochs,probe,last_block,top_third,all,all_decay"
    assert f"recipe auto: {search['chosen']}" in (search_project.parent / "cold.txt").read_text()

    # patience 4 instead of 3: never reached in 3 epochs, so the same result, but a new run to kill
    repo = copy_project(search_project, tmp_path / "project", finetune__patience=4)
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "finetune"], cwd=repo,
                            env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 900  # a loaded machine: the kill must still land mid-search
    while len(search_state(repo).get("done", [])) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_in = search_state(repo)
    assert killed_in.get("round") == 0 and 2 <= len(killed_in["done"]) < 4, f"not killed mid-search: {killed_in}"

    resumed = dvc(repo, "repro", "finetune")
    assert resumed.executed == ["finetune"] and "search: resuming in round 1" in resumed.stdout
    assert not (repo / "models" / ".resume").exists()  # the search's state too, once the outputs exist
    # deterministic for the seed: the killed and resumed run ends where the cold one did
    assert result_of(repo) == cold


@pytest.mark.slow
def test_too_small_val_falls_back_and_search_budget_reruns_fine_tuning_and_what_follows(cold_copy):
    repo = cold_copy(finetune__recipe="auto")
    assert dvc(repo, "repro").executed == ["finetune", "infer", "export_finetuned", "evaluate"]
    search = read_json(repo / "metrics" / "finetune.json")["search"]
    assert not search["searched"] and search["epochs_spent"] == 0 and search["rounds"] == []
    assert search["reason"].startswith("val too small to choose") and search["chosen"] == search["order"][0]
    assert read_json(repo / "metrics" / "finetune.json")["beats_probe_on_val"] is None  # kept by schedule

    params = (repo / "params.yaml").read_text()
    assert "search_budget: 0.5" in params
    (repo / "params.yaml").write_text(params.replace("search_budget: 0.5", "search_budget: 0.25"))
    # finetune reruns, and what follows it at most; here (no search: val too small) the budget does
    # not change the model, so DVC stops where the outputs come out the same (evaluate's inputs did)
    executed = dvc(repo, "repro").executed
    assert executed[0] == "finetune" and set(executed) <= {"finetune", "infer", "export_finetuned", "evaluate"}
