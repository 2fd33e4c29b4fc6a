"""Epoch checkpoints that let a killed fine-tuning run resume where it stopped.

They live beside, not inside, the stage's declared outputs: DVC deletes declared outputs before it
runs a stage, and `persist: true` (which would keep them) disables the stage's run-cache. Each run
gets a folder named by a hash of everything its result depends on, so a run resumes only from its
own epochs, never from another run's. The folder is written whole and renamed into place each
epoch (a kill leaves the previous epoch intact) and removed once the stage's outputs are written.
Tensors go to safetensors and the rest to JSON: nothing is unpickled on resume. A checkpoint that
cannot be read (damaged, or holding non-finite values) is dropped with a warning: the run starts
over, as it would have without one.

Stale folders: the finetune stage removes other runs' checkpoints when it starts, and every stage
(tlpipe.runtime.prune_finished_checkpoint) removes the checkpoint of the run whose outputs are in the workspace
(models/finetuned.json records its key): after its outputs were restored from DVC's run-cache, a
checkpoint left by an interrupted attempt of the same run can never be used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tlpipe.io import atomic_dir, check_finite, read_json, sha256_file, write_json, writing
from tlpipe.paths import DECODED, FEATURES, MANIFEST, RESUME


def run_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def finetune_run_key(settings: dict, device: str) -> str:
    """The key of a fine-tuning run: its params (`settings`), device, code and inputs. A run resumes
    only from a checkpoint with exactly these (its results would differ else)."""
    code = [Path("stages/finetune.py"), *sorted(Path("tlpipe").rglob("*.py"))]
    return run_key({"params": settings, "device": device, "inputs": {str(p): sha256_file(p) for p in [
        *code, MANIFEST, DECODED / "meta.json", FEATURES / "train.safetensors"]}})


def optimizer_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as (tensors by name, JSON-able rest)."""
    tensors, rest = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        rest["state"][str(pid)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value
                rest["state"][str(pid)][name] = {"tensor": f"{pid}.{name}"}
            else:
                rest["state"][str(pid)][name] = {"value": value}
    return tensors, rest


def optimizer_from_flat(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state = {int(pid): {name: tensors[v["tensor"]] if "tensor" in v else v["value"]
                        for name, v in entries.items()}
             for pid, entries in rest["state"].items()}
    return {"state": state, "param_groups": rest["param_groups"]}


class EpochCheckpoint:
    """The state after the last finished epoch: named tensor groups plus a JSON record."""

    def __init__(self, key: str, root: Path = RESUME):
        self.root, self.folder = root, root / key

    def save(self, groups: dict[str, dict[str, torch.Tensor]], record: dict) -> None:
        tensors = {f"{group}/{name}": t.detach().cpu().contiguous()
                   for group, named in groups.items() for name, t in named.items()}
        with atomic_dir(self.folder) as tmp:
            with writing(self.folder / "tensors.safetensors", tmp / "tensors.safetensors"):
                save_file(tensors, str(tmp / "tensors.safetensors"))
            write_json(tmp / "state.json", record)

    def load(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict] | None:
        if not (self.folder / "state.json").is_file():
            return None
        try:
            record = read_json(self.folder / "state.json")
            tensors = load_file(str(self.folder / "tensors.safetensors"))
            check_finite(self.folder / "tensors.safetensors", tensors)
            groups: dict[str, dict[str, torch.Tensor]] = {}
            for key, tensor in tensors.items():
                group, name = key.split("/", 1)
                groups.setdefault(group, {})[name] = tensor
            if not isinstance(record, dict) or "epoch" not in record or "model" not in groups:
                raise ValueError("incomplete")
        except Exception as e:  # any damage means the same: no usable checkpoint
            print(f"warning: ignoring the unreadable checkpoint {self.folder} ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); starting over")
            self.remove()
            return None
        return groups, record

    def remove_others(self) -> None:
        """Checkpoints of other runs (other params or inputs) can never be resumed by this one. A
        folder whose name extends this one's key (a recipe search's) belongs to this run."""
        if self.root.is_dir():
            for other in self.root.iterdir():
                if not other.name.startswith(self.folder.name):
                    shutil.rmtree(other, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()

