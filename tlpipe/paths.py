"""Where every artifact lives, relative to the project root.

One module, so that the stage that writes a file and every stage or tool that reads it name the
same path; dvc.yaml lists the same paths as outs and deps.
"""

from pathlib import Path

PREPARED = Path("data/prepared")            # data: manifest.csv, source.json, classes.json, skipped.csv (images/: digits only)
MANIFEST = PREPARED / "manifest.csv"
CLASSES = PREPARED / "classes.json"
DOWNLOADS = Path("data/downloads")          # data (url source): archives and their extraction
DECODED = Path("data/decoded")              # decode: uint8 shards + meta.json
STATS = Path("data/stats.json")             # stats
FEATURES = Path("data/features")            # features: {split}.safetensors, layers-{split}.safetensors, meta.json
WEIGHTS = Path("weights")                   # backbone.weights files of the project (a features dep)
PREDICTIONS = Path("data/predictions")      # infer: the fine-tuned model's outputs on val and test
FINETUNED_TEST = PREDICTIONS / "finetuned_test.safetensors"
FINETUNED_VAL = PREDICTIONS / "finetuned_val.safetensors"  # its temperature's fit
PREDICTIONS_META = PREDICTIONS / "meta.json"  # both files' sha256, which evaluate checks
DUPLICATES = PREPARED / "duplicates.csv"     # data: exact (sha256) copies
HEAD_HELDOUT = Path("data/head_heldout.safetensors")  # head: its logits on images it was not fitted on (out-of-fold, or val)

MODELS = Path("models")
HEAD = MODELS / "head.safetensors"          # head
HEAD_CONFIG = MODELS / "head.json"
FINETUNED = MODELS / "finetuned.safetensors"  # finetune
FINETUNED_CONFIG = MODELS / "finetuned.json"
FINETUNED_CALIBRATION = MODELS / "finetuned_calibration.json"  # infer: temperature fitted on val
RESUME = MODELS / ".resume"                 # finetune's per-epoch checkpoint (not an output)
HEAD_ONNX = MODELS / "head.onnx"            # export_head
FINETUNED_ONNX = MODELS / "finetuned.onnx"  # export_finetuned

METRICS = Path("metrics")
DATA_METRICS = METRICS / "data.json"
FEATURES_METRICS = METRICS / "features.json"
HEAD_METRICS = METRICS / "head.json"
HEAD_GRID = METRICS / "head_grid.csv"
HEAD_LAYERS = METRICS / "head_layers.csv"   # head: the CV curve of every layer set tried (head.layers)
HEAD_LAYERS_PLOT = METRICS / "head_layers.png"
SUSPECTS = METRICS / "suspect_labels.csv"   # head: train/val images whose label looks wrong
SUSPECTS_GALLERY = METRICS / "suspect_labels.png"
FINETUNE_METRICS = METRICS / "finetune.json"
FINETUNE_CURVES = METRICS / "finetune_curves"
FINETUNE_CURVE_FILES = FINETUNE_CURVES / "plots" / "metrics"  # dvclive's per-epoch TSVs (train/loss.tsv, ...)
FINETUNE_SEARCH_PLOT = METRICS / "finetune_search.csv"  # recipe auto: val loss per candidate and round
TEST_METRICS = METRICS / "test.json"
TEST_PER_CLASS = METRICS / "test_per_class.json"
TEST_PREDICTIONS = METRICS / "predictions"  # evaluate: {head,finetuned}.csv, per test image
GALLERY = METRICS / "gallery"               # evaluate: {head,finetuned}.png, misclassified test images
RELIABILITY = METRICS / "reliability.png"   # evaluate: reliability diagrams
TEST_DUPLICATES = METRICS / "duplicates.csv"  # evaluate: exact and near copies, label conflicts
SCRATCH_METRICS = METRICS / "scratch.json"
EXPORT_HEAD_METRICS = METRICS / "export_head.json"
EXPORT_FINETUNED_METRICS = METRICS / "export_finetuned.json"
