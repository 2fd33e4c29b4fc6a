"""tlpipe: a reproducible transfer-learning pipeline, as DVC stages (stages/) over this package.

The modules at this level are the core every stage stands on, the contracts between stages:
`params` (the params.yaml schema, and which leaves a stage read), `paths` (where every artifact
lives), `io` (atomic writes, verified reads), `runtime` (environment knobs, stage plumbing),
`preprocessing` (the one record of how pixels become a model's input) and `manifest` (the data
stage's list of images). Editing one of them reruns every stage that imports it, most of them all.
The core imports nothing from the wings below it.

The wings, each a sub-package that imports the core and the wings listed before it, never one
after it (tests/test_architecture.py checks the arrows):
  ingest  images in: sources, decode checks, uint8 shards, channel moments, data audits
  nets    backbones, features, the linear head, classifiers, calibration, batched inference
  train   fine-tuning, its checkpoints, several processes, the from-scratch baseline, lr-find
  deploy  ONNX export and `tlpipe predict`
  report  metrics, galleries, the leaderboard, the run's summary
  tools   the `tlpipe` command and the project scaffold, which may import any wing
Which stage a module's edit reruns: its code deps in dvc.yaml (`make deps` writes them).
"""
