"""export: from a checkpoint to a deployable file, checked before it is published.

Owns the exporters (``artifact``: an ONNX model by torch's dynamo or TorchScript-based exporter, or a
torch.export program; the check of an export against the PyTorch model and its tolerance), what an
export is made from (``source``: the checkpoint's model, class names, validation input side and the
images it is checked on), writing one (``publish``: checked, then written atomically) and running an
exported ONNX file as a classifier from its metadata alone (``runtime``).

May import: the top-level shared modules, launch/, data/ (the validation transform and
normalisation, the images to check on) and checkpoint/ (reading files, loading weights). Never
training/: an export needs a model and its weights, not a run. onnx, onnxruntime and onnxscript are
optional (the ``export`` extra) and imported only when a command asks for them.
"""
