"""The networks: pretrained backbones and what is built on their features.

`backbones` is the one table of backbones (how each is built, where its weights come from, its
blocks and intermediate layers); `features` reads and writes the cached feature files and their
metadata (the features' provenance); `layers` chooses which intermediate layers the head reads;
`extraction` taps the backbone and records what the features stage computed;
`linear` fits the head (multinomial logistic regression, L2 by cross-validation); `head_search` is
the head stage's choice of layer set and L2; `models` joins backbone and head into one classifier
and saves it; `calibration` fits a temperature; `inference` runs a model over batches. Imports the
core and `ingest`.
"""
