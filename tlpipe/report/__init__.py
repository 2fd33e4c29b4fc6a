"""What a run tells its user: test metrics, galleries, the leaderboard and the summary.

`metrics` computes accuracy, intervals, McNemar's test and per-class scores; `test_scores` reads the
fine-tuned model's test logits and writes and prints what the evaluate stage finds; `gallery` draws image
galleries (misclassified test images, suspect labels); `head_report` writes the head stage's
suspect labels and layer-set curves; `compare` is `tlpipe compare` (the experiments leaderboard);
`summary` is `tlpipe summary`. Imports the core and `ingest`.
"""
