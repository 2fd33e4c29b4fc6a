"""Images in: where the data comes from and how it is checked, decoded and summarised.

`sources` lists a data source (folder, pre-split folders, CSV, archive URL, the built-in digits)
and splits it; `pixels` decodes and verifies image bytes without torch (the data stage's only
reader); `images` turns them into tensors at the pipeline's geometry; `decoded` writes and reads
the decode stage's uint8 shards; `moments` streams per-channel mean and std; `screening` is the data
stage's check of every file, its skips and byte-identical copies; `audit` finds suspect labels,
near-duplicates and small val splits from the features. Imports the core only.
"""
