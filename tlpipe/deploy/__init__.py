"""Models leaving the pipeline: ONNX export and prediction on new images.

`export` writes a model as a sealed ONNX file and checks onnxruntime against PyTorch;
`onnx_model` verifies and runs such a file without torch; `predict` is `tlpipe predict` (head,
fine-tuned model or an ONNX file). Imports the core, `ingest` and `nets`.
"""
