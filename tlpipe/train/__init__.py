"""Training whole networks: fine-tuning (LP-FT) and the from-scratch baseline.

`finetuning` holds the recipe (start model, optimizer, schedule, the epoch loop, early stopping);
`recipe_search` the budgeted search behind `finetune.recipe: auto`; `finetune_outputs` what the
finetune stage writes once its run is over; `checkpoints` the per-epoch state a killed run resumes
from; `distributed` the torchrun launch and process group (also used by the features stage);
`scratch` the small CNN trained from scratch; `lrfind` the learning-rate range test behind
`tlpipe lr-find`. Imports the core, `ingest` and `nets`.
"""
