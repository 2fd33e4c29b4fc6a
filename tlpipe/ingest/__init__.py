"""Images in: where the data comes from and how it is checked, decoded and summarised.

`sources` lists a data source (folder, pre-split folders, CSV, archive URL, the built-in digits)
and splits it; `pixels` decodes and verifies image bytes without torch (the data stage's only
reader); `images` turns them into tensors at the pipeline's geometry; `decoded` writes and reads
the decode stage's uint8 shards; `moments` streams per-channel mean and std; `audit` finds
duplicates and small val splits. Imports the core only.
"""
