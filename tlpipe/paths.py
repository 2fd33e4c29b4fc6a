"""Where every artifact lives, relative to the project root.

One module, so that the stage that writes a file and every stage or tool that reads it name the
same path; dvc.yaml lists the same paths as outs and deps.
"""

from pathlib import Path

PREPARED = Path("data/prepared")            # data: images/, manifest.csv, classes.json, skipped.csv
MANIFEST = PREPARED / "manifest.csv"
CLASSES = PREPARED / "classes.json"
DOWNLOADS = Path("data/downloads")          # data (url source): archives and their extraction
DECODED = Path("data/decoded")              # decode: uint8 shards + meta.json
STATS = Path("data/stats.json")             # stats
FEATURES = Path("data/features")            # features: {split}.safetensors + meta.json
FINETUNED_TEST = Path("data/predictions/finetuned_test.safetensors")  # infer

MODELS = Path("models")
HEAD = MODELS / "head.safetensors"          # head
HEAD_CONFIG = MODELS / "head.json"
FINETUNED = MODELS / "finetuned.safetensors"  # finetune
FINETUNED_CONFIG = MODELS / "finetuned.json"
RESUME = MODELS / ".resume"                 # finetune's per-epoch checkpoint (not an output)
HEAD_ONNX = MODELS / "head.onnx"            # export_head
FINETUNED_ONNX = MODELS / "finetuned.onnx"  # export_finetuned

METRICS = Path("metrics")
DATA_METRICS = METRICS / "data.json"
HEAD_METRICS = METRICS / "head.json"
HEAD_GRID = METRICS / "head_grid.csv"
FINETUNE_METRICS = METRICS / "finetune.json"
FINETUNE_CURVES = METRICS / "finetune_curves"
TEST_METRICS = METRICS / "test.json"
TEST_PER_CLASS = METRICS / "test_per_class.json"
TEST_PREDICTIONS = METRICS / "predictions"
GALLERY = METRICS / "gallery"
SCRATCH_METRICS = METRICS / "scratch.json"
EXPORT_HEAD_METRICS = METRICS / "export_head.json"
EXPORT_FINETUNED_METRICS = METRICS / "export_finetuned.json"
